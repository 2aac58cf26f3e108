"""One audit, end to end: ``run_audit(config, model, probe, dataset, progress) -> AuditResult``."""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .activations import DEFAULT_SHARD_SIZE, ActivationStore, check_cover, extract_activations, plan_shards
from .attribution import REGISTRY
from .config import AuditConfig
from .confirmation import _similar_mass, apply_confirmation, confirm_shard, merge_confirmations
from .context import AuditContext
from .data import ImageSet
from .errors import EngineError
from .flags import Evidence, find_flags, relevance_tables, select_flags
from .harm import HarmInputs, harm_sums, metadata_auroc, slice_accuracy
from .heads import LinearProbe
from .hooks import select_tokens
from .interventions import area_under_curve, deletion_curves
from .loading import ClipBundle, resolve_device
from .result import SCHEMA_VERSION, AuditResult
from .sae import SAEMetrics, TopKSAE, evaluate_sae, size_sae, train_sae
from .semantics import (UNLABELLED, ReferenceTracker, Vocabulary, alignment, choose_labels, class_alignments,
                        label_confidence, semantic_embeddings)

log = logging.getLogger(__name__)

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


def _faithfulness_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).squeeze(1)
        mask[idx[torch.randperm(len(idx), generator=gen)[:per_class]]] = True
    return mask


