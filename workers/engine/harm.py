"""Harm: what a latent does to a head's answers, measured by splitting images on whether the latent is active.

For a latent ``i`` and class ``c`` a shortcut shows as: images of ``c`` without
``i`` are missed more often than those with it, and images of other classes
with ``i`` are called ``c`` more often than those without it, by the probe and
much less by zero-shot. That is the case study's with/without table, computed
for any latent without metadata. The sums here merge exactly across shards.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MIN_SLICE = 8  # fewer images than this on a side of a split measure nothing


def harm_sums(active: Tensor, onehot: Tensor, predicted: Tensor, class_score: Tensor, n_classes: int) -> dict:
    """One batch's sums for one head, each [classes, n_latents].

    ``active`` [b, L] (latent active on the image), ``onehot`` [b, C] (true
    class), ``predicted`` [b] (the head's argmax), ``class_score`` [b] (the
    head's centred score for the image's true class).
    """
    a = active.float()
    correct = (predicted == onehot.argmax(1)).float().unsqueeze(1)
    called = torch.nn.functional.one_hot(predicted, n_classes).float()
    return {"correct": (onehot * correct).T @ a, "called": called.T @ a,
            "score": (onehot * class_score.unsqueeze(1)).T @ a, "score_total": onehot.T @ class_score}


def _rate(k: float, n: float) -> float | None:
    return float(k / n) if n >= 1 else None


def head_table(sums: dict, totals: dict, c: int, latent: int) -> dict:
    """The with/without table of one head for class ``c`` and one latent.

    ``sums`` holds the merged [C, L] arrays ``active`` (per class, the images
    where the latent is active), ``correct``, ``called``, ``score`` and the [C]
    array ``score_total``; ``totals`` the per-class ``count``, ``correct`` and
    ``called`` (from the head's predictions over all images).
    """
    active = sums["active"][:, latent]
    n_with = float(active[c])
    n_without = float(totals["count"][c]) - n_with
    correct_with = float(sums["correct"][c, latent])
    correct_without = float(totals["correct"][c]) - correct_with
    score_with = float(sums["score"][c, latent])
    score_without = float(sums["score_total"][c]) - score_with
    others_with = float(active.sum()) - n_with
    others_without = float(totals["count"].sum() - totals["count"][c]) - others_with
    called_with = float(sums["called"][c, latent]) - correct_with  # other classes' images called c
    called_without = float(totals["called"][c] - totals["correct"][c]) - called_with
    table = {
        "class_with": {"n": int(n_with), "accuracy": _rate(correct_with, n_with),
                       "mean_logit": _rate(score_with, n_with)},
        "class_without": {"n": int(n_without), "accuracy": _rate(correct_without, n_without),
                          "mean_logit": _rate(score_without, n_without)},
        "others_with": {"n": int(others_with), "called_class": _rate(called_with, others_with)},
        "others_without": {"n": int(others_without), "called_class": _rate(called_without, others_without)},
    }
    return _with_gaps(table)


def _with_gaps(table: dict) -> dict:
    """Add a table's two gaps: class images with vs without the latent, other images with vs without it."""
    table["accuracy_gap"] = _gap(table["class_with"], table["class_without"], "accuracy")
    table["called_gap"] = _gap(table["others_with"], table["others_without"], "called_class")
    return table


def _gap(with_: dict, without: dict, key: str) -> float | None:
    if with_["n"] < MIN_SLICE or without["n"] < MIN_SLICE:
        return None
    return with_[key] - without[key]


def _z(with_: dict, without: dict, key: str) -> float:
    """Two-proportion z statistic of ``with - without`` (0 when a side is too small to measure)."""
    n1, n2 = with_["n"], without["n"]
    if n1 < MIN_SLICE or n2 < MIN_SLICE:
        return 0.0
    p1, p2 = with_[key], without[key]
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
    return (p1 - p2) / se


def measured_harm(probe: dict, zero_shot: dict, min_gap: float, min_z: float) -> tuple[bool, str | None]:
    """Is the probe's harm real and the probe's own? Either split counts:

    - class images without the latent are called correctly ``min_gap`` less often than those with it, or
    - other classes' images with it are called this class ``min_gap`` more often than those without it,

    significant (two-proportion z >= ``min_z``) and exceeding zero-shot's gap on the same split by ``min_gap / 2``
    (a latent that means the class helps zero-shot as much as the probe). Returns (measured, which split).
    """
    best = None
    for gap_key, key, with_key, without_key in (("accuracy_gap", "accuracy", "class_with", "class_without"),
                                                ("called_gap", "called_class", "others_with", "others_without")):
        gap = probe[gap_key]
        if gap is None or gap < min_gap:
            continue
        if _z(probe[with_key], probe[without_key], key) < min_z:
            continue
        zs_gap = zero_shot[gap_key] or 0.0
        if gap - zs_gap < min_gap / 2:
            continue
        if best is None or gap > probe[best]:
            best = gap_key
    return best is not None, best


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def summary(class_name: str, probe: dict, zero_shot: dict) -> str:
    """One sentence a reviewer reads: both splits, probe first, zero-shot in brackets."""
    p, z = probe, zero_shot
    return (f"{class_name} images with it called {class_name} {_pct(p['class_with']['accuracy'])} vs "
            f"{_pct(p['class_without']['accuracy'])} without (n={p['class_with']['n']}/{p['class_without']['n']}); "
            f"other images with it called {class_name} {_pct(p['others_with']['called_class'])} vs "
            f"{_pct(p['others_without']['called_class'])} without (n={p['others_with']['n']}/"
            f"{p['others_without']['n']}); zero-shot: {_pct(z['class_with']['accuracy'])} vs "
            f"{_pct(z['class_without']['accuracy'])}, {_pct(z['others_with']['called_class'])} vs "
            f"{_pct(z['others_without']['called_class'])}")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count half); None if one-sided."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class HarmInputs:
    """What every flag's harm table reads, gathered once per audit: per head, the merged [C, L] sums of an
    attribution partial (a :class:`~workers.engine.partials.Partial`, which imports this module) and the
    per-class totals of its predictions."""

    def __init__(self, merged, labels, n_classes: int):
        labels = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        count = np.bincount(labels, minlength=n_classes)
        self.sums, self.totals = {}, {}
        for h in ("probe", "zero_shot"):
            predicted = np.asarray(merged.heads[h].predictions)
            self.totals[h] = {"count": count,
                              "correct": np.bincount(labels[predicted == labels], minlength=n_classes),
                              "called": np.bincount(predicted, minlength=n_classes)}
            self.sums[h] = {"active": merged.active_count, **merged.heads[h].harm}

    def evidence(self, c: int, latent: int, head: str, *, name: str, config) -> dict:
        """A flag's ``harm`` block: both heads' with/without tables, whether harm is measured, and a sentence.

        For a probe flag, harm is measured when the probe's gap is large,
        significant and clearly larger than zero-shot's; for a zero-shot flag
        the roles swap.
        """
        tables = {h: head_table(self.sums[h], self.totals[h], c, latent) for h in ("probe", "zero_shot")}
        other = "zero_shot" if head == "probe" else "probe"
        measured, split = measured_harm(tables[head], tables[other], config.harm_min_gap, config.harm_min_z)
        return {**tables, "measured": measured, "split": split,
                "summary": summary(name, tables["probe"], tables["zero_shot"])}


