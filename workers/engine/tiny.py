"""Tiny OpenCLIP configurations the project builds itself (tests, demo, benchmarks).

No weights can be downloaded here, so the engine is exercised on models whose
architecture is real OpenCLIP and whose size fits a CPU.
"""
from __future__ import annotations

import copy

import torch

from .loading import ClipBundle, load_clip

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 3, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_config(**vision_overrides) -> dict:
    cfg = copy.deepcopy(TINY_VIT)
    cfg["vision_cfg"].update(vision_overrides)
    return cfg


def tiny_clip(seed: int = 0, config: dict | None = None, device: str = "cpu") -> ClipBundle:
    """A randomly initialised tiny OpenCLIP ViT, the same for the same seed."""
    torch.manual_seed(seed)
    bundle = load_clip(model_config=config or TINY_VIT, allow_random=True, device=device)
    # open_clip initialises a few tensors to constants; spread them so that no gradient is trivially zero
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in bundle.model.visual.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return bundle
