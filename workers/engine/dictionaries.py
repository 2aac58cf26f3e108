"""The audit's dictionaries: the SAE it reports with, and the others trained with the next seeds to vote on its
flags (``workers.engine.stability`` says how the vote goes).

Dictionary 0 lives in ``<folder>`` (``sae.json``, ``sae.safetensors``, ``metrics.json``), dictionary k >= 1 in
``<folder>/dictionaries/<k>`` with the same files; a finished one (its ``metrics.json`` written last) is reused, so
an audit that stopped half way resumes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from .activations import ActivationStore
from .config import AuditConfig
from .context import AuditContext
from .data import ImageSet
from .labelling import label_latents
from .loading import ClipBundle
from .partials import attribute_shard
from .sae import SAEMetrics, TopKSAE, evaluate_sae, size_sae, train_sae
from .semantics import Vocabulary
from .summary import candidate_flags

def other_folders(folder: Path, config: AuditConfig) -> list[Path]:
    """Where dictionaries 1 .. ``config.dictionaries - 1`` are kept."""
    return [Path(folder) / "dictionaries" / str(k) for k in range(1, config.dictionaries)]


def evaluate(sae: TopKSAE, store: ActivationStore, config: AuditConfig, device) -> dict:
    """The SAE's quality over one pass of the cache (the same token sample for a trained or a given SAE)."""
    cfg = config.sae
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return evaluate_sae(sae, (store.sae_vectors(a, gen, cfg.tokens_per_image)
                              for _, a, _ in store.iter_batches(1024)), device)


def train_or_load(store: ActivationStore, config: AuditConfig, folder: Path, device, report=None) -> tuple:
    """The SAE of ``config.sae`` trained on ``store`` and kept in ``folder``, or the one a finished earlier run
    kept there; with its metrics."""
    folder = Path(folder)
    if (folder / "sae.json").is_file() and (folder / "metrics.json").is_file():
        return TopKSAE.load(folder, device), json.loads((folder / "metrics.json").read_text())
    cfg = config.sae
    n_vectors = store.n_sae_vectors(cfg.tokens_per_image, cfg.patch_tokens)
    n_latents, k, steps = size_sae(store.d_model, n_vectors, cfg)
    sae, curve = train_sae(
        store.training_batches(cfg.batch_size, cfg.seed, cfg.tokens_per_image, cfg.patch_tokens),
        d_model=store.d_model, n_latents=n_latents, k=k, steps=steps,
        init_sample=store.sample(min(n_vectors, 16384), cfg.seed, cfg.tokens_per_image, cfg.patch_tokens),
        config=cfg, device=device, progress=report)
    quality = evaluate(sae, store, config, device)
    metrics = SAEMetrics(**quality, n_latents=n_latents, k=k, steps=steps, n_train_vectors=n_vectors,
                         loss_curve=[list(p) for p in curve]).to_dict()
    sae.save(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return sae, metrics


def with_seed(config: AuditConfig, k: int) -> AuditConfig:
    """The config of dictionary ``k``: the SAE seed moved on by k."""
    return dataclasses.replace(config, sae=dataclasses.replace(config.sae, seed=config.sae.seed + k))


def train_dictionaries(store: ActivationStore, config: AuditConfig, folder: Path, device,
                       report: Callable[[int, int], None] | None = None) -> tuple[TopKSAE, dict]:
    """Train (or reuse) every dictionary of the audit; returns dictionary 0 and its metrics. The progress of
    all of them is reported as one run of ``done`` / ``total``."""
    n = config.dictionaries

    def part(k):
        return None if report is None else (lambda done, total: report(k * total + done, n * total))

    sae, metrics = train_or_load(store, config, folder, device, part(0))
    for k, other in enumerate(other_folders(folder, config), start=1):
        train_or_load(store, with_seed(config, k), other, device, part(k))
    return sae, metrics


def load_others(folder: Path, config: AuditConfig, device) -> list[TopKSAE]:
    """Dictionaries 1.. that a run trained in ``folder`` (none for a given or reused SAE that came alone)."""
    found = [f for f in other_folders(folder, config) if (f / "metrics.json").is_file()]
    return [TopKSAE.load(f, device).eval().requires_grad_(False) for f in found]


def flags_of_others(ctx: AuditContext, store: ActivationStore, images: ImageSet, others: list[TopKSAE],
                    semantic_model: ClipBundle | None = None, vocab: Vocabulary | None = None
                    ) -> list[tuple[TopKSAE, list[dict]]]:
    """Each other dictionary with the flags the audit's rule raises on it: the same attribution (without the
    deletion curves, which only the reported SAE needs), labels and harm, over every audited image."""
    out = []
    for sae in others:
        other = ctx.with_sae(sae)
        merged = attribute_shard(other, store, 0, store.n, curves=False)
        labelled = label_latents(other, store, images, merged, semantic_model, vocab=vocab)
        out.append((sae, candidate_flags(other, store, merged, labelled)))
    return out
