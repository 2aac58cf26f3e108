"""Where in an image a latent is active: one map per image and latent over the model's patch grid (or finer).

A map is a grid of non-negative numbers, one per patch (``cells`` x ``cells`` per patch for the methods that reach
the pixels), row by row as the patch embedding lays the patches out; its units are the latent's own (activation,
or the part of the latent's evidence each cell holds).

**Spatial SAE** (``token="spatial"``): the map is the latent's activation at each patch token of the decomposed
layer, read directly; nothing is attributed, whatever the method.

**CLS SAE** (``token="cls"``): the latent reads only the CLS token, so its map says which patch tokens (or
pixels) the latent's evidence came from. How is :data:`METHODS`' choice (``AuditConfig.heatmap_method``):

- ``attnlrp`` (the default): the blocks ending at the decomposed one (``blocks`` of them) are re-run from the
  tokens entering the first with AttnLRP's rules (:mod:`workers.engine.lrp`, Achtibat et al. 2024, on which
  Dreyer et al. 2025 build), and the map is gradient x input of the latent's pre-activation ``p_i`` at those
  patch tokens, summed over channels, positive part::

      map_i[j] = max(0, sum_c x_j,c * d p_i / d x_j,c)    (j a patch token entering block L - blocks + 1)

- ``conservative``: the same with the attention weights held fixed (Ali et al. 2022); ``block`` is it through
  the decomposed block alone, the method before this option existed. Without LayerNorm's scale held fixed
  gradient x input there is zero up to LayerNorm's epsilon: every path from a token into a block starts with
  LayerNorm, which does not change when its input is scaled, so the gradient is orthogonal to the token.
- ``attnlrp-pixels``: the rules through every block and the patch embedding, to the pixels, pooled into cells.
- ``encoder``: the latent's encoder read at each patch token of the same layer.
- ``occlusion``: how much the pre-activation drops when a cell is painted over with the image's mean colour.

The benchmark measures them side by side (``workers.casestudy.benchmark``, docs/heatmaps.md).

The pre-activation rather than the activation: TopK and ReLU pass the gradient through unchanged where the
latent is active, so for an active latent both give the same map; an image where the latent is inactive (TopK
did not select it, or its value is 0) gets a map of zeros: there is no activation to explain, and the
pre-activation's evidence there would show a concept the SAE says is absent.

Only open_clip's standard attention block (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``) can be
re-run with the rules; a CLS map of another block type is refused with an EngineError (a spatial SAE's maps need
no such re-run), and every re-run is compared with the model's own output. open_clip's ViTs always prepend a
class token, with ``pool_type`` "tok" or "avg" alike, and the maps rely on it (token 0 the class token, then one
token per patch); a residual stream laid out otherwise is refused.

Maps travel in a JSON result as uint8 grids scaled by their own maximum (:func:`encode_map`); how much of a map
lies on a region of the image is :func:`mass_on_mask`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .config import HEATMAP_CELLS_MAX, AuditConfig
from .errors import EngineError, checkpoint
from .hooks import resolve_layer
from .lrp import block_forward, check_block, gradient_x_input, tower_relevance

TOKENS = ("cls", "spatial")
DEFAULT_METHOD = AuditConfig.__dataclass_fields__["heatmap_method"].default
DEFAULT_CELLS = AuditConfig.__dataclass_fields__["heatmap_cells"].default
DEFAULT_BLOCKS = AuditConfig.__dataclass_fields__["heatmap_blocks"].default
CELLS_MAX = HEATMAP_CELLS_MAX  # cells per patch side: a finer map than the model's pixels says nothing more


class _Stop(Exception):
    """Raised from a hook once the wanted block has run: the rest of the tower is not needed."""


def _batch_first(visual: nn.Module, x: Tensor) -> Tensor:
    return x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1)


@contextmanager
def _block_io(visual: nn.Module, index: int, first: int | None = None) -> Iterator[dict]:
    """Within the block, a forward pass stores the input of block ``first`` (default ``index``) as ``'x'`` and
    block ``index``'s output as ``'h'``, batch first, and stops with :class:`_Stop` right after block ``index``."""
    blocks = visual.transformer.resblocks
    block, start = blocks[index], blocks[index if first is None else first]
    store: dict = {}

    def before(_module, args, kwargs):
        x = args[0] if args else kwargs.get("q_x", kwargs.get("x"))
        store["x"] = _batch_first(visual, x)

    def after(_module, _inputs, output):
        store["h"] = _batch_first(visual, output)
        raise _Stop

    handles = [start.register_forward_pre_hook(before, with_kwargs=True), block.register_forward_hook(after)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _run_block(visual: nn.Module, index: int, pixels: Tensor, first: int | None = None) -> tuple[Tensor, Tensor]:
    """(input of block ``first``, default ``index``; output of block ``index``) [batch, tokens, d], without
    running the blocks after it."""
    with _block_io(visual, index, first) as store, torch.no_grad():
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
                    latents: Sequence[int], *, batch_size: int = 16, method: str = DEFAULT_METHOD,
                    cells: int = DEFAULT_CELLS, blocks: int = DEFAULT_BLOCKS) -> Tensor:
    """Maps of ``latents`` on the images ``pixels`` [n, 3, H, W] (the model's preprocessing applied):
    [n, len(latents), rows, cols], float, >= 0, on the CPU (see the module doc for what a map is).

    ``method`` names how a CLS latent's map is made (:data:`METHODS`); a spatial SAE's map is its activation
    whatever the method. ``cells``: cells per patch side for the methods traced to the pixels (the grid is
    then ``grid_h * cells`` x ``grid_w * cells``; a patch-level method ignores it). ``blocks``: how many
    blocks "attnlrp" and "conservative" trace the relevance back through (module doc).
    ``visual`` is ``bundle.model.visual``; the images run on its device, where ``sae`` must be too.
    """
    if token not in TOKENS:
        raise EngineError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    check_method(method, cells, blocks)
    index = resolve_layer(visual, layer)
    latents = _check_latents(sae, latents)
    device = next(visual.parameters()).device
    rows, cols = map_shape(visual, token, method, cells)
    if pixels.ndim != 4:
        raise EngineError(f"pixels must be [n, 3, H, W], got shape {list(pixels.shape)}")
    if not latents:
        return torch.zeros(pixels.shape[0], 0, rows, cols)
    out = []
    for lo in range(0, pixels.shape[0], batch_size):
        checkpoint()
        batch = pixels[lo:lo + batch_size].to(device)
        if token == "spatial":
            maps = _spatial_maps(visual, sae, index, batch, latents)
        else:
            maps = METHODS[method](visual, sae, index, batch, latents, cells=cells, blocks=blocks)
        out.append(maps.reshape(*maps.shape[:2], rows, cols).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(latents), rows, cols)


