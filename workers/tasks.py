"""Celery tasks of a whole audit: run it (in this task, or spread over shards) and reap audits whose worker is gone."""
from __future__ import annotations

import logging
import shutil
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import OperationalError, transaction
from django.utils import timezone

from audit_service.audits.liveness import worker_identity
from audit_service.audits.models import Audit, IllegalTransition, Status, store_result
from audit_service.audits.services import enqueue
from workers import sharded
from workers.engine import run_audit as run_engine
from workers.engine.config import AuditConfig
from workers.inputs import load_inputs, load_sae_images, sae_dataset_facts
from workers.steps import run_step
from workers.storage import remove_finished_work_folders, remove_leftover_work, store_with_artifacts

log = logging.getLogger(__name__)


@shared_task(bind=True, name="workers.tasks.run_audit", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_audit(self, audit_id: int) -> None:
    """Claim the audit (a duplicate delivery is ignored) and run it here, or send its shards to every worker."""
    audit = Audit.objects.filter(pk=audit_id).select_related("clip_model", "probe", "dataset", "sae_dataset").first()
    if audit is None:
        log.warning("audit %s no longer exists; dropping the task", audit_id)
        return
    if audit.is_finished:
        log.info("audit %s is already %s; ignoring a duplicate delivery", audit_id, audit.status)
        return
    if audit.status == Status.RUNNING and not audit.is_abandoned():
        log.info("audit %s is being run by %s; ignoring a duplicate delivery", audit_id, audit.worker_host)
        return
    if audit.out_of_attempts:
        audit.give_up()
        return
    if not audit.claim(worker_identity()):
        log.info("audit %s was claimed by another worker meanwhile; ignoring this delivery", audit_id)
        return
    if audit.shards or audit.dataset.n_images > settings.AUDIT_SHARD_SIZE:
        run_step(self, audit, lambda progress: sharded.start(audit))  # one task per shard and step (chords)
        return
    workdir = settings.AUDIT_WORK_DIR / f"audit-{audit.pk}"
    if run_step(self, audit, lambda progress: _run_here(audit, workdir, progress),
                clean=lambda: shutil.rmtree(workdir, ignore_errors=True)) == "done":
        shutil.rmtree(workdir, ignore_errors=True)


def _run_here(audit: Audit, workdir, progress) -> None:
    """The whole audit in this task: the engine end to end, then its rows and artifacts stored."""
    audit.mark_running("loading", 0.0)
    bundle, probe, images = load_inputs(audit)
    result = run_engine(AuditConfig.from_dict(audit.config), bundle, probe, images, progress, workdir=workdir,
                        sae_images=load_sae_images(audit))
    audit.device = result.environment["device"]
    audit.save(update_fields=["device"])
    data = result.to_dict()
    data["sae_dataset"] = sae_dataset_facts(audit)  # which images trained the SAE (None: the dataset)
    store_with_artifacts(audit, data, workdir, lambda stored: store_result(audit, stored, result.timings))


@shared_task(name="workers.tasks.reap_stale_audits")
def reap_stale_audits() -> dict:
    """Requeue (or give up) running audits whose worker is gone; re-send queued audits' lost messages; remove
    files that stopped workers left.

    Runs every AUDIT_REAP_EVERY_SECONDS (Celery beat) and when a worker starts.
    """
    now = timezone.now()
    done = {"requeued": [], "failed": [], "resent": []}
    for audit in Audit.objects.filter(status=Status.RUNNING):
        if not audit.is_abandoned(now):
            continue
        try:
            with transaction.atomic():
                if audit.out_of_attempts:
                    audit.give_up()
                    done["failed"].append(audit.pk)
                else:
                    log.warning("audit %s: worker %s stopped during %s; requeued (attempt %s of %s used)",
                                audit.pk, audit.worker_host or "of a shard", audit.stage, audit.attempts,
                                settings.AUDIT_MAX_ATTEMPTS)
                    audit.requeue()
                    transaction.on_commit(lambda pk=audit.pk: enqueue(pk))
                    done["requeued"].append(audit.pk)
        except IllegalTransition:
            continue  # it moved on meanwhile: finished, or claimed by a worker
    stale_message = now - timedelta(seconds=settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS)
    for audit in Audit.objects.filter(status=Status.QUEUED, enqueued_at__lt=stale_message):
        enqueue(audit.pk)
        done["resent"].append(audit.pk)
    done["cleaned"] = remove_leftover_work()
    if any(done.values()):
        log.warning("reaper: %s", done)
    remove_finished_work_folders()
    return done