def _evaluate(sae: TopKSAE, store: ActivationStore, cfg, device) -> dict:
    """The SAE's quality over one pass of the cache (the same token sample for a trained or a given SAE)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return evaluate_sae(sae, (store.sae_vectors(a, gen, cfg.tokens_per_image)
                              for _, a, _ in store.iter_batches(1024)), device)


def _train_or_load_sae(store: ActivationStore, config: AuditConfig, folder: Path, device, report) -> tuple:
    if (folder / "sae.json").is_file() and (folder / "metrics.json").is_file():
        return TopKSAE.load(folder, device), json.loads((folder / "metrics.json").read_text())
    cfg = config.sae
    n_vectors = store.n_sae_vectors(cfg.tokens_per_image)
    n_latents, k, steps = size_sae(store.d_model, n_vectors, cfg)
    sae, curve = train_sae(
        store.training_batches(cfg.batch_size, cfg.seed, cfg.tokens_per_image),
        d_model=store.d_model, n_latents=n_latents, k=k, steps=steps,
        init_sample=store.sample(min(n_vectors, 16384), cfg.seed, cfg.tokens_per_image),
        config=cfg, device=device, progress=report)
    quality = _evaluate(sae, store, cfg, device)
    metrics = SAEMetrics(**quality, n_latents=n_latents, k=k, steps=steps, n_train_vectors=n_vectors,
                         loss_curve=[list(p) for p in curve]).to_dict()
    # metrics.json last: its presence marks a finished SAE, so a resumed audit skips training
    sae.save(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return sae, metrics


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
                dtype=config.dtype, cache_dtype=config.cache_dtype)


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
    """Train the SAE on the pooled activations (or evaluate a given one); ready for inference on ``device``."""
    if sae is None:
        sae, sae_metrics = _train_or_load_sae(store, config, folder, device, report)
    else:
        sae_metrics = _evaluate(sae.to(device), store, config.sae, device)
        sae_metrics.update(n_latents=sae.n_latents, k=sae.k, steps=0)
    if sae.d_model != store.d_model:
        raise EngineError(f"the SAE reads {sae.d_model}-dimensional activations, the layer has {store.d_model}")
    return sae.to(device).eval().requires_grad_(False), sae_metrics


def _run(config, bundle, probe, dataset, stages, device, workdir, semantic_model, sae, shard_size, sae_images=None):
    bundle.model.to(device)
    images = prepare_images(bundle, probe, dataset)
    torch.manual_seed(config.seed)
    shard_size = shard_size or DEFAULT_SHARD_SIZE

    with stages.stage("extract") as report:
        store = extract_activations(bundle, images, workdir / "activations", shard_size=shard_size,
                                    progress=report, **extract_kwargs(config, device))
    with stages.stage("train_sae") as report:
        sae_store, train_report = store, report
        if sae_images is not None:  # the SAE learns from another set of images; their labels do not matter
            sae_store, train_report = extract_sae_images(bundle, sae_images, workdir / "sae_activations", config,
                                                         device, report, shard_size=shard_size)
        sae, sae_metrics = fit_sae(sae_store, config, workdir / "sae", device, train_report, sae)
    ctx = AuditContext.build(config, bundle, probe, sae, device)
    shards = plan_shards(store.n, shard_size)
    with stages.stage("attribute") as report:
        partials = [attribute_shard(ctx, store, start, count,
                                    progress=lambda done, total, s=start: report(s + done, store.n))
                    for start, count in shards]
    with stages.stage("label"):
        merged = merge_partials(partials)
        labelled = label_latents(ctx, store, images, merged, semantic_model)
        result, amounts = summarize(ctx, store, images, merged, labelled, sae_metrics, workdir)
    with stages.stage("confirm") as report:
        if config.causal and result.flags:
            stats = [confirm_shard(ctx, store, result.flags, amounts, start, count,
                                   progress=lambda done, total, s=start: report(s + done, store.n))
                     for start, count in shards]
            apply_confirmation(result.flags, merge_confirmations(stats), amounts, config)
        else:
            apply_confirmation(result.flags, None, amounts, config)
    result.timings = dict(stages.timings)
    return result


# How each array of an attribution partial merges across shards.
_SUM = ("frequency", "class_activation", "rel_sum.", "curve_sum.", "faith_counts", "active_count", "harm.")
_ROWS = ("top_values.", "top_indices.", "predictions.", "act_values", "act_indices")


def attribute_shard(ctx: AuditContext, store: ActivationStore, start: int, count: int,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Attribution, reference tracking, activation statistics and deletion curves of images
    [start, start + count): a dict of numpy arrays that :func:`merge_partials` joins exactly
    (sums, maxima, top-m merges and rows in image order)."""
    config, device, sae = ctx.config, ctx.device, ctx.sae
    n_latents, n_classes, steps = sae.n_latents, ctx.n_classes, config.faithfulness_steps
    labels = store.labels
    faith_mask = _faithfulness_subset(labels, config.faithfulness_max_images, config.seed)
    tracker = ReferenceTracker(n_latents, config.n_references, device)
    frequency = torch.zeros(n_latents, device=device)
    max_activation = torch.zeros(n_latents, device=device)
    class_activation = torch.zeros(n_classes, n_latents, device=device)
    rel_sum = {h: torch.zeros(n_classes, n_latents, device=device) for h in ctx.heads}
    top_values = {h: np.zeros((count, ctx.keep), np.float32) for h in ctx.heads}
    top_indices = {h: np.zeros((count, ctx.keep), np.int64) for h in ctx.heads}
    curve_sum = {h: {m: torch.zeros(n_classes, steps + 1, device=device) for m in REGISTRY} for h in ctx.heads}
    faith_counts = torch.zeros(n_classes, device=device)
    predictions = {h: np.zeros(count, np.int64) for h in ctx.heads}
    n_act = min(n_latents, ctx.keep)
    act_values, act_indices = np.zeros((count, n_act), np.float32), np.zeros((count, n_act), np.int64)
    active_count = torch.zeros(n_classes, n_latents, device=device)
    harm = {h: None for h in ctx.heads}
    with torch.no_grad():
        for lo, acts, emb in store.iter_batches(config.batch_size, start, start + count):
            acts, emb = acts.to(device), emb.to(device)
            b = acts.shape[0]
            row = lo - start
            positions = torch.arange(lo, lo + b)
            y = labels[lo:lo + b].to(device)
            onehot = F.one_hot(y, n_classes).float()
            selected = select_tokens(acts, config.token)
            values, indices = sae.encode_sparse(selected)
            z = torch.zeros(*selected.shape[:-1], n_latents, device=device).scatter(-1, indices, values)
            if z.ndim == 3:
                per_image = z.amax(1) if config.spatial_pool == "max" else z.mean(1)
                mean_act = z.mean(1)
            else:
                per_image = mean_act = z
            tracker.update(per_image, positions.to(device))
            frequency += (per_image > 0).float().sum(0)
            max_activation = torch.maximum(max_activation, per_image.amax(0))
            class_activation += onehot.T @ mean_act
            active = per_image > 0
            strongest = per_image.topk(n_act, dim=1)  # each image's most active latents: AUROC per metadata column
            act_values[row:row + b], act_indices[row:row + b] = (strongest.values.cpu().numpy(),
                                                                 strongest.indices.cpu().numpy())
            active_count += onehot.T @ active.float()
            sub = faith_mask[lo:lo + b].to(device)
            for h, head in ctx.heads.items():
                logits = head(emb)
                predicted = logits.argmax(1)
                predictions[h][row:row + b] = predicted.cpu().numpy()
                sums = harm_sums(active, onehot, predicted, logits.gather(1, y.unsqueeze(1)).squeeze(1), n_classes)
                harm[h] = sums if harm[h] is None else {k: harm[h][k] + v for k, v in sums.items()}
                rel = ctx.methods[h]["act_grad"].attribute(acts, target=y)[:, 0]  # [b, L]
                rel_sum[h] += onehot.T @ rel
                top = rel.topk(ctx.keep, dim=1)
                top_values[h][row:row + b] = top.values.cpu().numpy()
                top_indices[h][row:row + b] = top.indices.cpu().numpy()
                if sub.any():
                    for name, method in ctx.methods[h].items():
                        scores = rel[sub] if name == "act_grad" else method.attribute(
                            acts[sub], target=y[sub], positions=positions[sub.cpu()])[:, 0]
                        curves = deletion_curves(ctx.tail, sae, head, acts[sub], y[sub], scores, steps,
                                                 config.token)
                        curve_sum[h][name] += onehot[sub].T @ curves
            faith_counts += onehot[sub].sum(0)
            if progress:
                progress(row + b, count)
    out = {"start": np.int64(start), "count": np.int64(count), "ref_values": tracker.values.cpu().numpy(),
           "ref_indices": tracker.indices.cpu().numpy(), "frequency": frequency.cpu().numpy(),
           "max_activation": max_activation.cpu().numpy(), "class_activation": class_activation.cpu().numpy(),
           "faith_counts": faith_counts.cpu().numpy(), "active_count": active_count.cpu().numpy(),
           "act_values": act_values, "act_indices": act_indices}
    for h in ctx.heads:
        out[f"rel_sum.{h}"] = rel_sum[h].cpu().numpy()
        for key in ("correct", "called", "score"):
            out[f"harm.{h}.{key}"] = (harm[h][key].cpu().numpy() if harm[h] is not None
                                      else np.zeros((n_classes, n_latents), np.float32))
        out[f"harm.{h}.score_total"] = (harm[h]["score_total"].cpu().numpy() if harm[h] is not None
                                        else np.zeros(n_classes, np.float32))
        out[f"top_values.{h}"], out[f"top_indices.{h}"] = top_values[h], top_indices[h]
        out[f"predictions.{h}"] = predictions[h]
        for m in REGISTRY:
            out[f"curve_sum.{h}.{m}"] = curve_sum[h][m].cpu().numpy()
    return out


