"""The explanation task: one image explained with a finished audit's model, probe and SAE (a short job).

It runs like an audit (``workers.steps``: heartbeat, cancellation, time limit, memory ceiling, the one error
policy) and never in the web process: it loads the model. A cancel is seen once the model is loaded and before
the answer is stored.
"""
from __future__ import annotations

import time

from celery import shared_task
from django.db import OperationalError

from audit_service.audits.models import Explanation
from workers.engine.config import AuditConfig
from workers.engine.stages import LOADING
from workers.engine.context import AuditContext
from workers.engine.explain import explain_image
from workers.engine.imagefiles import open_image
from workers.engine.loading import resolve_device
from workers.engine.sae import TopKSAE
from workers.engine.semantics import UNLABELLED
from workers.inputs import dataset_folder, load_model, load_probe, local_path
from workers.steps import claim_delivery, run_in_scratch
from workers.storage import fetch_sae

EXPLAIN_STAGE = "explain"


def _percent(stage: str, done: int, total: int) -> float:
    return 0.0 if stage == LOADING else round(100.0 * done / total, 2) if total else 0.0


@shared_task(bind=True, name="workers.explanations.run_explanation", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_explanation(self, explanation_id: int) -> None:
    explanation = Explanation.objects.filter(pk=explanation_id).select_related(
        "audit__clip_model", "audit__probe", "audit__dataset").first()
    if not claim_delivery(explanation, "explanation", explanation_id):
        return
    run_in_scratch(self, explanation, lambda workdir, progress: _explain(explanation, workdir, progress),
                   percent=_percent)


def _explain(explanation: Explanation, workdir, progress) -> None:
    start = time.perf_counter()
    explanation.mark_running(LOADING, 0.0)
    audit = explanation.audit
    config = AuditConfig.from_dict(audit.config)
    device = resolve_device(config.device)
    bundle, probe = load_model(audit.clip_model), load_probe(audit.probe)
    sae = TopKSAE.load(fetch_sae(audit, workdir / "sae"), device).eval().requires_grad_(False)
    ctx = AuditContext.build(config, bundle, probe, sae, device)
    progress.check(force_poll=True)  # a cancel while the model loaded stops it here
    explanation.mark_running(EXPLAIN_STAGE, 50.0)
    label = None
    if explanation.item:
        path = dataset_folder(audit.dataset, only=[explanation.item]) / "images" / explanation.item
        label = dict(audit.dataset.labels()).get(explanation.item)
    else:
        path = local_path(explanation.image)
    with open_image(path) as img:
        pixels = bundle.preprocess(img.convert("RGB"))
    flags = list(audit.flags.values("head", "class_name", "latent", "label"))
    # a latent with no name reads as its likely concept, marked as such, not as a bare "unlabelled"
    labels = {latent: (f"likely “{closest}” (not named)" if label == UNLABELLED and closest else label)
              for latent, label, closest in audit.latents.values_list("latent", "label", "closest_concept")}
    result = explain_image(ctx, pixels, flags=flags, labels=labels)
    result["image"] = {"item": explanation.item or None, "label": label, "size": list(pixels.shape[-2:])}
    progress.check(force_poll=True)  # nor is an explanation cancelled meanwhile shown as succeeded
    explanation.device = str(device)
    explanation.save(update_fields=["device"])
    explanation.succeed(result, {EXPLAIN_STAGE: time.perf_counter() - start})
