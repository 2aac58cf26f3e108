"""Where in an image a latent is active: one map per image and latent over the model's patch grid.

A map is a grid [grid_h, grid_w] of non-negative numbers, one per patch, row by row as the patch embedding lays the
patches out; its units are the latent's own (activation, or activation explained by each patch).

**Spatial SAE** (``token="spatial"``): the map is the latent's activation at each patch token of the decomposed
layer, read directly; nothing is attributed.

**CLS SAE** (``token="cls"``): the latent reads only the CLS token, so its map says which patch tokens the CLS
token took the latent's activation from in the decomposed block. It is gradient x input of the latent's
pre-activation ``p_i`` with respect to the patch tokens of the residual stream entering that block (the tokens
the CLS token attends to there), summed over channels, positive part:

    map_i[j] = max(0, sum_c x_j,c * d p_i / d x_j,c)    (j a patch token, computed with the rules below)

with the block's attention weights and its LayerNorms' scales held fixed (detached), as in conservative
propagation for transformers (Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative
Propagation"; AttnLRP, Achtibat et al. 2024, on which Dreyer et al. 2025 build). Without that rule gradient x
input at this point is zero up to LayerNorm's epsilon: every path from a patch token into the block starts with
LayerNorm, which does not change when its input is scaled, so the gradient is orthogonal to the token
(Euler's theorem). With it, a patch's share is what the attention moves from its value vector into the CLS token,
weighted by how the latent reads the CLS token (through the block's MLP, by its gradient): were the MLP absent,
the shares of all tokens plus the biases' would add up to the pre-activation exactly.

The pre-activation rather than the activation: TopK and ReLU pass the gradient through unchanged where the
latent is active, so for an active latent both give the same map; an image where the latent is inactive (TopK
did not select it, or its value is 0) gets a map of zeros: there is no activation to explain, and the
pre-activation's evidence there would show a concept the SAE says is absent.

Only open_clip's standard attention block (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``) can be
re-run with fixed attention weights; a CLS map of another block type is refused with an EngineError (a spatial
SAE's maps need no such re-run). open_clip's ViTs always prepend a class token, with ``pool_type`` "tok" or
"avg" alike, and the maps rely on it (token 0 the class token, then one token per patch); a residual stream laid
out otherwise is refused.

Maps travel in a JSON result as uint8 grids scaled by their own maximum (:func:`encode_map`); how much of a map
lies on a region of the image is :func:`mass_on_mask`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EngineError, checkpoint
from .hooks import resolve_layer

TOKENS = ("cls", "spatial")
LATENT_CHUNK = 16  # latents whose gradients one backward pass computes at once: a copy of the block's input each


class _Stop(Exception):
    """Raised from a hook once the wanted block has run: the rest of the tower is not needed."""


def _batch_first(visual: nn.Module, x: Tensor) -> Tensor:
    return x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1)


@contextmanager
def _block_io(visual: nn.Module, index: int) -> Iterator[dict]:
    """Within the block, a forward pass stores block ``index``'s input (``'x'``) and output (``'h'``), batch
    first, and stops with :class:`_Stop` right after that block."""
    block = visual.transformer.resblocks[index]
    store: dict = {}

    def before(_module, args, kwargs):
        x = args[0] if args else kwargs.get("q_x", kwargs.get("x"))
        store["x"] = _batch_first(visual, x)

    def after(_module, _inputs, output):
        store["h"] = _batch_first(visual, output)
        raise _Stop

    handles = [block.register_forward_pre_hook(before, with_kwargs=True), block.register_forward_hook(after)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _run_block(visual: nn.Module, index: int, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(input, output) of block ``index`` [batch, tokens, d], without running the blocks after it."""
    with _block_io(visual, index) as store, torch.no_grad():
        try:
            visual(pixels)
        except _Stop:
            pass
    return store["x"], store["h"]


def _grid(visual: nn.Module) -> tuple[int, int]:
    grid = getattr(visual, "grid_size", None)
    if grid is None:
        raise EngineError("heatmaps need an open_clip VisionTransformer (this image tower has no patch grid)")
    return int(grid[0]), int(grid[1])


def _check_tokens(visual: nn.Module, h: Tensor) -> None:
    gh, gw = _grid(visual)
    if h.shape[1] != gh * gw + 1:
        raise EngineError(f"heatmaps need the class token followed by one token per patch ({gh} x {gw} + 1 = "
                          f"{gh * gw + 1} tokens), but the residual stream has {h.shape[1]}")


def _check_latents(sae: nn.Module, latents: Sequence[int]) -> list[int]:
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < sae.n_latents]
    if bad:
        raise EngineError(f"latent {bad[0]} does not exist: the SAE has {sae.n_latents} latents")
    return latents