def check_method(method: str, cells: int = DEFAULT_CELLS, blocks: int = DEFAULT_BLOCKS) -> None:
    """Refuse an unknown method, a cell count outside 1..:data:`CELLS_MAX` or a block count below 1."""
    if method not in METHODS:
        raise EngineError(f"heatmap method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= CELLS_MAX:
        raise EngineError(f"heatmap cells per patch side must be a whole number from 1 to {CELLS_MAX}, got {cells!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise EngineError(f"heatmap blocks must be a whole number >= 1, got {blocks!r}")


def map_shape(visual: nn.Module, token: str, method: str, cells: int) -> tuple[int, int]:
    """(rows, cols) of a map: the patch grid, times ``cells`` for a method traced to the pixels."""
    gh, gw = _grid(visual)
    scale = cells if token == "cls" and method in PIXEL_METHODS else 1
    return gh * scale, gw * scale


def _spatial_maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int]) -> Tensor:
    """[b, L, patches]: each latent's activation at every patch token after block ``index``."""
    _, h = _run_block(visual, index, pixels)
    _check_tokens(visual, h)
    with torch.no_grad():
        z = sae.encode(h[:, 1:].float())  # [b, patches, n_latents]
    return z[..., latents].transpose(1, 2)


def _active(sae: nn.Module, cls: Tensor, latents: list[int]) -> Tensor:
    """[b, L] 0/1: whether each latent is active on each image's CLS token."""
    with torch.no_grad():
        values, indices = sae.encode_sparse(cls.float())
        z = torch.zeros(cls.shape[0], sae.n_latents, device=cls.device).scatter(-1, indices, values)
        return (z[:, latents] > 0).float()


