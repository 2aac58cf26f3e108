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
from torch.utils.data import DataLoader, Subset

from .data import ImageSet
from .errors import EngineError, checkpoint, reserve
from .hooks import VisionTail, capture_residual, select_tokens

DEFAULT_SHARD_SIZE = 4096  # images per shard file; a ViT-B/32 all-token shard in fp32 is ~0.6 GB
TRAINING_BLOCK = 4096  # images per block of the SAE's shuffled training stream (independent of the files)
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Shard:
    start: int
    count: int
    acts: str  # file name of [count, *item_shape] activations
    emb: str  # file name of [count, embed_dim] image embeddings
    patches: str | None = None  # a CLS-only cache: file name of [count, patch_tokens, d] patch tokens for training


def patch_picks(index: int, n_patches: int, take: int) -> np.ndarray:
    """Which ``take`` of image ``index``'s ``n_patches`` patch tokens an SAE of its CLS token also trains on: drawn
    from the image's own index, so a sharded and an unsharded extraction keep the same tokens."""
    return np.sort(np.random.default_rng([index, 2027]).permutation(n_patches)[:take])


def kept_patches(tokens: Tensor, indices, take: int) -> Tensor:
    """[b, take, d] the patch tokens :func:`patch_picks` keeps of images ``indices`` (their tokens [b, 1 + p, d],
    the CLS token first): what extraction writes for a CLS-only cache and what a cache of every token gives."""
    picks = torch.as_tensor(np.stack([patch_picks(int(i), tokens.shape[1] - 1, take) for i in indices]),
                            device=tokens.device)
    return tokens[:, 1:].gather(1, picks.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


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
        # a CLS-only cache extracted with sae.patch_tokens: that many patch tokens per image, kept for training
        self.patch_tokens: int = int(meta.get("patch_tokens", 0))
        self.labels = torch.from_numpy(np.load(self.folder / "labels.npy"))

    @property
    def d_model(self) -> int:
        return self.item_shape[-1]

    def _arrays(self, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
        return (np.load(self.folder / shard.acts, mmap_mode="r"), np.load(self.folder / shard.emb, mmap_mode="r"))

    def read(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Activations and embeddings of images [lo, hi) as fp32, across shard files."""
        acts, emb = [], []
        for shard in self.shards:
            a, b = max(lo, shard.start), min(hi, shard.start + shard.count)
            if a < b:
                sa, se = self._arrays(shard)
                acts.append(np.array(sa[a - shard.start:b - shard.start], dtype=np.float32))
                emb.append(np.array(se[a - shard.start:b - shard.start], dtype=np.float32))
        return torch.from_numpy(np.concatenate(acts)), torch.from_numpy(np.concatenate(emb))

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(first image index, activations [b, *item_shape] fp32, embeddings [b, embed_dim] fp32) in order.

        Batches cover images [start, stop) and do not depend on how the cache is split into files, so a
        sharded and an unsharded audit read the same batches.
        """
        stop = self.n if stop is None else min(stop, self.n)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield (lo, *self.read(lo, hi))

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

    def gather_patches(self, indices: np.ndarray) -> Tensor:
        """[len(indices), patch_tokens, d] the training patch tokens a CLS-only cache keeps for these images."""
        out = np.empty((len(indices), self.patch_tokens, self.d_model), dtype=np.float32)
        for shard in self.shards:
            sel = np.nonzero((indices >= shard.start) & (indices < shard.start + shard.count))[0]
            if len(sel):
                out[sel] = np.load(self.folder / shard.patches, mmap_mode="r")[indices[sel] - shard.start]
        return torch.from_numpy(out)

    def embeddings(self) -> Tensor:
        """[n, embed_dim] image embeddings (small: one vector per image)."""
        return torch.cat([torch.from_numpy(np.array(np.load(self.folder / s.emb, mmap_mode="r"), dtype=np.float32))
                          for s in self.shards])

    def sae_vectors(self, acts: Tensor, generator: torch.Generator, tokens_per_image: int) -> Tensor:
        """The SAE's training vectors of a batch: CLS tokens, or a random sample of patch tokens per image."""
        selected = select_tokens(acts, self.token)
        if selected.ndim == 2:
            return selected
        b, p, d = selected.shape
        take = min(tokens_per_image, p)
        pick = torch.rand(b, p, generator=generator).argsort(dim=1)[:, :take]
        return selected.gather(1, pick.unsqueeze(-1).expand(b, take, d)).reshape(b * take, d)

    def n_sae_vectors(self, tokens_per_image: int, patch_tokens: int = 0) -> int:
        if self.token == "cls":
            return self.n * (1 + self._patches_per_image(patch_tokens))
        return self.n * min(tokens_per_image, self.item_shape[0] - 1)

    def _patches_per_image(self, patch_tokens: int) -> int:
        """How many patch tokens per image a CLS SAE trains on besides the CLS token: what the cache keeps (a
        CLS-only cache) or can give (a cache of every token), at most ``patch_tokens``."""
        if self.token != "cls" or patch_tokens <= 0:
            return 0
        if len(self.item_shape) == 1:
            return min(patch_tokens, self.patch_tokens)
        return min(patch_tokens, self.item_shape[0] - 1)

    def training_vectors(self, rows: np.ndarray, acts: Tensor, generator: torch.Generator, tokens_per_image: int,
                         patch_tokens: int = 0) -> Tensor:
        """The SAE's training vectors of the images ``rows`` (their activations ``acts``): :meth:`sae_vectors`,
        and for a CLS SAE each image's kept patch tokens too (``patch_tokens`` per image, 0: CLS alone)."""
        vectors = self.sae_vectors(acts, generator, tokens_per_image)
        take = self._patches_per_image(patch_tokens)
        if not take:
            return vectors
        if acts.ndim == 2:  # a CLS-only cache: the patch tokens extraction kept
            patches = self.gather_patches(rows)[:, :take]
        else:  # a cache of every token: the same patch tokens extraction would have kept
            patches = kept_patches(acts, rows, take)
        return torch.cat([vectors, patches.reshape(-1, acts.shape[-1])])

    def training_batches(self, batch_size: int, seed: int, tokens_per_image: int, patch_tokens: int = 0
                         ) -> Iterator[Tensor]:
        """Endless shuffled SAE training batches [batch_size, d]: blocks of images in random order, rows
        shuffled within.

        Blocks are fixed ranges of TRAINING_BLOCK images, not the cache's files, so the stream (and the SAE)
        is the same however extraction was sharded.
        """
        # a batch larger than the cache is filled by cycling it: refused up front when it cannot fit, stoppable
        # between chunks while it fills
        reserve(2 * batch_size * self.d_model * 4, f"SAE training batches of {batch_size} vectors (sae.batch_size): "
                                                   "the buffer and its concatenation")
        gen = torch.Generator().manual_seed(seed)
        blocks = [(lo, min(lo + TRAINING_BLOCK, self.n)) for lo in range(0, self.n, TRAINING_BLOCK)]
        buffer: list[Tensor] = []
        buffered = 0
        while True:
            for s in torch.randperm(len(blocks), generator=gen).tolist():
                lo, hi = blocks[s]
                order = torch.randperm(hi - lo, generator=gen).numpy() + lo
                for c in range(0, hi - lo, 1024):
                    checkpoint()
                    rows = np.sort(order[c:c + 1024])
                    chunk, _ = self.gather(rows)
                    vecs = self.training_vectors(rows, chunk, gen, tokens_per_image, patch_tokens)
                    vecs = vecs[torch.randperm(len(vecs), generator=gen)]
                    buffer.append(vecs)
                    buffered += len(vecs)
                    while buffered >= batch_size:
                        allv = torch.cat(buffer)
                        yield allv[:batch_size]
                        rest = allv[batch_size:]
                        buffer, buffered = [rest], len(rest)

    def sample(self, n_vectors: int, seed: int, tokens_per_image: int, patch_tokens: int = 0) -> Tensor:
        """About ``n_vectors`` SAE input vectors drawn from the whole cache (for initialisation)."""
        gen = torch.Generator().manual_seed(seed)
        per_image = self.n_sae_vectors(tokens_per_image, patch_tokens) // self.n
        n_images = min(self.n, max(1, math.ceil(n_vectors / per_image)))
        idx = np.sort(torch.randperm(self.n, generator=gen)[:n_images].numpy())
        acts, _ = self.gather(idx)
        return self.training_vectors(idx, acts, gen, tokens_per_image, patch_tokens)


def autocast_context(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype != "fp32":
        return torch.autocast("cuda", dtype=_TORCH_DTYPES[dtype])
    return nullcontext()


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """(first image, image count) of each shard of a dataset of ``n`` images."""
    if shard_size < 1:
        raise EngineError(f"the shard size must be at least 1 image, got {shard_size}")
    return [(lo, min(shard_size, n - lo)) for lo in range(0, n, shard_size)]


def check_cover(ranges: list[tuple[int, int]], what: str) -> int:
    """(start, count) of shards, in order, must cover images 0..n once each; returns n."""
    expected = 0
    for start, count in ranges:
        if start != expected:
            raise EngineError(f"the {what} shards do not cover the dataset: a gap or overlap at image {expected} "
                              f"(a shard starts at {start})")
        expected += count
    return expected


def shard_files(index: int) -> dict[str, str]:
    """The file names one extraction shard writes; ``done`` is written last and marks it complete."""
    name = f"{index:05d}"
    return {"acts": f"acts-{name}.npy", "emb": f"emb-{name}.npy", "labels": f"labels-{name}.npy",
            "patches": f"patches-{name}.npy", "done": f"shard-{name}.json"}


def extract_shard(
    bundle,
    images: ImageSet,
    folder: str | os.PathLike,
    index: int,
    start: int,
    count: int,
    *,
    layer: int = -1,
    token: str = "cls",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    cache_dtype: str = "float32",
    num_workers: int = 0,
    patch_tokens: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the model over images [start, start + count) and write shard ``index`` of the cache to ``folder``.

    Writes the residual stream after ``layer`` (acts), the image embeddings (emb) and the labels; a cache that
    keeps only the CLS token also keeps ``patch_tokens`` of each image's patch tokens (patches, drawn by
    :func:`patch_picks`) for its SAE to train on. The shard's ``done`` file (its metadata) is written last and
    atomically. A shard already done is kept. Returns the metadata.
    """
    folder = Path(folder)
    files = shard_files(index)
    if (folder / files["done"]).is_file():
        return json.loads((folder / files["done"]).read_text())
    if count < 1 or start < 0 or start + count > len(images):
        raise EngineError(f"shard {index} ({start}..{start + count}) lies outside the {len(images)} images")
    device = torch.device(device)
    tail = VisionTail(bundle.model.visual, layer, token)
    reserve(_batch_bytes(bundle.model.visual, min(batch_size, count)),
            f"a forward pass over {min(batch_size, count)} images (batch_size)")
    folder.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(Subset(images, range(start, start + count)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    # temporary names carry the pid: two processes given the same shard never write into one file
    tmp = {key: folder / f".{name}.{os.getpid()}.part" for key, name in files.items()}
    keep = patch_tokens if tail.cls_only else 0
    item_shape, kept = _write_shard(bundle.model, loader, tmp, count, start=start, layer=layer,
                                    cls_only=tail.cls_only, patch_tokens=keep, device=device, dtype=dtype,
                                    cache_dtype=np.dtype(cache_dtype), progress=progress)
    for key in ("acts", "emb", "labels") + (("patches",) if kept else ()):
        os.replace(tmp[key], folder / files[key])
    meta = {"index": index, "start": start, "count": count, "item_shape": item_shape,
            "embed_dim": int(bundle.model.visual.output_dim), "token": token, "layer": layer, **files,
            "patches": files["patches"] if kept else None, "patch_tokens": kept}
    tmp["done"].write_text(json.dumps(meta))
    os.replace(tmp["done"], folder / files["done"])
    return meta


def _batch_bytes(visual, n_images: int) -> int:
    """A lower bound of one forward pass's host memory, fp32: the images' pixels twice (each image and the batch
    they are stacked into) and the CPU copy of the residual stream the hook captures."""
    h, w = _pair(getattr(visual, "image_size", 224))
    grid = getattr(visual, "grid_size", None)
    tokens = grid[0] * grid[1] + 1 if grid else 1
    width = getattr(getattr(visual, "transformer", None), "width", 0)
    return 4 * n_images * (2 * 3 * h * w + tokens * width)


def _pair(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _write_shard(model, loader: DataLoader, tmp: dict[str, Path], count: int, *, start: int, layer: int,
                 cls_only: bool, patch_tokens: int, device: torch.device, dtype: str, cache_dtype: np.dtype,
                 progress: Callable[[int, int], None] | None) -> tuple[list[int], int]:
    """Run the model over the loader's ``count`` images (the first is image ``start``) into the temporary files
    ``tmp["acts"]``, ``tmp["emb"]``, ``tmp["labels"]`` and, for a CLS-only cache with ``patch_tokens``,
    ``tmp["patches"]``; returns the shape of one image's activations and the patch tokens kept per image."""
    acts_mm = emb_mm = patches_mm = None
    kept = 0
    labels_all = np.empty(count, dtype=np.int64)
    done = 0
    with capture_residual(model.visual, layer) as store, torch.inference_mode():
        for pixels, labels in loader:
            checkpoint()
            pixels = pixels.to(device, non_blocking=True)
            with autocast_context(device, dtype):
                emb = model.encode_image(pixels)
            h = store["h"]
            item = (h[:, 0] if cls_only else h).float().cpu().numpy()
            emb = emb.float().cpu().numpy()
            if acts_mm is None:
                acts_mm = np.lib.format.open_memmap(tmp["acts"], mode="w+", dtype=cache_dtype,
                                                    shape=(count, *item.shape[1:]))
                emb_mm = np.lib.format.open_memmap(tmp["emb"], mode="w+", dtype=np.float32,
                                                   shape=(count, emb.shape[1]))
            acts_mm[done:done + len(item)] = item
            emb_mm[done:done + len(item)] = emb
            if cls_only and patch_tokens and h.ndim == 3 and h.shape[1] > 1:
                kept = min(patch_tokens, h.shape[1] - 1)
                if patches_mm is None:
                    patches_mm = np.lib.format.open_memmap(tmp["patches"], mode="w+", dtype=cache_dtype,
                                                           shape=(count, kept, h.shape[-1]))
                patches_mm[done:done + len(item)] = kept_patches(
                    h, range(start + done, start + done + len(item)), kept).float().cpu().numpy()
            labels_all[done:done + len(item)] = labels.numpy()
            done += len(item)
            if progress:
                progress(done, count)
    acts_mm.flush()
    emb_mm.flush()
    if patches_mm is not None:
        patches_mm.flush()
    item_shape = list(acts_mm.shape[1:])
    del acts_mm, emb_mm, patches_mm
    with open(tmp["labels"], "wb") as fh:
        np.save(fh, labels_all)
    return item_shape, kept


def assemble_store(folder: str | os.PathLike, shards: list[dict]) -> ActivationStore:
    """Join finished extraction shards (their metadata, any order) into one cache: labels.npy and store.json."""
    folder = Path(folder)
    shards = sorted(shards, key=lambda m: m["start"])
    expected = check_cover([(m["start"], m["count"]) for m in shards], "activation")
    first = shards[0]
    labels = np.concatenate([np.load(folder / m["labels"]) for m in shards])
    part = folder / f".labels.npy.{os.getpid()}.part"  # workers sharing the folder may join it at once
    with open(part, "wb") as fh:
        np.save(fh, labels)
    os.replace(part, folder / "labels.npy")
    meta = {"n": expected, "item_shape": first["item_shape"], "embed_dim": first["embed_dim"],
            "token": first["token"], "layer": first["layer"], "patch_tokens": min(m.get("patch_tokens", 0) for m in shards),
            "shards": [{"start": m["start"], "count": m["count"], "acts": m["acts"], "emb": m["emb"],
                        "patches": m.get("patches")} for m in shards]}
    # store.json is written last and atomically: its presence means the cache is complete.
    tmp = folder / f".store.json.{os.getpid()}.part"
    tmp.write_text(json.dumps(meta))
    tmp.replace(folder / "store.json")
    return ActivationStore(folder)


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
    patch_tokens: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationStore:
    """Run the model over ``images`` and cache the residual stream after ``layer`` in ``folder``.

    One process, shard after shard (the service runs the shards as separate tasks instead). A finished
    cache (``store.json`` present) is reused as it is, and finished shards are kept, so an interrupted
    audit resumes without redoing them.
    """
    folder = Path(folder)
    if (folder / "store.json").is_file():
        return ActivationStore(folder)
    n = len(images)
    if n == 0:
        raise EngineError("the dataset has no images")
    metas = []
    for index, (start, count) in enumerate(plan_shards(n, shard_size)):
        report = (lambda done, total, s=start: progress(s + done, n)) if progress else None
        metas.append(extract_shard(bundle, images, folder, index, start, count, layer=layer, token=token,
                                   batch_size=batch_size, device=device, dtype=dtype, cache_dtype=cache_dtype,
                                   num_workers=num_workers, patch_tokens=patch_tokens, progress=report))
    return assemble_store(folder, metas)