def save_partial(partial: dict, path: str | os.PathLike) -> None:
    """Write an attribution partial atomically (a half-written file is never read as finished)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        np.savez(fh, **partial)
    os.replace(tmp, path)


def load_partial(path: str | os.PathLike) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def merge_partials(partials: list[dict]) -> dict:
    """Join attribution partials of disjoint shards that cover the dataset: exact top-m reference merge,
    sums and maxima in image order, per-image rows concatenated in image order."""
    partials = sorted(partials, key=lambda p: int(p["start"]))
    expected = check_cover([(int(p["start"]), int(p["count"])) for p in partials], "attribution")
    merged = {"start": np.int64(0), "count": np.int64(expected)}
    first = partials[0]
    tracker = None
    for p in partials:
        part = ReferenceTracker(p["ref_values"].shape[0], p["ref_values"].shape[1])
        part.values, part.indices = torch.from_numpy(p["ref_values"]), torch.from_numpy(p["ref_indices"])
        if tracker is None:
            tracker = part
        else:
            tracker.merge(part)
    merged["ref_values"], merged["ref_indices"] = tracker.values.numpy(), tracker.indices.numpy()
    for key in first:
        if key in merged:
            continue
        if key == "max_activation":
            merged[key] = np.maximum.reduce([p[key] for p in partials])
        elif key.startswith(_SUM):
            merged[key] = np.sum([p[key] for p in partials], axis=0, dtype=first[key].dtype)
        elif key.startswith(_ROWS):
            merged[key] = np.concatenate([p[key] for p in partials])
        elif not key.startswith(("ref_",)):
            raise EngineError(f"unknown partial field {key!r}")
    return merged


def label_latents(ctx: AuditContext, store: ActivationStore, images: ImageSet, merged: dict,
                  semantic_model: ClipBundle | None = None) -> dict:
    """Each latent's semantic embedding, clarity, alignments and label (stage 'label')."""
    config, class_names = ctx.config, ctx.class_names
    tracker = ReferenceTracker(*merged["ref_values"].shape)
    tracker.values, tracker.indices = torch.from_numpy(merged["ref_values"]), torch.from_numpy(merged["ref_indices"])
    if semantic_model is None:
        semantic_model, image_embeddings = ctx.bundle, store.embeddings()
    else:
        image_embeddings = _embed_references(semantic_model, images, tracker, ctx.device, config.batch_size)
    sem, clarity, n_refs = semantic_embeddings(tracker.indices, tracker.values, image_embeddings)
    vocab = Vocabulary.build(class_names, config.expected_concepts, config.artifact_vocabulary,
                             config.general_vocabulary)
    vocab.encode(semantic_model, config.prompt_templates)
    align = alignment(sem, vocab)  # [L, V]
    has_refs = n_refs > 0
    expected_alignment, specific_alignment = class_alignments(align, vocab, class_names,
                                                              config.expected_concepts)  # [C, L] each
    label_index, label_alignment = choose_labels(align, vocab, expected_alignment)
    scale = float(semantic_model.model.logit_scale.exp().clamp(max=100)) if hasattr(semantic_model.model,
                                                                                     "logit_scale") else 100.0
    confidence = label_confidence(align, vocab, expected_alignment, scale)
    closest = [vocab.concepts[j] if has_refs[i] else None for i, j in enumerate(label_index.tolist())]
    return {
        "tracker": tracker, "sem": sem, "clarity": clarity, "vocab": vocab,
        # a latent no concept describes well is "unlabelled": its images speak for it, not a confident wrong name
        "labels_text": [None if c is None else (c if confidence[i] >= config.label_min_confidence else UNLABELLED)
                        for i, c in enumerate(closest)],
        "closest_concepts": closest, "label_confidence": confidence,
        "label_indices": [j if has_refs[i] else None for i, j in enumerate(label_index.tolist())],
        "label_alignment": label_alignment, "expected_alignment": expected_alignment,
        "specific_alignment": specific_alignment,
        "name_alignment": torch.stack([align[:, vocab.index[name.lower()]] for name in class_names]),
    }


