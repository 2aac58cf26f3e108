"""How far a correction could go on a planted case: the same methods along the artifact's true direction.

A correction removes the direction of the concept the audit flagged, measured from the SAE's latents
(:mod:`workers.engine.directions`). When it closes too little of a hurt slice's gap, either the method cannot do
better on this probe, or the direction is not the artifact's. The ground truth tells the two apart: the artifact's
own direction is the difference of the probe's mean features between the audited images that show it and those
that do not, within each class, averaged over the classes
(:func:`~workers.engine.directions.within_class_difference`, what a correction with the artifact's labels.csv
column removes). ``project`` and ``refit`` along that one direction give the gaps the method could close. The
concept's Otsu split (the images a correction takes as showing it,
:func:`~workers.engine.correct_audit.presence_threshold`) against the ground truth says how much of the artifact
the SAE's concept covers.

Only the gap part of the bar is measured here (no re-audit: "still flagged" needs the SAE's latents, which the
true direction does not have).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .check import MIN_GAP_CLOSED, hurt_slices

CEILING_METHODS = ("project", "refit")


def meets_gap(gaps: dict | None) -> bool:
    """The gap part of the bar: every hurt slice's gap (name -> share closed) closed at least MIN_GAP_CLOSED."""
    return bool(gaps) and all(g is not None and g >= MIN_GAP_CLOSED for g in gaps.values())


def concept_coverage(activation: np.ndarray, shows: np.ndarray) -> dict:
    """How the images a correction takes as showing the concept (its summed activation above the Otsu split)
    compare with those that show the artifact: ``precision`` (of the concept's images, the share that show it)
    and ``recall`` (of the artifact's images, the share the concept takes)."""
    from workers.engine.correct_audit import presence_threshold

    present = np.asarray(activation, dtype=np.float64) > presence_threshold(activation)
    return {"images": int(present.sum()),
            "precision": round(float(shows[present].mean()), 4) if present.any() else None,
            "recall": round(float(present[shows].mean()), 4) if shows.any() else None}


def correction_ceiling(case: dict, rows: Sequence[dict], workdir: Path, latents: Sequence[int],
                       activity: Callable[[int], np.ndarray]) -> dict:
    """On the case's audit (run in ``workdir``; ``rows`` its labels.csv in the audited order): per method of
    :data:`CEILING_METHODS`, the hurt slices' gaps closed along the artifact's true direction (``gap_closed``) and
    whether both reach the bar (``meets_gap``); ``coverage`` of the corrected ``latents``' concept."""
    from workers.engine import LinearProbe, load_clip
    from workers.engine.activations import ActivationStore
    from workers.engine.correction import ShortcutDirections, TrainingSplit, compare_probes, correct_probe
    from workers.engine.directions import within_class_difference

    from .build import _embed, _images

    artifact, classes = case["config"]["artifact"], sorted({r["label"] for r in rows})
    shows = np.array([r[artifact] == "1" for r in rows])
    labels = np.array([classes.index(r["label"]) for r in rows])
    embeddings = ActivationStore(Path(workdir) / "activations").embeddings().float()
    probe, reference = LinearProbe.load(case["probe"]), LinearProbe.load(case["reference_probe"])
    with torch.no_grad():
        features = probe.features(embeddings).double()
    shortcut = ShortcutDirections.from_vectors(within_class_difference(features, labels, shows)[None],
                                               features[torch.from_numpy(~shows)].mean(0), [0])
    shortcut.mean_center = features.mean(0).float()
    names = hurt_slices(case)
    other = next(c for c in classes if c != case["config"]["toward"])
    slices = {names[0]: (labels == classes.index(case["config"]["toward"])) & ~shows,
              names[1]: (labels == classes.index(other)) & shows}
    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    train_images, train_rows = _images(Path(case["probe_train_dir"]))
    training = TrainingSplit(_embed(bundle, train_images), [r["label"] for r in train_rows])
    out: dict = {}
    for method in CEILING_METHODS:
        new, _ = correct_probe(probe, shortcut, method, training if method == "refit" else None)
        table = compare_probes(probe, new, embeddings, labels, slices, reference)
        gaps = {name: table["slices"][name]["gap_closed"] for name in names}
        out[method] = {"gap_closed": gaps, "overall_new": table["overall"]["new"],
                       "meets_gap": meets_gap(gaps)}
    activation = np.sum([activity(int(latent)) for latent in latents], axis=0)
    out["coverage"] = concept_coverage(activation, shows)
    return out


def ceiling_summary(planted: Sequence[dict]) -> dict:
    """Per method, over the planted cases corrected: how many meet the gap part of the bar with the SAE's
    direction (the correction as run) and how many would with the artifact's true one; the concepts' coverage."""
    rows = [c for c in planted if c.get("ceiling")]
    if not rows:
        return {}
    out = {}
    for method in CEILING_METHODS:
        ran = [c["corrections"][method] for c in rows if method in (c.get("corrections") or {})]
        out[method] = {
            "cases": len(rows),
            "true_direction_meets_gap": sum(c["ceiling"][method]["meets_gap"] for c in rows),
            "sae_direction_meets_gap": sum(meets_gap(r.get("gap_closed")) for r in ran)}
    cover = [c["ceiling"]["coverage"] for c in rows]
    recall = [c["recall"] for c in cover if c["recall"] is not None]
    precision = [c["precision"] for c in cover if c["precision"] is not None]
    out["coverage"] = {"recall_mean": round(float(np.mean(recall)), 4) if recall else None,
                       "recall_min": round(float(np.min(recall)), 4) if recall else None,
                       "precision_mean": round(float(np.mean(precision)), 4) if precision else None}
    return {"ceiling": out}


def format_ceiling(ceiling: dict) -> str:
    """A case's ceiling in a few words: each method's gaps along the true direction, and the concept's coverage."""
    parts = []
    for method in CEILING_METHODS:
        gaps = " / ".join("n/a" if g is None else f"{g:.0%}" for g in ceiling[method]["gap_closed"].values())
        parts.append(f"{method} {gaps}{'' if ceiling[method]['meets_gap'] else ' (below the bar)'}")
    cover = ceiling["coverage"]
    covered = ("" if cover["recall"] is None else
               f"; the concept takes {cover['recall']:.0%} of the artifact's images"
               + ("" if cover["precision"] is None else f" at precision {cover['precision']:.2f}"))
    return "true direction: " + ", ".join(parts) + covered
