"""A correction along the concept's widened images through the service: ``options.directions`` "widened" is run,
its direction is the widened images', the correction's page says so, a wrong value is refused at once naming the
known ones, and the client sends ``--directions widened``."""
import pytest

from audit_service.audits.corrections import create_correction
from audit_service.audits.models import Correction, Status
from clip_audit_client import cli as client_cli

from .test_correction_column import sent_by_client_correct
from .test_corrections import audited, probe_flag, run_every_round  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db


def test_a_correction_along_the_widened_images_runs_and_its_page_says_so(audited, users, web, queue,  # noqa: F811
                                                                         django_capture_on_commit_callbacks):
    flag = probe_flag(audited)
    correction = create_correction(audit=audited, user=users["member"], flag_ids=[flag.pk],
                                   options={"directions": "widened", "rounds": 1})
    correction = run_every_round(correction, django_capture_on_commit_callbacks)

    assert correction.status == Status.SUCCEEDED, correction.error
    shortcut = correction.result["correction"]["shortcut"]
    assert shortcut["estimate"] == "widened" and len(shortcut["n_active"]) == 1 and shortcut["n_active"][0] > 0
    page = web("viewer").get(f"/corrections/{correction.pk}/").content.decode()
    assert "the direction of the concept's images widened in the probe's features" in page


def test_a_wrong_way_to_measure_the_direction_is_refused_at_once(audited, users, client_for):  # noqa: F811
    flag = probe_flag(audited)
    response = client_for("member").post(f"/api/v1/audits/{audited.pk}/corrections/",
                                         {"flags": [flag.pk], "options": {"directions": "wide"}}, format="json")
    assert response.status_code == 400
    assert "must be 'regression', 'removal' or 'widened', got 'wide'" in response.content.decode()
    assert not Correction.objects.exists()


def test_the_client_sends_its_directions_option(monkeypatch):
    assert sent_by_client_correct(monkeypatch, "--directions", "widened")["options"]["directions"] == "widened"
    with pytest.raises(SystemExit):
        client_cli.parser().parse_args(["--url", "http://x", "--token", "t", "correct", "--audit", "3",
                                        "--directions", "wide"])
