import pytest
import torch

from workers.engine.config import AuditConfig, SAEConfig
from workers.engine.tiny import tiny_clip


@pytest.fixture
def tiny():
    """A random tiny OpenCLIP ViT (3 blocks, width 48, 32x32 images), fresh per test."""
    return tiny_clip(0)


@pytest.fixture
def images():
    """[12, 3, 32, 32] random images."""
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build_audit_config(**overrides) -> AuditConfig:
    sae = overrides.pop("sae", {})
    base = dict(sae=SAEConfig(**{"steps": 200, **sae}), faithfulness_max_images=8, faithfulness_steps=5,
                general_vocabulary=False)
    base.update(overrides)
    return AuditConfig(**base)
