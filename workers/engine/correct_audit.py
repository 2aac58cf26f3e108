"""A correction end to end, as the service's job runs it and the case study proves it::

    outcome = run_correction(bundle, probe, images, sae, flags=[("melanoma", 12)], layer=-1, token="cls")
    outcome.probe.save("probe-corrected.npz"); outcome.table["slices"]["melanoma, latent 12 inactive"]

The audited images' activations are extracted once; each chosen latent's direction is measured on them through the
real tail (:func:`~workers.engine.correction.shortcut_directions`); the probe is corrected by ``project`` or, with
the probe's training split, ``refit`` (:func:`~workers.engine.correction.correct_probe`); old and new probe are
compared overall, per class and on every slice the chosen flags hurt (:func:`~workers.engine.correction.harm_slices`)
plus the "clean" images, on which none of the chosen latents is active. Re-auditing the new probe is the service's
next step (an ordinary audit that reuses the SAE).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .activations import extract_activations
from .config import ESTIMATES
from .correction import (ANCHORS, TrainingSplit, compare_probes, concept_directions, correct_probe, harm_slices,
                         shortcut_directions)
from .data import ImageSet
from .errors import EngineError
from .heads import LinearProbe
from .hooks import VisionTail
from .loading import ClipBundle, resolve_device
from .pipeline import prepare_images
from .sae import TopKSAE

CLEAN_SLICE = "images without any chosen latent"  # the slice whose accuracy a correction must not cost


@dataclass
class CorrectionOutcome:
    """The corrected probe, what was done (``info``: method, reason, anchor, C...), the proof table
    (:func:`~workers.engine.correction.compare_probes`), the shortcut's directions (``shortcut``: latents, rank,
    images each is active on) and each stage's seconds."""

    probe: LinearProbe
    info: dict
    table: dict
    shortcut: dict
    timings: dict

    def to_dict(self) -> dict:
        return {"info": self.info, "table": self.table, "shortcut": self.shortcut, "timings": self.timings}


def run_correction(bundle: ClipBundle, probe: LinearProbe, images: ImageSet, sae: TopKSAE,
                   flags: Sequence[tuple[str, int]], *, layer: int = -1, token: str = "cls",
                   method: str | None = None, anchor: str | None = None, training: ImageSet | None = None,
                   concepts: Sequence[Sequence[int]] | None = None, directions: str = "regression",
                   C: float | None = None, reference: LinearProbe | None = None, batch_size: int = 64,
                   device: str | torch.device = "auto", dtype: str = "fp32", cache_dtype: str = "float32",
                   seed: int = 0, workdir: str | os.PathLike,
                   progress: Callable[[str, int, int], None] | None = None) -> CorrectionOutcome:
    """Correct ``probe`` so that it no longer reads the latents of ``flags`` ((class name, latent) pairs of the
    audit of ``probe`` on ``images`` with ``sae``), and measure old against new on ``images``.

    ``concepts``: the chosen latents grouped by concept (a flag's ``concept_latents``; default: each flag's latent
    alone). ``directions``: "regression" (one direction per concept, from how the features move with its
    activation within a class: :func:`~workers.engine.correction.concept_directions`) or "removal" (one per
    latent, what removing it takes away: :func:`~workers.engine.correction.shortcut_directions`).
    ``anchor``: None for the mean features of the audited images (the default), or "midpoint" / "clean".
    ``training``: the probe's training split (labelled images); given, the default method is ``refit``.
    ``reference``: a probe to measure how much of the way to it the correction went (e.g. one trained without
    the correlation). ``workdir`` keeps the activation caches. ``progress(stage, done, total)`` reports the
    stages of ``workers.engine.stages.CORRECTION_STAGES``.
    """
    if not flags:
        raise EngineError("no flag chosen: name at least one (class, latent) to correct")
    if anchor is not None and anchor not in ANCHORS:
        raise EngineError(f"unknown anchor {anchor!r}; known: {', '.join(ANCHORS)}")
    if directions not in ESTIMATES:
        raise EngineError(f"unknown way to measure directions {directions!r}; known: {', '.join(ESTIMATES)}")
    report = progress or (lambda stage, done, total: None)
    device = resolve_device(device)
    workdir = Path(workdir)
    timings: dict[str, float] = {}
    latents = list(dict.fromkeys(int(latent) for _, latent in flags))
    concepts = [list(c) for c in concepts] if concepts else [[latent] for latent in latents]
    missing = [latent for latent in latents if not any(latent in c for c in concepts)]
    if missing:
        raise EngineError(f"flagged latents {missing} belong to none of the concepts {concepts}")
    bundle.model.to(device)
    probe = probe.to(device)
    sae = sae.to(device).eval().requires_grad_(False)
    extract = dict(layer=layer, token=token, batch_size=batch_size, device=device, dtype=dtype,
                   cache_dtype=cache_dtype)

    start = time.perf_counter()
    images = prepare_images(bundle, probe, images)
    store = extract_activations(bundle, images, workdir / "activations",
                                progress=lambda done, total: report("extract", done, total), **extract)
    timings["extract"] = time.perf_counter() - start

    start = time.perf_counter()
    report("directions", 0, 1)
    tail = VisionTail(bundle.model.visual, layer, token)
    if directions == "regression":
        shortcut = concept_directions(tail, sae, probe, store, concepts, images.labels, token=token,
                                      batch_size=batch_size)
    else:
        shortcut = shortcut_directions(tail, sae, probe, store, latents, token=token, batch_size=batch_size)
    report("directions", 1, 1)
    timings["directions"] = time.perf_counter() - start

    split = None
    if training is not None:
        start = time.perf_counter()
        train_store = extract_activations(bundle, prepare_images(bundle, probe, training), workdir / "training",
                                          progress=lambda done, total: report("training", done, total), **extract)
        split = TrainingSplit(train_store.embeddings(), training.remap(probe.class_names).labels.numpy(), C)
        timings["training"] = time.perf_counter() - start
    elif C is not None:
        raise EngineError("C sets the refit's regularization; it needs the probe's training split")

    start = time.perf_counter()
    report("correct", 0, 1)
    new, info = correct_probe(probe.cpu(), shortcut, method, split, anchor=anchor, seed=seed)
    report("correct", 1, 1)
    timings["correct"] = time.perf_counter() - start

    start = time.perf_counter()
    report("compare", 0, 1)
    labels = images.labels.numpy()
    slices = harm_slices(shortcut, labels, probe.class_names, flags, images.metadata)
    slices[CLEAN_SLICE] = ~shortcut.active.numpy().any(1)
    table = compare_probes(probe, new, store.embeddings(), labels, slices, reference)
    table["clean_slice"] = CLEAN_SLICE
    report("compare", 1, 1)
    timings["compare"] = time.perf_counter() - start

    active = shortcut.active.numpy()
    columns = shortcut.active_latents or shortcut.latents
    facts = {**shortcut.to_dict(), "flags": [[c, int(latent)] for c, latent in flags],
             "active_images": {str(latent): int(active[:, j].sum()) for j, latent in enumerate(columns)},
             "clean_images": int((~active.any(1)).sum()), "images": int(len(labels))}
    return CorrectionOutcome(new, info, table, facts, timings)


def clean_accuracy_change(table: dict) -> float | None:
    """New minus old accuracy on the images without any chosen latent (None when there are none)."""
    return (table.get("slices", {}).get(table.get("clean_slice", CLEAN_SLICE)) or {}).get("change")
