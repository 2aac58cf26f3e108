"""A correction end to end, as the service's job runs it and the case study proves it::

    audited = AuditedInputs(bundle, probe, images, sae, flags=[("melanoma", 12)])
    outcome = run_correction(audited, AuditConfig(layer=-1, token="cls"), CorrectionOptions(), workdir=workdir)
    outcome.probe.save("probe-corrected.npz"); outcome.table["slices"]["melanoma, latent 12 inactive"]

The audited images' activations are extracted once; each chosen latent's direction is measured on them through the
real tail (:mod:`workers.engine.directions`); the probe is corrected by ``project`` or, with the probe's training
split, ``refit`` or ``reweight`` (:func:`~workers.engine.correction.correct_probe`); old and new probe are compared
overall, per class and on every slice the chosen flags hurt (:func:`~workers.engine.proof.harm_slices`) plus the
"clean" images, on which none of the chosen latents is active. Re-auditing the new probe is the service's next step
(an ordinary audit that reuses the SAE).

With the training split the SAE also reads its images, and the outcome shows the data behind the shortcut
(:func:`training_data`): how often each class's training images have the concept, the imbalance a probe learnt
it from, and the images that have it (:func:`training_data_csv`).
"""
from __future__ import annotations

import csv
import io
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .activations import ActivationStore, extract_activations
from .config import ANCHORS, ESTIMATES, AuditConfig, CorrectionOptions
from .correction import TrainingSplit, correct_probe
from .columns import binary_column
from .data import ImageSet
from .directions import (ShortcutDirections, column_directions, concept_directions, shortcut_directions,
                         widened_directions)
from .errors import EngineError, checkpoint
from .heads import LinearProbe
from .hooks import VisionTail, select_tokens
from .loading import ClipBundle, resolve_device
from .pipeline import prepare_images
from .proof import compare_probes, harm_slices
from .sae import TopKSAE

CLEAN_SLICE = "images without any chosen latent"  # the slice whose accuracy a correction must not cost


@dataclass
class CorrectionOutcome:
    """The corrected probe, what was done (``info``: method, reason, anchor, C...), the proof table
    (:func:`~workers.engine.proof.compare_probes`), the shortcut's directions (``shortcut``: latents, rank,
    images each is active on), each stage's seconds and, when the probe's training split was given, the data
    behind the shortcut (``training_data``: :func:`training_data`; None without it)."""

    probe: LinearProbe
    info: dict
    table: dict
    shortcut: dict
    timings: dict
    training_data: dict | None = None

    def to_dict(self) -> dict:
        return {"info": self.info, "table": self.table, "shortcut": self.shortcut, "timings": self.timings,
                "training_data": self.training_data}


@dataclass(frozen=True)
class AuditedInputs:
    """What the audit being corrected provides: its model, probe, images and SAE, the flags chosen on it
    ((class name, latent) pairs) and, optionally, the concepts they stand for (the chosen latents grouped by
    concept, e.g. the flags' ``concept_latents``; default: each flag's latent alone)."""

    bundle: ClipBundle
    probe: LinearProbe
    images: ImageSet
    sae: TopKSAE
    flags: Sequence[tuple[str, int]]
    concepts: Sequence[Sequence[int]] | None = None