MAX_SLICE_VALUES = 50  # a metadata column with more distinct values is an identifier, not a slice


def column_values(values) -> tuple[np.ndarray, list[str]]:
    """A metadata column's values as stripped strings, and its distinct non-empty values."""
    values = np.asarray([str(v).strip() for v in values])
    return values, sorted(set(values) - {""})


def metadata_columns(metadata: dict) -> dict[str, np.ndarray]:
    """Boolean indicators from metadata columns: a 0/1 column as itself, a categorical one as ``column=value``."""
    out = {}
    for column, values in metadata.items():
        values, distinct = column_values(values)
        if set(distinct) <= {"0", "1"}:
            out[column] = values == "1"
        else:
            for v in distinct:
                out[f"{column}={v}"] = values == v
    return out


def metadata_auroc(activity: np.ndarray, metadata: dict) -> dict[str, float]:
    """AUROC of a latent's activation for each metadata indicator, the most telling first (farthest from 0.5: near
    1 the latent fires with the value, near 0 it fires when the value is absent)."""
    scores = {}
    for name, positive in metadata_columns(metadata).items():
        value = auroc(activity, positive)
        if value is not None:
            scores[name] = round(value, 4)
    return dict(sorted(scores.items(), key=lambda kv: -abs(kv[1] - 0.5)))


def slice_accuracy(metadata: dict, predictions: dict, labels: np.ndarray, class_names: list) -> dict:
    """Per metadata column and value: how many images, and each head's accuracy overall and per class."""
    out = {}
    for column, values in metadata.items():
        values, distinct = column_values(values)
        if len(distinct) > MAX_SLICE_VALUES:
            continue
        out[column] = {}
        for v in distinct:
            mask = values == v
            entry = {"n": int(mask.sum())}
            for h, pred in predictions.items():
                pred = np.asarray(pred)
                correct = pred[mask] == labels[mask]
                entry[h] = {"accuracy": float(correct.mean()),
                            "per_class": {name: (float(correct[labels[mask] == c].mean())
                                                 if (labels[mask] == c).any() else None)
                                          for c, name in enumerate(class_names)}}
            out[column][v] = entry
    return out


def subset_table(active: np.ndarray, keep: np.ndarray, labels: np.ndarray, predicted: np.ndarray, c: int) -> dict:
    """:func:`head_table` computed from per-image data on the images ``keep`` selects (``mean_logit`` omitted)."""
    own, other = keep & (labels == c), keep & (labels != c)
    called = predicted == c

    def side(mask, key):
        n = int(mask.sum())
        return {"n": n, key: float(called[mask].mean()) if n else None}

    table = {"class_with": side(own & active, "accuracy"), "class_without": side(own & ~active, "accuracy"),
             "others_with": side(other & active, "called_class"),
             "others_without": side(other & ~active, "called_class")}
    return _with_gaps(table)


def harm_size(table: dict) -> float:
    """The larger of a head's two gaps (0 where neither can be measured)."""
    return max(table["accuracy_gap"] or 0.0, table["called_gap"] or 0.0)
