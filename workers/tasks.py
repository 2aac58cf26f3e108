"""Celery tasks of a whole audit: run it (in this task, or spread over shards) and reap audits whose worker is gone."""
from __future__ import annotations

import logging
import shutil
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import OperationalError, transaction
from django.utils import timezone

from audit_service.audits.jobs import JobKind, job_kind, kinds
from audit_service.audits.models import Audit, IllegalTransition, Status, store_result
from workers import sharded
from workers.engine import run_audit as run_engine
from workers.engine.config import AuditConfig
from workers.engine.stages import LOADING
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
    workdir = job_kind("audit").workdir(audit.pk)
    if run_step(self, audit, lambda progress: _run_here(audit, workdir, progress),
                clean=lambda: shutil.rmtree(workdir, ignore_errors=True)) == "done":
        shutil.rmtree(workdir, ignore_errors=True)


def _run_here(audit: Audit, workdir, progress) -> None:
    """The whole audit in this task: the engine end to end, then its rows and artifacts stored."""
    audit.mark_running(LOADING, 0.0)
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
    """Requeue (or give up) running jobs of every kind whose worker is gone; re-send queued ones' lost messages;
    do each kind's own part (``JobKind.reap``: e.g. finish corrections whose re-audit finished unnoticed); remove
    files that stopped workers left.

    Runs every AUDIT_REAP_EVERY_SECONDS (Celery beat) and when a worker starts. Returns what it did: audits'
    ids at the top level, other kinds' under their plural ("corrections", "explanations").
    """
    now = timezone.now()
    done = {}
    for kind in kinds():
        found = _reap(kind, now)
        if kind.reap is not None:
            found.update(kind.reap())
        if kind.model is Audit:
            done.update(found)
        else:
            done[kind.plural] = found
    done["cleaned"] = remove_leftover_work()
    if any(any(v.values()) if isinstance(v, dict) else v for v in done.values()):
        log.warning("reaper: %s", done)
    remove_finished_work_folders()
    return done


def _reap(kind: JobKind, now) -> dict:
    done = {"requeued": [], "failed": [], "resent": []}
    for job in kind.model.objects.filter(status=Status.RUNNING):
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
                    kind.enqueue_on_commit(job.pk)
                    done["requeued"].append(job.pk)
        except IllegalTransition:
            continue  # it moved on meanwhile: finished, or claimed by a worker
    stale_message = now - timedelta(seconds=settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS)
    for job in kind.model.objects.filter(status=Status.QUEUED, enqueued_at__lt=stale_message):
        kind.enqueue(job.pk)
        done["resent"].append(job.pk)
    return done
