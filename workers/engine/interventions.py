"""Changing latents and recomputing the output through the tail: deletion curves and causal tests.

All edits keep the SAE's reconstruction error, so with no edit the output is
exactly the model's: deleting latent ``i`` subtracts ``z_i D_i`` from the
residual stream, inserting adds ``a D_i``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .heads import Head
from .hooks import VisionTail, replace_tokens, select_tokens
from .sae import TopKSAE


def _dense_latents(sae: TopKSAE, selected: Tensor) -> Tensor:
    values, indices = sae.encode_sparse(selected)
    return torch.zeros(*selected.shape[:-1], sae.n_latents, dtype=values.dtype,
                       device=values.device).scatter(-1, indices, values)


@torch.no_grad()
def deletion_curves(tail: VisionTail, sae: TopKSAE, head: Head, acts: Tensor, target: Tensor, scores: Tensor,
                    steps: int, token: str = "cls") -> Tensor:
    """[batch, steps + 1]: ``y_target`` after deleting the top-n latents by ``scores``, n = 0..steps.

    ``scores`` [batch, n_latents] rank the latents of each image; only active
    latents are deleted (deleting an inactive one would change nothing).
    """
    selected = select_tokens(acts, token)
    z = _dense_latents(sae, selected)  # [b, (P,) L]
    activity = z if z.ndim == 2 else z.sum(1)
    n = min(steps, sae.n_latents)
    ranked = scores.masked_fill(activity <= 0, float("-inf")).topk(n, dim=-1)
    order, valid = ranked.indices, torch.isfinite(ranked.values)  # [b, n]
    directions = sae.dictionary[order]  # [b, n, d]
    if z.ndim == 2:
        amounts = z.gather(1, order) * valid  # [b, n]
        removed = (amounts.unsqueeze(-1) * directions).cumsum(1)  # [b, n, d]
        variants = torch.cat([selected.unsqueeze(1), selected.unsqueeze(1) - removed], 1)  # [b, n+1, d]
    else:
        p = z.shape[1]
        amounts = z.gather(2, order.unsqueeze(1).expand(-1, p, -1)) * valid.unsqueeze(1)  # [b, P, n]
        removed = (amounts.unsqueeze(-1) * directions.unsqueeze(1)).cumsum(2)  # [b, P, n, d]
        variants = torch.cat([selected.unsqueeze(1), (selected.unsqueeze(2) - removed).transpose(1, 2)], 1)
    b = acts.shape[0]
    expanded = acts.unsqueeze(1).expand(b, n + 1, *acts.shape[1:]).reshape(b * (n + 1), *acts.shape[1:])
    flat = variants.reshape(b * (n + 1), *variants.shape[2:])
    y = head(tail(replace_tokens(expanded, flat, token))).reshape(b, n + 1, -1)
    out = y.gather(2, target.view(b, 1, 1).expand(b, n + 1, 1)).squeeze(-1)
    if n < steps:  # fewer latents than steps: the curve stays flat
        out = torch.cat([out, out[:, -1:].expand(b, steps - n)], 1)
    return out


@torch.no_grad()
def shifted_outputs(tail: VisionTail, sae: TopKSAE, head: Head, acts: Tensor, latent: int | list[int], *,
                    insert: float | None = None, token: str = "cls") -> Tensor:
    """Head scores [batch, classes] with latent ``latent`` (or every latent of a list) ablated (``insert`` None),
    or with the one latent ``latent`` raised by ``insert``."""
    selected = select_tokens(acts, token)
    if insert is None:
        values, indices = sae.encode_sparse(selected)
        chosen = torch.as_tensor(latent, device=indices.device).reshape(-1)
        removed = values * torch.isin(indices, chosen)  # z of the ablated latents, 0 elsewhere
        edited = selected - (removed.unsqueeze(-1) * sae.dictionary[indices]).sum(-2)
    else:
        edited = selected + insert * sae.dictionary[latent]
    return head(tail(replace_tokens(acts, edited, token)))


def area_under_curve(curve: Tensor) -> Tensor:
    """Normalized trapezoid area over n = 0..N (the mean height of the curve); [..., N+1] -> [...]."""
    if curve.shape[-1] == 1:
        return curve[..., 0]
    return torch.trapezoid(curve, dim=-1) / (curve.shape[-1] - 1)
