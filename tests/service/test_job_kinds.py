"""Job kinds are one idea (``audit_service.audits.jobs``): a kind declared in one module (``jobkind_example``) is
enqueued, routed, counted, listed, shown, cancelled, reaped and swept by code that never names it; the three
kinds the service has are declared the same way."""
from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.urls import clear_url_caches
from django.utils import timezone

from audit_service.audits import jobs
from audit_service.audits.models import Status
from audit_service.registry.services import RegistrationError
from workers import tasks
from workers.celery import app as celery_app
from workers.storage import remove_finished_work_folders

from .jobkind_example import create_inspection, declare, forget, run_inspection


def _reload_urls() -> None:
    import audit_service.urls
    import audit_service.web.urls

    importlib.reload(audit_service.web.urls)
    importlib.reload(audit_service.urls)
    clear_url_caches()


@pytest.fixture
def kind(transactional_db):
    """The example kind declared, its table made, the URLs read again; all undone afterwards."""
    declared = declare()
    try:
        with connection.schema_editor() as editor:
            editor.create_model(declared.model)
        _reload_urls()
        yield declared
    finally:
        forget()
        _reload_urls()
        with connection.schema_editor() as editor:
            editor.delete_model(declared.model)


@pytest.fixture
def messages(monkeypatch) -> list[tuple[str, int]]:
    """(task name, job id) of every task message sent; none reaches a broker."""
    calls = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, args=None, **kw: calls.append((name, args[0])))
    return calls


def test_a_kind_declared_in_one_module_is_enqueued_routed_listed_shown_and_run(kind, project, users, messages,
                                                                                client_for, web):
    inspection = create_inspection(project=project, user=users["member"])
    assert messages == [(kind.task, inspection.pk)]  # sent once the row was committed
    assert jobs.route(kind.task, [], {}, {}) == {"queue": "gpu"}  # the gpu queue, with the other jobs

    api = client_for("viewer")
    assert [row["id"] for row in api.get("/api/v1/inspections/").json()["results"]] == [inspection.pk]
    body = api.get(f"/api/v1/inspections/{inspection.pk}/").json()
    assert body["status"] == "queued" and body["project"] == project.pk and body["cancel_requested"] is False
    assert client_for("outsider").get(f"/api/v1/inspections/{inspection.pk}/").status_code == 404

    assert web("viewer").get(f"/inspections/{inspection.pk}/status.json").json()["status"] == "queued"
    page = web("member").get(f"/inspections/{inspection.pk}/")
    assert page.status_code == 200 and b"Inspection #" in page.content and b"Cancel inspection" in page.content

    run_inspection.apply(args=[inspection.pk])
    inspection.refresh_from_db()
    assert inspection.status == Status.SUCCEEDED and inspection.result == {"audits": 0}
    progress = web("viewer").get(f"/inspections/{inspection.pk}/status.json").json()
    assert progress["finished"] and progress["report_url"] == f"/inspections/{inspection.pk}/"


def test_the_room_check_counts_the_new_kind_with_the_others(kind, project, users, messages):
    project.max_concurrent_audits = 1
    project.save()
    create_inspection(project=project, user=users["member"])
    with pytest.raises(RegistrationError, match="already has 1 jobs queued or running"):
        create_inspection(project=project, user=users["member"])
    assert kind.model.objects.count() == 1


def test_the_api_and_the_pages_cancel_the_new_kind(kind, project, users, messages, client_for, web):
    first = create_inspection(project=project, user=users["member"])
    second = create_inspection(project=project, user=users["member"])
    assert client_for("viewer").post(f"/api/v1/inspections/{first.pk}/cancel/").status_code == 403
    assert client_for("member").post(f"/api/v1/inspections/{first.pk}/cancel/").json()["status"] == "cancelled"
    assert client_for("member").post(f"/api/v1/inspections/{first.pk}/cancel/").status_code == 409
    response = web("member").post(f"/inspections/{second.pk}/cancel/")
    assert response.status_code == 302 and response.url == f"/inspections/{second.pk}/"
    assert kind.model.objects.get(pk=second.pk).status == Status.CANCELLED


def test_the_reaper_requeues_and_resends_the_new_kind_and_its_scratch_folder_is_swept(kind, project, users,
                                                                                      messages):
    stale = timezone.now() - timedelta(seconds=settings.AUDIT_STALE_AFTER_SECONDS + 60)
    lost = kind.model.objects.create(project=project, status=Status.RUNNING, stage="counting", attempts=1,
                                     worker_host="gpu-7:1", started_at=stale, heartbeat_at=stale)
    queued = kind.model.objects.create(project=project, enqueued_at=timezone.now() - timedelta(days=1))
    done = tasks.reap_stale_audits()
    assert done["inspections"]["requeued"] == [lost.pk] and done["inspections"]["resent"] == [queued.pk]
    assert kind.model.objects.get(pk=lost.pk).status == Status.QUEUED
    assert (kind.task, queued.pk) in messages

    folder = kind.workdir(queued.pk)
    assert folder.name == f"inspection-{queued.pk}"
    folder.mkdir(parents=True)
    remove_finished_work_folders()
    assert folder.is_dir()  # still queued: its scratch stays
    kind.model.objects.get(pk=queued.pk).cancel()
    remove_finished_work_folders()
    assert not folder.exists()


def test_every_kind_of_the_service_is_declared_once_and_can_be_cancelled():
    assert [k.name for k in jobs.kinds()] == ["audit", "correction", "explanation", "checklist"]
    for k in jobs.kinds():
        assert jobs.job_kind(k.name) is k and jobs.route(k.task, [], {}, {}) == {"queue": "gpu"}
    with pytest.raises(ValueError, match="declared twice"):
        jobs.register(jobs.JobKind("audit", jobs.job_kind("explanation").model, "elsewhere"))
