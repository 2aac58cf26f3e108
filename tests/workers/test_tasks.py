"""workers.tasks: claiming an audit once, running it in one task or handing it to the shards, and the reaper."""
import socket
from datetime import timedelta

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone

from audit_service.audits.models import Audit, Status
from workers import sharded, tasks
from workers.engine.errors import EngineError

pytestmark = pytest.mark.django_db


@pytest.fixture
def engine(monkeypatch):
    """The engine of the one-task path, replaced by ``engine.run`` (inputs are not loaded)."""
    state = {"run": None, "workdir": None}

    def run_engine(config, bundle, probe, images, progress, workdir, sae_images, sae=None):
        state["workdir"] = workdir
        workdir.mkdir(parents=True)
        (workdir / "activations.npy").write_bytes(b"cache")
        return state["run"](progress)

    monkeypatch.setattr(tasks, "load_inputs", lambda audit: (None, None, None))
    monkeypatch.setattr(tasks, "load_sae_images", lambda audit: None)
    monkeypatch.setattr(tasks, "run_engine", run_engine)
    return state


def test_only_one_of_two_readers_of_a_queued_audit_claims_it(audit):
    other = Audit.objects.get(pk=audit.pk)
    assert audit.claim("gpu-1:100") is True
    assert other.claim("gpu-2:200") is False
    audit.refresh_from_db()
    assert audit.attempts == 1 and audit.worker_host == "gpu-1:100"


def test_a_delivery_of_an_audit_a_live_worker_runs_is_ignored(running, engine):
    engine["run"] = lambda progress: pytest.fail("the engine ran twice")
    tasks.run_audit.apply(args=[running.pk])
    running.refresh_from_db()
    assert running.status == Status.RUNNING and running.attempts == 1 and running.worker_host == "gpu-1:100"


def test_a_permanent_engine_error_fails_the_audit_with_its_message_and_leaves_no_files(audit, engine):
    def broken(progress):
        progress("extract", 1, 2)
        raise EngineError("the checkpoint is not a CLIP model: missing visual.proj")

    engine["run"] = broken
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED and audit.error == "the checkpoint is not a CLIP model: missing visual.proj"
    assert audit.attempts == 1 and audit.result is None
    assert not engine["workdir"].exists()
    assert not default_storage.exists(f"projects/{audit.project_id}/audits/{audit.pk}")


def test_a_cancelled_audit_stops_at_the_next_progress_report(audit, engine):
    def cancelled_meanwhile(progress):
        Audit.objects.get(pk=audit.pk).cancel()
        progress("attribute", 0, 4)
        pytest.fail("the audit went on after its cancellation")

    engine["run"] = cancelled_meanwhile
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.CANCELLED and not engine["workdir"].exists()


def test_a_large_audit_is_handed_to_its_shards(audit, settings, monkeypatch):
    settings.AUDIT_SHARD_SIZE = 7
    sent = []
    monkeypatch.setattr(sharded, "send", lambda *args: sent.append(args))
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert sent == [(audit.pk, 1, "extract")]
    assert audit.status == Status.RUNNING and audit.stage == "extract" and audit.shards == 5
    assert audit.worker_host == ""  # the steps' rows name their workers


def test_the_reaper_requeues_an_audit_whose_heartbeat_stopped(running, sent, settings,
                                                              django_capture_on_commit_callbacks):
    settings.AUDIT_STALE_AFTER_SECONDS = 60
    Audit.objects.filter(pk=running.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=61))
    with django_capture_on_commit_callbacks(execute=True):
        done = tasks.reap_stale_audits()
    running.refresh_from_db()
    assert done["requeued"] == [running.pk] and sent == [running.pk]
    assert running.status == Status.QUEUED and running.stage == "requeued" and running.heartbeat_at is None


def test_the_reaper_gives_up_an_abandoned_audit_out_of_attempts(running, sent, settings):
    Audit.objects.filter(pk=running.pk).update(attempts=settings.AUDIT_MAX_ATTEMPTS, heartbeat_at=None,
                                               worker_host=f"{socket.gethostname()}:{2 ** 22 + 1}")
    assert tasks.reap_stale_audits()["failed"] == [running.pk]
    running.refresh_from_db()
    assert running.status == Status.FAILED and "given up after AUDIT_MAX_ATTEMPTS attempts" in running.error
    assert sent == []


def test_the_reaper_leaves_a_beating_audit_alone(running, sent):
    assert tasks.reap_stale_audits() == {"requeued": [], "failed": [], "resent": [], "cleaned": [],
                                         "corrections": {"requeued": [], "failed": [], "resent": []},
                                         "explanations": {"requeued": [], "failed": [], "resent": []},
                                         "checklists": {"requeued": [], "failed": [], "resent": []}}
    assert Audit.objects.get(pk=running.pk).status == Status.RUNNING
