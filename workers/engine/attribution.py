"""Attributing a head's scores to SAE latents, and the baselines the paper compares against.

Every method has one call shape::

    method = get_method("act_grad", tail=tail, sae=sae, head=head, token="cls")
    relevance = method.attribute(activations, target=None, batch_size=64)  # [batch, classes, n_latents]

``activations`` are cached residual streams (what :class:`VisionTail` reads);
``target`` is None for every class, or a [batch] tensor of one class per image
(then the result is [batch, 1, n_latents]).

``act_grad`` is attribution patching, ``R_i = z_i * dy_c/dz_i``. Because the
SAE is spliced in as ``h_hat + stopgrad(h - h_hat)`` and ``h_hat = b_pre +
sum_i z_i D_i``, ``dy_c/dz_i = dy_c/dh . D_i``: one backward pass through the
tail (blocks after the layer, LayerNorm, projection, head) gives the gradient
for every latent at once; the trunk before the layer is never differentiated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import EngineError, checkpoint
from .heads import Head
from .hooks import VisionTail, replace_tokens, select_tokens
from .sae import TopKSAE


class AttributionMethod:
    name = ""

    def __init__(self, tail: VisionTail, sae: TopKSAE, head: Head, token: str = "cls", seed: int = 0):
        self.tail, self.sae, self.head, self.token = tail, sae, head, token
        self.seed = seed

    @property
    def n_classes(self) -> int:
        return len(self.head.class_names)

    def attribute(self, activations: Tensor, target: Tensor | None = None, batch_size: int | None = None,
                  positions: Tensor | None = None) -> Tensor:
        """[batch, classes or 1, n_latents] relevance of each latent for each class.

        ``positions`` [batch] are the images' indices in the dataset (default 0..batch-1): a method with
        randomness draws per image from them, so its scores do not depend on how images were batched.
        """
        if target is not None and target.shape[0] != activations.shape[0]:
            raise EngineError("one target class per image is needed")
        batch_size = batch_size or activations.shape[0]
        if positions is None:
            positions = torch.arange(activations.shape[0])
        chunks = []
        for lo in range(0, activations.shape[0], batch_size):
            checkpoint()
            chunk_target = None if target is None else target[lo:lo + batch_size]
            chunks.append(self._attribute(activations[lo:lo + batch_size], chunk_target,
                                          positions[lo:lo + batch_size]))
        return torch.cat(chunks)

    # -------------------------------------------------------------- helpers
    def _sparse(self, acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(SAE input [b, (P,) d], active values [b, (P,) k], indices [b, (P,) k])."""
        selected = select_tokens(acts, self.token)
        with torch.no_grad():
            values, indices = self.sae.encode_sparse(selected)
        return selected, values, indices

    def _activity(self, acts: Tensor) -> Tensor:
        """[b, n_latents] latent activations, summed over tokens for a spatial SAE."""
        _, values, indices = self._sparse(acts)
        b = values.shape[0]
        out = torch.zeros(b, self.sae.n_latents, dtype=values.dtype, device=values.device)
        return out.scatter_add_(-1, indices.reshape(b, -1), values.reshape(b, -1))

    def _scatter(self, per_active: Tensor, indices: Tensor) -> Tensor:
        """[c, b, (P,) k] values at active latents -> dense [b, c, n_latents], summed over tokens."""
        c, b = per_active.shape[:2]
        out = torch.zeros(c, b, self.sae.n_latents, dtype=per_active.dtype, device=per_active.device)
        idx = indices.reshape(1, b, -1).expand(c, b, -1)
        out.scatter_add_(-1, idx, per_active.reshape(c, b, -1))
        return out.transpose(0, 1)

    def _classes(self, target: Tensor | None, b: int, device) -> Tensor:
        """[c, b] class index per output row."""
        if target is None:
            return torch.arange(self.n_classes, device=device).unsqueeze(1).expand(-1, b)
        return target.to(device).unsqueeze(0)

    def _attribute(self, acts: Tensor, target: Tensor | None, positions: Tensor) -> Tensor:
        raise NotImplementedError