def summarize(ctx: AuditContext, store: ActivationStore, images: ImageSet, merged: dict, labelled: dict,
              sae_metrics: dict, workdir: Path) -> tuple[AuditResult, list[float]]:
    """Flags, relevance tables, faithfulness, accuracy and latents from the merged partial (stage 'flag').

    Returns the result (flags not yet causally confirmed) and, per flag, the amount confirmation inserts.
    Writes the full relevance tables to ``workdir / relevance.npz``.
    """
    config, class_names, heads = ctx.config, ctx.class_names, list(ctx.heads)
    n_classes = len(class_names)
    labels = store.labels
    counts = torch.bincount(labels, minlength=n_classes)
    labels_text, label_indices = labelled["labels_text"], labelled["label_indices"]
    vocab, clarity, tracker = labelled["vocab"], labelled["clarity"], labelled["tracker"]
    expected_alignment = labelled["expected_alignment"]
    tables = {h: relevance_tables(torch.from_numpy(merged[f"rel_sum.{h}"]), counts) for h in heads}
    flags = []
    for h in heads:
        mean, share = tables[h]
        flags += find_flags(h, mean, share, class_names, labels=labels_text, label_indices=label_indices,
                            label_alignment=labelled["label_alignment"], expected_alignment=expected_alignment,
                            name_alignment=labelled["name_alignment"], clarity=clarity, vocab=vocab, config=config)
    harm = HarmInputs(merged, labels, n_classes)
    for flag in flags:
        c = class_names.index(flag["class_name"])
        flag["probe_share"] = float(tables["probe"][1][c, flag["latent"]])
        flag["zero_shot_share"] = float(tables["zero_shot"][1][c, flag["latent"]])
        flag["harm"] = harm.evidence(c, flag["latent"], flag["head"], name=flag["class_name"], config=config)
    activity = _sparse_activity(merged)
    evidence = Evidence(activity, labels.numpy(), {h: np.asarray(merged[f"predictions.{h}"]) for h in heads},
                        class_names, config)
    flags = select_flags(flags, labelled["sem"], config, evidence)
    class_mean = torch.from_numpy(merged["class_activation"]) / counts.clamp_min(1).unsqueeze(1)
    metadata = getattr(images, "metadata", None) or {}
    amounts = []
    for flag in flags:
        c = class_names.index(flag["class_name"])
        latent = flag["latent"]
        flag["references"] = [images.ids[i] for i in tracker.references(latent)]
        # what the latent means, as a unit vector in the semantic model's embedding space: the audit diff
        # matches flags across audits with it (latent indices differ between SAEs)
        flag["semantic"] = [round(v, 5) for v in F.normalize(labelled["sem"][latent], dim=0).tolist()]
        top_rel = (merged[f"top_values.{flag['head']}"], merged[f"top_indices.{flag['head']}"])
        flag["top_images"] = _top_images(top_rel, latent, labels, c, images.ids, config.top_images_per_flag)
        flag["label_confidence"] = float(labelled["label_confidence"][latent])
        flag["closest_concept"] = labelled["closest_concepts"][latent]
        flag["metadata_auroc"] = metadata_auroc(activity(latent), metadata)
        flag["baseline_latents"] = _similar_mass(class_mean[c], latent, exclude=[
            i for f in flags if f["class_name"] == flag["class_name"] for i in f["concept_latents"]])
        amounts.append(float(class_mean[c, latent]))

    comparison = {}
    for c, name in enumerate(class_names):
        probe_flags = [f for f in flags if f["class_name"] == name and f["head"] == "probe"]
        flagged = sorted({i for f in probe_flags for i in f["concept_latents"]})
        probe_share = float(tables["probe"][1][c, flagged].sum()) if flagged else 0.0
        zs_share = float(tables["zero_shot"][1][c, flagged].sum()) if flagged else 0.0
        comparison[name] = {
            "flagged_latents": flagged, "probe_share": probe_share, "zero_shot_share": zs_share,
            "measured_harm": sum(f["harm"]["measured"] for f in probe_flags),
            # the probe leans on the flagged latents more than zero-shot does: by share, or by measured harm
            # (the probe's with/without gap exceeds zero-shot's)
            "amplified_by_probe": bool(probe_flags) and (
                any(f["harm"]["measured"] for f in probe_flags)
                or (probe_share >= config.flag_min_share and probe_share >= config.amplification_ratio * zs_share)),
        }

    relevance = {}
    for h in heads:
        mean, share = tables[h]
        relevance[h] = {}
        for c, name in enumerate(class_names):
            top = torch.argsort(share[c], descending=True)[: config.report_top_n].tolist()
            relevance[h][name] = {
                "total_positive_relevance": float(mean[c].clamp_min(0).sum()),
                "top": [{"latent": i, "mean_relevance": float(mean[c, i]), "share": float(share[c, i]),
                         "label": labels_text[i]} for i in top if float(mean[c, i]) != 0.0],
            }

    faith_counts = merged["faith_counts"]
    faithfulness = {}
    for h in heads:
        faithfulness[h] = {}
        for c, name in enumerate(class_names):
            if faith_counts[c] == 0:
                continue
            faithfulness[h][name] = {}
            for m in REGISTRY:
                curve = torch.from_numpy(merged[f"curve_sum.{h}.{m}"][c] / faith_counts[c])
                faithfulness[h][name][m] = {"curve": curve.tolist(), "auc": float(area_under_curve(curve)),
                                            "n_images": int(faith_counts[c])}

    n_latents = ctx.sae.n_latents
    freq = torch.from_numpy(merged["frequency"] / store.n)
    max_activation = merged["max_activation"]
    specific_alignment = labelled["specific_alignment"]
    latents = [{
        "latent": i, "label": labels_text[i],
        "label_source": vocab.sources[label_indices[i]] if label_indices[i] is not None else None,
        "label_category": (vocab.categories[label_indices[i]] if label_indices[i] is not None
                           and labels_text[i] != UNLABELLED else None),
        "label_confidence": float(labelled["label_confidence"][i]), "closest_concept": labelled["closest_concepts"][i],
        "alignment": float(labelled["label_alignment"][i]) if labels_text[i] is not None else None,
        "clarity": float(clarity[i]), "frequency": float(freq[i]), "max_activation": float(max_activation[i]),
        "references": [images.ids[j] for j in tracker.references(i)],
        "expected_alignment": {name: float(expected_alignment[c, i]) for c, name in enumerate(class_names)},
        "specific_alignment": {name: float(specific_alignment[c, i]) for c, name in enumerate(class_names)},
    } for i in range(n_latents)]

    accuracy = {}
    for h in heads:
        correct = torch.from_numpy(merged[f"predictions.{h}"]) == labels
        accuracy[h] = {"overall": float(correct.float().mean()),
                       "per_class": {name: float(correct[labels == c].float().mean()) if counts[c] else None
                                     for c, name in enumerate(class_names)}}

    slices = slice_accuracy(metadata, {h: merged[f"predictions.{h}"] for h in heads}, labels.numpy(), class_names)

    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(workdir / "relevance.npz", classes=np.array(class_names),
             **{f"{h}_mean": tables[h][0].numpy() for h in heads},
             **{f"{h}_share": tables[h][1].numpy() for h in heads},
             alignment_expected=expected_alignment.numpy(), clarity=clarity.numpy(), frequency=freq.numpy())

    bundle, device = ctx.bundle, ctx.device
    result = AuditResult(
        schema_version=SCHEMA_VERSION,
        config=config.to_dict(),
        model={"name": bundle.name, "layer": config.layer, "token": config.token, "n_blocks": bundle.n_blocks,
               "width": bundle.width, "embed_dim": bundle.embed_dim},
        classes=list(class_names),
        dataset={"n_images": store.n, "per_class": {n: int(counts[c]) for c, n in enumerate(class_names)}},
        sae=sae_metrics,
        accuracy=accuracy,
        latents=latents,
        relevance=relevance,
        flags=flags,
        comparison=comparison,
        faithfulness=faithfulness,
        slices=slices,
        timings={},
        environment={"device": str(device), "torch": torch.__version__, "host": platform.node(),
                     "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        artifacts={"relevance": "relevance.npz", "sae": "sae/", "activations": "activations/"},
    )
    return result, amounts


def _sparse_activity(merged: dict) -> Callable[[int], np.ndarray]:
    """latent -> its activation on every image (0 where it is not among the image's strongest)."""
    values, indices = merged["act_values"], merged["act_indices"]

    def activity(latent: int) -> np.ndarray:
        return np.where(indices == latent, values, 0.0).max(1)

    return activity


def _top_images(top_rel, latent: int, labels: torch.Tensor, c: int, ids: list, n: int) -> list[dict]:
    values, indices = top_rel
    hit = (indices == latent) & (labels.numpy() == c)[:, None]
    rows, cols = np.nonzero(hit)
    rel = values[rows, cols]
    order = np.argsort(-rel)[:n]
    return [{"image": ids[int(rows[o])], "relevance": float(rel[o])} for o in order if rel[o] > 0]


def _embed_references(semantic_model: ClipBundle, images: ImageSet, tracker: ReferenceTracker, device,
                      batch_size: int) -> torch.Tensor:
    """Semantic model embeddings of the reference images (others stay zero: they are never read)."""
    needed = sorted({i for i in tracker.indices[tracker.values > 0].tolist()})
    sem_images = images.with_preprocess(semantic_model.preprocess)
    out = None
    model = semantic_model.model.to(device)
    with torch.inference_mode():
        for lo in range(0, len(needed), batch_size):
            idx = needed[lo:lo + batch_size]
            pixels = torch.stack([sem_images[i][0] for i in idx]).to(device)
            emb = model.encode_image(pixels).float().cpu()
            if out is None:
                out = torch.zeros(len(images), emb.shape[1])
            out[idx] = emb
    if out is None:
        out = torch.zeros(len(images), semantic_model.embed_dim)
    return out