def latent_heatmaps(visual: nn.Module, sae: nn.Module, layer: int, token: str, pixels: Tensor,
                    latents: Sequence[int], *, batch_size: int = 16) -> Tensor:
    """Maps of ``latents`` on the images ``pixels`` [n, 3, H, W] (the model's preprocessing applied):
    [n, len(latents), grid_h, grid_w], float, >= 0, on the CPU (see the module doc for what a map is).

    ``visual`` is ``bundle.model.visual``; the images run on its device, where ``sae`` must be too.
    """
    if token not in TOKENS:
        raise EngineError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    index = resolve_layer(visual, layer)
    latents = _check_latents(sae, latents)
    device = next(visual.parameters()).device
    gh, gw = _grid(visual)
    if pixels.ndim != 4:
        raise EngineError(f"pixels must be [n, 3, H, W], got shape {list(pixels.shape)}")
    if not latents:
        return torch.zeros(pixels.shape[0], 0, gh, gw)
    out = []
    for lo in range(0, pixels.shape[0], batch_size):
        checkpoint()
        batch = pixels[lo:lo + batch_size].to(device)
        maps = (_spatial_maps if token == "spatial" else _cls_maps)(visual, sae, index, batch, latents)
        out.append(maps.reshape(*maps.shape[:2], gh, gw).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(latents), gh, gw)


def _spatial_maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int]) -> Tensor:
    """[b, L, patches]: each latent's activation at every patch token after block ``index``."""
    _, h = _run_block(visual, index, pixels)
    _check_tokens(visual, h)
    with torch.no_grad():
        z = sae.encode(h[:, 1:].float())  # [b, patches, n_latents]
    return z[..., latents].transpose(1, 2)


def _cls_maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int]) -> Tensor:
    """[b, L, patches]: each latent's CLS map (module doc), zero where the latent is inactive."""
    relevance, active = cls_relevance(visual, sae, index, pixels, latents)
    return relevance[:, :, 1:].clamp_min(0) * active.unsqueeze(-1)


def cls_relevance(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int]
                  ) -> tuple[Tensor, Tensor]:
    """Signed gradient x input of each latent's pre-activation at every token entering block ``index`` (CLS
    first), attention weights and LayerNorm scales fixed: ([b, L, tokens], active [b, L] as 0/1 floats).

    :func:`latent_heatmaps` keeps the patch tokens' positive part where the latent is active.
    """
    block = visual.transformer.resblocks[index]
    _check_block(block)
    x, h = _run_block(visual, index, pixels)
    _check_tokens(visual, x)
    with torch.no_grad():
        values, indices = sae.encode_sparse(h[:, 0].float())
        z = torch.zeros(h.shape[0], sae.n_latents, device=h.device).scatter(-1, indices, values)
        active = (z[:, latents] > 0).float()
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_(True)
        cls_out = _frozen_cls_output(block, x).float()
        # the re-run must be the block: a variant this code does not know would give other numbers
        if not torch.allclose(cls_out.detach(), h[:, 0].float(), rtol=1e-3, atol=1e-4 * (1 + h.abs().max().item())):
            raise EngineError(f"block {index} of the vision transformer computes something other than open_clip's "
                              "standard attention block, so a CLS SAE's heatmaps cannot be computed for it")
        pre = sae.pre_activations(cls_out)  # [b, n_latents]
        relevance = []
        for lo in range(0, len(latents), LATENT_CHUNK):
            chunk = torch.as_tensor(latents[lo:lo + LATENT_CHUNK], device=pre.device)
            pick = torch.zeros(len(chunk), *pre.shape, device=pre.device)  # one backward pass per latent, vmapped
            pick[torch.arange(len(chunk)), :, chunk] = 1.0
            (grad,) = torch.autograd.grad(pre, x, grad_outputs=pick, is_grads_batched=True,
                                          retain_graph=lo + LATENT_CHUNK < len(latents))
            relevance.append((grad * x).sum(-1).detach().float())  # [chunk, b, tokens]
    return torch.cat(relevance).transpose(0, 1), active


