"""One list of fields per result row (audits/fields.py): the API, the JSON report, the CSVs and the pages show
what it declares, under its names; deprecated names still answer for one release."""
import csv
import io
import json
import re

import pytest
from django.test import Client

from audit_service.audits import report
from audit_service.audits.fields import FLAG_FIELDS, LATENT_FIELDS, Field, model_values
from audit_service.audits.models import Flag, Latent
from audit_service.audits.serializers import FlagSerializer, LatentSerializer

from .results import build_result, stored_audit

pytestmark = pytest.mark.django_db


@pytest.fixture
def audit(project, users, registered):
    result = build_result()
    for i, (latent, alignment) in enumerate(zip(result["latents"], (0.3, 0.1, 0.4, 0.2))):
        latent["label_alignment"] = alignment
        if i % 2:  # results stored before the rename named it "alignment": they still store
            latent["alignment"] = latent.pop("label_alignment")
    return stored_audit(project, users["member"], registered, result)


def _download(users, audit, fmt: str):
    browser = Client()
    browser.force_login(users["viewer"])
    response = browser.get(f"/audits/{audit.pk}/download/{fmt}")
    return b"".join(response.streaming_content) if response.streaming else response.content


def _csv_header(users, audit, fmt: str) -> list[str]:
    return next(csv.reader(io.StringIO(_download(users, audit, fmt).decode())))


def test_every_field_of_the_lists_is_in_the_api_the_json_report_and_the_csv(client_for, users, audit):
    api = client_for("viewer")
    report_json = json.loads(_download(users, audit, "json"))
    for fields, api_rows, json_rows, csv_name in (
            (FLAG_FIELDS, api.get(f"/api/v1/audits/{audit.pk}/flags/").json()["results"], report_json["flags"],
             "flags.csv"),
            (LATENT_FIELDS, api.get(f"/api/v1/audits/{audit.pk}/latents/").json()["results"],
             report_json["latents"], "latents.csv")):
        header = _csv_header(users, audit, csv_name)
        for field in fields:
            if field.api:
                assert field.name in api_rows[0] and field.name in json_rows[0], field.name
            assert set(field.csv_columns) <= set(header), field.name
        assert header == [c for f in fields for c in f.csv_columns]  # nothing else, in the list's order


def test_the_serializers_show_the_list_and_the_deprecated_names_only():
    for serializer, fields, bookkeeping in ((FlagSerializer(), FLAG_FIELDS, {"id", "audit", "corrections"}),
                                            (LatentSerializer(), LATENT_FIELDS, set())):
        assert set(serializer.fields) == (bookkeeping | {f.name for f in fields if f.api}
                                          | {old for f in fields for old in f.aliases})
        assert all(f.read_only for f in serializer.fields.values())


def test_every_model_field_of_a_flag_and_a_latent_is_stored_from_the_list():
    result = build_result()
    for model, fields, row in ((Flag, FLAG_FIELDS, result["flags"][0]), (Latent, LATENT_FIELDS, result["latents"][0])):
        stored = {f.name for f in model._meta.concrete_fields} - {"id", "audit"}
        assert set(model_values(fields, row)) == stored, model


def test_a_field_added_to_the_list_reaches_the_json_report_the_csv_and_the_cards(users, audit, monkeypatch):
    doubled = Field("doubled_share", None, lambda f: 2 * f.share, lambda f: [f"{2 * f.share:.2f}"],
                    title="twice the share")
    monkeypatch.setattr(report, "FLAG_FIELDS", (*FLAG_FIELDS, doubled))
    flags = json.loads(_download(users, audit, "json"))["flags"]
    assert {f["doubled_share"] for f in flags} == {0.8}
    rows = list(csv.DictReader(io.StringIO(_download(users, audit, "flags.csv").decode())))
    assert {r["doubled_share"] for r in rows} == {"0.80"}
    assert _csv_header(users, audit, "flags.csv")[-1] == "doubled_share"  # new columns go at the end
    cards = [card for c in report.report_context(audit, images=False)["classes"] for card in c["cards"]]
    assert {n["title"]: n["value"] for n in cards[0]["numbers"]}["twice the share"] == pytest.approx(0.8)


def test_the_report_card_shows_the_lists_numbers_with_the_flags_class(client_for, audit):
    browser = Client()
    browser.force_login(audit.created_by)
    html = browser.get(f"/audits/{audit.pk}/report/").content.decode()
    flag = audit.flags.get(head="probe", class_name="melanoma")
    card = html[html.index(f'id="flag-{flag.pk}"'):]
    assert "share (probe) <b>0.400</b>" in card and "alignment with label <b>0.300</b>" in card
    assert "with “melanoma” concepts <b>-0.100</b>" in card


def test_old_api_names_answer_for_one_release(client_for, audit):
    api = client_for("viewer")
    flag = api.get(f"/api/v1/audits/{audit.pk}/flags/", {"head": "probe", "class_name": "melanoma"}).json()
    flag = flag["results"][0]
    assert flag["latent"] == flag["latent_index"] == 0
    latent = api.get(f"/api/v1/audits/{audit.pk}/latents/3/").json()
    assert latent["latent"] == latent["index"] == 3
    assert latent["label_alignment"] == latent["alignment"] == 0.2

    def order(by: str) -> list[int]:
        return [r["latent"] for r in api.get(f"/api/v1/audits/{audit.pk}/latents/", {"ordering": by}).json()["results"]]

    assert order("-index") == order("-latent") == [3, 2, 1, 0]
    assert order("-alignment") == order("-label_alignment") == [2, 0, 3, 1]


def test_the_latents_page_lists_the_lists_numbers_and_orders_by_them(users, audit):
    browser = Client()
    browser.force_login(users["viewer"])
    page = browser.get(f"/audits/{audit.pk}/latents/", {"order": "-frequency"}).content.decode()
    assert '<th class="num">Alignment with label</th>' in page and '<th class="num">Frequency</th>' in page
    assert re.search(r'<option value="-label_alignment"\s*>alignment with label, highest first</option>', page)
    assert '<td class="num">0.1000</td>' in page  # frequency with its 4 decimals
    page = browser.get(f"/audits/{audit.pk}/latents/", {"order": "-label_alignment"}).content.decode()
    assert re.findall(r'<tr><td class="num">(\d+)</td>', page) == ["2", "0", "3", "1"]


def test_the_summary_api_and_the_report_table_count_flags_alike(client_for, users, audit):
    summary = client_for("viewer").get(f"/api/v1/audits/{audit.pk}/summary/").json()["classes"]
    assert summary == report.class_summary(audit)
    browser = Client()
    browser.force_login(users["viewer"])
    table = re.search(r'<table id="class-summary">.*?</table>', browser.get(f"/audits/{audit.pk}/report/")
                      .content.decode(), re.S).group(0)
    for name, c in summary.items():
        row = re.search(rf"<tr><td>{name}</td>.*?</tr>", table, re.S).group(0)
        assert f'{c["flags"]["probe"]} / {c["flags"]["zero_shot"]}' in row
        assert f'{c["confirmed_flags"]} / {c["flags_with_measured_harm"]}' in row
    assert summary["melanoma"]["flags"] == {"probe": 1, "zero_shot": 1}
    assert (summary["melanoma"]["confirmed_flags"], summary["melanoma"]["flags_with_measured_harm"]) == (1, 1)