class ActGrad(AttributionMethod):
    """``R_i = z_i * dy_c/dz_i`` (attribution patching), through the tail only."""

    name = "act_grad"

    def gradients(self, acts: Tensor, target: Tensor | None) -> Tensor:
        """dy/dh at the SAE input: [c, b, (P,) d], c = classes (target None) or 1."""
        selected = select_tokens(acts, self.token)
        with torch.enable_grad():
            x = selected.detach().requires_grad_(True)
            y = self.head(self.tail(replace_tokens(acts, x, self.token)))  # [b, classes]
            if target is not None:
                picked = y.gather(1, target.to(y.device).unsqueeze(1)).sum()
                return torch.autograd.grad(picked, x)[0].unsqueeze(0)
            eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
            grad_outputs = eye.unsqueeze(1).expand(-1, y.shape[0], -1)  # one vector-Jacobian product per class
            return torch.autograd.grad(y, x, grad_outputs=grad_outputs, is_grads_batched=True)[0]

    def _attribute(self, acts, target, positions):
        selected, values, indices = self._sparse(acts)
        grads = self.gradients(acts, target)  # [c, b, (P,) d]
        directions = self.sae.dictionary[indices]  # [b, (P,) k, d]
        per_active = torch.einsum("cb...d,b...kd->cb...k", grads, directions) * values.unsqueeze(0)
        return self._scatter(per_active, indices)


class LogitLens(AttributionMethod):
    """``LL_i(c) = cos(proj(ln_post(D_i)), u_c)``, input-independent, reported on the active latents.

    ``u_c`` is the class direction the head reads (text embedding or probe weight).
    """

    name = "logit_lens"

    def lens(self) -> Tensor:  # [classes, n_latents]
        cached = getattr(self, "_lens", None)
        if cached is None or cached.dtype != self.sae.dictionary.dtype:
            with torch.no_grad():
                emb = self.tail.logit_lens(self.sae.dictionary)
                u = self.head.directions().to(emb.dtype)
                cached = F.normalize(u, dim=-1) @ F.normalize(emb, dim=-1).T
            self._lens = cached
        return cached

    def weight(self, activity: Tensor) -> Tensor:
        return (activity > 0).to(activity.dtype)

    def _attribute(self, acts, target, positions):
        activity = self._activity(acts)  # [b, n_latents]
        lens = self.lens()[self._classes(target, acts.shape[0], activity.device)]  # [c, b, n_latents]
        return lens.transpose(0, 1) * self.weight(activity).unsqueeze(1)


class ActLogitLens(LogitLens):
    """``z_i * LL_i(c)``."""

    name = "act_logit_lens"

    def weight(self, activity):
        return activity


class Energy(AttributionMethod):
    """``z_i * ||D_i||``: how much the latent adds to the residual stream, class-blind."""

    name = "energy"

    def _attribute(self, acts, target, positions):
        energy = self._activity(acts) * self.sae.dictionary.norm(dim=-1)
        c = 1 if target is not None else self.n_classes
        return energy.unsqueeze(1).expand(-1, c, -1).clone()


class RandomOrder(AttributionMethod):
    """A random score for every active latent: the floor any method must beat."""

    name = "random"

    def _attribute(self, acts, target, positions):
        activity = self._activity(acts)
        c = 1 if target is not None else self.n_classes
        scores = torch.stack([
            torch.rand(c, activity.shape[1], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(p)))
            for p in positions.tolist()])
        return scores.to(activity.device, activity.dtype) * (activity > 0).to(activity.dtype).unsqueeze(1)


REGISTRY: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (ActGrad, LogitLens, ActLogitLens, Energy, RandomOrder)
}


def get_method(name: str, **kwargs) -> AttributionMethod:
    try:
        return REGISTRY[name](**kwargs)
    except KeyError:
        raise EngineError(f"unknown attribution method {name!r}; known: {', '.join(REGISTRY)}") from None
