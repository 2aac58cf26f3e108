"""Re-running open_clip's vision tower with relevance rules, so that gradient x input is a relevance.

Layer-wise relevance propagation through a transformer can be computed as gradient x input of a forward pass
whose non-linear parts are changed so that their gradient carries relevance instead of sensitivity (the
"efficient" form of AttnLRP, Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
for Transformers"). The forward values stay the model's own; only the gradients change. The rules used here,
written for open_clip's ``VisionTransformer`` and ``ResidualAttentionBlock``:

- **LayerNorm** (identity rule): its scale, the standard deviation, is held fixed (detached), so the norm is
  linear in its input and passes relevance on in proportion to each channel's contribution.
- **Activation of the MLP** (GELU, QuickGELU; identity rule): ``act(h)`` is computed as ``h * (act(h) / h)``
  with the ratio detached, so relevance passes through unchanged instead of being scaled by the slope.
- **Products of two computed tensors** (the query-key product and the weights-value product; uniform rule):
  each operand receives half of the gradient, so the two halves of gradient x input add up to the product's
  relevance instead of twice it.
- **Softmax** of the attention scores: the ordinary gradient. Its gradient x input is Proposition 3.1 of the
  AttnLRP paper (the relevance of the scores, the bias term of the Taylor expansion dropped).
- **Linear maps** (the patch embedding, projections, the MLP's layers): the ordinary gradient (the epsilon
  rule with epsilon -> 0).

With ``attention="fixed"`` instead of ``"attnlrp"`` the attention weights are detached as a whole, so relevance
moves only along the value path: the conservative propagation of Ali et al. 2022 ("XAI for Transformers:
Better Explanations through Conservative Propagation"), the rule today's block-level maps use.

:func:`tower_relevance` gives the relevance of chosen latents of an SAE, read at the CLS token after block
``index``, at every input pixel. Every re-run is compared with the model's own output of that block, so a block
this module does not know is refused instead of explained wrongly.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EngineError

ATTENTION_RULES = ("attnlrp", "fixed")
LATENT_CHUNK = 16  # latents whose gradients one backward pass computes at once: a copy of the graph each


def half_gradient(x: Tensor) -> Tensor:
    """``x`` in the forward pass; half of the gradient flows back to it (the uniform rule of a product)."""
    return 0.5 * x + (0.5 * x).detach()


def frozen_layer_norm(ln: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm with its scale (the standard deviation) held fixed: linear in ``x`` apart from the bias. A norm
    that is not an ``nn.LayerNorm`` (``nn.Identity`` where a model has none) is applied as it is."""
    if not isinstance(ln, nn.LayerNorm):
        return ln(x)
    mean = x.mean(-1, keepdim=True)
    std = (x.var(-1, keepdim=True, unbiased=False) + ln.eps).sqrt().detach()
    y = (x - mean) / std
    if ln.weight is not None:
        y = y * ln.weight
    return y + ln.bias if ln.bias is not None else y


