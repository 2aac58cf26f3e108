"""Audit diffs: flags matched across audits by the meaning of their latents."""
import numpy as np
import pytest
from django.test import Client

from audit_service.audits.diff import match_flags
from audit_service.audits.models import Review, Status
from audit_service.audits.services import create_audit
from workers import tasks

from .conftest import FAST_AUDIT

FLAGGING = {**FAST_AUDIT, "flag_max_alignment": 1.0, "flag_min_share": 0.0}


def unit(*values):
    v = np.array(values, float)
    return list(v / np.linalg.norm(v))


def flag(latent, label, share, semantic, verdict=None, cls="melanoma", head="probe", id=None):
    return {"id": id or latent, "head": head, "class_name": cls, "latent": latent, "label": label,
            "category": "dataset_artifact", "rank": 1, "share": share, "semantic": semantic, "verdict": verdict}


def test_flags_are_matched_one_to_one_by_meaning_not_by_index():
    ruler, ink, hair = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)
    baseline = [flag(3, "with a ruler", 0.30, ruler, verdict="benign"), flag(5, "with ink marking", 0.10, ink),
                flag(7, "with hair", 0.08, hair, cls="nevus")]
    current = [flag(11, "with a ruler", 0.31, unit(0.99, 0.05, 0)),  # same meaning, another index
               flag(2, "with ink marking", 0.25, unit(0.02, 1, 0)),  # same meaning, share up
               flag(9, "with hair", 0.08, hair),  # hair, but now for melanoma: a new flag of that class
               flag(4, "with a band-aid", 0.12, unit(1, 1, 1))]  # nothing like it before
    diff = match_flags(baseline, current, threshold=0.9)
    assert [(e["baseline"]["latent"], e["current"]["latent"]) for e in diff["unchanged"]] == [(3, 11)]
    assert diff["unchanged"][0]["inherited_verdict"] == "benign"
    assert [(e["baseline"]["latent"], e["current"]["latent"]) for e in diff["changed"]] == [(5, 2)]
    assert diff["changed"][0]["share_change"] == pytest.approx(0.15)
    assert sorted(e["current"]["latent"] for e in diff["new"]) == [4, 9]
    assert [(e["class_name"], e["baseline"]["latent"]) for e in diff["gone"]] == [("nevus", 7)]
    # a stricter threshold no longer matches the ruler (cos 0.9987) or the ink (0.9998) latents
    strict = match_flags(baseline, current, threshold=0.99995)
    assert len(strict["new"]) == 4 and len(strict["gone"]) == 3


@pytest.mark.django_db
def test_the_diff_of_two_runs_of_one_audit_matches_every_flag_and_carries_benign_verdicts(project, users,
                                                                                         registered, client_for):
    runs = []
    for _ in range(2):
        audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                             probe=registered["probe"], dataset=registered["dataset"], options=FLAGGING)
        tasks.run_audit.apply(args=[audit.pk])
        audit.refresh_from_db()
        assert audit.status == Status.SUCCEEDED, audit.error
        runs.append(audit)
    baseline, current = runs
    benign = baseline.flags.order_by("pk").first()
    Review.objects.create(flag=benign, reviewer=users["member"], verdict="benign")
    api = client_for("viewer")
    body = api.get(f"/api/v1/audits/{current.pk}/diff/", {"baseline": baseline.pk}).json()
    n = current.flags.count()
    assert body["counts"] == {"new": 0, "gone": 0, "changed": 0, "unchanged": n} and body["same_model"]
    inherited = [e for e in body["unchanged"] if e["baseline"]["id"] == benign.pk]
    assert inherited[0]["inherited_verdict"] == "benign" and inherited[0]["similarity"] > 0.999
    assert api.get(f"/api/v1/audits/{current.pk}/diff/").status_code == 400
    assert client_for("outsider").get(f"/api/v1/audits/{current.pk}/diff/",
                                      {"baseline": baseline.pk}).status_code == 404
    queued = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                          probe=registered["probe"], dataset=registered["dataset"], options=FLAGGING)
    assert api.get(f"/api/v1/audits/{current.pk}/diff/", {"baseline": queued.pk}).status_code == 409

    page = Client()
    page.force_login(users["viewer"])
    report = page.get(f"/audits/{current.pk}/report/").content.decode()
    assert 'id="compare"' in report and f'value="{baseline.pk}"' in report
    html = page.get(f"/audits/{current.pk}/diff/", {"baseline": baseline.pk}).content.decode()
    assert f"unchanged <b>{n}</b>" in html and "new <b>0</b>" in html
