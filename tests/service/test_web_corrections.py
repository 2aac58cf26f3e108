"""Corrections in the web UI with Django's test client: the report's form and its refusals, the correction's page
and progress, the report's section (also in the downloaded HTML), the project page's lineage, roles."""
import pytest

from audit_service.audits.models import Correction, Review, Status, Verdict
from workers import corrections as correction_tasks
from workers import tasks

from .test_corrections import audited, probe_flag  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db


def test_the_report_offers_members_a_correction_with_confirmed_shortcuts_preselected(audited, users, web):  # noqa: F811
    flag = probe_flag(audited)
    Review.objects.create(flag=flag, reviewer=users["member"], verdict=Verdict.CONFIRMED_SHORTCUT)
    page = web("member").get(f"/audits/{audited.pk}/report/").content.decode()
    assert "Make a corrected probe" in page
    assert f'name="flags" value="{flag.pk}" checked' in page
    others = audited.flags.filter(head="probe").exclude(pk=flag.pk)
    assert all(f'name="flags" value="{f.pk}" checked' not in page and f'value="{f.pk}"' in page for f in others)
    assert "Make a corrected probe" not in web("viewer").get(f"/audits/{audited.pk}/report/").content.decode()
    assert "No corrected probe has been made from this audit" in page


def test_the_form_refuses_bad_input_with_a_message_and_makes_nothing(audited, web, queue):  # noqa: F811
    url = f"/audits/{audited.pk}/corrections/new/"
    flag = probe_flag(audited)
    for data, words in (({}, "tick at least one flag"),
                        ({"flags": ["x"]}, "must be numbers"),
                        ({"flags": [str(flag.pk)], "method": "refit"}, "needs the probe&#x27;s training split"),
                        ({"flags": [str(flag.pk)], "training_dataset": "999999"}, "no such training dataset"),
                        ({"flags": [str(flag.pk)], "max_clean_drop": "3"}, "max_clean_drop"),
                        ({"flags": [str(flag.pk)], "rounds": "9"}, "rounds"),
                        ({"flags": [str(flag.pk)], "rounds": "two"}, "must be numbers")):
        response = web("member").post(url, data, follow=True)
        assert words in response.content.decode(), (data, words)
    assert web("viewer").post(url, {"flags": [str(flag.pk)]}).status_code == 403
    assert web("outsider").post(url, {"flags": [str(flag.pk)]}).status_code == 404
    assert Correction.objects.count() == 0 and queue == []


def test_a_correction_made_on_the_page_shows_its_result_in_the_page_the_report_and_the_project(
        audited, web, queue, django_capture_on_commit_callbacks):  # noqa: F811
    flag = probe_flag(audited)
    with django_capture_on_commit_callbacks(execute=True):
        response = web("member").post(f"/audits/{audited.pk}/corrections/new/",
                                      {"flags": [str(flag.pk)], "method": "", "anchor": "midpoint",
                                       "max_clean_drop": "0.05", "rounds": "1"})
    correction = Correction.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/corrections/{correction.pk}/"
    assert correction.options == {"anchor": "midpoint", "directions": "regression", "C": None, "max_clean_drop": 0.05,
                                  "rounds": 1, "column": None}
    status = web("viewer").get(f"/corrections/{correction.pk}/status.json").json()
    assert status["status"] == "queued" and not status["finished"]

    with django_capture_on_commit_callbacks(execute=True):
        correction_tasks.run_correction.apply(args=[correction.pk])
    correction.refresh_from_db()
    status = web("viewer").get(f"/corrections/{correction.pk}/status.json").json()
    assert status["stage"].startswith(f"round 1, re-audit #{correction.reaudit_id}") and 80 <= status["percent"] < 100
    with django_capture_on_commit_callbacks(execute=True):
        tasks.run_audit.apply(args=[correction.reaudit_id])
    correction.refresh_from_db()
    assert correction.status == Status.SUCCEEDED, correction.error

    page = web("viewer").get(f"/corrections/{correction.pk}/").content.decode()
    assert "correction-table" in page and f"latent {flag.latent} active" in page and "flags gone" in page
    assert f"/probes/{correction.new_probe_id}/download/" in page and "Cancel correction" not in page
    probe_file = web("viewer").get(f"/probes/{correction.new_probe_id}/download/")
    assert b"".join(probe_file.streaming_content) == correction.new_probe.file.open("rb").read()

    report = web("viewer").get(f"/audits/{audited.pk}/report/").content.decode()
    assert "Answered by" in report and f"/corrections/{correction.pk}/" in report
    reaudit_report = web("viewer").get(f"/audits/{correction.reaudit_id}/report/").content.decode()
    assert "This audit checks a corrected probe" in reaudit_report
    download = web("viewer").get(f"/audits/{audited.pk}/download/html").content.decode()
    assert f"Correction #{correction.pk}" in download and "correction-table" in download
    assert "/probes/" not in download  # the offline report links nowhere
    project = web("viewer").get(f"/projects/{audited.project_id}/").content.decode()
    assert f"version 2 of {audited.probe.name}" in project and f"correction #{correction.pk}" in project

    assert web("outsider").get(f"/corrections/{correction.pk}/").status_code == 404
    assert web("outsider").get(f"/probes/{correction.new_probe_id}/download/").status_code == 404


def test_a_member_cancels_a_queued_correction_on_its_page(audited, users, web, queue):  # noqa: F811
    from audit_service.audits.corrections import create_correction

    correction = create_correction(audit=audited, user=users["member"], flag_ids=[probe_flag(audited).pk])
    assert web("viewer").post(f"/corrections/{correction.pk}/cancel/").status_code == 403
    page = web("member").post(f"/corrections/{correction.pk}/cancel/", follow=True).content.decode()
    assert "Correction cancelled." in page
    correction.refresh_from_db()
    assert correction.status == Status.CANCELLED
