"""A correction end to end, as the service's job runs it and the case study proves it::

    audited = AuditedInputs(bundle, probe, images, sae, flags=[("melanoma", 12)])
    outcome = run_correction(audited, AuditConfig(layer=-1, token="cls"), CorrectionOptions(), workdir=workdir)
    outcome.probe.save("probe-corrected.npz"); outcome.table["slices"]["melanoma, latent 12 inactive"]

The audited images' activations are extracted once; each chosen latent's direction is measured on them through the
real tail (:mod:`workers.engine.directions`); the probe is corrected by ``project`` or, with the probe's training
split, ``refit`` (:func:`~workers.engine.correction.correct_probe`); old and new probe are compared overall, per
class and on every slice the chosen flags hurt (:func:`~workers.engine.proof.harm_slices`) plus the "clean" images,
on which none of the chosen latents is active. Re-auditing the new probe is the service's next step (an ordinary
audit that reuses the SAE).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .activations import ActivationStore, extract_activations
from .config import ANCHORS, ESTIMATES, AuditConfig, CorrectionOptions
from .correction import TrainingSplit, correct_probe
from .data import ImageSet
from .directions import ShortcutDirections, concept_directions, shortcut_directions
from .errors import EngineError
from .heads import LinearProbe
from .hooks import VisionTail
from .loading import ClipBundle, resolve_device
from .pipeline import prepare_images
from .proof import compare_probes, harm_slices
from .sae import TopKSAE

CLEAN_SLICE = "images without any chosen latent"  # the slice whose accuracy a correction must not cost


@dataclass
class CorrectionOutcome:
    """The corrected probe, what was done (``info``: method, reason, anchor, C...), the proof table
    (:func:`~workers.engine.proof.compare_probes`), the shortcut's directions (``shortcut``: latents, rank,
    images each is active on) and each stage's seconds."""

    probe: LinearProbe
    info: dict
    table: dict
    shortcut: dict
    timings: dict

    def to_dict(self) -> dict:
        return {"info": self.info, "table": self.table, "shortcut": self.shortcut, "timings": self.timings}


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
    ``options`` (default :class:`CorrectionOptions`): ``directions`` "regression" (one direction per concept, from
    how the features move with its activation within a class: :func:`~workers.engine.directions.concept_directions`)
    or "removal" (one per latent, what removing it takes away:
    :func:`~workers.engine.directions.shortcut_directions`); ``anchor``: "mean" (the mean features of the audited
    images), "midpoint" or "clean"; ``C``: the refit's inverse regularization (needs ``training``).
    ``method``: "project" or "refit"; None: ``refit`` when ``training`` (the probe's training split, labelled
    images) is given, ``project`` otherwise. ``reference``: a probe to measure how much of the way to it the
    correction went (e.g. one trained without the correlation). ``workdir`` keeps the activation caches.
    ``progress(stage, done, total)`` reports the stages of ``workers.engine.stages.CORRECTION_STAGES``.
    """
    options = CorrectionOptions() if options is None else options
    _check_options(audited.flags, options)
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
        run.report("directions", 1, 1)
    split = _training_split(run, training, options.C)
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
        run.report("compare", 1, 1)
    return CorrectionOutcome(new, info, table, _facts(shortcut, audited.flags, len(labels)), run.timings)


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
    if directions == "regression":
        return concept_directions(tail, run.sae, run.probe, store, concepts, labels, token=token,
                                  batch_size=batch_size)
    return shortcut_directions(tail, run.sae, run.probe, store, latents, token=token, batch_size=batch_size)


def _training_split(run: _Run, training: ImageSet | None, C: float | None) -> TrainingSplit | None:
    """The probe's training split as a refit reads it (its embeddings and labels), or None when not given."""
    if training is None:
        if C is not None:
            raise EngineError("C sets the refit's regularization; it needs the probe's training split")
        return None
    with run.timed("training"):
        store = run.extract(prepare_images(run.bundle, run.probe, training), "training", "training")
        return TrainingSplit(store.embeddings(), training.remap(run.probe.class_names).labels.numpy(), C)


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
