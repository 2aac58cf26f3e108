"""From a finding to a fix: a corrected linear probe that no longer reads the flagged latents, and the proof table.

Three steps, each usable on its own::

    shortcut = shortcut_directions(tail, sae, probe, activations, latents=[12], token="cls")
    new_probe, info = correct_probe(probe, shortcut)                  # "project", or "refit" when training is given
    table = compare_probes(probe, new_probe, embeddings, labels, slices=harm_slices(shortcut, labels, ...))

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

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .activations import ActivationStore
from .config import ANCHORS
from .errors import EngineError, checkpoint
from .harm import MAX_SLICE_VALUES, column_values
from .heads import LinearProbe
from .hooks import VisionTail, select_tokens
from .interventions import shifted_outputs
from .sae import TopKSAE

CV_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # the grid a refit searches when no C is given
CV_FOLDS = 3
REDUNDANT_TOL = 1e-3  # a direction whose part outside the earlier ones is below this (unit vectors) adds nothing


# --------------------------------------------------------------------------- the shortcut's directions

@dataclass
class ShortcutDirections:
    """The flagged latents' directions in a probe's feature space (``g(f)``, standardized: where its weight acts).

    ``vectors`` [latents, embed_dim]: what each latent adds to the features, on average over the images where it
    is active. ``basis`` [rank, embed_dim]: orthonormal rows spanning them (Gram-Schmidt in the latents' order;
    a latent whose direction the earlier ones already span is listed in ``redundant_latents``).
    ``clean_center`` [embed_dim]: the mean features of the images where none of the latents is active.
    ``active`` [images, latents] bool: which latent is active on which image of the split that was measured
    (None when built by hand).
    """

    latents: list[int]
    vectors: Tensor
    basis: Tensor
    clean_center: Tensor
    n_active: list[int] = field(default_factory=list)
    n_clean: int = 0
    redundant_latents: list[int] = field(default_factory=list)
    active: Tensor | None = None
    # the columns of ``active`` (default: ``latents``); a concept's direction is named by its lead latent, while
    # every latent of the concept has its own activity
    active_latents: list[int] | None = None
    mean_center: Tensor | None = None  # the mean features of every image measured (the "mean" anchor)
    concepts: list[list[int]] | None = None  # per direction, the latents it stands for (None: one latent each)
    estimate: str = "removal"

    @property
    def embed_dim(self) -> int:
        return self.basis.shape[1]

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @classmethod
    def from_vectors(cls, vectors, clean_center, latents: Sequence[int] | None = None) -> "ShortcutDirections":
        """Directions given by hand: ``vectors`` [m, embed_dim] (what each adds), ``clean_center`` [embed_dim]."""
        vectors = torch.as_tensor(vectors, dtype=torch.float64).detach().cpu()
        clean_center = torch.as_tensor(clean_center, dtype=torch.float64).detach().cpu().reshape(-1)
        if vectors.ndim != 2:
            raise EngineError(f"shortcut vectors must be a matrix [directions, embed_dim], got shape "
                              f"{list(vectors.shape)}")
        if clean_center.numel() != vectors.shape[1]:
            raise EngineError(f"the clean images' center has {clean_center.numel()} entries but the shortcut "
                              f"vectors are {vectors.shape[1]} wide")
        latents = list(range(vectors.shape[0])) if latents is None else [int(i) for i in latents]
        if len(latents) != vectors.shape[0]:
            raise EngineError(f"{vectors.shape[0]} shortcut vectors but {len(latents)} latents name them")
        for latent, v in zip(latents, vectors):
            if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
                raise EngineError(f"latent {latent}: its direction is zero or not finite, so nothing can be removed")
        basis, redundant = orthonormal_basis(vectors, latents)
        return cls(latents, vectors.float(), basis.float(), clean_center.float(), redundant_latents=redundant)

    def anchor(self, how: str = "mean") -> Tensor:
        """[embed_dim] the point whose coordinate along the shortcut every image is given (see the module doc)."""
        if how not in ANCHORS:
            raise EngineError(f"unknown anchor {how!r}; known: {', '.join(ANCHORS)}")
        if how == "mean":
            if self.mean_center is None:
                raise EngineError("the 'mean' anchor needs the mean features of the measured images; these "
                                  "directions were given by hand without them: use 'midpoint' or 'clean'")
            return self.mean_center
        if how == "clean" or not len(self.vectors):
            return self.clean_center
        return self.clean_center + 0.5 * self.vectors.sum(0)

    def activity(self, latent: int):
        """[images] bool: where ``latent`` was active on the images measured."""
        columns = self.active_latents if self.active_latents is not None else self.latents
        if self.active is None:
            raise EngineError("these shortcut directions were not measured on images, so no latent's activity is "
                              "known")
        if latent not in columns:
            raise EngineError(f"latent {latent} is not one of the shortcut's latents {columns}")
        return self.active[:, columns.index(latent)]

    def to_dict(self) -> dict:
        return {"latents": list(self.latents), "rank": self.rank, "n_active": list(self.n_active),
                "n_clean": self.n_clean, "redundant_latents": list(self.redundant_latents),
                "norms": [round(float(v), 6) for v in self.vectors.norm(dim=1)], "estimate": self.estimate,
                "concepts": self.concepts if self.concepts is not None else [[i] for i in self.latents]}


def orthonormal_basis(vectors: Tensor, latents: Sequence[int]) -> tuple[Tensor, list[int]]:
    """([rank, d] orthonormal rows spanning ``vectors`` [m, d], the latents that added nothing new).

    Gram-Schmidt on the unit vectors in the given order (a QR decomposition that skips dependent columns), each
    step twice for accuracy.
    """
    vectors = vectors.double()
    kept: list[Tensor] = []
    redundant: list[int] = []
    for latent, v in zip(latents, vectors):
        r = v / v.norm()
        for _ in range(2):
            for q in kept:
                r = r - (r @ q) * q
        if float(r.norm()) < REDUNDANT_TOL:
            redundant.append(int(latent))
        else:
            kept.append(r / r.norm())
    basis = torch.stack(kept) if kept else torch.zeros(0, vectors.shape[1], dtype=torch.float64)
    return basis, redundant


def _checked_latents(sae: TopKSAE, latents: Sequence[int]) -> list[int]:
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < sae.n_latents]
    if bad:
        raise EngineError(f"latents {bad} do not exist: the SAE has {sae.n_latents} latents")
    if len(set(latents)) != len(latents):
        raise EngineError(f"latents {latents} name one latent more than once")
    return latents


def _batches(activations, batch_size: int) -> Iterator[Tensor]:
    if isinstance(activations, ActivationStore):
        for _, acts, _ in activations.iter_batches(batch_size):
            yield acts
    else:
        for lo in range(0, activations.shape[0], batch_size):
            yield activations[lo:lo + batch_size]


@torch.no_grad()
def shortcut_directions(tail: VisionTail, sae: TopKSAE, probe: LinearProbe, activations: Tensor | ActivationStore,
                        latents: Sequence[int], *, token: str = "cls", batch_size: int = 256
                        ) -> ShortcutDirections:
    """Measure what each latent adds to the features the probe reads, on the images where it is active.

    For latent ``i``: ``v_i = mean over images with z_i > 0 of g(tail(h)) - g(tail(h - z_i D_i))``, with ``g`` the
    probe's normalization and standardization (:meth:`LinearProbe.features`). Removing the latent keeps the SAE's
    reconstruction error, as every intervention of the engine does, and the edit goes through the real tail
    (remaining blocks, LayerNorm, projection), so the direction is what the latent changes in the embedding, the
    normalization included, rather than its decoder direction pushed through a linearized tail (the Logit Lens
    reading ignores LayerNorm's dependence on the rest of the residual). A spatial latent is active on an image
    when it is active on any patch, and removing it removes it from every patch.

    ``activations``: cached residual streams [images, *item] (what the tail reads) or an activation store;
    ``tail``, ``sae`` and ``probe`` sit on one device. Several latents give an orthonormal basis of their
    directions (:func:`orthonormal_basis`).
    """
    latents = _checked_latents(sae, latents)
    device = sae.b_pre.device
    dim = probe.embed_dim
    sums = torch.zeros(len(latents), dim, dtype=torch.float64)
    counts = torch.zeros(len(latents), dtype=torch.long)
    clean_sum = torch.zeros(dim, dtype=torch.float64)
    feature_sum = torch.zeros(dim, dtype=torch.float64)
    n_clean = n_seen = 0
    active_rows: list[Tensor] = []
    chosen = torch.tensor(latents, dtype=torch.long, device=device)
    for acts in _batches(activations, batch_size):
        checkpoint()
        acts = acts.to(device)
        values, indices = sae.encode_sparse(select_tokens(acts, token))
        on = (indices.unsqueeze(-1) == chosen) & (values > 0).unsqueeze(-1)  # [b, (P,) k, latents]
        active = on.flatten(1, -2).any(1)  # [b, latents]
        features = probe.features(tail(acts))  # [b, embed_dim]
        for j, latent in enumerate(latents):
            rows = active[:, j]
            if rows.any():
                without = shifted_outputs(tail, sae, probe.features, acts[rows], latent, token=token)
                sums[j] += (features[rows] - without).double().sum(0).cpu()
                counts[j] += int(rows.sum())
        clean = ~active.any(1)
        clean_sum += features[clean].double().sum(0).cpu()
        n_clean += int(clean.sum())
        feature_sum += features.double().sum(0).cpu()
        n_seen += features.shape[0]
        active_rows.append(active.cpu())
    never = [latent for latent, n in zip(latents, counts.tolist()) if n == 0]
    if never:
        raise EngineError(f"latents {never} are active on no image of the split, so their direction cannot be "
                          "measured")
    if n_clean == 0:
        raise EngineError(f"every image of the split has one of the latents {latents} active: no clean image "
                          "tells what the features look like without them")
    vectors = sums / counts.unsqueeze(1).double()
    shortcut = ShortcutDirections.from_vectors(vectors, clean_sum / n_clean, latents)
    shortcut.n_active, shortcut.n_clean = counts.tolist(), n_clean
    shortcut.mean_center = (feature_sum / n_seen).float()
    shortcut.active = torch.cat(active_rows) if active_rows else torch.zeros(0, len(latents), dtype=torch.bool)
    return shortcut


def concept_groups(latent_sets: Sequence[Sequence[int]]) -> list[list[int]]:
    """Merge sets of latents that share a latent into one concept each (a flag's ``concept_latents`` are the
    latents one concept is spread over; two flags of one concept, e.g. for two classes, give one group), in the
    order they first appear."""
    groups: list[list[int]] = []
    for latents in latent_sets:
        merged = list(dict.fromkeys(int(i) for i in latents))
        for group in [g for g in groups if set(g) & set(merged)]:
            groups.remove(group)
            merged = list(dict.fromkeys(group + merged))
        groups.append(merged)
    return groups


@torch.no_grad()
def concept_directions(tail: VisionTail, sae: TopKSAE, probe: LinearProbe, activations: Tensor | ActivationStore,
                       concepts: Sequence[Sequence[int]], labels, *, token: str = "cls", batch_size: int = 256
                       ) -> ShortcutDirections:
    """One direction per concept: how the probe's features move with the concept's activation, within a class.

    For concept ``c`` (its latents ``L_c``) and image ``n``: ``s_n = sum over L_c of z_i`` (summed over the patches
    of a spatial SAE). Within each class ``k``, the regression slope of the features on ``s``::

        b_k = Cov_k(g(f), s) / Var_k(s)        v_c = mean over classes of b_k  x  mean of s where s > 0

    i.e. what the concept adds to the features where it is active, read from how features and activation vary
    together among images of one class, so the class signal the SAE mixed into the concept's latents (a
    "ruler" latent that also fires more on melanomas) is not taken for the concept's direction. Measuring each
    latent alone by removing it (:func:`shortcut_directions`) gives one direction per latent; when a concept is
    spread over several latents that also carry the class, those directions span the class signal too and a
    correction removes the lesion with the ruler (the case study measures both: ``tests/casestudy``).

    ``labels`` [images]: class indices (an :class:`ActivationStore` has them; give them for a tensor). A class
    whose images all have the same ``s`` (or fewer than 2 images) gives no slope; at least one class must.
    """
    concepts = [_checked_latents(sae, c) for c in concepts]
    if not concepts or any(not c for c in concepts):
        raise EngineError("name at least one concept, each with at least one latent")
    all_latents = list(dict.fromkeys(i for c in concepts for i in c))
    device = sae.b_pre.device
    labels = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels), dtype=torch.long)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    dim, m = probe.embed_dim, len(concepts)
    n_k = torch.zeros(n_classes, dtype=torch.float64)
    x1 = torch.zeros(n_classes, dim, dtype=torch.float64)  # per class: sum of features
    s1 = torch.zeros(m, n_classes, dtype=torch.float64)  # ... sum of s, of s^2, of features x s
    s2 = torch.zeros(m, n_classes, dtype=torch.float64)
    xs = torch.zeros(m, n_classes, dim, dtype=torch.float64)
    on_sum = torch.zeros(m, dtype=torch.float64)
    on_n = torch.zeros(m, dtype=torch.long)
    feature_sum = torch.zeros(dim, dtype=torch.float64)
    clean_sum = torch.zeros(dim, dtype=torch.float64)
    n_clean = seen = 0
    active_rows: list[Tensor] = []
    chosen = torch.tensor(all_latents, dtype=torch.long, device=device)
    member = torch.tensor([[i in c for i in all_latents] for c in concepts], dtype=torch.float64)  # [m, latents]
    for acts in _batches(activations, batch_size):
        checkpoint()
        acts = acts.to(device)
        values, indices = sae.encode_sparse(select_tokens(acts, token))
        hit = (indices.unsqueeze(-1) == chosen) & (values > 0).unsqueeze(-1)  # [b, (P,) k, latents]
        per_latent = (hit * values.unsqueeze(-1)).flatten(1, -2).sum(1).double().cpu()  # [b, latents]
        active = hit.flatten(1, -2).any(1).cpu()  # [b, latents]
        s = per_latent @ member.T  # [b, m]
        x = probe.features(tail(acts)).double().cpu()  # [b, dim]
        y = labels[seen:seen + x.shape[0]]
        if len(y) != x.shape[0]:
            raise EngineError(f"{len(labels)} labels for more images than that; give one label per image")
        seen += x.shape[0]
        onehot = torch.nn.functional.one_hot(y, n_classes).double()  # [b, classes]
        n_k += onehot.sum(0)
        x1 += onehot.T @ x
        s1 += s.T @ onehot
        s2 += (s * s).T @ onehot
        xs += torch.einsum("bm,bk,bd->mkd", s, onehot, x)
        on = s > 0
        on_sum += (s * on).sum(0)
        on_n += on.sum(0)
        feature_sum += x.sum(0)
        clean = ~active.any(1)
        clean_sum += x[clean].sum(0)
        n_clean += int(clean.sum())
        active_rows.append(active)
    if seen != len(labels):
        raise EngineError(f"{len(labels)} labels for {seen} images; give one label per image")
    never = [c for c, n in zip(concepts, on_n.tolist()) if n == 0]
    if never:
        raise EngineError(f"the concept of latents {never[0]} is active on no image of the split, so its direction "
                          "cannot be measured")
    vectors = []
    for c in range(m):
        slopes = []
        for k in range(n_classes):
            n = float(n_k[k])
            if n < 2:
                continue
            var = float(s2[c, k] / n - (s1[c, k] / n) ** 2)
            if var <= 1e-12 * max(1.0, float(s2[c, k] / n)):
                continue
            slopes.append((xs[c, k] / n - (x1[k] / n) * (s1[c, k] / n)) / var)
        if not slopes:
            raise EngineError(f"the concept of latents {concepts[c]} takes the same activation on every image of "
                              "each class, so how the features move with it cannot be measured")
        vectors.append(torch.stack(slopes).mean(0) * (on_sum[c] / on_n[c]))
    if n_clean == 0:  # the clean anchor's center; the default anchor (the mean) does not need clean images
        clean_sum, n_clean = feature_sum.clone(), seen
    lead = [c[0] for c in concepts]
    shortcut = ShortcutDirections.from_vectors(torch.stack(vectors), clean_sum / n_clean, lead)
    shortcut.n_active, shortcut.n_clean = on_n.tolist(), n_clean
    shortcut.active = torch.cat(active_rows) if active_rows else torch.zeros(0, len(all_latents), dtype=torch.bool)
    shortcut.active_latents, shortcut.concepts = all_latents, [list(c) for c in concepts]
    shortcut.mean_center, shortcut.estimate = (feature_sum / seen).float(), "regression"
    return shortcut


# --------------------------------------------------------------------------- corrections

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


# --------------------------------------------------------------------------- the proof

def gap_closed(old: float | None, new: float | None, reference: float | None) -> float | None:
    """How much of the way from the old accuracy to the reference's the new one went (1: all of it); None where
    there was no gap to close."""
    if old is None or new is None or reference is None or reference - old <= 1e-12:
        return None
    return (new - old) / (reference - old)


@torch.no_grad()
def _predict(probe: LinearProbe, embeddings: Tensor, batch_size: int = 4096) -> np.ndarray:
    device = probe.weight.device
    return torch.cat([probe(embeddings[lo:lo + batch_size].float().to(device)).argmax(1).cpu()
                      for lo in range(0, embeddings.shape[0], batch_size)]).numpy()


def compare_probes(old: LinearProbe, new: LinearProbe, embeddings: Tensor, labels, slices: dict | None = None,
                   reference: LinearProbe | None = None) -> dict:
    """The proof table: accuracy of the old and the new probe overall, per class and on each slice.

    ``embeddings`` [images, embed_dim] raw image embeddings (what a probe reads), ``labels`` [images] class
    indices, ``slices`` name -> boolean mask [images] (:func:`harm_slices`). Every row is ``{"n", "old", "new",
    "change"}`` (accuracies None on an empty row); with a ``reference`` probe (e.g. one trained without the
    correlation) also ``"reference"`` and ``"gap_closed"`` (:func:`gap_closed`).
    """
    if list(old.class_names) != list(new.class_names):
        raise EngineError("the old and the new probe name different classes")
    embeddings = torch.as_tensor(embeddings).detach().cpu()
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise EngineError(f"compare_probes needs one label per embedding: {list(embeddings.shape)} embeddings, "
                          f"{len(labels)} labels")
    for probe in (old, new) + ((reference,) if reference is not None else ()):
        probe.check_fits(embeddings.shape[1])
    heads = {"old": old, "new": new, **({"reference": reference} if reference is not None else {})}
    predicted = {h: _predict(p, embeddings) for h, p in heads.items()}
    correct = {h: pred == labels for h, pred in predicted.items()}

    def row(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        out: dict = {"n": n}
        for h in heads:
            out[h] = float(correct[h][mask].mean()) if n else None
        out["change"] = None if not n else out["new"] - out["old"]
        if reference is not None:
            out["gap_closed"] = gap_closed(out["old"], out["new"], out["reference"])
        return out

    everything = np.ones(len(labels), bool)
    table = {"class_names": list(old.class_names), "overall": row(everything),
             "per_class": {name: row(labels == c) for c, name in enumerate(old.class_names)}, "slices": {},
             "changed_predictions": int((predicted["old"] != predicted["new"]).sum())}
    for name, mask in (slices or {}).items():
        mask = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
        if mask.shape != (len(labels),):
            raise EngineError(f"slice {name!r} has {mask.size} entries, expected one per image ({len(labels)})")
        table["slices"][name] = row(mask)
    return table


def _metadata_indicators(metadata: dict, n: int) -> dict[str, np.ndarray]:
    """Both sides of each metadata column: ``col=1``/``col=0`` for a 0/1 column, ``col=v``/``col!=v`` otherwise
    (empty cells on neither side; a column with more than MAX_SLICE_VALUES values is skipped)."""
    out = {}
    for column, values in metadata.items():
        values, distinct = column_values(values)
        if len(values) != n:
            raise EngineError(f"metadata column {column!r} has {len(values)} values, expected one per image ({n})")
        if len(distinct) > MAX_SLICE_VALUES:
            continue
        known = values != ""
        if set(distinct) <= {"0", "1"}:
            out[f"{column}=1"], out[f"{column}=0"] = values == "1", values == "0"
        else:
            for v in distinct:
                out[f"{column}={v}"], out[f"{column}!={v}"] = values == v, known & (values != v)
    return out


def harm_slices(shortcut: ShortcutDirections, labels, class_names: Sequence[str], flags: Sequence[tuple[str, int]],
                metadata: dict | None = None) -> dict[str, np.ndarray]:
    """The slices a correction is proven on, for the flags ``(class name, latent)`` it answers.

    Per flag, the harm table's four sides: ``"melanoma, latent 12 active"`` / ``"... inactive"`` and the same
    for the other images, named by the other class for a binary probe (``"nevus, latent 12 active"``) and
    ``"not melanoma, ..."`` otherwise. Per metadata column (``{column: [value per image]}``), both of its sides
    overall and within each flagged class and the others (``"melanoma, ruler=0"``, ``"nevus, ruler=1"``).
    Activity is ``shortcut.active``: the images the directions were measured on.
    """
    if shortcut.active is None:
        raise EngineError("these shortcut directions were not measured on images, so no latent's activity is known")
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    active = shortcut.active.numpy().astype(bool)
    if active.shape[0] != len(labels):
        raise EngineError(f"the shortcut was measured on {active.shape[0]} images but {len(labels)} labels are given")
    names = list(class_names)

    def others(class_name: str) -> str:
        return [n for n in names if n != class_name][0] if len(names) == 2 else f"not {class_name}"

    out: dict[str, np.ndarray] = {}
    flagged_classes: list[str] = []
    for class_name, latent in flags:
        if class_name not in names:
            raise EngineError(f"flag class {class_name!r} is not a class of the probe ({', '.join(names)})")
        own = labels == names.index(class_name)
        on = shortcut.activity(latent).numpy().astype(bool)
        out[f"{class_name}, latent {latent} active"] = own & on
        out[f"{class_name}, latent {latent} inactive"] = own & ~on
        out[f"{others(class_name)}, latent {latent} active"] = ~own & on
        out[f"{others(class_name)}, latent {latent} inactive"] = ~own & ~on
        if class_name not in flagged_classes:
            flagged_classes.append(class_name)
    for indicator, mask in _metadata_indicators(metadata or {}, len(labels)).items():
        out[indicator] = mask
        for class_name in flagged_classes:
            own = labels == names.index(class_name)
            out[f"{class_name}, {indicator}"] = own & mask
            out[f"{others(class_name)}, {indicator}"] = ~own & mask
    return out
