"""The correction task: a corrected probe from an audit's flags, its proof table, and its re-audit submitted.

The task runs like an audit's (``workers.steps``: heartbeat, progress, cancellation, time limit, memory ceiling,
the one error policy). Its last step writes, in one transaction, the new probe (a version of the audited one),
the correction's result so far and the re-audit (an ordinary audit of the new probe that reuses the original
audit's SAE); the correction then waits, at stage "reaudit", for that audit
(``audit_service.audits.corrections.finish_after_reaudit``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from celery import shared_task
from django.conf import settings
from django.core.files import File
from django.db import OperationalError, transaction

from audit_service.audits.models import BEFORE_REAUDIT, REAUDIT_STAGE, Audit, Correction, Status
from audit_service.audits.services import enqueue
from audit_service.registry.models import Probe
from audit_service.registry.services import sha256_of
from workers.engine.config import AuditConfig, CorrectionOptions
from workers.engine.correct_audit import run_correction as run_engine
from workers.engine.correction import concept_groups
from workers.engine.sae import TopKSAE
from workers.engine.stages import correction_percent
from workers.inputs import dataset_images, load_inputs
from workers.steps import claim_delivery, run_step
from workers.storage import fetch_sae

log = logging.getLogger(__name__)


def workdir_of(correction: Correction) -> Path:
    return settings.AUDIT_WORK_DIR / f"correction-{correction.pk}"


@shared_task(bind=True, name="workers.corrections.run_correction", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_correction(self, correction_id: int) -> None:
    """Claim the correction (a duplicate delivery is ignored), correct the probe and submit its re-audit."""
    correction = Correction.objects.filter(pk=correction_id).select_related(
        "audit__clip_model", "audit__probe", "audit__dataset", "training_dataset").first()
    if not claim_delivery(correction, "correction", correction_id):
        return
    workdir = workdir_of(correction)
    run_step(self, correction, lambda progress: _correct(correction, workdir, progress),
             clean=lambda: shutil.rmtree(workdir, ignore_errors=True), percent=correction_percent)
    shutil.rmtree(workdir, ignore_errors=True)


def _correct(correction: Correction, workdir: Path, progress) -> None:
    correction.mark_running("loading", 0.0)
    audit = correction.audit
    config = AuditConfig.from_dict(audit.config)
    options = CorrectionOptions.from_dict(correction.options)
    bundle, probe, images = load_inputs(audit)
    sae = TopKSAE.load(fetch_sae(audit, workdir / "sae"))
    training = dataset_images(correction.training_dataset) if correction.training_dataset else None
    chosen = list(correction.flags.order_by("class_name", "rank"))
    flags = [(f.class_name, f.latent) for f in chosen]
    # a flag stands for its concept: every latent the concept is spread over, flags sharing one merged
    concepts = concept_groups([f.concept_latents or [f.latent] for f in chosen])
    outcome = run_engine(bundle, probe, images, sae, flags, layer=config.layer, token=config.token,
                         method=correction.method or None, anchor=options.anchor, training=training, C=options.C,
                         concepts=concepts, directions=options.directions,
                         batch_size=config.batch_size, device=config.device, dtype=config.dtype,
                         cache_dtype=config.cache_dtype, seed=config.seed, workdir=workdir, progress=progress)
    path = workdir / f"probe{Path(audit.probe.file.name).suffix.lower() or '.npz'}"
    outcome.probe.save(path)
    result = {"correction": outcome.to_dict(), "method": outcome.info["method"], "reason": outcome.info["reason"]}
    _register_and_reaudit(correction, path, result, outcome.timings)


def _register_and_reaudit(correction: Correction, path: Path, result: dict, timings: dict) -> None:
    """In one transaction: the new probe's row and file, the re-audit, and the correction moved to "reaudit". A
    failure leaves neither a probe row nor its file."""
    audit, parent = correction.audit, correction.audit.probe
    version = parent.version + 1  # a version of the probe it was made from (several corrections: siblings)
    root = parent
    while root.parent_id:
        root = root.parent
    stored = None
    try:
        with transaction.atomic():
            with open(path, "rb") as fh:
                digest = sha256_of(fh)
            probe = Probe(project=audit.project, clip_model=audit.clip_model,
                          name=f"{root.name} v{version} (correction {correction.pk})", sha256=digest,
                          class_names=parent.class_names, normalization=parent.normalization,
                          embed_dim=parent.embed_dim, parent=parent, version=version,
                          created_by=correction.created_by)
            with open(path, "rb") as fh:
                probe.file.save(path.name, File(fh), save=False)
            stored = probe.file.name
            probe.save()
            reaudit = Audit.objects.create(
                project=audit.project, clip_model=audit.clip_model, probe=probe, dataset=audit.dataset,
                sae_dataset=audit.sae_dataset, sae_from=audit, config=audit.config,
                context={"correction": correction.pk, "corrects_audit": audit.pk}, created_by=correction.created_by)
            correction.refresh_from_db(fields=["status"])
            correction.mark_running(REAUDIT_STAGE, BEFORE_REAUDIT)
            Correction.objects.filter(pk=correction.pk, status=Status.RUNNING).update(
                new_probe=probe, reaudit=reaudit, result=result, timings=timings, worker_host="", heartbeat_at=None)
            transaction.on_commit(lambda: enqueue(reaudit.pk))
    except Exception:
        if stored:
            probe.file.storage.delete(stored)
        raise