def run_correction(audited: AuditedInputs, config: AuditConfig, options: CorrectionOptions | None = None, *,
                   method: str | None = None, training: ImageSet | None = None, reference: LinearProbe | None = None,
                   workdir: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None
                   ) -> CorrectionOutcome:
    """Correct ``audited.probe`` so that it no longer reads the latents of ``audited.flags`` (flags of the audit of
    that probe on ``audited.images`` with ``audited.sae``), and measure old against new on those images.

    ``config``: the audit's options (layer, token, batch size, device, dtypes and seed are read from it).
    ``options`` (default :class:`CorrectionOptions`): ``directions`` "regression", "removal" or "widened" (how
    the direction is measured: :mod:`~workers.engine.directions`); ``anchor``: "mean" (the mean features of the
    audited images), "midpoint" or "clean"; ``C``: the new fit's inverse regularization (needs ``training``);
    ``column``: a 0/1 column of the images' metadata (labels.csv) marking those that show the chosen flags'
    concept, whose direction (:func:`~workers.engine.directions.column_directions`) is removed instead of the
    SAE's; on a training split that has the column too, it says which images show the concept.
    ``method``: "project", "refit" or "reweight" (the last two need ``training``, the probe's training split:
    labelled images); None: ``refit`` when ``training`` is given, ``project`` otherwise. With ``training`` the
    outcome also carries the data behind the shortcut (:func:`training_data`, on the flags' latents).
    ``reference``: a probe to measure how much of the way to it the correction went (e.g. one trained without the
    correlation). ``workdir`` keeps the activation caches.
    ``progress(stage, done, total)`` reports the stages of ``workers.engine.stages.CORRECTION_STAGES``.
    """
    options = CorrectionOptions() if options is None else options
    _check_options(audited.flags, options)
    # before any work: a column that is not there, or not 0/1, is refused now
    marked = (None if options.column is None
              else binary_column(audited.images.metadata, options.column, "to mark the concept's images"))
    run = _Run(audited.bundle, audited.probe, audited.sae, config, resolve_device(config.device), Path(workdir),
               progress or (lambda stage, done, total: None))
    latents, concepts = _chosen(audited.flags, audited.concepts)
    run.place()
    with run.timed("extract"):
        images = prepare_images(run.bundle, run.probe, audited.images)
        store = run.extract(images, "activations", "extract")
    with run.timed("directions"):
        run.report("directions", 0, 1)
        shortcut = _measure(run, store, options.directions, concepts, latents, images.labels)
        if marked is not None:
            shortcut = _along_column(run, store, images, shortcut, marked, options.column)
        run.report("directions", 1, 1)
    split = _training_split(run, training, options.C, latents, options.column)
    with run.timed("correct"):
        run.report("correct", 0, 1)
        new, info = correct_probe(run.probe.cpu(), shortcut, method, split, anchor=options.anchor, seed=config.seed)
        run.report("correct", 1, 1)
    with run.timed("compare"):
        run.report("compare", 0, 1)
        labels = images.labels.numpy()
        slices = harm_slices(shortcut, labels, run.probe.class_names, audited.flags, images.metadata)
        slices[CLEAN_SLICE] = ~shortcut.active.numpy().any(1)
        table = compare_probes(run.probe, new, store.embeddings(), labels, slices, reference)
        table["clean_slice"] = CLEAN_SLICE
        tracking = tracking_latents(run, store, concepts)
        run.report("compare", 1, 1)
    marked_by = options.column if split is not None and split.activation is None and options.column else None
    data = None if split is None else {"latents": latents, "column": marked_by,
                                       **training_data(split, run.probe.class_names)}
    facts = {**_facts(shortcut, audited.flags, len(labels)), "concepts": concepts, "tracking": tracking}
    return CorrectionOutcome(new, info, table, facts, run.timings, data)


@dataclass
class _Run:
    """One correction's model, probe and SAE (on ``device`` once placed), where it works and what it reports."""

    bundle: ClipBundle
    probe: LinearProbe
    sae: TopKSAE
    config: AuditConfig
    device: torch.device
    workdir: Path
    report: Callable[[str, int, int], None]
    timings: dict[str, float] = field(default_factory=dict)

    def place(self) -> None:
        self.bundle.model.to(self.device)
        self.probe = self.probe.to(self.device)
        self.sae = self.sae.to(self.device).eval().requires_grad_(False)

    @contextmanager
    def timed(self, stage: str):
        """Time the block as ``stage``'s seconds (kept only when it finishes)."""
        start = time.perf_counter()
        yield
        self.timings[stage] = time.perf_counter() - start

    def extract(self, images: ImageSet, folder: str, stage: str) -> ActivationStore:
        """The residual streams of ``images`` at the audit's layer, cached in ``workdir / folder``."""
        c = self.config
        return extract_activations(self.bundle, images, self.workdir / folder,
                                   progress=lambda done, total: self.report(stage, done, total), layer=c.layer,
                                   token=c.token, batch_size=c.batch_size, device=self.device, dtype=c.dtype,
                                   cache_dtype=c.cache_dtype)


def _check_options(flags: Sequence[tuple[str, int]], options: CorrectionOptions) -> None:
    if not flags:
        raise EngineError("no flag chosen: name at least one (class, latent) to correct")
    if options.anchor is not None and options.anchor not in ANCHORS:
        raise EngineError(f"unknown anchor {options.anchor!r}; known: {', '.join(ANCHORS)}")
    if options.directions not in ESTIMATES:
        raise EngineError(f"unknown way to measure directions {options.directions!r}; known: "
                          f"{', '.join(ESTIMATES)}")


