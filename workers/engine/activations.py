"""Extracting the residual stream after a block and caching it on disk in shards.

The cache holds, per image, what the tail of the network needs to recompute
the image embedding (:class:`~workers.engine.hooks.VisionTail`): the CLS
token [d] when nothing after the layer mixes tokens, else all tokens
[tokens, d]. Shards are numpy ``.npy`` files written through memmaps, so
memory stays flat however large the dataset.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import ImageSet
from .errors import EngineError
from .hooks import VisionTail, capture_residual, select_tokens

DEFAULT_SHARD_SIZE = 4096  # images per shard file; a ViT-B/32 all-token shard in fp32 is ~0.6 GB
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Shard:
    start: int
    count: int
    acts: str  # file name of [count, *item_shape] activations
    emb: str  # file name of [count, embed_dim] image embeddings


class ActivationStore:
    """A folder of activation shards plus ``store.json``; read in order or at random."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / "store.json"
        if not meta_path.is_file():
            raise EngineError(f"no activation cache in {self.folder}")
        meta = json.loads(meta_path.read_text())
        self.n: int = meta["n"]
        self.item_shape: tuple = tuple(meta["item_shape"])
        self.embed_dim: int = meta["embed_dim"]
        self.token: str = meta["token"]
        self.layer: int = meta["layer"]
        self.shards = [Shard(**s) for s in meta["shards"]]
        self.labels = torch.from_numpy(np.load(self.folder / "labels.npy"))

    @property
    def d_model(self) -> int:
        return self.item_shape[-1]

    def _arrays(self, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
        return (np.load(self.folder / shard.acts, mmap_mode="r"), np.load(self.folder / shard.emb, mmap_mode="r"))

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(first image index, activations [b, *item_shape] fp32, embeddings [b, embed_dim] fp32) in order."""
        for shard in self.shards:
            acts, emb = self._arrays(shard)
            for lo in range(0, shard.count, batch_size):
                hi = min(lo + batch_size, shard.count)
                yield (shard.start + lo, torch.from_numpy(np.array(acts[lo:hi], dtype=np.float32)),
                       torch.from_numpy(np.array(emb[lo:hi], dtype=np.float32)))

    def gather(self, indices: np.ndarray | list[int]) -> tuple[Tensor, Tensor]:
        """Activations and embeddings of the given images (any order)."""
        indices = np.asarray(indices, dtype=np.int64)
        acts = np.empty((len(indices), *self.item_shape), dtype=np.float32)
        emb = np.empty((len(indices), self.embed_dim), dtype=np.float32)
        for shard in self.shards:
            sel = np.nonzero((indices >= shard.start) & (indices < shard.start + shard.count))[0]
            if len(sel):
                a, e = self._arrays(shard)
                local = indices[sel] - shard.start
                acts[sel] = a[local]
                emb[sel] = e[local]
        return torch.from_numpy(acts), torch.from_numpy(emb)

    def embeddings(self) -> Tensor:
        """[n, embed_dim] image embeddings (small: one vector per image)."""
        return torch.cat([torch.from_numpy(np.array(self._arrays(s)[1], dtype=np.float32)) for s in self.shards])

    def sae_vectors(self, acts: Tensor, generator: torch.Generator, tokens_per_image: int) -> Tensor:
        """The SAE's training vectors of a batch: CLS tokens, or a random sample of patch tokens per image."""
        selected = select_tokens(acts, self.token)
        if selected.ndim == 2:
            return selected
        b, p, d = selected.shape
        take = min(tokens_per_image, p)
        pick = torch.rand(b, p, generator=generator).argsort(dim=1)[:, :take]
        return selected.gather(1, pick.unsqueeze(-1).expand(b, take, d)).reshape(b * take, d)

    def n_sae_vectors(self, tokens_per_image: int) -> int:
        if self.token == "cls":
            return self.n
        return self.n * min(tokens_per_image, self.item_shape[0] - 1)

    def training_batches(self, batch_size: int, seed: int, tokens_per_image: int) -> Iterator[Tensor]:
        """Endless shuffled SAE training batches [batch_size, d]: shards in random order, rows shuffled within."""
        gen = torch.Generator().manual_seed(seed)
        buffer: list[Tensor] = []
        buffered = 0
        while True:
            for s in torch.randperm(len(self.shards), generator=gen).tolist():
                shard = self.shards[s]
                acts, _ = self._arrays(shard)
                order = torch.randperm(shard.count, generator=gen).numpy()
                for lo in range(0, shard.count, 1024):
                    rows = np.sort(order[lo:lo + 1024])
                    chunk = torch.from_numpy(np.array(acts[rows], dtype=np.float32))
                    vecs = self.sae_vectors(chunk, gen, tokens_per_image)
                    vecs = vecs[torch.randperm(len(vecs), generator=gen)]
                    buffer.append(vecs)
                    buffered += len(vecs)
                    while buffered >= batch_size:
                        allv = torch.cat(buffer)
                        yield allv[:batch_size]
                        rest = allv[batch_size:]
                        buffer, buffered = [rest], len(rest)

    def sample(self, n_vectors: int, seed: int, tokens_per_image: int) -> Tensor:
        """About ``n_vectors`` SAE input vectors drawn from the whole cache (for initialisation)."""
        gen = torch.Generator().manual_seed(seed)
        per_image = 1 if self.token == "cls" else min(tokens_per_image, self.item_shape[0] - 1)
        n_images = min(self.n, max(1, math.ceil(n_vectors / per_image)))
        idx = np.sort(torch.randperm(self.n, generator=gen)[:n_images].numpy())
        acts, _ = self.gather(idx)
        return self.sae_vectors(acts, gen, tokens_per_image)


def autocast_context(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype != "fp32":
        return torch.autocast("cuda", dtype=_TORCH_DTYPES[dtype])
    return nullcontext()


def extract_activations(
    bundle,
    images: ImageSet,
    folder: str | os.PathLike,
    *,
    layer: int = -1,
    token: str = "cls",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    cache_dtype: str = "float32",
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationStore:
    """Run the model over ``images`` and cache the residual stream after ``layer`` in ``folder``.

    A finished cache (``store.json`` present) is reused as it is, so an
    interrupted audit resumes without redoing this stage.
    """
    folder = Path(folder)
    if (folder / "store.json").is_file():
        return ActivationStore(folder)
    device = torch.device(device)
    model = bundle.model
    visual = model.visual
    tail = VisionTail(visual, layer, token)
    n = len(images)
    if n == 0:
        raise EngineError("the dataset has no images")
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(cache_dtype)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    shards: list[Shard] = []
    acts_mm = emb_mm = None
    shard_fill = 0
    done = 0
    labels_all = np.empty(n, dtype=np.int64)
    with capture_residual(visual, layer) as store, torch.inference_mode():
        for pixels, labels in loader:
            pixels = pixels.to(device, non_blocking=True)
            with autocast_context(device, dtype):
                emb = model.encode_image(pixels)
            h = store["h"]
            item = h[:, 0] if tail.cls_only else h
            item = item.float().cpu().numpy()
            emb = emb.float().cpu().numpy()
            labels_all[done:done + len(labels)] = labels.numpy()
            lo = 0
            while lo < len(item):
                if acts_mm is None:
                    count = min(shard_size, n - done - lo)
                    name = f"{len(shards):05d}"
                    acts_mm = np.lib.format.open_memmap(folder / f"acts-{name}.npy", mode="w+", dtype=np_dtype,
                                                        shape=(count, *item.shape[1:]))
                    emb_mm = np.lib.format.open_memmap(folder / f"emb-{name}.npy", mode="w+", dtype=np.float32,
                                                       shape=(count, emb.shape[1]))
                    shards.append(Shard(done + lo, count, f"acts-{name}.npy", f"emb-{name}.npy"))
                    shard_fill = 0
                take = min(len(item) - lo, acts_mm.shape[0] - shard_fill)
                acts_mm[shard_fill:shard_fill + take] = item[lo:lo + take]
                emb_mm[shard_fill:shard_fill + take] = emb[lo:lo + take]
                shard_fill += take
                lo += take
                if shard_fill == acts_mm.shape[0]:
                    acts_mm.flush()
                    emb_mm.flush()
                    acts_mm = emb_mm = None
            done += len(item)
            if progress:
                progress(done, n)
    np.save(folder / "labels.npy", labels_all)
    meta = {"n": n, "item_shape": list(np.load(folder / shards[0].acts, mmap_mode="r").shape[1:]),
            "embed_dim": int(visual.output_dim), "token": token, "layer": layer,
            "shards": [s.__dict__ for s in shards]}
    # store.json is written last and atomically: its presence means the cache is complete.
    tmp = folder / "store.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(folder / "store.json")
    return ActivationStore(folder)
