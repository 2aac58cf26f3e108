"""Celery tasks: thin wrappers that read inputs, call the engine and write results and progress."""
from __future__ import annotations

import logging
import shutil
import socket
import time
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import OperationalError
from django.utils import timezone

log = logging.getLogger(__name__)

# Share of the overall progress bar each engine stage takes.
STAGE_WEIGHTS = {"extract": 30, "train_sae": 30, "attribute": 25, "label": 5, "flag": 2, "confirm": 8}
HEARTBEAT_STALE = timedelta(minutes=2)


def overall_percent(stage: str, done: int, total: int) -> float:
    before = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return round(before + weight * (done / total if total else 1.0), 2)
        before += weight
    return before


class _Progress:
    """The engine's progress callback: writes stage and percent to the row, honours cancellation."""

    def __init__(self, audit):
        self.audit = audit
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        from audit_service.audits.models import Audit
        from workers.engine.errors import AuditCancelled

        now = time.monotonic()
        if now - self.last < settings.AUDIT_PROGRESS_EVERY_SECONDS and done not in (0, total):
            return
        self.last = now
        self.audit.mark_running(stage, overall_percent(stage, done, total))
        if Audit.objects.filter(pk=self.audit.pk, cancel_requested=True).exists():
            raise AuditCancelled()


ARTIFACTS = ("sae/sae.safetensors", "sae/sae.json", "sae/metrics.json", "relevance.npz")


def save_artifacts(audit, workdir) -> dict:
    """Copy the SAE and the full relevance tables into the media store; returns their storage keys.

    The activation cache stays on the worker's scratch disk and is deleted with it.
    """
    prefix = f"projects/{audit.project_id}/audits/{audit.pk}"
    keys = {}
    for rel in ARTIFACTS:
        key = f"{prefix}/{rel}"
        if default_storage.exists(key):  # a re-delivered task: replace, never pile up copies
            default_storage.delete(key)
        with open(workdir / rel, "rb") as fh:
            keys[rel] = default_storage.save(key, File(fh))
    return keys


@shared_task(bind=True, name="workers.tasks.run_audit", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_audit(self, audit_id: int) -> None:
    from audit_service.audits.models import Audit, Status, store_result
    from workers.engine import run_audit as engine_run_audit
    from workers.engine.config import AuditConfig
    from workers.engine.errors import AuditCancelled, EngineError
    from workers.inputs import load_inputs

    audit = Audit.objects.filter(pk=audit_id).select_related("clip_model", "probe", "dataset").first()
    if audit is None:
        log.warning("audit %s no longer exists; dropping the task", audit_id)
        return
    if audit.is_finished:
        log.info("audit %s is already %s; ignoring a duplicate delivery", audit_id, audit.status)
        return
    if audit.status == Status.RUNNING and audit.heartbeat_at and timezone.now() - audit.heartbeat_at < HEARTBEAT_STALE:
        log.info("audit %s is being run by %s; ignoring a duplicate delivery", audit_id, audit.worker_host)
        return
    if audit.attempts >= settings.AUDIT_MAX_ATTEMPTS:
        audit.fail(f"the audit was started {audit.attempts} times and never finished (workers crashed or were "
                   "stopped); it was given up. Submit it again, or check the workers' logs and memory")
        return
    Audit.objects.filter(pk=audit.pk).update(attempts=audit.attempts + 1)
    audit.attempts += 1
    workdir = settings.AUDIT_WORK_DIR / f"audit-{audit.pk}"
    try:
        audit.mark_running("loading", 0.0, worker_host=socket.gethostname())
        bundle, probe, images = load_inputs(audit)
        config = AuditConfig.from_dict(audit.config)
        result = engine_run_audit(config, bundle, probe, images, _Progress(audit), workdir=workdir)
        Audit.objects.filter(pk=audit.pk).update(device=result.environment["device"])
        data = result.to_dict()
        data["artifacts"] = save_artifacts(audit, workdir)
        try:
            store_result(audit, data, result.timings)
        except Exception:
            for key in data["artifacts"].values():  # no files of an audit that is not shown as finished
                default_storage.delete(key)
            raise
    except AuditCancelled:
        audit.refresh_from_db()
        audit.confirm_cancelled()
    except EngineError as exc:
        if exc.permanent:
            audit.refresh_from_db()
            audit.fail(exc.message)
        else:
            Audit.objects.filter(pk=audit.pk).update(heartbeat_at=None)
            raise self.retry(exc=exc, countdown=30)
    except OperationalError:
        Audit.objects.filter(pk=audit.pk).update(heartbeat_at=None)
        raise  # transient: autoretry with backoff
    except Exception as exc:  # a bug or an unexpected input: fail loudly rather than hang
        log.exception("audit %s failed", audit_id)
        audit.refresh_from_db()
        if not audit.is_finished:
            audit.fail(f"internal error: {type(exc).__name__}: {exc}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    if Audit.objects.filter(pk=audit.pk, status__in=[Status.FAILED, Status.CANCELLED]).exists():
        shutil.rmtree(workdir, ignore_errors=True)