def _token_maps(rule: str, fixed_blocks: int | None = None):
    def maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int],
             cells: int = 1, blocks: int = DEFAULT_BLOCKS) -> Tensor:
        """[b, L, patches]: the relevance of the patch tokens entering the earliest of the ``blocks`` blocks
        that end at block ``index`` (module doc) under ``rule``, positive part, zero where the latent is
        inactive."""
        relevance, active = cls_relevance(visual, sae, index, pixels, latents, rule, fixed_blocks or blocks)
        return relevance[:, :, 1:].clamp_min(0) * active.unsqueeze(-1)
    return maps


def _encoder_maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int],
                  **_options) -> Tensor:
    """[b, L, patches]: method "encoder": the CLS latent's encoder read at every patch token of the same layer
    (its pre-activation, positive part), zero where the latent is inactive on the CLS token."""
    _, h = _run_block(visual, index, pixels)
    _check_tokens(visual, h)
    active = _active(sae, h[:, 0], latents)
    with torch.no_grad():
        pre = sae.pre_activations(h[:, 1:].float())[..., latents]  # [b, patches, L]
    return pre.clamp_min(0).transpose(1, 2) * active.unsqueeze(-1)


def _pixel_maps(rule: str):
    def maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int],
             cells: int = 1, **_options) -> Tensor:
        """[b, L, cells]: the latent's relevance at the pixels (``lrp.tower_relevance``), summed over each of
        ``cells`` x ``cells`` cells per patch (a pixel a cell border cuts counts in proportion), positive part;
        zero where the latent is inactive."""
        _, h = _run_block(visual, index, pixels)
        _check_tokens(visual, h)
        active = _active(sae, h[:, 0], latents)
        relevance = tower_relevance(visual, sae, index, pixels, latents, h[:, 0], rule)  # [b, L, H, W]
        gh, gw = _grid(visual)
        pooled = pool_to_cells(relevance, gh * cells, gw * cells)
        return pooled.clamp_min(0).reshape(*pooled.shape[:2], -1) * active.unsqueeze(-1)
    return maps


def pool_to_cells(relevance: Tensor, rows: int, cols: int) -> Tensor:
    """[..., H, W] -> [..., rows, cols]: each cell the sum of the pixels in it, a pixel that a cell border cuts
    shared between the cells by area (so the total is kept whatever the cell count)."""
    height, width = relevance.shape[-2:]
    down = torch.as_tensor(_cell_overlap(rows, height) * (height / rows), dtype=relevance.dtype)
    across = torch.as_tensor(_cell_overlap(cols, width) * (width / cols), dtype=relevance.dtype)
    return torch.einsum("rh,...hw,cw->...rc", down.to(relevance.device), relevance, across.to(relevance.device))


