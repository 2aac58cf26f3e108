"""Reading and rewriting the residual stream of an OpenCLIP vision transformer.

Everything here is a context manager: hooks are registered on entry and
removed on exit, also when the body raised.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .errors import EngineError


def resolve_layer(visual: nn.Module, layer: int) -> int:
    """Block index in [0, n_blocks); negative layers count from the end (-1: the last block)."""
    n = len(visual.transformer.resblocks)
    index = layer + n if layer < 0 else layer
    if not 0 <= index < n:
        raise EngineError(f"layer {layer} does not exist: the vision transformer has {n} blocks "
                          f"(use 0..{n - 1} or -1..-{n})")
    return index


# The tokens of the last block that reach the image embedding, by open_clip's pool_type: "tok" keeps the CLS token
# alone, "avg" the mean of the patch tokens. Everything before the last block reaches it through attention.
_POOLED_TOKEN = {"tok": "cls", "avg": "spatial"}
_POOLING = {"tok": "a CLS-pooled model's output (pool_type 'tok': the image embedding is the CLS token)",
            "avg": "an average-pooled model's output (pool_type 'avg': the image embedding is the mean of the "
                   "patch tokens)"}


def unreachable_token(n_blocks: int, layer: int, token: str, pool_type: str, attention_pooled: bool = False
                      ) -> str | None:
    """Why the relevance of ``token`` after ``layer`` is zero by construction, and what to pick instead; None
    when the token reaches the output.

    After the last block only LayerNorm (per token), pooling and the projection remain, so the tokens the pooling
    drops have no path to the embedding: every gradient, every relevance and so every flag would be zero. An
    attention pooler reads every token, so nothing is unreachable there.
    """
    index = layer + n_blocks if layer < 0 else layer
    pooled = _POOLED_TOKEN.get(pool_type)
    if attention_pooled or pooled is None or index != n_blocks - 1 or token == pooled:
        return None
    earlier = "-2" if layer < 0 else str(n_blocks - 2)  # in the numbering the caller used
    picks = ([f"layer {earlier}"] if n_blocks > 1 else []) + [f"token {pooled}"]
    what = "spatial tokens do" if token == "spatial" else "CLS token does"
    return (f"layer {layer} with token '{token}': the last block's {what} not reach {_POOLING[pool_type]}, so "
            f"every relevance would be zero and the audit could flag nothing; pick {' or '.join(picks)}")


def check_token_reaches_output(visual: nn.Module, layer: int, token: str) -> None:
    """Refuse a layer/token pair whose relevance is zero by construction (see :func:`unreachable_token`)."""
    n = len(visual.transformer.resblocks)
    resolve_layer(visual, layer)
    reason = unreachable_token(n, layer, token, getattr(visual, "pool_type", "tok"),
                               getattr(visual, "attn_pool", None) is not None)
    if reason:
        raise EngineError(reason)


def _batch_first(visual: nn.Module, x: Tensor) -> Tensor:
    return x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1)


def select_tokens(h: Tensor, token: str) -> Tensor:
    """The part of the residual stream [batch, tokens, d] the SAE reads: CLS [batch, d] or patches [batch, P, d]."""
    if h.ndim == 2:  # already the CLS token
        return h
    return h[:, 0] if token == "cls" else h[:, 1:]


def replace_tokens(h: Tensor, selected: Tensor, token: str) -> Tensor:
    """Inverse of :func:`select_tokens`: ``h`` with the selected part replaced."""
    if h.ndim == 2:
        return selected
    if token == "cls":
        return torch.cat([selected.unsqueeze(1), h[:, 1:]], dim=1)
    return torch.cat([h[:, :1], selected], dim=1)


def splice(selected: Tensor, sae: nn.Module, latents: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``h_hat + stopgrad(h - h_hat)`` with the value of ``h`` exactly, bit for bit.

    Written as ``stopgrad(h) + (h_hat - stopgrad(h_hat))``: the value is
    ``h + 0`` and the gradient reaches the latents through ``h_hat`` only.
    Returns (spliced, latents); pass ``latents`` to splice given latents.
    """
    z = sae.encode(selected) if latents is None else latents
    h_hat = sae.decode(z)
    return selected.detach() + (h_hat - h_hat.detach()), z


