"""TopK sparse autoencoder: ``z = TopK_k(W_enc (h - b_pre) / s + b_enc)``, ``h_hat = b_pre + s W_dec z``.

``s`` is a fixed scalar (``input_scale``) measured from the data before
training, so that one learning rate serves residual streams of any size; the
decoder columns of ``W_dec`` have unit norm and the effective dictionary
direction of latent ``i`` is ``s * W_dec[:, i]`` (:attr:`TopKSAE.dictionary`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAEConfig, sae_training_bytes
from .errors import EngineError, checkpoint, reserve


class TopKSAE(nn.Module):
    def __init__(self, d_model: int, n_latents: int, k: int, input_scale: float = 1.0):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise EngineError(f"TopK SAE needs 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.W_enc = nn.Parameter(torch.zeros(n_latents, d_model))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(d_model, n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    # ------------------------------------------------------------------ maths
    def pre_activations(self, h: Tensor) -> Tensor:  # [..., d_model] -> [..., n_latents]
        return F.linear((h - self.b_pre) / self.input_scale, self.W_enc, self.b_enc)

    def encode_sparse(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The k active latents: values [..., k] (ReLU'd) and indices [..., k]."""
        values, indices = self.pre_activations(h).topk(self.k, dim=-1)
        return values.relu(), indices

    def encode(self, h: Tensor) -> Tensor:  # [..., d_model] -> z [..., n_latents], exactly k entries may be > 0
        values, indices = self.encode_sparse(h)
        return torch.zeros(*h.shape[:-1], self.n_latents, dtype=values.dtype, device=values.device) \
            .scatter(-1, indices, values)

    def decode(self, z: Tensor) -> Tensor:  # [..., n_latents] -> [..., d_model]
        return self.b_pre + self.input_scale * F.linear(z, self.W_dec)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(h)
        return self.decode(z), z

    @property
    def dictionary(self) -> Tensor:
        """[n_latents, d_model]: latent i adds ``z_i * dictionary[i]`` to the reconstruction."""
        return (self.W_dec * self.input_scale).T

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8))

    # ------------------------------------------------------------------ files
    def config(self) -> dict:
        return {"d_model": self.d_model, "n_latents": self.n_latents, "k": self.k,
                "input_scale": float(self.input_scale)}

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``sae.safetensors`` and ``sae.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "sae.safetensors"))
        (folder / "sae.json").write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "TopKSAE":
        from safetensors.torch import load_file

        from safetensors import SafetensorError

        folder = Path(folder)
        try:
            cfg = json.loads((folder / "sae.json").read_text())
            state = load_file(str(folder / "sae.safetensors"), device=str(device))
            sae = cls(int(cfg["d_model"]), int(cfg["n_latents"]), int(cfg["k"]), float(cfg["input_scale"]))
            sae.load_state_dict(state)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise EngineError(f"SAE in {folder} cannot be read: {exc}") from exc
        return sae.to(device)


