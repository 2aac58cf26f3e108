"""The audit state machine and the worker task, run in-process."""
import pytest
from django.conf import settings

from audit_service.audits.models import Audit, Flag, IllegalTransition, Latent, Status
from audit_service.audits.services import create_audit
from workers import steps, tasks
from workers.engine import summary
from workers.engine.errors import EngineError
from workers.engine.stages import ENGINE_STAGES

from .conftest import FAST_AUDIT

pytestmark = pytest.mark.django_db


@pytest.fixture
def audit(project, users, registered):
    return create_audit(project=project, user=users["member"], clip_model=registered["model"],
                        probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)


def test_a_new_audit_is_queued_and_enqueued_after_commit(project, users, registered, django_capture_on_commit_callbacks,
                                                         sent):
    with django_capture_on_commit_callbacks(execute=True):
        audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                             probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    assert audit.status == Status.QUEUED
    assert sent == [audit.pk]
    assert audit.config["layer"] == -1 and audit.config["sae"]["steps"] == 150


def test_illegal_transitions_are_refused(audit):
    with pytest.raises(IllegalTransition, match="is queued; it cannot become succeeded"):
        audit.succeed({}, {})
    audit.fail("broken input")
    for move in (lambda: audit.mark_running("extract", 1.0), lambda: audit.succeed({}, {}), audit.cancel,
                 lambda: audit.fail("again")):
        with pytest.raises(IllegalTransition):
            move()
    audit.refresh_from_db()
    assert audit.status == Status.FAILED and audit.error == "broken input"


def test_a_stale_copy_cannot_overwrite_a_newer_state(audit):
    stale = Audit.objects.get(pk=audit.pk)
    audit.cancel()
    with pytest.raises(IllegalTransition, match="changed to cancelled meanwhile"):
        stale.mark_running("extract", 0.0)
    assert Audit.objects.get(pk=audit.pk).status == Status.CANCELLED


def test_cancelling_a_running_audit_asks_the_worker_to_stop(audit):
    audit.mark_running("extract", 5.0)
    audit.cancel()
    audit.refresh_from_db()
    assert audit.status == Status.RUNNING and audit.cancel_requested


def test_the_task_runs_an_audit_and_stores_its_rows(audit):
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.percent == 100.0 and audit.worker_host and audit.device == "cpu"
    assert Latent.objects.filter(audit=audit).count() == audit.result["sae"]["n_latents"]
    assert Flag.objects.filter(audit=audit).count() == len(audit.result["flags"])
    assert set(audit.timings) == set(ENGINE_STAGES)
    assert not (settings.AUDIT_WORK_DIR / f"audit-{audit.pk}").exists()
    from django.core.files.storage import default_storage

    from workers.engine.sae import TopKSAE

    keys = audit.result["artifacts"]
    # the audit's SAE, and the other dictionaries that voted on its flags (a reuse of the SAE votes with them)
    voters = {f"sae/dictionaries/{k}/{name}" for k in (1, 2) for name in ("sae.safetensors", "sae.json", "metrics.json")}
    assert set(keys) == {"sae/sae.safetensors", "sae/sae.json", "sae/metrics.json", "relevance.npz", *voters}
    assert all(default_storage.exists(k) for k in keys.values())
    sae_dir = settings.MEDIA_ROOT / keys["sae/sae.json"].rsplit("/", 1)[0]
    assert TopKSAE.load(sae_dir).n_latents == audit.result["sae"]["n_latents"]


def test_a_failed_stage_leaves_the_audit_failed_with_the_engines_message_and_no_rows(audit, monkeypatch):
    def broken(*args, **kwargs):
        raise EngineError("the flag stage could not read the relevance tables")

    monkeypatch.setattr(summary, "find_flags", broken)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED
    assert audit.error == "the flag stage could not read the relevance tables"
    assert audit.result is None
    assert Latent.objects.filter(audit=audit).count() == 0 and Flag.objects.filter(audit=audit).count() == 0
    assert not (settings.AUDIT_WORK_DIR / f"audit-{audit.pk}").exists()


def test_a_cancel_request_stops_the_worker_between_batches(audit, monkeypatch):
    original = steps.Progress.__call__

    def cancel_when_attributing(self, stage, done, total):
        if stage == "attribute":
            Audit.objects.filter(pk=self.job.pk).update(cancel_requested=True)
        return original(self, stage, done, total)

    monkeypatch.setattr(steps.Progress, "__call__", cancel_when_attributing)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.CANCELLED
    assert Flag.objects.filter(audit=audit).count() == 0


def test_a_duplicate_delivery_of_a_finished_audit_changes_nothing(audit):
    audit.fail("done before")
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED and audit.error == "done before" and audit.attempts == 0


def test_an_audit_that_kept_crashing_is_given_up(audit):
    Audit.objects.filter(pk=audit.pk).update(attempts=settings.AUDIT_MAX_ATTEMPTS)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED
    assert "started 3 times and never finished" in audit.error