def _chosen(flags: Sequence[tuple[str, int]], concepts: Sequence[Sequence[int]] | None
            ) -> tuple[list[int], list[list[int]]]:
    """(the flags' latents, the concepts they belong to: each latent alone when none are given)."""
    latents = list(dict.fromkeys(int(latent) for _, latent in flags))
    concepts = [list(c) for c in concepts] if concepts else [[latent] for latent in latents]
    missing = [latent for latent in latents if not any(latent in c for c in concepts)]
    if missing:
        raise EngineError(f"flagged latents {missing} belong to none of the concepts {concepts}")
    return latents, concepts


def _measure(run: _Run, store: ActivationStore, directions: str, concepts: list[list[int]], latents: list[int],
             labels) -> ShortcutDirections:
    """The shortcut's directions, measured as ``directions`` says on the audited images' activations."""
    token, batch_size = run.config.token, run.config.batch_size
    tail = VisionTail(run.bundle.model.visual, run.config.layer, token)
    if directions in ("regression", "widened"):
        shortcut = concept_directions(tail, run.sae, run.probe, store, concepts, labels, token=token,
                                      batch_size=batch_size)
        if directions == "widened":
            shortcut = widened_directions(shortcut, _probe_features(run, store), labels)
        return shortcut
    return shortcut_directions(tail, run.sae, run.probe, store, latents, token=token, batch_size=batch_size)


def _along_column(run: _Run, store: ActivationStore, images: ImageSet, shortcut: ShortcutDirections,
                  marked: np.ndarray, column: str) -> ShortcutDirections:
    """The shortcut with its direction read from the images ``marked`` by their labels.csv ``column`` (the
    correction's option; the prepared images keep the audited ones' order)."""
    return column_directions(shortcut, _probe_features(run, store), images.labels.numpy(), marked, column)


@torch.no_grad()
def _probe_features(run: _Run, store: ActivationStore) -> torch.Tensor:
    """[images, embed_dim] the audited images' embeddings as the probe reads them (its normalized, standardized
    features), on the CPU: where a direction read from marked images is measured."""
    return run.probe.features(store.embeddings().float().to(run.device)).cpu()


def _training_split(run: _Run, training: ImageSet | None, C: float | None, latents: list[int],
                    column: str | None = None) -> TrainingSplit | None:
    """The probe's training split as a refit reads it (its embeddings and labels) and as the SAE sees it (where
    the chosen ``latents`` are active, how strongly, on which image), or None when not given. When its labels.csv
    has ``column`` (the correction's), the column says which images show the concept instead of the SAE."""
    if training is None:
        if C is not None:
            raise EngineError("C sets the refit's regularization; it needs the probe's training split")
        return None
    with run.timed("training"):
        images = prepare_images(run.bundle, run.probe, training)
        store = run.extract(images, "training", "training")
        if column is not None and column in images.metadata:
            present = binary_column(images.metadata, column, "to mark the concept's images")
            return TrainingSplit(store.embeddings(), images.labels.numpy(), C, concept_active=present,
                                 ids=list(images.ids))
        activation = _concept_activation(run, store, latents)
        return TrainingSplit(store.embeddings(), images.labels.numpy(), C,
                             concept_active=activation > presence_threshold(activation), activation=activation,
                             ids=list(images.ids))


def presence_threshold(activation: np.ndarray, include_zeros: bool = False) -> float:
    """The summed activation above which an image counts as showing the concept: the split of the images into
    two groups with the largest between-group variance (Otsu's threshold), over the images where it is active.

    "Any chosen latent active" is too loose: a TopK SAE keeps k latents on every image, so a concept spread over
    several latents is weakly on most images (on the case study, 682 of 800 training images for the ruler, which
    400 show; the split finds 320 and agrees with the ground truth on 90 %). 0 when fewer than two distinct
    positive values leave nothing to split. ``include_zeros``: split over every image, the silent ones too (for a
    concept whose latents are silent off it, the split then falls between silent and active)."""
    values = np.asarray(activation, dtype=np.float64)
    values = np.sort(values if include_zeros else values[values > 0])
    if len(np.unique(values)) < 2:
        return 0.0
    n = len(values)
    below = np.cumsum(values)[:-1]  # the sum of the first i + 1 values, for a split after each
    count = np.arange(1, n)
    mean_low, mean_high = below / count, (values.sum() - below) / (n - count)
    between = count * (n - count) * (mean_low - mean_high) ** 2
    distinct = values[1:] > values[:-1]  # split only between different values
    i = int(np.argmax(np.where(distinct, between, -1.0)))
    return float((values[i] + values[i + 1]) / 2)


