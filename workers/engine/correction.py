"""From a finding to a fix: a corrected linear probe that no longer reads the flagged latents, and the proof table.

Three steps, each usable on its own::

    shortcut = shortcut_directions(tail, sae, probe, activations, latents=[12], token="cls")
    new_probe, info = correct_probe(probe, shortcut)                  # "project", or "refit" when training is given
    table = compare_probes(probe, new_probe, embeddings, labels, slices=harm_slices(shortcut, labels, ...))

This module holds the second step; the first is :mod:`workers.engine.directions`, the third
:mod:`workers.engine.proof`, and their names are importable from here too.

The probe reads ``x = g(f)``: the embedding after its normalization and standardization, where its weight acts.
Every direction here lives in that space. With ``U`` [k, embed_dim] an orthonormal basis of the shortcut's
directions and ``P = U^T U``, both corrections end as the same kind of probe::

    W' = W (I - P)          b' = b + W P a

i.e. the old probe applied to ``x - P (x - a)``: every image's coordinate along the shortcut replaced by the one
of an anchor point ``a``. The new probe reads nothing along ``U`` (``W' U^T = 0``) and is a plain
:class:`~workers.engine.heads.LinearProbe` of the old one's format (classes, normalization, mean, scale, one row
for a binary probe that came as one row), so it saves to ``.npz``/``.safetensors`` and drops in where the old one
ran.

Methods (one verb, ``correct``, chosen by name from :data:`REGISTRY`):

- ``project`` (P-ClArC's projection applied to a linear read-out) keeps the old weights off the shortcut's
  subspace; it needs only the audit's data.
- ``refit`` fits a new logistic regression on the user's training split with the shortcut's coordinate replaced
  by the anchor's (so the fit cannot use it), then reads features exactly as above.

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
    "ANCHORS", "CV_CS", "CV_FOLDS", "REDUNDANT_TOL", "REGISTRY", "Correction", "Projection", "Refit",
    "ShortcutDirections", "TrainingSplit", "compare_probes", "concept_directions", "concept_groups", "correct_probe",
    "gap_closed", "get_correction", "harm_slices", "orthonormal_basis", "shortcut_directions",
]

CV_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # the grid a refit searches when no C is given
CV_FOLDS = 3


@dataclass
class TrainingSplit:
    """The probe's training split: raw image embeddings [n, embed_dim] (the model's output, before the probe's
    normalization) and labels (class indices, or class names as in labels.csv). ``C``: the probe's inverse
    regularization strength when known; otherwise a refit picks it by cross-validation."""

    embeddings: Tensor
    labels: Sequence
    C: float | None = None

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
        p = _projector(shortcut)
        x = (x - (x - point.double()) @ p).numpy()  # the shortcut's coordinate held at the anchor's
        folds = min(CV_FOLDS, int(counts.min()))
        if training.C is not None:
            c, how = float(training.C), "given"
        elif folds >= 2:
            c, how = _cross_validated_c(x, y, folds, seed), f"{folds}-fold cross-validation (log loss) over {list(CV_CS)}"
        else:
            c, how = 1.0, "scikit-learn's default (too few images per class to cross-validate)"
        clf = LogisticRegression(C=c, max_iter=5000).fit(x, y)
        coef = torch.as_tensor(clf.coef_, dtype=torch.float64)
        intercept = torch.as_tensor(clf.intercept_, dtype=torch.float64)
        if coef.shape[0] == 1:  # binary: scikit-learn's one row reads class 1 against class 0
            # one stored row keeps scikit-learn's row; two rows split its logit so that softmax gives its probability
            half = 1.0 if probe.stored_rows == 1 else 0.5
            coef = torch.cat([-half * coef, half * coef])
            intercept = torch.cat([-half * intercept, half * intercept])
        weight, bias = _read_off(coef, intercept, shortcut, point)
        return weight, bias, {"n_train": int(len(y)), "C": c, "C_from": how}


def _cross_validated_c(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """The C of :data:`CV_CS` with the lowest held-out log loss (the smallest C on a tie: the simpler probe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))
    losses = []
    for c in CV_CS:
        checkpoint()
        losses.append(np.mean([log_loss(y[test], LogisticRegression(C=c, max_iter=5000).fit(x[train], y[train])
                                        .predict_proba(x[test]), labels=np.arange(int(y.max()) + 1))
                               for train, test in splits]))
    return float(CV_CS[int(np.argmin(losses))])


REGISTRY: dict[str, type[Correction]] = {cls.name: cls for cls in (Projection, Refit)}


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