def _check_block(block: nn.Module) -> None:
    attn = getattr(block, "attn", None)
    standard = (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.bias_k is None
                and not attn.add_zero_attn and not hasattr(block, "ln_1_kv")
                and all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")))
    if not standard:
        raise EngineError(f"heatmaps of a CLS SAE need open_clip's standard attention block (ResidualAttentionBlock "
                          f"with nn.MultiheadAttention); this model's block is a {type(block).__name__}. A spatial "
                          "SAE (token 'spatial') gives maps for any block")


def _frozen_layer_norm(ln: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm with its scale (the standard deviation) held fixed: linear in ``x`` apart from the bias."""
    mean = x.mean(-1, keepdim=True)
    std = (x.var(-1, keepdim=True, unbiased=False) + ln.eps).sqrt().detach()
    y = (x - mean) / std
    if ln.weight is not None:
        y = y * ln.weight
    return y + ln.bias if ln.bias is not None else y


def _frozen_cls_output(block: nn.Module, x: Tensor) -> Tensor:
    """The block's output at the CLS token [b, d] from its input ``x`` [b, tokens, d], with the CLS token's
    attention weights and every LayerNorm scale detached (the same value as the block's own output)."""
    attn: nn.MultiheadAttention = block.attn
    b, t, d = x.shape
    heads = attn.num_heads
    y = _frozen_layer_norm(block.ln_1, x)
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(y[:, :1], w[:d], None if bias is None else bias[:d])  # the CLS token's query alone
    k = F.linear(y, w[d:2 * d], None if bias is None else bias[d:2 * d])
    v = F.linear(y, w[2 * d:], None if bias is None else bias[2 * d:])
    q, k, v = (m.reshape(b, -1, heads, d // heads).transpose(1, 2) for m in (q, k, v))  # [b, heads, n, hd]
    weights = ((q @ k.transpose(-1, -2)) / math.sqrt(d // heads)).softmax(-1).detach()  # [b, heads, 1, tokens]
    mixed = (weights @ v).transpose(1, 2).reshape(b, d)
    r = x[:, 0] + block.ls_1(attn.out_proj(mixed))
    return r + block.ls_2(block.mlp(_frozen_layer_norm(block.ln_2, r)))


def heatmaps_for(bundle, sae: nn.Module, layer: int, token: str, images, wanted: dict[int, list[int]], *,
                 device: str | torch.device = "cpu", batch_size: int = 16) -> dict[int, dict[int, np.ndarray]]:
    """Maps of the wanted (latent, image) pairs: ``wanted[latent]`` lists indices into ``images`` (an ImageSet
    with the model's preprocessing); returns latent -> {image index -> [grid_h, grid_w] float32 map}.

    Each image needed runs once, in batches, for all the latents wanted on it. The model and the SAE are moved
    to ``device``.
    """
    device = torch.device(device)
    bundle.model.to(device)
    sae.to(device)
    visual = bundle.model.visual
    per_image: dict[int, set[int]] = {}
    for latent, rows in wanted.items():
        for i in rows:
            if not 0 <= int(i) < len(images):
                raise EngineError(f"image {i} does not exist: the image set has {len(images)} images")
            per_image.setdefault(int(i), set()).add(int(latent))
    maps: dict[int, dict[int, np.ndarray]] = {int(latent): {} for latent in wanted}
    order = sorted(per_image)
    for lo in range(0, len(order), batch_size):
        checkpoint()
        rows = order[lo:lo + batch_size]
        latents = sorted(set().union(*(per_image[i] for i in rows)))
        pixels = torch.stack([images[i][0] for i in rows])
        grids = latent_heatmaps(visual, sae, layer, token, pixels, latents, batch_size=batch_size).numpy()
        for r, i in enumerate(rows):
            for j, latent in enumerate(latents):
                if latent in per_image[i]:
                    maps[latent][i] = grids[r, j].astype(np.float32)
    return maps


def encode_map(grid) -> list[list[int]]:
    """A map as rows of integers 0..255, scaled by its own maximum (a map without mass stays all zero)."""
    grid = np.clip(np.asarray(grid, dtype=np.float64), 0, None)
    top = grid.max() if grid.size else 0.0
    if not np.isfinite(top):
        raise EngineError("a heatmap holds a value that is not finite")
    scaled = np.zeros_like(grid) if top <= 0 else np.rint(grid / top * 255)
    return scaled.astype(np.uint8).tolist()


def decode_map(encoded: Sequence[Sequence[int]]) -> np.ndarray:
    """:func:`encode_map`'s rows back to a float32 grid in 0..1 (1 at the map's maximum)."""
    return np.asarray(encoded, dtype=np.float32) / 255.0


def mass_on_mask(heatmap, mask) -> tuple[float, float]:
    """(share of the map's mass on the mask, the mask's share of the image): the second is what a map spread
    evenly over the image would score.

    ``heatmap`` [gh, gw] >= 0 covers the same field as ``mask`` [H, W] (bool: the model's input, after its
    preprocessing's resize and crop). Each patch cell counts by the fraction of its area the mask covers
    (:func:`mask_coverage`), so nothing is thresholded. A map without mass has no share: nan.
    """
    heatmap = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is a grid [gh, gw], got shape {heatmap.shape}")
    coverage = mask_coverage(mask, heatmap.shape)
    total = heatmap.sum()
    mass = float((heatmap * coverage).sum() / total) if total > 0 else float("nan")
    return mass, float(np.asarray(mask, dtype=np.float64).mean())


def mask_coverage(mask, grid: tuple[int, int]) -> np.ndarray:
    """[gh, gw]: the fraction of each patch cell's area that ``mask`` [H, W] covers, pixels cut by a cell border
    counted in proportion."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim != 2:
        raise ValueError(f"a mask is an image [H, W], got shape {mask.shape}")
    return _cell_overlap(grid[0], mask.shape[0]) @ mask @ _cell_overlap(grid[1], mask.shape[1]).T


def _cell_overlap(cells: int, pixels: int) -> np.ndarray:
    """[cells, pixels]: the fraction of each cell (of ``pixels / cells`` pixels) that each pixel fills."""
    edges = np.arange(cells + 1) * (pixels / cells)
    lo, hi = edges[:-1, None], edges[1:, None]
    p = np.arange(pixels)[None, :]
    return np.clip(np.minimum(hi, p + 1) - np.maximum(lo, p), 0, None) / (pixels / cells)
