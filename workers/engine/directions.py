"""The shortcut's directions: where the flagged latents move the features a linear probe reads.

Three ways to measure them, all on the audited images through the real tail (remaining blocks, LayerNorm,
projection) and in the probe's feature space (``g(f)``, normalized and standardized: where its weight acts):

- :func:`shortcut_directions` ("removal"): one direction per latent, what removing it takes away;
- :func:`concept_directions` ("regression"): one direction per concept (the latents it is spread over), from how
  the features move with its activation within a class;
- :func:`widened_directions` ("widened"): one direction for the concepts together, from the images they are
  active on widened to the side of the features those images lie on (:func:`widened_presence`).

Each gives a :class:`ShortcutDirections` (an orthonormal basis of the directions, the anchors' centers and which
latent is active on which image), what :mod:`workers.engine.correction` corrects a probe along and
:mod:`workers.engine.proof` slices the images by.
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
from .heads import LinearProbe
from .hooks import VisionTail, select_tokens
from .interventions import shifted_outputs
from .sae import TopKSAE

REDUNDANT_TOL = 1e-3  # a direction whose part outside the earlier ones is below this (unit vectors) adds nothing
WIDEN_STEPS = 3  # how many times a concept's images are read again along their own direction ("widened")


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
    sums = _ConceptSums(len(concepts), n_classes, probe.embed_dim)
    chosen = torch.tensor(all_latents, dtype=torch.long, device=device)
    member = torch.tensor([[i in c for i in all_latents] for c in concepts], dtype=torch.float64)  # [m, latents]
    for acts in _batches(activations, batch_size):
        checkpoint()
        s, x, active = _concept_batch(tail, sae, probe, acts.to(device), chosen, member, token)
        y = labels[sums.seen:sums.seen + x.shape[0]]
        if len(y) != x.shape[0]:
            raise EngineError(f"{len(labels)} labels for more images than that; give one label per image")
        sums.add(s, x, y, active)
    if sums.seen != len(labels):
        raise EngineError(f"{len(labels)} labels for {sums.seen} images; give one label per image")
    never = [c for c, n in zip(concepts, sums.on_n.tolist()) if n == 0]
    if never:
        raise EngineError(f"the concept of latents {never[0]} is active on no image of the split, so its direction "
                          "cannot be measured")
    return _concept_shortcut(sums, concepts, all_latents)


def _concept_batch(tail: VisionTail, sae: TopKSAE, probe: LinearProbe, acts: Tensor, chosen: Tensor, member: Tensor,
                   token: str) -> tuple[Tensor, Tensor, Tensor]:
    """One batch of residual streams -> (``s`` [b, concepts] each concept's summed activation, the probe's features
    [b, embed_dim], which of the ``chosen`` latents is active [b, latents]); float64 and bool, on the CPU."""
    values, indices = sae.encode_sparse(select_tokens(acts, token))
    hit = (indices.unsqueeze(-1) == chosen) & (values > 0).unsqueeze(-1)  # [b, (P,) k, latents]
    per_latent = (hit * values.unsqueeze(-1)).flatten(1, -2).sum(1).double().cpu()  # [b, latents]
    active = hit.flatten(1, -2).any(1).cpu()  # [b, latents]
    s = per_latent @ member.T  # [b, m]
    x = probe.features(tail(acts)).double().cpu()  # [b, dim]
    return s, x, active


class _ConceptSums:
    """What :func:`concept_directions` sums over the batches (float64, on the CPU): per class its images, features
    and, per concept, ``s``, ``s^2`` and features x ``s``; per concept ``s`` where it is positive and how often; the
    features of every image and of the clean ones (no chosen latent active); which latent is active where."""

    def __init__(self, m: int, n_classes: int, dim: int):
        self.n_classes = n_classes
        self.n_k = torch.zeros(n_classes, dtype=torch.float64)
        self.x1 = torch.zeros(n_classes, dim, dtype=torch.float64)  # per class: sum of features
        self.s1 = torch.zeros(m, n_classes, dtype=torch.float64)  # ... sum of s, of s^2, of features x s
        self.s2 = torch.zeros(m, n_classes, dtype=torch.float64)
        self.xs = torch.zeros(m, n_classes, dim, dtype=torch.float64)
        self.on_sum = torch.zeros(m, dtype=torch.float64)
        self.on_n = torch.zeros(m, dtype=torch.long)
        self.feature_sum = torch.zeros(dim, dtype=torch.float64)
        self.clean_sum = torch.zeros(dim, dtype=torch.float64)
        self.n_clean = self.seen = 0
        self.active_rows: list[Tensor] = []

    def add(self, s: Tensor, x: Tensor, y: Tensor, active: Tensor) -> None:
        """One batch: ``s`` [b, m], features ``x`` [b, dim], classes ``y`` [b], ``active`` [b, latents]."""
        self.seen += x.shape[0]
        onehot = torch.nn.functional.one_hot(y, self.n_classes).double()  # [b, classes]
        self.n_k += onehot.sum(0)
        self.x1 += onehot.T @ x
        self.s1 += s.T @ onehot
        self.s2 += (s * s).T @ onehot
        self.xs += torch.einsum("bm,bk,bd->mkd", s, onehot, x)
        on = s > 0
        self.on_sum += (s * on).sum(0)
        self.on_n += on.sum(0)
        self.feature_sum += x.sum(0)
        clean = ~active.any(1)
        self.clean_sum += x[clean].sum(0)
        self.n_clean += int(clean.sum())
        self.active_rows.append(active)

    def slope(self, c: int, concept: Sequence[int]) -> Tensor:
        """[dim] the mean over classes of the features' regression slope on concept ``c``'s activation."""
        slopes = []
        for k in range(self.n_classes):
            n = float(self.n_k[k])
            if n < 2:
                continue
            var = float(self.s2[c, k] / n - (self.s1[c, k] / n) ** 2)
            if var <= 1e-12 * max(1.0, float(self.s2[c, k] / n)):
                continue
            slopes.append((self.xs[c, k] / n - (self.x1[k] / n) * (self.s1[c, k] / n)) / var)
        if not slopes:
            raise EngineError(f"the concept of latents {concept} takes the same activation on every image of "
                              "each class, so how the features move with it cannot be measured")
        return torch.stack(slopes).mean(0)


def _concept_shortcut(sums: _ConceptSums, concepts: list[list[int]], all_latents: list[int]) -> ShortcutDirections:
    """The concepts' directions (each slope times the concept's mean activation where it is active), as
    :class:`ShortcutDirections` named by each concept's lead latent."""
    vectors = [sums.slope(c, concept) * (sums.on_sum[c] / sums.on_n[c]) for c, concept in enumerate(concepts)]
    clean_sum, n_clean = sums.clean_sum, sums.n_clean
    if n_clean == 0:  # the clean anchor's center; the default anchor (the mean) does not need clean images
        clean_sum, n_clean = sums.feature_sum.clone(), sums.seen
    lead = [c[0] for c in concepts]
    shortcut = ShortcutDirections.from_vectors(torch.stack(vectors), clean_sum / n_clean, lead)
    shortcut.n_active, shortcut.n_clean = sums.on_n.tolist(), n_clean
    active_rows = sums.active_rows
    shortcut.active = torch.cat(active_rows) if active_rows else torch.zeros(0, len(all_latents), dtype=torch.bool)
    shortcut.active_latents, shortcut.concepts = all_latents, [list(c) for c in concepts]
    shortcut.mean_center, shortcut.estimate = (sums.feature_sum / sums.seen).float(), "regression"
    return shortcut


