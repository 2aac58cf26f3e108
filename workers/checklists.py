"""The checklist task: a finished audit asked about the suspects a user names (a short job).

It runs like an audit (``workers.steps``: heartbeat, cancellation, time limit, memory ceiling, the one error
policy): the audited images' activations are extracted again with the audit's model (stage "extract"), then each
suspect is matched to the audit's SAE latents and answered from its stored relevance tables, and the images that
show it most get heatmaps of its latents (stage "check"). Example images uploaded with the checklist
(``checklist.images``) are read from storage and named ``upload:NAME`` in the suspects. A cancel is seen once the
model is loaded, during the extraction and before the answer is stored.
"""
from __future__ import annotations

import time

from celery import shared_task
from django.db import OperationalError

from audit_service.audits.models import Audit, Checklist
from audit_service.audits.report import relevance_arrays
from workers.engine.checklist import Suspect
from workers.engine.config import AuditConfig
from workers.engine.errors import EngineError
from workers.engine.loading import resolve_device
from workers.engine.sae import TopKSAE
from workers.engine.stages import LOADING
from workers.engine.suspects import probe_shortcuts, run_checklist as check_suspects
from workers.inputs import load_inputs, local_path
from workers.steps import claim_delivery, run_in_scratch
from workers.storage import fetch_sae

EXTRACT_STAGE, CHECK_STAGE = "extract", "check"
EXTRACT_WEIGHT = 80.0  # of the percent: extracting the activations is most of the work
TABLES = ("probe_share", "zero_shot_share")


def _percent(stage: str, done: int, total: int) -> float:
    share = done / total if total else 0.0
    if stage == EXTRACT_STAGE:
        return round(EXTRACT_WEIGHT * share, 2)
    if stage == CHECK_STAGE:
        return round(EXTRACT_WEIGHT + (100.0 - EXTRACT_WEIGHT) * share, 2)
    return 0.0


@shared_task(bind=True, name="workers.checklists.run_checklist", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_checklist(self, checklist_id: int) -> None:
    checklist = Checklist.objects.filter(pk=checklist_id).select_related(
        "audit__clip_model", "audit__probe", "audit__dataset").first()
    if not claim_delivery(checklist, "checklist", checklist_id):
        return
    run_in_scratch(self, checklist, lambda workdir, progress: _check(checklist, workdir, progress), percent=_percent)


def audit_tables(audit: Audit) -> dict:
    """The audit's stored relevance shares ([classes, latents] per head), as the engine reads them."""
    arrays = relevance_arrays(audit)
    missing = [name for name in TABLES if arrays is None or name not in arrays]
    if missing:
        raise EngineError(f"audit {audit.pk} kept no relevance tables ({', '.join(missing)} missing); run the audit "
                          "again, then ask the checklist of the new one")
    return {name: arrays[name] for name in TABLES}


def latent_references(audit: Audit, n_latents: int) -> list[list[str]]:
    """Each latent's reference images (their ids), indexed by latent number (none for a latent without a row)."""
    references: list[list[str]] = [[] for _ in range(n_latents)]
    for latent, refs in audit.latents.values_list("latent", "references"):
        if latent < n_latents:
            references[latent] = [str(r) for r in refs or []]
    return references


def _check(checklist: Checklist, workdir, progress) -> None:
    started = time.perf_counter()
    checklist.mark_running(LOADING, 0.0)
    audit = checklist.audit
    config = AuditConfig.from_dict(audit.config)
    device = resolve_device(config.device)
    suspects = [Suspect.from_dict(s) for s in checklist.suspects]
    bundle, probe, images = load_inputs(audit)
    sae = TopKSAE.load(fetch_sae(audit, workdir / "sae"), device)
    tables, references = audit_tables(audit), latent_references(audit, sae.n_latents)
    progress.check(force_poll=True)  # a cancel while the model loaded stops it here
    marks = {LOADING: time.perf_counter()}

    def report(stage: str, done: int, total: int) -> None:
        marks.setdefault(stage, time.perf_counter())
        progress(stage, done, total)

    uploads = {image.name: local_path(image.file) for image in checklist.images.all()}
    shortcuts = probe_shortcuts(audit.flags.order_by("pk").values("head", "latent", "concept_latents"))
    answers = check_suspects(bundle, probe, images, sae, tables, references, suspects, config, workdir=workdir,
                             progress=report, uploads=uploads, shortcuts=shortcuts)
    progress.check(force_poll=True)  # nor is a checklist cancelled meanwhile shown as succeeded
    ended = time.perf_counter()
    check_at = marks.get(CHECK_STAGE, ended)
    timings = {LOADING: marks[LOADING] - started, EXTRACT_STAGE: check_at - marks.get(EXTRACT_STAGE, marks[LOADING]),
               CHECK_STAGE: ended - check_at}
    checklist.device = str(device)
    checklist.save(update_fields=["device"])
    checklist.succeed({"suspects": answers}, {k: round(v, 3) for k, v in timings.items()})
