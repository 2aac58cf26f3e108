"""Attributing one shard of images (:func:`attribute_shard`) into a :class:`Partial`, and joining shards' partials.

A partial holds sums, maxima, each latent's top-m references and per-image rows, so the partials of disjoint
shards merge into exactly the partial of all their images: a sharded audit gives the answer of one task.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ActivationStore, check_cover
from .attribution import REGISTRY
from .context import AuditContext
from .errors import checkpoint, reserve
from .harm import harm_sums
from .hooks import select_tokens
from .interventions import deletion_curves
from .semantics import ReferenceTracker

_HARM_KEYS = ("correct", "called", "score", "score_total")  # what harm_sums adds up, per head


@dataclass
class HeadPartial:
    """One head's part of a partial (C classes, L latents, n images of the shard)."""

    relevance_sum: np.ndarray  # [C, L] act x grad relevance summed over each class's images
    top_values: np.ndarray  # [n, keep] each image's largest relevances ...
    top_indices: np.ndarray  # [n, keep] ... and their latents
    predictions: np.ndarray  # [n] the head's predicted class
    curve_sum: dict[str, np.ndarray]  # attribution method -> [C, steps + 1] deletion curves summed per class
    harm: dict[str, np.ndarray]  # harm_sums: correct, called, score [C, L]; score_total [C]

    @classmethod
    def merge(cls, parts: list["HeadPartial"]) -> "HeadPartial":
        first = parts[0]
        return cls(relevance_sum=_sum([p.relevance_sum for p in parts]),
                   **{name: np.concatenate([getattr(p, name) for p in parts])
                      for name in ("top_values", "top_indices", "predictions")},
                   curve_sum={m: _sum([p.curve_sum[m] for p in parts]) for m in first.curve_sum},
                   harm={k: _sum([p.harm[k] for p in parts]) for k in first.harm})


@dataclass
class Partial:
    """What attributing images [start, start + count) found (C classes, L latents, n = count images)."""

    start: int
    count: int
    ref_values: np.ndarray  # [L, m] each latent's top-m activations (a ReferenceTracker's) ...
    ref_indices: np.ndarray  # [L, m] ... and the images they are on
    frequency: np.ndarray  # [L] images the latent is active on
    max_activation: np.ndarray  # [L]
    class_activation: np.ndarray  # [C, L] activation (mean over patches) summed over each class's images
    faith_counts: np.ndarray  # [C] images in the faithfulness subset
    active_count: np.ndarray  # [C, L] images of each class the latent is active on
    act_values: np.ndarray  # [n, n_act] each image's strongest activations ...
    act_indices: np.ndarray  # [n, n_act] ... and their latents
    heads: dict[str, HeadPartial]

    def references(self) -> ReferenceTracker:
        tracker = ReferenceTracker(*self.ref_values.shape)
        tracker.values, tracker.indices = torch.from_numpy(self.ref_values), torch.from_numpy(self.ref_indices)
        return tracker

    def activity(self, latent: int) -> np.ndarray:
        """[n] the latent's activation on every image (0 where it is not among the image's strongest)."""
        return np.where(self.act_indices == latent, self.act_values, 0.0).max(1)

    @classmethod
    def merge(cls, partials: list["Partial"]) -> "Partial":
        """Join the partials of disjoint shards that cover the dataset: exact top-m reference merge, sums and
        maxima in image order, per-image rows concatenated in image order."""
        partials = sorted(partials, key=lambda p: p.start)
        n = check_cover([(p.start, p.count) for p in partials], "attribution")
        tracker = partials[0].references()
        for p in partials[1:]:
            tracker.merge(p.references())
        return cls(start=0, count=n, ref_values=tracker.values.numpy(), ref_indices=tracker.indices.numpy(),
                   max_activation=np.maximum.reduce([p.max_activation for p in partials]),
                   **{name: _sum([getattr(p, name) for p in partials])
                      for name in ("frequency", "class_activation", "faith_counts", "active_count")},
                   **{name: np.concatenate([getattr(p, name) for p in partials])
                      for name in ("act_values", "act_indices")},
                   heads={h: HeadPartial.merge([p.heads[h] for p in partials]) for h in partials[0].heads})

    def save(self, path: str | os.PathLike) -> None:
        """Write the partial atomically (a half-written file is never read as finished)."""
        tree = {f.name: getattr(self, f.name) for f in fields(self)}
        tree["start"], tree["count"] = np.int64(self.start), np.int64(self.count)
        tree["heads"] = {h: {f.name: getattr(part, f.name) for f in fields(part)} for h, part in self.heads.items()}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        with open(tmp, "wb") as fh:
            np.savez(fh, **_flatten(tree))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Partial":
        with np.load(path) as data:
            tree = _nest({key: data[key] for key in data.files})
        heads = {h: HeadPartial(**part) for h, part in tree.pop("heads").items()}
        start, count = int(tree.pop("start")), int(tree.pop("count"))
        return cls(start=start, count=count, heads=heads, **tree)