def within_class_difference(features: Tensor, labels, present) -> Tensor:
    """[embed_dim] the mean over classes of (the mean ``features`` of the class's images where ``present``) -
    (the mean of its other images), float64; classes without images on both sides are left out. What a linear
    read-out of "the concept is there" points along, with the class signal held apart."""
    features = torch.as_tensor(features).double()
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).reshape(-1)
    present = np.asarray(present, dtype=bool).reshape(-1)
    if len(labels) != features.shape[0] or len(present) != features.shape[0]:
        raise EngineError(f"{features.shape[0]} images but {len(labels)} labels and {len(present)} presence values")
    diffs = [features[torch.from_numpy((labels == k) & present)].mean(0)
             - features[torch.from_numpy((labels == k) & ~present)].mean(0)
             for k in np.unique(labels) if ((labels == k) & present).any() and ((labels == k) & ~present).any()]
    if not diffs:
        raise EngineError("no class has images both with and without the concept, so its direction cannot be told "
                          "from the class's")
    return torch.stack(diffs).mean(0)


def column_directions(shortcut: ShortcutDirections, features: Tensor, labels, present, column: str
                      ) -> ShortcutDirections:
    """The shortcut's direction from a labels.csv column that marks the images showing it, instead of from the
    SAE's latents: :func:`within_class_difference` of the probe's ``features`` [images, embed_dim] (the audited
    images', as the probe reads them) between the images the column marks (``present``) and the others.

    The latents of ``shortcut`` (measured on the same images) are taken to be the column's one concept: they
    keep their activity (the flags' slices) and name it. An SAE's concept can cover part of what the probe reads
    as the artifact (on the benchmark's planted cases its images are about half the artifact's); a column a
    person filled in covers all of it."""
    return _marked_directions(shortcut, features, labels, present, (f"column {column!r} marks",
                                                                    f"the images column {column!r} marks"), "column")