def _occlusion_maps(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int],
                    cells: int = 1, **_options) -> Tensor:
    """[b, L, cells]: method "occlusion": how much each latent's pre-activation drops when one cell of the image
    (``cells`` x ``cells`` per patch) is painted over with the image's mean colour, positive part; zero where
    the latent is inactive. One forward pass (up to block ``index``) per image and cell."""
    _, h = _run_block(visual, index, pixels)
    _check_tokens(visual, h)
    active = _active(sae, h[:, 0], latents)
    gh, gw = _grid(visual)
    rows, cols = gh * cells, gw * cells
    b, _, height, width = pixels.shape
    edges_r = [round(r * height / rows) for r in range(rows + 1)]
    edges_c = [round(c * width / cols) for c in range(cols + 1)]
    fill = pixels.mean((2, 3), keepdim=True)  # [b, 3, 1, 1]
    with torch.no_grad():
        base = sae.pre_activations(h[:, 0].float())[:, latents]  # [b, L]
        drops = torch.zeros(b, len(latents), rows * cols, device=pixels.device)
        order = [(r, c) for r in range(rows) for c in range(cols)]
        step = max(1, 256 // b)
        for lo in range(0, len(order), step):
            chunk = order[lo:lo + step]
            occluded = pixels.unsqueeze(1).repeat(1, len(chunk), 1, 1, 1)
            for j, (r, c) in enumerate(chunk):
                occluded[:, j, :, edges_r[r]:edges_r[r + 1], edges_c[c]:edges_c[c + 1]] = fill
            _, hh = _run_block(visual, index, occluded.reshape(-1, *pixels.shape[1:]))
            pre = sae.pre_activations(hh[:, 0].float())[:, latents].reshape(b, len(chunk), len(latents))
            drops[:, :, lo:lo + len(chunk)] = (base.unsqueeze(1) - pre).transpose(1, 2)
    return drops.clamp_min(0) * active.unsqueeze(-1)


METHODS = {"attnlrp": _token_maps("attnlrp"), "conservative": _token_maps("fixed"), "block": _token_maps("fixed", 1),
           "attnlrp-pixels": _pixel_maps("attnlrp"), "encoder": _encoder_maps, "occlusion": _occlusion_maps}
PIXEL_METHODS = ("attnlrp-pixels", "occlusion")


def cls_relevance(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: list[int],
                  rule: str = "fixed", blocks: int = 1) -> tuple[Tensor, Tensor]:
    """Signed gradient x input of each latent's pre-activation at every token entering block
    ``index - blocks + 1`` (CLS first; block 0 when ``blocks`` reaches further back), the blocks from there to
    ``index`` re-run with LayerNorm scales fixed and the attention under ``rule`` (``lrp.ATTENTION_RULES``:
    "fixed", its weights fixed; "attnlrp", AttnLRP's rules): ([b, L, tokens], active [b, L] as 0/1 floats).

    The token methods keep the patch tokens' positive part where the latent is active.
    """
    first = max(0, index - blocks + 1)
    chain = [visual.transformer.resblocks[i] for i in range(first, index + 1)]
    for block in chain:
        check_block(block)
    x, h = _run_block(visual, index, pixels, first)
    _check_tokens(visual, x)
    active = _active(sae, h[:, 0], latents)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_(True)
        out = x
        for i, block in enumerate(chain):
            out = block_forward(block, out, rule, cls_only=i == len(chain) - 1)
        cls_out = out[:, 0].float()
        # the re-run must be the blocks: a variant this code does not know would give other numbers
        if not torch.allclose(cls_out.detach(), h[:, 0].float(), rtol=1e-3, atol=1e-4 * (1 + h.abs().max().item())):
            raise EngineError(f"blocks {first}..{index} of the vision transformer compute something other than "
                              "open_clip's standard attention block, so a CLS SAE's heatmaps cannot be computed "
                              "for them")
        relevance = gradient_x_input(sae.pre_activations(cls_out), x, latents, dim=2)  # [b, L, tokens]
    return relevance, active


def heatmaps_for(bundle, sae: nn.Module, layer: int, token: str, images, wanted: dict[int, list[int]], *,
                 device: str | torch.device = "cpu", batch_size: int = 16, method: str = DEFAULT_METHOD,
                 cells: int = DEFAULT_CELLS, blocks: int = DEFAULT_BLOCKS) -> dict[int, dict[int, np.ndarray]]:
    """Maps of the wanted (latent, image) pairs: ``wanted[latent]`` lists indices into ``images`` (an ImageSet
    with the model's preprocessing); returns latent -> {image index -> [grid_h, grid_w] float32 map}.

    Each image needed runs once, in batches, for all the latents wanted on it. The model and the SAE are moved
    to ``device``. ``method``, ``cells`` and ``blocks`` as in :func:`latent_heatmaps`.
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
        grids = latent_heatmaps(visual, sae, layer, token, pixels, latents, batch_size=batch_size, method=method,
                                cells=cells, blocks=blocks).numpy()
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
