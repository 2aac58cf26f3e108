"""The correction task: a corrected probe from an audit's flags, its proof table, and its re-audit submitted.

The task runs like an audit's (``workers.steps``: heartbeat, progress, cancellation, time limit, memory ceiling,
the one error policy). Its last step hands the corrected probe to the domain
(``audit_service.audits.corrections.reaudit_corrected_probe``), which writes in one transaction the new probe (a
version of the audited one), the correction's result so far and the re-audit (an ordinary audit of the new probe
that reuses the original audit's SAE); the correction then waits, at stage "reaudit", for that audit
(``finish_after_reaudit``). When that re-audit asks for another round (``workers.engine.rounds``), the correction
is queued again and this task runs the next round on the audited probe with the grown concepts.
"""
from __future__ import annotations

import logging
from pathlib import Path

from celery import shared_task
from django.db import OperationalError

from audit_service.audits.corrections import reaudit_corrected_probe
from audit_service.audits.models import Correction
from workers.engine.config import AuditConfig, CorrectionOptions
from workers.engine.correct_audit import AuditedInputs
from workers.engine.correct_audit import run_correction as run_engine
from workers.engine.correction import concept_groups
from workers.engine.rounds import grown_concepts
from workers.engine.sae import TopKSAE
from workers.engine.stages import LOADING, correction_percent
from workers.inputs import dataset_images, load_inputs
from workers.steps import claim_delivery, run_in_scratch
from workers.storage import fetch_sae

log = logging.getLogger(__name__)


@shared_task(bind=True, name="workers.corrections.run_correction", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_correction(self, correction_id: int) -> None:
    """Claim the correction (a duplicate delivery is ignored), correct the probe and submit its re-audit."""
    correction = Correction.objects.filter(pk=correction_id).select_related(
        "audit__clip_model", "audit__probe", "audit__dataset", "training_dataset").first()
    if not claim_delivery(correction, "correction", correction_id):
        return
    run_in_scratch(self, correction, lambda workdir, progress: _correct(correction, workdir, progress),
                   percent=correction_percent)


def _correct(correction: Correction, workdir: Path, progress) -> None:
    correction.mark_running(LOADING, 0.0)
    audit = correction.audit
    config = AuditConfig.from_dict(audit.config)
    options = CorrectionOptions.from_dict(correction.options)
    bundle, probe, images = load_inputs(audit)
    sae = TopKSAE.load(fetch_sae(audit, workdir / "sae"))
    training = dataset_images(correction.training_dataset) if correction.training_dataset else None
    chosen = list(correction.flags.order_by("class_name", "rank"))
    flags = [(f.class_name, f.latent) for f in chosen]
    rounds = (correction.result or {}).get("rounds") or []
    if rounds:  # a later round: the last round's concepts grown as its re-audit asked (workers.engine.rounds)
        concepts = grown_concepts(rounds[-1]["concepts"], rounds[-1]["added"], rounds[-1].get("split") or [])
    else:  # a flag stands for its concept: every latent the concept is spread over, flags sharing one merged
        concepts = concept_groups([f.concept_latents or [f.latent] for f in chosen])
    # every round corrects the audited probe afresh (not the last round's), so each proof table is against it
    outcome = run_engine(AuditedInputs(bundle, probe, images, sae, flags, concepts), config, options,
                         method=correction.method or None, training=training, workdir=workdir, progress=progress)
    path = workdir / f"probe{Path(audit.probe.file.name).suffix.lower() or '.npz'}"
    outcome.probe.save(path)
    result = {"correction": _kept(outcome.to_dict()), "method": outcome.info["method"],
              "reason": outcome.info["reason"], "rounds": rounds}
    timings = {stage: correction.timings.get(stage, 0.0) + seconds for stage, seconds in outcome.timings.items()}
    reaudit_corrected_probe(correction, path, result, {**correction.timings, **timings})  # the domain's rows


TRAINING_ROWS_MAX = 20_000  # training images with the concept a correction's result keeps (strongest first)


def _kept(outcome: dict) -> dict:
    """The outcome as stored: the data behind the shortcut keeps its :data:`TRAINING_ROWS_MAX` strongest images
    (``rows_kept`` says so when it had more), so a large training split does not make the row huge."""
    data = outcome.get("training_data")
    if data and len(data.get("rows") or []) > TRAINING_ROWS_MAX:
        outcome = {**outcome, "training_data": {**data, "rows": data["rows"][:TRAINING_ROWS_MAX],
                                                "rows_kept": TRAINING_ROWS_MAX}}
    return outcome