def _sum(arrays: list[np.ndarray]) -> np.ndarray:
    return np.sum(arrays, axis=0, dtype=arrays[0].dtype)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"heads": {"probe": {"harm": {"score": a}}}} -> {"heads/probe/harm/score": a}: the file's array names."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _faithfulness_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).squeeze(1)
        mask[idx[torch.randperm(len(idx), generator=gen)[:per_class]]] = True
    return mask


@dataclass
class _Batch:
    """One batch of a shard, on the device (b images)."""

    row: int  # its first image's row in the shard
    acts: Tensor  # [b, *item_shape] cached residual stream
    emb: Tensor  # [b, embed_dim] image embeddings
    y: Tensor  # [b] true classes
    onehot: Tensor  # [b, C]
    positions: Tensor  # [b] the images' indices in the dataset (cpu)
    sub: Tensor  # [b] bool: in the faithfulness subset
    active: Tensor | None = None  # [b, L] bool: latent active on the image (set before the heads read it)


class _HeadSums:
    """One head's running sums over a shard's batches."""

    def __init__(self, ctx: AuditContext, h: str, count: int):
        device, n_classes, n_latents = ctx.device, ctx.n_classes, ctx.sae.n_latents
        self.ctx, self.head, self.methods = ctx, ctx.heads[h], ctx.methods[h]
        self.rel_sum = torch.zeros(n_classes, n_latents, device=device)
        self.top_values = np.zeros((count, ctx.keep), np.float32)
        self.top_indices = np.zeros((count, ctx.keep), np.int64)
        steps = ctx.config.faithfulness_steps
        self.curve_sum = {m: torch.zeros(n_classes, steps + 1, device=device) for m in REGISTRY}
        self.predictions = np.zeros(count, np.int64)
        self.harm = None

    def add(self, batch: _Batch) -> None:
        ctx, rows = self.ctx, slice(batch.row, batch.row + batch.acts.shape[0])
        logits = self.head(batch.emb)
        predicted = logits.argmax(1)
        self.predictions[rows] = predicted.cpu().numpy()
        sums = harm_sums(batch.active, batch.onehot, predicted, logits.gather(1, batch.y.unsqueeze(1)).squeeze(1),
                         ctx.n_classes)
        self.harm = sums if self.harm is None else {k: self.harm[k] + v for k, v in sums.items()}
        rel = self.methods["act_grad"].attribute(batch.acts, target=batch.y)[:, 0]  # [b, L]
        self.rel_sum += batch.onehot.T @ rel
        top = rel.topk(ctx.keep, dim=1)
        self.top_values[rows] = top.values.cpu().numpy()
        self.top_indices[rows] = top.indices.cpu().numpy()
        if batch.sub.any():
            self._add_curves(batch, rel)

    def _add_curves(self, batch: _Batch, rel: Tensor) -> None:
        """Deletion curves of the batch's faithfulness images, by every method's ordering."""
        config, sub = self.ctx.config, batch.sub
        acts, y = batch.acts[sub], batch.y[sub]
        # each curve is computed whole, then padded to faithfulness_steps: [b, steps + 1] a few times over
        reserve(3 * 4 * acts.shape[0] * (config.faithfulness_steps + 1),
                f"deletion curves of {acts.shape[0]} images x {config.faithfulness_steps} steps (faithfulness_steps)")
        for name, method in self.methods.items():
            checkpoint()
            scores = rel[sub] if name == "act_grad" else method.attribute(
                acts, target=y, positions=batch.positions[sub.cpu()])[:, 0]
            curves = deletion_curves(self.ctx.tail, self.ctx.sae, self.head, acts, y, scores,
                                     config.faithfulness_steps, config.token)
            self.curve_sum[name] += batch.onehot[sub].T @ curves

    def partial(self) -> HeadPartial:
        shape = self.rel_sum.shape
        harm = ({k: v.cpu().numpy() for k, v in self.harm.items()} if self.harm is not None else
                {k: np.zeros(shape[:1] if k == "score_total" else shape, np.float32) for k in _HARM_KEYS})
        return HeadPartial(relevance_sum=self.rel_sum.cpu().numpy(), top_values=self.top_values,
                           top_indices=self.top_indices, predictions=self.predictions,
                           curve_sum={m: c.cpu().numpy() for m, c in self.curve_sum.items()}, harm=harm)


