"""Celery tasks of a whole audit: run it (in this task, or spread over shards) and reap audits whose worker is gone."""
from __future__ import annotations

import logging
import shutil
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import OperationalError, transaction
from django.utils import timezone

from audit_service.audits.corrections import enqueue_correction, finish_after_reaudit
from audit_service.audits.explanations import enqueue_explanation
from audit_service.audits.models import (FINISHED, REAUDIT_STAGE, Audit, Correction, Explanation, IllegalTransition,
                                        Status, store_result)
from audit_service.audits.services import enqueue
from workers import sharded
from workers.engine import run_audit as run_engine
from workers.engine.config import AuditConfig
from workers.inputs import (load_inputs, load_registered_sae, load_sae_images, registered_sae_facts,
                            sae_dataset_facts)
from workers.steps import claim_delivery, run_step
from workers.storage import fetch_sae, remove_finished_work_folders, remove_leftover_work, store_with_artifacts

log = logging.getLogger(__name__)


@shared_task(bind=True, name="workers.tasks.run_audit", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_audit(self, audit_id: int) -> None:
    """Claim the audit (a duplicate delivery is ignored) and run it here, or send its shards to every worker."""
    audit = Audit.objects.filter(pk=audit_id).select_related("clip_model", "probe", "dataset", "sae_dataset").first()
    if not claim_delivery(audit, "audit", audit_id):
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
    if audit.sae_from_id:  # the engine finds the earlier audit's SAE in its folder and reuses it
        fetch_sae(audit.sae_from, workdir / "sae")
    result = run_engine(AuditConfig.from_dict(audit.config), bundle, probe, images, progress, workdir=workdir,
                        sae_images=None if audit.sae_from_id else load_sae_images(audit),
                        sae=load_registered_sae(audit.sae) if audit.sae_id else None)
    audit.device = result.environment["device"]
    audit.save(update_fields=["device"])
    data = result.to_dict()
    data["sae_dataset"] = sae_dataset_facts(audit)  # which images trained the SAE (None: the dataset)
    data["registered_sae"] = registered_sae_facts(audit)  # or the SAE registered for the model it used
    store_with_artifacts(audit, data, workdir, lambda stored: store_result(audit, stored, result.timings))


@shared_task(name="workers.tasks.reap_stale_audits")
def reap_stale_audits() -> dict:
    """Requeue (or give up) running audits and corrections whose worker is gone; re-send queued ones' lost
    messages; finish corrections whose re-audit finished unnoticed; remove files that stopped workers left.

    Runs every AUDIT_REAP_EVERY_SECONDS (Celery beat) and when a worker starts. Returns what it did: audits'
    ids at the top level, corrections' and explanations' under their names.
    """
    now = timezone.now()
    done = _reap(Audit, enqueue, now)
    done["corrections"] = _reap(Correction, enqueue_correction, now)
    done["explanations"] = _reap(Explanation, enqueue_explanation, now)
    for correction in Correction.objects.filter(status=Status.RUNNING, stage=REAUDIT_STAGE,
                                                reaudit__status__in=FINISHED):
        finish_after_reaudit(correction.pk)  # its re-audit's worker stopped before it could tell
        done["corrections"].setdefault("answered", []).append(correction.pk)
    done["cleaned"] = remove_leftover_work()
    if any(any(v.values()) if isinstance(v, dict) else v for v in done.values()):
        log.warning("reaper: %s", done)
    remove_finished_work_folders()
    return done


def _reap(model, send, now) -> dict:
    done = {"requeued": [], "failed": [], "resent": []}
    for job in model.objects.filter(status=Status.RUNNING):
        if not job.is_abandoned(now):
            continue
        try:
            with transaction.atomic():
                if job.out_of_attempts:
                    job.give_up()
                    done["failed"].append(job.pk)
                else:
                    log.warning("%s %s: worker %s stopped during %s; requeued (attempt %s of %s used)", job.noun, job.pk,
                                job.worker_host or "of a shard", job.stage, job.attempts, settings.AUDIT_MAX_ATTEMPTS)
                    job.requeue()
                    transaction.on_commit(lambda pk=job.pk: send(pk))
                    done["requeued"].append(job.pk)
        except IllegalTransition:
            continue  # it moved on meanwhile: finished, or claimed by a worker
    stale_message = now - timedelta(seconds=settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS)
    for job in model.objects.filter(status=Status.QUEUED, enqueued_at__lt=stale_message):
        send(job.pk)
        done["resent"].append(job.pk)
    return done