@contextmanager
def capture_residual(visual: nn.Module, layer: int) -> Iterator[dict]:
    """Within the block, ``store['h']`` holds the residual stream [batch, tokens, d] after ``layer``."""
    block = visual.transformer.resblocks[resolve_layer(visual, layer)]
    store: dict = {}

    def hook(_module, _inputs, output):
        store["h"] = _batch_first(visual, output)

    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def spliced_sae(visual: nn.Module, layer: int, sae: nn.Module, token: str = "cls",
                latents_require_grad: bool = False) -> Iterator[dict]:
    """Run the model with the SAE spliced in after ``layer``; outputs stay identical.

    ``store['latents']`` holds the latents of the last forward pass; with
    ``latents_require_grad`` they are a leaf that gradients reach.
    """
    block = visual.transformer.resblocks[resolve_layer(visual, layer)]
    store: dict = {}

    def hook(_module, _inputs, output):
        h = _batch_first(visual, output)
        selected = select_tokens(h, token)
        z = sae.encode(selected)
        if latents_require_grad:
            z = z.detach().requires_grad_(True)
        spliced, z = splice(selected, sae, z)
        store["latents"] = z
        out = replace_tokens(h, spliced, token)
        return out if getattr(visual.transformer, "batch_first", True) else out.transpose(0, 1)

    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class VisionTail(nn.Module):
    """The vision tower after block ``layer``: remaining blocks, final LayerNorm, pooling, projection.

    Pooling and LayerNorm are open_clip's own ``_pool``, so every pooling it has (class token, mean of the patch
    tokens, attention pooler; LayerNorm before or after pooling) is recomputed as the model computes it.

    ``tail(h_L)`` equals the model's image embedding for the residual stream
    ``h_L`` [batch, tokens, d]. When nothing after the layer mixes tokens (last
    block, CLS pooling, CLS SAE) the tail needs only the CLS token [batch, d],
    and :attr:`cls_only` is True: the cache then stores just that.
    """

    def __init__(self, visual: nn.Module, layer: int, token: str = "cls"):
        super().__init__()
        index = resolve_layer(visual, layer)
        self.visual = visual
        self.blocks = visual.transformer.resblocks[index + 1:]
        self.cls_only = (index == len(visual.transformer.resblocks) - 1 and token == "cls"
                         and getattr(visual, "pool_type", "tok") == "tok" and visual.attn_pool is None)

    def forward(self, h: Tensor) -> Tensor:
        v = self.visual
        if self.cls_only:
            x = h if h.ndim == 2 else h[:, 0]
            pooled = v.ln_post(x)
        else:
            if h.ndim != 3:
                raise EngineError("this layer's tail needs every token of the residual stream")
            x = h if getattr(v.transformer, "batch_first", True) else h.transpose(0, 1)
            for block in self.blocks:
                x = block(x)
            x = _batch_first(v, x)
            pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled

    def logit_lens(self, directions: Tensor) -> Tensor:
        """[n, d] residual directions -> [n, embed_dim]: the embedding of a last-block residual stream holding
        the direction at every token, skipping the blocks.

        With token or average pooling that is ``proj(ln_post(d))``. An attention pooler reads it through its keys
        and values: every key is the same, so every query attends evenly and gets ``d``'s value vector.
        """
        v = self.visual
        if getattr(v, "attn_pool", None) is not None:
            tokens = directions.unsqueeze(1).expand(-1, 2, -1)  # two tokens: average pooling skips token 0
            out, _ = v._pool(tokens)
        else:
            out = v.ln_post(directions)
        return out @ v.proj if v.proj is not None else out


def has_hooks(module: nn.Module) -> bool:
    """True when any submodule still carries a forward (pre-)hook."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