class _ShardSums:
    """The running sums of a shard: latent activity, references, and each head's."""

    def __init__(self, ctx: AuditContext, count: int):
        device, n_classes, n_latents = ctx.device, ctx.n_classes, ctx.sae.n_latents
        self.ctx = ctx
        self.tracker = ReferenceTracker(n_latents, ctx.config.n_references, device)
        self.frequency = torch.zeros(n_latents, device=device)
        self.max_activation = torch.zeros(n_latents, device=device)
        self.class_activation = torch.zeros(n_classes, n_latents, device=device)
        self.faith_counts = torch.zeros(n_classes, device=device)
        self.active_count = torch.zeros(n_classes, n_latents, device=device)
        self.n_act = min(n_latents, ctx.keep)
        self.act_values = np.zeros((count, self.n_act), np.float32)
        self.act_indices = np.zeros((count, self.n_act), np.int64)
        self.heads = {h: _HeadSums(ctx, h, count) for h in ctx.heads}

    def add(self, batch: _Batch) -> None:
        config, sae, device = self.ctx.config, self.ctx.sae, self.ctx.device
        rows = slice(batch.row, batch.row + batch.acts.shape[0])
        selected = select_tokens(batch.acts, config.token)
        values, indices = sae.encode_sparse(selected)
        z = torch.zeros(*selected.shape[:-1], sae.n_latents, device=device).scatter(-1, indices, values)
        if z.ndim == 3:
            per_image = z.amax(1) if config.spatial_pool == "max" else z.mean(1)
            mean_act = z.mean(1)
        else:
            per_image = mean_act = z
        self.tracker.update(per_image, batch.positions.to(device))
        self.frequency += (per_image > 0).float().sum(0)
        self.max_activation = torch.maximum(self.max_activation, per_image.amax(0))
        self.class_activation += batch.onehot.T @ mean_act
        batch.active = per_image > 0
        strongest = per_image.topk(self.n_act, dim=1)  # each image's most active latents: AUROC per metadata column
        self.act_values[rows] = strongest.values.cpu().numpy()
        self.act_indices[rows] = strongest.indices.cpu().numpy()
        self.active_count += batch.onehot.T @ batch.active.float()
        for head in self.heads.values():
            head.add(batch)
        self.faith_counts += batch.onehot[batch.sub].sum(0)

    def partial(self, start: int, count: int) -> Partial:
        return Partial(start=start, count=count, ref_values=self.tracker.values.cpu().numpy(),
                       ref_indices=self.tracker.indices.cpu().numpy(), frequency=self.frequency.cpu().numpy(),
                       max_activation=self.max_activation.cpu().numpy(),
                       class_activation=self.class_activation.cpu().numpy(),
                       faith_counts=self.faith_counts.cpu().numpy(), active_count=self.active_count.cpu().numpy(),
                       act_values=self.act_values, act_indices=self.act_indices,
                       heads={h: sums.partial() for h, sums in self.heads.items()})


def _reserve_sums(ctx: AuditContext, count: int) -> None:
    """Refuse, before they are allocated, the running sums whose size an option decides: the deletion curves
    (faithfulness_steps) and the reference images (n_references), both per latent or class."""
    config, n_classes, n_latents = ctx.config, ctx.n_classes, ctx.sae.n_latents
    steps, m = config.faithfulness_steps, config.n_references
    reserve(4 * len(ctx.heads) * len(REGISTRY) * n_classes * (steps + 1),
            f"deletion curves of {steps} steps per class and method (faithfulness_steps)")
    batch = min(config.batch_size, count)
    # the tracker's values and image indices [L, m], and while it updates, both joined with a batch's [L, m + b]
    reserve(2 * 12 * n_latents * (m + batch), f"the top {m} reference images of {n_latents} latents (n_references)")


def attribute_shard(ctx: AuditContext, store: ActivationStore, start: int, count: int,
                    progress: Callable[[int, int], None] | None = None, curves: bool = True) -> Partial:
    """Attribution, reference tracking, activation statistics and deletion curves of images
    [start, start + count): a :class:`Partial`, which :meth:`Partial.merge` joins exactly with other shards'.
    ``curves`` False leaves the deletion curves out (a voting dictionary needs none)."""
    config, device, labels = ctx.config, ctx.device, store.labels
    faith_mask = _faithfulness_subset(labels, config.faithfulness_max_images, config.seed)
    if not curves:
        faith_mask = torch.zeros_like(faith_mask)
    _reserve_sums(ctx, count)
    sums = _ShardSums(ctx, count)
    with torch.no_grad():
        for lo, acts, emb in store.iter_batches(config.batch_size, start, start + count):
            checkpoint()
            b = acts.shape[0]
            y = labels[lo:lo + b].to(device)
            sums.add(_Batch(row=lo - start, acts=acts.to(device), emb=emb.to(device), y=y,
                            onehot=F.one_hot(y, ctx.n_classes).float(), positions=torch.arange(lo, lo + b),
                            sub=faith_mask[lo:lo + b].to(device)))
            if progress:
                progress(lo - start + b, count)
    return sums.partial(start, count)