@torch.no_grad()
def _concept_activation(run: _Run, store: ActivationStore, latents: list[int]) -> np.ndarray:
    """[images] the summed activation of ``latents`` on each image of ``store``, read at the audit's token (a
    spatial SAE's latent counts with its largest activation over the patches), float64."""
    return _group_activations(run, store, [latents])[0]


@torch.no_grad()
def _image_codes(run: _Run, acts: torch.Tensor) -> torch.Tensor:
    """[batch, n_latents] each latent's activation on each image of the batch, read at the audit's token (a
    spatial SAE's latent counts with its largest activation over the patches). Built from the k active latents
    only: a dense [batch, patches, latents] code of a wide spatial SAE is gigabytes."""
    values, indices = run.sae.encode_sparse(select_tokens(acts.to(run.device), run.config.token))
    b = values.shape[0]
    codes = torch.zeros(b, run.sae.n_latents, dtype=values.dtype, device=values.device)
    return codes.scatter_reduce(1, indices.reshape(b, -1), values.clamp_min(0).reshape(b, -1), reduce="amax")


@torch.no_grad()
def _group_activations(run: _Run, store: ActivationStore, groups: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per group of latents: [images] their summed activation on each image of ``store`` (float64)."""
    chosen = [torch.tensor(list(g), dtype=torch.long, device=run.device) for g in groups]
    sums: list[list[torch.Tensor]] = [[] for _ in chosen]
    for _, acts, _ in store.iter_batches(run.config.batch_size):
        checkpoint()
        codes = _image_codes(run, acts)
        for out, latents in zip(sums, chosen):
            out.append(codes[:, latents].sum(1).double().cpu())
    return [torch.cat(s).numpy() if s else np.zeros(0) for s in sums]


TRACK_SHARE = 0.8  # a latent tracks a concept when at least this share of its activation falls on the concept's images
TRACK_MIN_IMAGES = 3  # ... and it is active on at least this many of them


@torch.no_grad()
def tracking_latents(run: _Run, store: ActivationStore, concepts: Sequence[Sequence[int]]) -> list[dict]:
    """Per concept (a group of latents), the other latents of the SAE that track it on the images of ``store``.

    The concept's images are those where its latents' summed activation passes :func:`presence_threshold`. A
    latent tracks the concept when at least :data:`TRACK_SHARE` of its summed activation over all images falls on
    those images (and more than halfway from their share of the images to all of it, so a concept on most images
    does not make every latent track it), on :data:`TRACK_MIN_IMAGES` of them or more. This is the test a
    correction's next round applies to what its re-audit still flags (:func:`next_round_latents`): a latent that
    tracks the concept reads the same thing under another index (the SAE spread the concept over several).

    Each entry: ``concept`` (its latents), ``images_with`` (how many images show it), ``share_needed`` and
    ``latents`` (latent as text -> the share of its activation on the concept's images, highest first)."""
    concepts = [[int(i) for i in c] for c in concepts]
    activations = _group_activations(run, store, concepts)
    present = [a > presence_threshold(a) for a in activations]
    n_latents = run.sae.n_latents
    mass, mass_on = np.zeros(n_latents), np.zeros((len(concepts), n_latents))
    count_on = np.zeros((len(concepts), n_latents))
    start = 0
    for _, acts, _ in store.iter_batches(run.config.batch_size):
        checkpoint()
        codes = _image_codes(run, acts).double().cpu().numpy()
        rows = slice(start, start + len(codes))
        start += len(codes)
        mass += codes.sum(0)
        for g, on in enumerate(present):
            mass_on[g] += codes[on[rows]].sum(0)
            count_on[g] += (codes[on[rows]] > 0).sum(0)
    out = []
    for g, concept in enumerate(concepts):
        base = float(present[g].mean()) if len(present[g]) else 0.0
        needed = max(TRACK_SHARE, base + (1.0 - base) / 2)
        share = mass_on[g] / np.maximum(mass, 1e-30)
        keep = (share >= needed) & (count_on[g] >= TRACK_MIN_IMAGES) & (mass > 0)
        keep[concept] = False
        if base in (0.0, 1.0):  # the concept on no image or on all: nothing to tell its images from the others
            keep[:] = False
        order = sorted(np.flatnonzero(keep), key=lambda i: (-share[i], i))
        out.append({"concept": concept, "images_with": int(present[g].sum()), "share_needed": round(needed, 4),
                    "latents": {str(int(i)): round(float(share[i]), 4) for i in order}})
    return out


def training_data(split: TrainingSplit, class_names: Sequence[str]) -> dict:
    """The data behind the shortcut: how the concept (the chosen latents, :attr:`TrainingSplit.concept_active`)
    is spread over the classes of the probe's training split, which the probe learnt it from.

    ``classes``: per class its images, how many have the concept and how many not, and the share that have it.
    ``imbalance``: per class the concept's rate among its images against among the other classes' (difference and
    ratio; ratio None where the others never have it): a class whose rate is higher is the one a probe learns to
    read the concept as evidence for, ``points_to`` (the largest difference; None when the rates are equal or the
    concept is on no image). ``rows``: the images with the concept (image id, class, summed activation), strongest
    first (in image order when the activation was not measured).
    """
    if split.concept_active is None:
        raise EngineError("the training split does not say where the concept is active; extract it with the "
                          "audit's SAE first")
    y = split.label_indices(class_names)
    present = np.asarray(split.concept_active, dtype=bool).reshape(-1)
    if len(present) != len(y):
        raise EngineError(f"the training split has {len(y)} images but concept_active says {len(present)}")
    ids = [str(i) for i in split.ids] if split.ids is not None else [str(i) for i in range(len(y))]
    activation = None if split.activation is None else np.asarray(split.activation, dtype=np.float64).reshape(-1)
    if len(ids) != len(y) or (activation is not None and len(activation) != len(y)):
        raise EngineError(f"the training split has {len(y)} images but not as many ids and activations")
    n_class = np.bincount(y, minlength=len(class_names))
    n_with = np.bincount(y[present], minlength=len(class_names))
    classes, imbalance = {}, {}
    for k, name in enumerate(class_names):
        rate_in = _rate(n_with[k], n_class[k])
        rate_out = _rate(n_with.sum() - n_with[k], n_class.sum() - n_class[k])
        known = rate_in is not None and rate_out is not None
        classes[name] = {"images": int(n_class[k]), "with": int(n_with[k]), "without": int(n_class[k] - n_with[k]),
                         "share_with": _rounded(rate_in)}
        imbalance[name] = {"rate_in_class": _rounded(rate_in), "rate_in_others": _rounded(rate_out),
                           "difference": _rounded(rate_in - rate_out) if known else None,
                           "ratio": _rounded(rate_in / rate_out) if known and rate_out else None}
    differences = {name: row["difference"] for name, row in imbalance.items() if row["difference"] is not None}
    leader = max(differences, key=differences.get) if differences else None
    order = np.flatnonzero(present)
    if activation is not None:
        order = order[np.argsort(-activation[order], kind="stable")]
    rows = [{"image": ids[i], "class": class_names[y[i]],
             "activation": None if activation is None else round(float(activation[i]), 6)} for i in order]
    return {"images": int(len(y)), "with_concept": int(present.sum()), "classes": classes, "imbalance": imbalance,
            "points_to": leader if leader is not None and differences[leader] > 0 else None, "rows": rows}


def _rate(part: int, whole: int) -> float | None:
    return float(part) / float(whole) if whole else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def training_data_csv(data: dict) -> str:
    """The rows of :func:`training_data` (the training images that have the concept) as CSV text, with the
    header ``image,class,activation``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "class", "activation"])
    for row in data.get("rows", []):
        writer.writerow([row["image"], row["class"], "" if row["activation"] is None else row["activation"]])
    return out.getvalue()


def _facts(shortcut: ShortcutDirections, flags: Sequence[tuple[str, int]], n_images: int) -> dict:
    """The shortcut's directions as the outcome reports them, with the images each latent is active on."""
    active = shortcut.active.numpy()
    columns = shortcut.active_latents or shortcut.latents
    return {**shortcut.to_dict(), "flags": [[c, int(latent)] for c, latent in flags],
            "active_images": {str(latent): int(active[:, j].sum()) for j, latent in enumerate(columns)},
            "clean_images": int((~active.any(1)).sum()), "images": int(n_images)}


def clean_accuracy_change(table: dict) -> float | None:
    """New minus old accuracy on the images without any chosen latent (None when there are none)."""
    return (table.get("slices", {}).get(table.get("clean_slice", CLEAN_SLICE)) or {}).get("change")