def identity_rule(act: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
    """``act(h)``, with the gradient of the identity scaled by ``act(h) / h`` (detached): relevance passes
    through the activation unchanged."""
    out = act(h)
    safe = torch.where(h == 0, torch.ones_like(h), h)
    ratio = torch.where(h == 0, torch.zeros_like(h), out / safe).detach()
    return h * ratio


def check_block(block: nn.Module) -> None:
    """Refuse a block that is not open_clip's standard attention block (the only one re-run here)."""
    attn = getattr(block, "attn", None)
    standard = (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.bias_k is None
                and not attn.add_zero_attn and not hasattr(block, "ln_1_kv")
                and all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")))
    if not standard:
        raise EngineError(f"heatmaps of a CLS SAE need open_clip's standard attention block (ResidualAttentionBlock "
                          f"with nn.MultiheadAttention); this model's block is a {type(block).__name__}. A spatial "
                          "SAE (token 'spatial') gives maps for any block")


def attention(block: nn.Module, y: Tensor, rule: str, queries: int | None = None) -> Tensor:
    """The block's attention of the normalised tokens ``y`` [b, tokens, d] under ``rule`` (module doc), before
    its output projection's layer scale; ``queries``: only the first this many tokens as queries (1: the CLS
    token alone)."""
    attn: nn.MultiheadAttention = block.attn
    b, t, d = y.shape
    heads = attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(y[:, :queries] if queries else y, w[:d], None if bias is None else bias[:d])
    k = F.linear(y, w[d:2 * d], None if bias is None else bias[d:2 * d])
    v = F.linear(y, w[2 * d:], None if bias is None else bias[2 * d:])
    q, k, v = (m.reshape(b, -1, heads, d // heads).transpose(1, 2) for m in (q, k, v))  # [b, heads, n, hd]
    if rule == "fixed":
        weights = ((q @ k.transpose(-1, -2)) / math.sqrt(d // heads)).softmax(-1).detach()
        mixed = weights @ v
    else:
        scores = (half_gradient(q) @ half_gradient(k).transpose(-1, -2)) / math.sqrt(d // heads)
        mixed = half_gradient(scores.softmax(-1)) @ half_gradient(v)
    return attn.out_proj(mixed.transpose(1, 2).reshape(b, -1, d))


def mlp(block: nn.Module, x: Tensor) -> Tensor:
    """The block's MLP with the identity rule on its activation and fixed scales on any norm inside it."""
    for layer in block.mlp:
        if isinstance(layer, nn.Linear):
            x = layer(x)
        elif isinstance(layer, nn.LayerNorm):
            x = frozen_layer_norm(layer, x)
        elif isinstance(layer, nn.Dropout):
            continue
        else:
            x = identity_rule(layer, x)
    return x


def block_forward(block: nn.Module, x: Tensor, rule: str, cls_only: bool = False) -> Tensor:
    """Block output [b, tokens, d] (or the CLS token's [b, 1, d] with ``cls_only``) with the relevance rules."""
    a = attention(block, frozen_layer_norm(block.ln_1, x), rule, queries=1 if cls_only else None)
    r = (x[:, :1] if cls_only else x) + block.ls_1(a)
    return r + block.ls_2(mlp(block, frozen_layer_norm(block.ln_2, r)))


def embed(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(patch embeddings [b, patches, d], the tokens entering block 0 [b, tokens, d]): open_clip's
    ``VisionTransformer._embeds`` with a fixed-scale ``ln_pre``."""
    patches = visual.conv1(pixels)
    patches = patches.reshape(*patches.shape[:2], -1).transpose(1, 2)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(patches.shape[0], -1, -1).to(patches.dtype)
    x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
    return patches, frozen_layer_norm(visual.ln_pre, x)


def tower_cls_output(visual: nn.Module, index: int, pixels: Tensor, rule: str) -> Tensor:
    """The CLS token after block ``index`` [b, d], re-run from the pixels with the relevance rules."""
    _, x = embed(visual, pixels)
    blocks = visual.transformer.resblocks
    for i in range(index + 1):
        x = block_forward(blocks[i], x, rule, cls_only=i == index)
    return x[:, 0]


def tower_relevance(visual: nn.Module, sae: nn.Module, index: int, pixels: Tensor, latents: Sequence[int],
                    reference: Tensor, rule: str = "attnlrp") -> Tensor:
    """Relevance of each latent's pre-activation (CLS token after block ``index``) at every pixel, summed over
    the colour channels: [b, L, H, W], signed, float.

    ``reference`` [b, d] is the model's own CLS output of that block; a re-run that does not reproduce it means
    a block this module does not know, and is refused.
    """
    if rule not in ATTENTION_RULES:
        raise EngineError(f"attention rule must be one of {', '.join(ATTENTION_RULES)}, got {rule!r}")
    for i in range(index + 1):
        check_block(visual.transformer.resblocks[i])
    with torch.inference_mode(False), torch.enable_grad():
        x = pixels.detach().clone().requires_grad_(True)
        cls_out = tower_cls_output(visual, index, x, rule).float()
        tolerance = 1e-3 * (1 + reference.abs().max().item())
        if not torch.allclose(cls_out.detach(), reference.float(), rtol=1e-3, atol=tolerance):
            raise EngineError(f"blocks 0..{index} of the vision transformer compute something other than open_clip's "
                              "standard layout (patch embedding, class token, positions, attention blocks), so "
                              "their relevance cannot be traced to the pixels")
        return gradient_x_input(sae.pre_activations(cls_out), x, latents, dim=1)  # [b, L, H, W]


def gradient_x_input(pre: Tensor, x: Tensor, latents: Sequence[int], dim: int) -> Tensor:
    """[b, L, ...]: gradient x input of each latent's pre-activation ``pre`` [b, n_latents] at ``x`` [b, ...],
    summed over ``x``'s axis ``dim`` (channels), one vmapped backward pass per :data:`LATENT_CHUNK` latents."""
    out = []
    for lo in range(0, len(latents), LATENT_CHUNK):
        chunk = torch.as_tensor(list(latents[lo:lo + LATENT_CHUNK]), device=pre.device)
        pick = torch.zeros(len(chunk), *pre.shape, device=pre.device)
        pick[torch.arange(len(chunk)), :, chunk] = 1.0
        (grad,) = torch.autograd.grad(pre, x, grad_outputs=pick, is_grads_batched=True,
                                      retain_graph=lo + LATENT_CHUNK < len(latents))
        out.append((grad * x).sum(dim + 1).detach().float())  # [chunk, b, ...]
    return torch.cat(out).transpose(0, 1)