def widened_presence(features: Tensor, labels, present, steps: int = WIDEN_STEPS) -> np.ndarray:
    """[images] the images that show a concept, widened from ``present`` (those its latents are active on):
    ``steps`` times, the :func:`within_class_difference` of the ``features`` between the images marked and the
    others, and within each class the images past the midpoint of the two groups' mean projections on it. A step
    that would mark every image of a class, or none, keeps the class as it was.

    An SAE's concept takes part of an artifact's images (on the benchmark's planted cases a third to a half, at a
    precision of about 0.95): those are the images where the artifact is plainest, and the direction they share
    in the features reaches the rest."""
    features = torch.as_tensor(features).double()
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).reshape(-1)
    marked = np.asarray(present, dtype=bool).reshape(-1).copy()
    for _ in range(steps):
        projection = (features @ within_class_difference(features, labels, marked)).numpy()
        widened = marked.copy()
        for k in np.unique(labels):
            mine = labels == k
            if not (mine & marked).any() or not (mine & ~marked).any():
                continue
            cut = (projection[mine & marked].mean() + projection[mine & ~marked].mean()) / 2
            side = mine & (projection > cut)
            if side[mine].any() and not side[mine].all():
                widened[mine] = side[mine]
        if np.array_equal(widened, marked):
            break
        marked = widened
    return marked


def widened_directions(shortcut: ShortcutDirections, features: Tensor, labels, steps: int = WIDEN_STEPS
                       ) -> ShortcutDirections:
    """The shortcut's direction from the images its concepts are active on (``shortcut.active``, any of its
    latents), widened by :func:`widened_presence`: the :func:`within_class_difference` of the probe's
    ``features`` [images, embed_dim] (the audited images', as the probe reads them) between the widened images
    and the others, one direction for the concepts together. The latents keep their activity (the flags' slices)
    and name it, as along a column."""
    if shortcut.active is None:
        raise EngineError("these shortcut directions were not measured on images, so no concept's images are known "
                          "to widen")
    present = shortcut.active.cpu().numpy().any(1)
    marked = widened_presence(features, labels, present, steps)
    return _marked_directions(shortcut, features, labels, marked, ("the concept, widened, covers",
                                                                   "the concept's widened images"), "widened")


def _marked_directions(shortcut: ShortcutDirections, features: Tensor, labels, present, named: tuple[str, str],
                       estimate: str) -> ShortcutDirections:
    """:func:`column_directions` and :func:`widened_directions`: the direction between the images ``present``
    and the others, with the latents of ``shortcut`` as its one concept; ``named``: what marks the images, and
    the images, as refusals say them."""
    features = torch.as_tensor(features).double()
    present = np.asarray(present, dtype=bool).reshape(-1)
    if present.all() or not present.any():
        raise EngineError(f"{named[0]} {'every' if present.any() else 'no'} audited image, so no image "
                          f"tells what the features look like {'without' if present.any() else 'with'} it")
    vector = within_class_difference(features, labels, present)
    if not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0.0:
        raise EngineError(f"{named[1]} look on average like the others of their class, so "
                          "they give no direction to remove")
    latents = list(shortcut.active_latents if shortcut.active_latents is not None else shortcut.latents)
    out = ShortcutDirections.from_vectors(vector[None], features[torch.from_numpy(~present)].mean(0), latents[:1])
    out.n_active, out.n_clean = [int(present.sum())], int((~present).sum())
    out.active, out.active_latents, out.concepts = shortcut.active, latents, [latents]
    out.mean_center, out.estimate = features.mean(0).float(), estimate
    return out