def size_sae(d_model: int, n_samples: int, config: SAEConfig) -> tuple[int, int, int]:
    """(n_latents, k, steps) from the config, filling what it leaves open from the data size.

    A dictionary sized to what the data can teach: about one latent per 32
    training vectors (a power of two, at least 16, at most 4 x d_model), so a
    concept that a few hundred images show gets one latent instead of being split
    over many that each hold a sliver of it; k = n_latents / 4 within [4, 64],
    enough active latents per image that co-occurring artifacts (a ruler on an
    image with dark corners) need not share one latent;
    steps: 30 passes over the data, at least 600 and at most 20 000.
    """
    n_latents = config.n_latents or int(min(4 * d_model, max(16, 2 ** round(math.log2(max(n_samples, 1) / 32)))))
    k = config.k or int(min(64, max(4, n_latents // 4)))
    k = min(k, n_latents)
    steps = config.steps or int(min(20000, max(600, math.ceil(30 * n_samples / config.batch_size))))
    return int(n_latents), int(k), int(steps)


@dataclass
class SAEMetrics:
    mse: float  # mean squared error per activation vector, in the model's units
    fvu: float  # fraction of variance unexplained
    explained_variance: float
    mean_l0: float  # active latents per vector
    dead_fraction: float  # latents never active on the evaluated data
    n_latents: int
    k: int
    steps: int = 0
    n_train_vectors: int = 0
    loss_curve: list | None = None  # (step, normalized MSE) pairs

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def init_from_sample(sae: TopKSAE, sample: Tensor, seed: int) -> None:
    """Data-dependent start: b_pre = mean, s = RMS distance to it, W_enc = W_dec^T with random unit columns."""
    sample = sample.float()
    mean = sample.mean(0)
    scale = ((sample - mean).pow(2).sum(-1).mean() / sample.shape[-1]).sqrt().clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(sae.d_model, sae.n_latents, generator=gen)
    W = W / W.norm(dim=0, keepdim=True)
    sae.W_dec.copy_(W)
    sae.W_enc.copy_(W.T)
    sae.b_enc.zero_()
    sae.b_pre.copy_(mean)
    sae.input_scale.fill_(float(scale))


def train_sae(
    batches: Iterable[Tensor],
    *,
    d_model: int,
    n_latents: int,
    k: int,
    steps: int,
    init_sample: Tensor,
    config: SAEConfig,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TopKSAE, list[tuple[int, float]]]:
    """Train a TopK SAE on activation batches [batch, d_model] (the iterator may cycle).

    Loss: normalized MSE plus ``aux_coef`` times the AuxK loss (Gao et al.
    2024): the ``aux_k`` largest dead latents learn to model the residual error,
    which brings dead latents back. Decoder columns stay unit norm (gradient
    parallel to them removed, then renormalized). Deterministic for a seed on CPU.
    """
    if torch.device(device).type == "cpu":  # on a GPU an allocation too large fails at once, catchably
        reserve(sae_training_bytes(d_model, n_latents, config.batch_size),
                f"training an SAE of {n_latents} latents on batches of {config.batch_size} vectors "
                "(sae.n_latents, sae.batch_size)")
    torch.manual_seed(config.seed)
    sae = TopKSAE(d_model, n_latents, k)
    init_from_sample(sae, init_sample, config.seed)
    sae.to(device).train()
    aux_k = min(config.aux_k or 2 * k, n_latents)
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr)
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    curve: list[tuple[int, float]] = []
    report_every = max(1, steps // 50)
    prefixes = matryoshka_prefixes(n_latents)
    it: Iterator[Tensor] = iter(batches)
    for step in range(steps):
        checkpoint()
        h = _next_batch(it).to(device, torch.float32, non_blocking=True)
        loss, mse, indices, values = _training_loss(sae, h, since_fired, prefixes, aux_k, config)
        _descend(sae, opt, loss)
        _mark_fired(since_fired, indices, values)
        if step % report_every == 0 or step == steps - 1:
            curve.append((step, mse.item()))
            if progress:
                progress(step + 1, steps)
    sae.eval().requires_grad_(False)
    return sae, curve


def _next_batch(it: Iterator[Tensor]) -> Tensor:
    try:
        return next(it)
    except StopIteration:
        raise EngineError("the activation iterator ran dry before SAE training finished") from None


def _training_loss(sae: TopKSAE, h: Tensor, since_fired: Tensor, prefixes: list[int], aux_k: int,
                   config: SAEConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batch's loss (normalized MSE, the Matryoshka prefixes' when asked, AuxK on the dead latents), its
    normalized MSE, and the indices and values of the TopK latents."""
    pre = sae.pre_activations(h)
    values, indices = pre.topk(sae.k, dim=-1)
    values = values.relu()
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    err = h - sae.decode(z)
    mse = err.pow(2).sum(-1).mean() / (sae.input_scale ** 2 * sae.d_model)
    loss = mse
    if config.variant == "matryoshka":
        loss = (loss + sum(_prefix_mse(sae, h, z, m) for m in prefixes)) / (1 + len(prefixes))
    dead = since_fired >= config.dead_after_steps
    n_dead = int(dead.sum())
    if n_dead and config.aux_coef > 0:
        aux = _aux_loss(sae, pre, err, dead, min(aux_k, n_dead))
        loss = loss + config.aux_coef * torch.nan_to_num(aux, nan=0.0)
    return loss, mse, indices, values


def _mark_fired(since_fired: Tensor, indices: Tensor, values: Tensor) -> None:
    """Steps since each latent last fired: reset for the latents active in this batch, one more for the others."""
    with torch.no_grad():
        fired = torch.zeros(since_fired.shape[0], dtype=torch.bool, device=since_fired.device)
        fired[indices[values > 0]] = True
        since_fired += 1
        since_fired[fired] = 0


def matryoshka_prefixes(n_latents: int) -> list[int]:
    """The nested dictionaries a Matryoshka SAE trains besides the whole: its first n/8, n/4 and n/2 latents
    (those with at least two latents)."""
    return sorted({n_latents // d for d in (8, 4, 2) if 2 <= n_latents // d < n_latents})


def _prefix_mse(sae: TopKSAE, h: Tensor, z: Tensor, m: int) -> Tensor:
    """Normalized MSE of the reconstruction from the first ``m`` latents' codes alone."""
    recon = sae.b_pre + sae.input_scale * F.linear(z[:, :m], sae.W_dec[:, :m])
    return (h - recon).pow(2).sum(-1).mean() / (sae.input_scale ** 2 * sae.d_model)


def _aux_loss(sae: TopKSAE, pre: Tensor, err: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK: the ``aux_k`` largest dead latents' reconstruction of the residual error ``err``, normalized by the
    error's variance."""
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    a_vals, a_idx = pre_dead.topk(aux_k, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, a_idx, a_vals.relu())
    e_hat = sae.input_scale * F.linear(z_aux, sae.W_dec)
    target = err.detach()
    denom = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (target - e_hat).pow(2).sum(-1).mean() / denom


def _descend(sae: TopKSAE, opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimizer step that keeps the decoder columns unit norm (gradient along them removed, renormalized)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        g = sae.W_dec.grad
        g -= (g * sae.W_dec).sum(0, keepdim=True) * sae.W_dec
    opt.step()
    sae.normalize_decoder()


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, batches: Iterable[Tensor], device: torch.device | str = "cpu") -> dict:
    """MSE, FVU, mean L0 and dead fraction over one pass of ``batches``."""
    n = 0
    sq_err = 0.0
    l0 = 0.0
    sum_h = None
    sum_h2 = 0.0
    ever = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    for h in batches:
        checkpoint()
        h = h.to(device, torch.float32)
        values, indices = sae.encode_sparse(h)
        z = torch.zeros(*h.shape[:-1], sae.n_latents, device=device).scatter(-1, indices, values)
        h_hat = sae.decode(z)
        sq_err += float((h - h_hat).pow(2).sum())
        l0 += float((values > 0).sum())
        ever[indices[values > 0]] = True
        sum_h = h.sum(0) if sum_h is None else sum_h + h.sum(0)
        sum_h2 += float(h.pow(2).sum())
        n += h.shape[0]
    if n == 0:
        raise EngineError("no activations to evaluate the SAE on")
    total_var = sum_h2 - float(sum_h.pow(2).sum()) / n
    fvu = sq_err / max(total_var, 1e-12)
    return {"mse": sq_err / n, "fvu": fvu, "explained_variance": 1.0 - fvu, "mean_l0": l0 / n,
            "dead_fraction": float((~ever).float().mean())}
