"""One audit, end to end: ``run_audit(config, model, probe, dataset, progress) -> AuditResult``.

The stages run here in the order ``workers.engine.stages`` declares; each stage's work lives in its own module:
activations (extract), sae (train_sae), partials (attribute), labelling and summary (label), confirmation (confirm).
The stage bodies are written once, here: ``train_stage``, ``attribute_shard`` (one shard), ``label_stage``,
``confirm_shard`` (one shard) and ``confirm_stage``. ``run_audit`` runs them in one process, shard after shard;
the sharded workers (``workers.sharded``) run the same bodies on many, handing over the typed values between
stages through files (the activation store, the SAE's folder, ``Partial``, ``Draft``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .activations import DEFAULT_SHARD_SIZE, ActivationStore, extract_activations, plan_shards
from .config import AuditConfig
from .confirmation import apply_confirmation, confirm_shard, merge_confirmations
from .context import AuditContext
from .data import ImageSet
from .errors import EngineError
from .explain import attach_flag_heatmaps, flag_image_keys
from .heads import LinearProbe
from .hooks import check_token_reaches_output
from .labelling import label_latents
from .loading import ClipBundle, resolve_device
from .partials import Partial, attribute_shard
from .result import AuditResult
from .dictionaries import evaluate, flags_of_others, load_others, train_dictionaries
from .sae import TopKSAE
from .stages import ENGINE_STAGES
from .summary import summarize

# The names the sharded workers import from here; their homes are the modules above.
__all__ = ["run_audit", "prepare_images", "extract_kwargs", "train_stage", "load_others", "AuditContext", "Draft",
           "AuditResult", "attribute_shard", "save_partial", "load_partial", "label_stage", "confirm_shard",
           "confirm_stage"]
save_partial, load_partial, merge_partials = Partial.save, Partial.load, Partial.merge

log = logging.getLogger(__name__)

EXTRACT, TRAIN_SAE, ATTRIBUTE, LABEL, CONFIRM = ENGINE_STAGES
Progress = Callable[[str, int, int], None]


class _Stages:
    """Times each stage and reports progress as (stage, done, total)."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self.report(name, 0, 1)
        yield lambda done, total: self.report(name, done, total)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.report(name, 1, 1)

    def report(self, name, done, total):
        if self.progress:
            self.progress(name, done, total)


def run_audit(
    config: AuditConfig,
    model: ClipBundle,
    probe: LinearProbe,
    dataset: ImageSet,
    progress: Progress | None = None,
    *,
    workdir: str | os.PathLike | None = None,
    semantic_model: ClipBundle | None = None,
    sae: TopKSAE | None = None,
    shard_size: int | None = None,
    sae_images: ImageSet | None = None,
) -> AuditResult:
    """Audit ``probe`` (and the zero-shot classifier of its class names) on ``model`` over ``dataset``.

    ``workdir`` keeps the activation cache and the SAE; a finished stage found
    there is reused, so a re-run after a crash resumes. ``semantic_model``
    labels latents with another CLIP (default: the audited one). ``sae`` skips
    training and uses a given SAE. ``shard_size`` splits extraction, attribution
    and confirmation into shards of that many images, one after another, the way
    the service spreads them over workers (the answer does not depend on it).
    ``sae_images`` trains the SAE on these images' activations (e.g. a larger,
    unlabelled set; their labels are ignored) instead of ``dataset``'s;
    attribution, labels and flags still run on ``dataset``.
    """
    if isinstance(config, dict):
        config = AuditConfig.from_dict(config)
    stages = _Stages(progress)
    device = resolve_device(config.device)
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="clip-audit-")
        workdir = own_tmp.name
    workdir = Path(workdir)
    try:
        return _run(config, model, probe, dataset, stages, device, workdir, semantic_model, sae, shard_size,
                    sae_images)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def prepare_images(bundle: ClipBundle, probe: LinearProbe, dataset: ImageSet) -> ImageSet:
    """The dataset as the engine reads it: labels in the probe's class order, the model's preprocessing."""
    probe.check_fits(bundle.embed_dim)
    images = dataset.remap(probe.class_names).with_preprocess(bundle.preprocess)
    if len(images) == 0:
        raise EngineError("the dataset has no images")
    return images


def extract_kwargs(config: AuditConfig, device) -> dict:
    return dict(layer=config.layer, token=config.token, batch_size=config.batch_size, device=device,
                dtype=config.dtype, cache_dtype=config.cache_dtype,
                patch_tokens=config.sae.patch_tokens if config.token == "cls" else 0)


def extract_sae_images(bundle: ClipBundle, sae_images: ImageSet, folder: Path, config: AuditConfig, device,
                       report: Callable[[int, int], None], shard_size: int | None = None
                       ) -> tuple[ActivationStore, Callable[[int, int], None]]:
    """Activations of the images an SAE is trained on instead of the audited ones, reported as the first half of
    the SAE stage; returns the store and the report for its second half (training)."""
    store = extract_activations(bundle, sae_images.with_preprocess(bundle.preprocess), folder,
                                shard_size=shard_size or DEFAULT_SHARD_SIZE,
                                progress=lambda done, total: report(done, 2 * total), **extract_kwargs(config, device))
    return store, lambda done, total: report(total + done, 2 * total)


