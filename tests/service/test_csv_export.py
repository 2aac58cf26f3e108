"""The CSV downloads neutralise formula cells (issue 17, point 5): text a user wrote (a class name, a review note, a
latent's label, an image's name) that starts with =, +, -, @, a tab or a carriage return reaches the spreadsheet as
text behind a single quote (OWASP); numbers, negative ones too, stay numbers."""
import csv
import io

import pytest
from django.test import Client
from rest_framework.test import APIClient

from .results import build_result, stored_audit

pytestmark = pytest.mark.django_db

CLASS_NAME = "=cmd|' /C calc'!A0"
NOTE = '=HYPERLINK("http://x","y")'
# a latent's label for each start a spreadsheet reads as a formula
LABELS = {4: "+1+cmd|' /C calc'!A0", 5: "-2+3+cmd|' /C calc'!A0", 6: "@SUM(1+9)*cmd|' /C calc'!A0",
          7: "\t=1+1", 8: "\r=1+1", 9: "=1+1"}


@pytest.fixture
def hostile(project, users, registered):
    """A succeeded audit whose class name, latents' labels and image names start formulas, and whose flag a
    member reviewed with a formula for a note."""
    result = build_result()
    ruler = result["flags"][0]
    ruler["class_name"], ruler["expected_alignment"] = CLASS_NAME, -0.12
    template = result["latents"][0]
    result["latents"] += [{**template, "latent": i, "label": label, "label_alignment": -0.25,
                           "max_activation": -1e-05, "references": ["=evil.png", "ok.png"]}
                          for i, label in LABELS.items()]
    audit = stored_audit(project, users["member"], registered, result)
    flag = audit.flags.get(class_name=CLASS_NAME)
    member = APIClient()
    member.force_authenticate(users["member"])
    reviewed = member.post(f"/api/v1/audits/{audit.pk}/flags/{flag.pk}/reviews/",
                           {"verdict": "needs_work", "note": NOTE}, format="json")
    assert reviewed.status_code == 201
    return audit


def download(client, url: str) -> list[dict]:
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


@pytest.fixture(params=["api", "web"])
def fetch(request, users):
    """The same download through the API and through the web UI, as a viewer."""
    if request.param == "api":
        client = APIClient()
        client.force_authenticate(users["viewer"])
        return lambda audit, fmt: download(client, f"/api/v1/audits/{audit.pk}/download/{fmt}/")
    client = Client()
    client.force_login(users["viewer"])
    return lambda audit, fmt: download(client, f"/audits/{audit.pk}/download/{fmt}")


def test_the_flags_csv_writes_a_formula_class_name_and_review_note_as_text(hostile, fetch):
    ruler = next(r for r in fetch(hostile, "flags.csv") if r["head"] == "probe" and r["latent"] == "0")
    assert ruler["class_name"] == "'" + CLASS_NAME
    assert ruler["latest_note"] == "'" + NOTE
    assert (ruler["latest_verdict"], ruler["latest_reviewer"]) == ("needs_work", "member")
    assert ruler["expected_alignment"] == "-0.12"  # a negative number stays a number


def test_the_latents_csv_writes_every_formula_start_as_text_and_keeps_negative_numbers(hostile, fetch):
    rows = {int(r["latent"]): r for r in fetch(hostile, "latents.csv")}
    assert {i: rows[i]["label"] for i in LABELS} == {i: "'" + label for i, label in LABELS.items()}
    assert rows[4]["references"] == "'=evil.png ok.png"
    assert (rows[4]["label_alignment"], rows[4]["max_activation"]) == ("-0.25", "-1e-05")
    assert (rows[0]["label"], rows[0]["references"]) == ("a ruler", "")  # plain text is left as it is
