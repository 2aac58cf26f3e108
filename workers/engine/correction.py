"""From a finding to a fix: a corrected linear probe that no longer reads the flagged latents, and the proof table.

Three steps, each usable on its own::

    shortcut = shortcut_directions(tail, sae, probe, activations, latents=[12], token="cls")
    new_probe, info = correct_probe(probe, shortcut)                  # "project", or "refit" when training is given
    table = compare_probes(probe, new_probe, embeddings, labels, slices=harm_slices(shortcut, labels, ...))

This module holds the second step; the first is :mod:`workers.engine.directions`, the third
:mod:`workers.engine.proof`, and their names are importable from here too.

The probe reads ``x = g(f)``: the embedding after its normalization and standardization, where its weight acts.
Every direction here lives in that space. With ``U`` [k, embed_dim] an orthonormal basis of the shortcut's
directions and ``P = U^T U``, ``project`` and ``refit`` end as the same kind of probe::

    W' = W (I - P)          b' = b + W P a

i.e. the old probe applied to ``x - P (x - a)``: every image's coordinate along the shortcut replaced by the one
of an anchor point ``a``. The new probe reads nothing along ``U`` (``W' U^T = 0``). Every method's probe is a plain
:class:`~workers.engine.heads.LinearProbe` of the old one's format (classes, normalization, mean, scale, one row
for a binary probe that came as one row), so it saves to ``.npz``/``.safetensors`` and drops in where the old one
ran.

Methods (one verb, ``correct``, chosen by name from :data:`REGISTRY`):

- ``project`` (P-ClArC's projection applied to a linear read-out) keeps the old weights off the shortcut's
  subspace; it needs only the audit's data.
- ``refit`` fits a new logistic regression on the user's training split with the shortcut's coordinate replaced
  by the anchor's (so the fit cannot use it), then reads features exactly as above.
- ``reweight`` fits a new logistic regression on the training split as it is, nothing projected out, with the
  images weighted so that the concept is as frequent in every class (:func:`balancing_weights`): it removes the
  correlation the probe learnt the shortcut from instead of the direction it reads it along. It needs to know on
  which training images the concept is active (:attr:`TrainingSplit.concept_active`); its probe may still read
  the shortcut's direction where that helps tell the classes apart once the concept no longer does.

The anchor matters for ``project`` only (a refit learns its own intercept). ``mean`` (the default) holds every
image's shortcut coordinate at the audited images' mean (directions given by hand, without that mean, fall back
to ``midpoint``). ``midpoint`` puts every
image halfway between "without the latents" (the mean of the images where none is active) and "with each of them"
(that mean plus what each latent adds): the point where the shortcut's evidence is neutral when the training data
tied it to a class symmetrically. ``clean`` is P-ClArC's reference point (every image made to look like the clean
ones); it keeps the clean images' predictions, so it also keeps the bias the shortcut's *absence* put on them: a
probe that learnt "ruler means melanoma" also learnt "no ruler means nevus", and with the clean anchor melanomas
without a ruler stay missed as often as before (``tests/engine/test_correction.py`` measures both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .config import ANCHORS
from .directions import (REDUNDANT_TOL, ShortcutDirections, concept_directions, concept_groups, orthonormal_basis,
                         shortcut_directions)
from .errors import EngineError, checkpoint
from .heads import LinearProbe
from .proof import compare_probes, gap_closed, harm_slices

__all__ = [
    "ANCHORS", "CV_CS", "CV_FOLDS", "REDUNDANT_TOL", "REGISTRY", "Correction", "Projection", "Refit", "Reweight",
    "ShortcutDirections", "TrainingSplit", "balancing_weights", "compare_probes", "concept_directions",
    "concept_groups", "correct_probe", "gap_closed", "get_correction", "harm_slices", "orthonormal_basis",
    "shortcut_directions",
]

CV_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # the grid a refit searches when no C is given
CV_FOLDS = 3


@dataclass
class TrainingSplit:
    """The probe's training split: raw image embeddings [n, embed_dim] (the model's output, before the probe's
    normalization) and labels (class indices, or class names as in labels.csv). ``C``: the probe's inverse
    regularization strength when known; otherwise a refit picks it by cross-validation.

    What the audit's SAE sees on these images, when measured: ``concept_active`` [n] bool, whether any of the
    chosen latents is active on the image (``reweight`` balances it across the classes); ``activation`` [n] float,
    their summed activation; ``ids`` [n], the images' names (the rows of the data behind the shortcut).
    """

    embeddings: Tensor
    labels: Sequence
    C: float | None = None
    concept_active: np.ndarray | None = None
    activation: np.ndarray | None = None
    ids: Sequence[str] | None = None

    def label_indices(self, class_names: Sequence[str]) -> np.ndarray:
        labels = list(self.labels.tolist() if hasattr(self.labels, "tolist") else self.labels)
        if len(labels) != self.embeddings.shape[0]:
            raise EngineError(f"the training split has {self.embeddings.shape[0]} embeddings but {len(labels)} "
                              "labels")
        if all(isinstance(v, str) for v in labels):
            unknown = sorted(set(labels) - set(class_names))
            if unknown:
                raise EngineError(f"training labels {unknown[:5]} are not classes of the probe "
                                  f"({', '.join(class_names)})")
            return np.array([list(class_names).index(v) for v in labels], dtype=np.int64)
        out = np.asarray(labels, dtype=np.int64)
        if len(out) and (out.min() < 0 or out.max() >= len(class_names)):
            raise EngineError(f"training labels must be class indices 0..{len(class_names) - 1}")
        return out


def _projector(shortcut: ShortcutDirections) -> Tensor:
    u = shortcut.basis.double()
    return u.T @ u  # [d, d]


def _read_off(weight: Tensor, bias: Tensor, shortcut: ShortcutDirections, anchor: Tensor) -> tuple[Tensor, Tensor]:
    """``W' = W (I - P)``, ``b' = b + W P a``: the probe applied to ``x - P (x - a)``."""
    p = _projector(shortcut)
    weight, bias = weight.double(), bias.double()
    return weight - weight @ p, bias + weight @ (p @ anchor.double())


def _weight_share(weight: Tensor, shortcut: ShortcutDirections, class_names: Sequence[str]) -> dict[str, float]:
    """Per class: the share of the squared weight norm along the shortcut (how much of its reading it was)."""
    along = (weight.double() @ shortcut.basis.double().T).pow(2).sum(1)
    total = weight.double().pow(2).sum(1).clamp_min(1e-30)
    return {name: round(float(a / t), 6) for name, a, t in zip(class_names, along, total)}


class Correction:
    """One verb: ``correct(probe, shortcut, training, anchor=...)`` -> (new probe, what was done)."""

    name = ""
    needs_training = False
    uses_anchor = False  # a refit learns its own intercept, so where the shortcut's coordinate is held is moot

    def correct(self, probe: LinearProbe, shortcut: ShortcutDirections, training: TrainingSplit | None = None, *,
                anchor: str | None = None, seed: int = 0) -> tuple[LinearProbe, dict]:
        if shortcut.embed_dim != probe.embed_dim:
            raise EngineError(f"the shortcut's directions are {shortcut.embed_dim} wide but the probe reads "
                              f"{probe.embed_dim}-dimensional features; measure them with this probe")
        if self.needs_training and training is None:
            raise EngineError(f"the {self.name!r} correction needs the probe's training split (embeddings and "
                              "labels); without it use 'project'")
        if anchor is None:  # the mean of the measured images when known (directions given by hand: the midpoint)
            anchor = "mean" if shortcut.mean_center is not None else "midpoint"
        point = shortcut.anchor(anchor)
        weight, bias, details = self._correct(probe, shortcut, training, point, seed)
        if self.uses_anchor:
            details = {"anchor": anchor, **details}
        new = probe.with_weights(weight, bias)
        info = {"method": self.name, "latents": list(shortcut.latents), "rank": shortcut.rank,
                "redundant_latents": list(shortcut.redundant_latents),
                "weight_share_removed": _weight_share(probe.weight.cpu(), shortcut, probe.class_names), **details}
        return new, info

    def _correct(self, probe, shortcut, training, point, seed) -> tuple[Tensor, Tensor, dict]:
        raise NotImplementedError


class Projection(Correction):
    """The old probe's weights with the shortcut's subspace projected out; the bias moved to the anchor."""

    name = "project"
    uses_anchor = True

    def _correct(self, probe, shortcut, training, point, seed):
        weight, bias = _read_off(probe.weight.cpu(), probe.bias.cpu(), shortcut, point)
        return weight, bias, {}


class Refit(Correction):
    """A logistic regression fitted on the training split with the shortcut's coordinate held at the anchor's.

    Same normalization and standardization as the old probe (the fit reads its features); C as given, else the
    best of :data:`CV_CS` by stratified cross-validation; scikit-learn's defaults otherwise (L2 penalty, lbfgs).
    """

    name = "refit"
    needs_training = True

    def _correct(self, probe, shortcut, training, point, seed):
        from sklearn.linear_model import LogisticRegression

        x, y, counts = _training_features(probe, training)
        p = _projector(shortcut)
        x = (x - (x - point.double()) @ p).numpy()  # the shortcut's coordinate held at the anchor's
        c, how = _regularization(x, y, counts, training.C, seed)
        clf = LogisticRegression(C=c, max_iter=5000).fit(x, y)
        weight, bias = _read_off(*_probe_rows(clf, probe), shortcut, point)
        return weight, bias, {"n_train": int(len(y)), "C": c, "C_from": how}


class Reweight(Correction):
    """A logistic regression fitted on the training split as it is, each image weighted so that the concept is
    independent of the class (:func:`balancing_weights`).

    The probe learnt the shortcut because the concept came with one class more often than with the others; under
    these weights it comes with every class equally often, so it no longer tells the classes apart and the fit has
    no reason to read it. Nothing is projected out: what the concept's direction shares with the classes' own
    signal stays readable. Same features, C (chosen on the weighted log loss) and solver as ``refit``.
    """

    name = "reweight"
    needs_training = True

    def _correct(self, probe, shortcut, training, point, seed):
        from sklearn.linear_model import LogisticRegression

        x, y, counts = _training_features(probe, training)
        if training.concept_active is None:
            raise EngineError("the 'reweight' correction needs to know on which training images the concept is "
                              "active (the training split's concept_active)")
        present = np.asarray(training.concept_active, dtype=bool).reshape(-1)
        if len(present) != len(y):
            raise EngineError(f"the training split has {len(y)} images but concept_active says {len(present)}")
        if present.all() or not present.any():
            raise EngineError(f"the concept is active on {'every' if present.any() else 'no'} image of the "
                              "training split: there is nothing to balance, so reweighting would change nothing")
        sample_weight, cells = balancing_weights(y, present, len(probe.class_names))
        weighting = "cells"
        if training.activation is not None:
            sample_weight, weighting = propensity_weights(y, training.activation, len(probe.class_names)), "propensity"
        x = x.numpy()
        c, how = _regularization(x, y, counts, training.C, seed, sample_weight)
        clf = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=sample_weight)
        weight, bias = _probe_rows(clf, probe)
        weighted = np.zeros((len(probe.class_names), 2))
        np.add.at(weighted, (y, present.astype(np.int64)), sample_weight)
        names = probe.class_names
        return weight, bias, {
            "n_train": int(len(y)), "C": c, "C_from": how, "concept_images": int(present.sum()),
            "weighting": weighting,
            "counts_before": {name: {"with": int(row[1]), "without": int(row[0])} for name, row in zip(names, cells)},
            "counts_after": {name: {"with": round(float(row[1]), 6), "without": round(float(row[0]), 6)}
                             for name, row in zip(names, weighted)},
            "empty_cells": [{"class": names[k], "concept": "with" if p else "without"}
                            for k, p in zip(*np.nonzero(cells == 0))],
            "weight_share_after": _weight_share(weight, shortcut, names),
        }


PROPENSITY_FLOOR = 0.02  # p(class | concept) below this counts as this: no image weighs more than 50 x its class prior


def propensity_weights(labels: np.ndarray, activation, n_classes: int) -> np.ndarray:
    """Per-image weights under which the concept's *activation* says nothing about the class: the class prior
    over the class's probability given the activation, ``w_i = p(y_i) / p(y_i | a_i)`` (inverse propensity).

    ``p(y | a)`` is a logistic regression of the class on the summed activation ``a`` and ``log(1 + a)`` (a
    concept's activation is heavy-tailed), floored at :data:`PROPENSITY_FLOOR`; the weights are scaled to mean 1.
    Unlike :func:`balancing_weights` it needs no threshold for "the concept is present": an image weakly showing
    the concept weighs in proportion. On the case study's ruler (seed 0) the cells' weights closed 53 % and 62 %
    of the two hurt slices' gaps, these 83 % and 80 %."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, dtype=np.int64)
    a = np.clip(np.asarray(activation, dtype=np.float64).reshape(-1), 0, None)
    features = np.stack([a, np.log1p(a)], 1)
    model = LogisticRegression(max_iter=5000).fit(features, labels)
    columns = {int(k): j for j, k in enumerate(model.classes_)}
    proba = model.predict_proba(features)[np.arange(len(labels)), [columns[int(k)] for k in labels]]
    prior = np.bincount(labels, minlength=n_classes) / len(labels)
    weights = prior[labels] / np.clip(proba, PROPENSITY_FLOOR, 1.0)
    return weights / weights.mean()


def balancing_weights(labels: np.ndarray, present: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image weights under which the concept's presence is independent of the class, and the cells' counts.

    Cell (k, p): the ``n_kp`` images of class ``k`` with the concept present (p = 1) or absent (p = 0); ``n_k``
    images of class ``k``, ``n_p`` with presence ``p``, ``n`` in all. Every image of a cell weighs
    ``(n_k n_p / n) / n_kp``, so the cell's weighted count is ``n_k n_p / n``: the counts factorize, each class
    keeps its size and the concept its overall frequency, and the weights average 1 (a C keeps its meaning). An
    empty cell has no image to carry its weight: its class keeps the concept's absence (or presence) as evidence,
    and the caller reports it. Returns (weights [n] float64, counts [n_classes, 2] int, column p).
    """
    labels = np.asarray(labels, dtype=np.int64)
    column = np.asarray(present, dtype=bool).astype(np.int64)
    counts = np.zeros((n_classes, 2), dtype=np.int64)
    np.add.at(counts, (labels, column), 1)
    n = counts.sum()
    target = np.outer(counts.sum(1), counts.sum(0)) / max(int(n), 1)  # n_k n_p / n
    per_image = np.divide(target, counts, out=np.zeros_like(target), where=counts > 0)
    return per_image[labels, column], counts


def _training_features(probe: LinearProbe, training: TrainingSplit) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """The training split as the probe reads it: features [n, embed_dim] float64, class indices [n] and the
    images per class; refused when the embeddings are not the probe's width or a class has no image."""
    emb = torch.as_tensor(training.embeddings).detach().float().cpu()
    if emb.ndim != 2 or emb.shape[1] != probe.embed_dim:
        raise EngineError(f"training embeddings must be [images, {probe.embed_dim}] (the probe's width), got "
                          f"shape {list(emb.shape)}")
    y = training.label_indices(probe.class_names)
    counts = np.bincount(y, minlength=len(probe.class_names))
    missing = [name for name, n in zip(probe.class_names, counts) if n == 0]
    if missing:
        raise EngineError(f"the training split has no image of class(es) {', '.join(missing)}")
    with torch.no_grad():
        x = probe.features(emb.to(probe.mean.device)).double().cpu()
    return x, y, counts


def _regularization(x: np.ndarray, y: np.ndarray, counts: np.ndarray, given: float | None, seed: int,
                    sample_weight: np.ndarray | None = None) -> tuple[float, str]:
    """(C, where it came from): as given, else cross-validated, else scikit-learn's default when a class has too
    few images to hold some out."""
    folds = min(CV_FOLDS, int(counts.min()))
    if given is not None:
        return float(given), "given"
    if folds >= 2:
        loss = "log loss" if sample_weight is None else "weighted log loss"
        return (_cross_validated_c(x, y, folds, seed, sample_weight),
                f"{folds}-fold cross-validation ({loss}) over {list(CV_CS)}")
    return 1.0, "scikit-learn's default (too few images per class to cross-validate)"


def _probe_rows(clf, probe: LinearProbe) -> tuple[Tensor, Tensor]:
    """A fitted scikit-learn classifier's weight and bias as rows of ``probe``'s layout, float64."""
    coef = torch.as_tensor(clf.coef_, dtype=torch.float64)
    intercept = torch.as_tensor(clf.intercept_, dtype=torch.float64)
    if coef.shape[0] == 1:  # binary: scikit-learn's one row reads class 1 against class 0
        # one stored row keeps scikit-learn's row; two rows split its logit so that softmax gives its probability
        half = 1.0 if probe.stored_rows == 1 else 0.5
        coef = torch.cat([-half * coef, half * coef])
        intercept = torch.cat([-half * intercept, half * intercept])
    return coef, intercept


def _cross_validated_c(x: np.ndarray, y: np.ndarray, folds: int, seed: int,
                       sample_weight: np.ndarray | None = None) -> float:
    """The C of :data:`CV_CS` with the lowest held-out log loss (the smallest C on a tie: the simpler probe); with
    ``sample_weight``, fitted and scored under the weights."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    def weights(rows):
        return None if sample_weight is None else sample_weight[rows]

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))
    losses = []
    for c in CV_CS:
        checkpoint()
        losses.append(np.mean([log_loss(y[test], LogisticRegression(C=c, max_iter=5000)
                                        .fit(x[train], y[train], sample_weight=weights(train)).predict_proba(x[test]),
                                        sample_weight=weights(test), labels=np.arange(int(y.max()) + 1))
                               for train, test in splits]))
    return float(CV_CS[int(np.argmin(losses))])


REGISTRY: dict[str, type[Correction]] = {cls.name: cls for cls in (Projection, Refit, Reweight)}


def get_correction(name: str) -> Correction:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise EngineError(f"unknown correction method {name!r}; known: {', '.join(REGISTRY)}") from None


def correct_probe(probe: LinearProbe, shortcut: ShortcutDirections, method: str | None = None,
                  training: TrainingSplit | None = None, *, anchor: str | None = None, seed: int = 0
                  ) -> tuple[LinearProbe, dict]:
    """The corrected probe and what was done: ``method`` by name, or (None) ``refit`` when the training split is
    given and ``project`` otherwise; ``info['reason']`` says which and why."""
    if method is None:
        method = "refit" if training is not None else "project"
        reason = f"{method}: " + ("training split given" if training is not None else "no training split")
    else:
        reason = f"{method}: chosen by option"
    new, info = get_correction(method).correct(probe, shortcut, training, anchor=anchor, seed=seed)
    return new, {**info, "reason": reason}