def fit_sae(store: ActivationStore, config: AuditConfig, folder: Path, device, report=None,
            sae: TopKSAE | None = None) -> tuple[TopKSAE, dict]:
    """Train the audit's dictionaries on the pooled activations (or evaluate a given SAE, which comes alone);
    returns the first, ready for inference on ``device``, and its metrics."""
    if sae is None:
        sae, sae_metrics = train_dictionaries(store, config, folder, device, report)
    else:
        if sae.d_model != store.d_model:  # before measuring it: a wrong width is the user's input, not a shape bug
            raise EngineError(f"the SAE reads {sae.d_model}-dimensional activations, the layer has {store.d_model}")
        sae_metrics = evaluate(sae.to(device), store, config, device)
        sae_metrics.update(n_latents=sae.n_latents, k=sae.k, steps=0)
        # kept with the audit as a trained one is (its artifacts: corrections and explanations reload it)
        sae.save(folder)
        (Path(folder) / "metrics.json").write_text(json.dumps(sae_metrics))
    if sae.d_model != store.d_model:
        raise EngineError(f"the SAE reads {sae.d_model}-dimensional activations, the layer has {store.d_model}")
    return sae.to(device).eval().requires_grad_(False), sae_metrics


def train_stage(bundle: ClipBundle, store: ActivationStore | None, config: AuditConfig, folder: Path, device,
                report=None, *, sae: TopKSAE | None = None, sae_images: ImageSet | None = None,
                scratch: Path | None = None, shard_size: int | None = None) -> tuple[TopKSAE, dict]:
    """The train_sae stage: the audit's dictionaries trained on ``store`` (the audited images' activations), or
    on ``sae_images``' activations extracted into ``scratch`` first (another set of images; their labels do not
    matter), or a given ``sae`` measured. Writes them to ``folder``; returns the first and its metrics."""
    if sae_images is not None:
        store, report = extract_sae_images(bundle, sae_images, scratch, config, device, report, shard_size=shard_size)
    return fit_sae(store, config, folder, device, report, sae)


@dataclass
class Draft:
    """The label stage's hand-off to confirmation: the result with its flags not yet confirmed, and per flag
    the amount confirmation inserts."""

    result: AuditResult
    amounts: list[float]

    def needs_confirmation(self, config: AuditConfig) -> bool:
        return bool(config.causal and self.result.flags)

    def to_dict(self) -> dict:
        return {"result": self.result.to_dict(), "amounts": self.amounts}

    @classmethod
    def from_dict(cls, data: dict) -> "Draft":
        return cls(AuditResult.from_dict(data["result"]), data["amounts"])


def label_stage(ctx: AuditContext, store: ActivationStore, images: ImageSet, partials: list[Partial],
                sae_metrics: dict, folder: Path, *, voters: list, semantic_model: ClipBundle | None = None,
                fetch_images: Callable[[list[str]], None] | None = None) -> Draft:
    """The label stage: the attribution partials merged, latents labelled, flags found and put to the vote of
    the other dictionaries (``voters``, ``load_others``), the flags' heatmaps drawn (after
    ``fetch_images(keys)`` where the images are remote). Writes the relevance tables to ``folder``."""
    merged = Partial.merge(partials)
    labelled = label_latents(ctx, store, images, merged, semantic_model)
    others = flags_of_others(ctx, store, images, voters, semantic_model, labelled.vocab)
    result, amounts = summarize(ctx, store, images, merged, labelled, sae_metrics, folder, others)
    if ctx.config.heatmaps:
        if fetch_images is not None:
            fetch_images(flag_image_keys(result.flags))
        attach_flag_heatmaps(ctx, images, result.flags, ctx.config.batch_size)
    return Draft(result, amounts)


def confirm_stage(draft: Draft, stats: list[dict] | None, config: AuditConfig) -> AuditResult:
    """The confirm stage's reduction: the shards' ablation and insertion counts (``confirm_shard``; None when
    the draft needs no confirmation) summed and applied to the flags."""
    merged = merge_confirmations(stats) if draft.needs_confirmation(config) else None
    apply_confirmation(draft.result.flags, merged, draft.amounts, config)
    return draft.result


def _run(config, bundle, probe, dataset, stages, device, workdir, semantic_model, sae, shard_size, sae_images=None):
    bundle.model.to(device)
    check_token_reaches_output(bundle.model.visual, config.layer, config.token)  # before hours of work for no flags
    images = prepare_images(bundle, probe, dataset)
    torch.manual_seed(config.seed)
    shard_size = shard_size or DEFAULT_SHARD_SIZE

    with stages.stage(EXTRACT) as report:
        store = extract_activations(bundle, images, workdir / "activations", shard_size=shard_size,
                                    progress=report, **extract_kwargs(config, device))
    given = sae is not None
    with stages.stage(TRAIN_SAE) as report:
        sae, sae_metrics = train_stage(bundle, store, config, workdir / "sae", device, report, sae=sae,
                                       sae_images=sae_images, scratch=workdir / "sae_activations",
                                       shard_size=shard_size)
    ctx = AuditContext.build(config, bundle, probe, sae, device)
    shards = plan_shards(store.n, shard_size)
    with stages.stage(ATTRIBUTE) as report:
        partials = [attribute_shard(ctx, store, start, count,
                                    progress=lambda done, total, s=start: report(s + done, store.n))
                    for start, count in shards]
    with stages.stage(LABEL):
        # a given SAE comes alone; trained ones were trained with the dictionaries that vote on their flags
        voters = [] if given else load_others(workdir / "sae", config, device)
        draft = label_stage(ctx, store, images, partials, sae_metrics, workdir, voters=voters,
                            semantic_model=semantic_model)
    with stages.stage(CONFIRM) as report:
        stats = None
        if draft.needs_confirmation(config):
            stats = [confirm_shard(ctx, store, draft.result.flags, draft.amounts, start, count,
                                   progress=lambda done, total, s=start: report(s + done, store.n))
                     for start, count in shards]
        result = confirm_stage(draft, stats, config)
    result.timings = dict(stages.timings)
    return result
