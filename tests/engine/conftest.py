import pytest
import torch

from workers.engine.config import AuditConfig, SAEConfig
from workers.engine.data import TensorImages
from workers.engine.heads import LinearProbe
from workers.engine.tiny import tiny_clip


@pytest.fixture
def tiny():
    """A random tiny OpenCLIP ViT (3 blocks, width 48, 32x32 images), fresh per test."""
    return tiny_clip(0)


@pytest.fixture
def images():
    """[12, 3, 32, 32] random images."""
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


CLASSES = ["nevus", "melanoma"]


@pytest.fixture
def dataset():
    """48 images of two classes, melanomas with a bright corner: something for a probe to find."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(48, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 1] * 24)
    x[y == 1, :, :8, :8] += 2.0
    return TensorImages(x, y, CLASSES)


@pytest.fixture
def probe():
    """A random binary probe on the tiny model's 32-wide embedding."""
    return LinearProbe(torch.randn(1, 32, generator=torch.Generator().manual_seed(4)), torch.zeros(1), CLASSES)


def build_audit_config(**overrides) -> AuditConfig:
    sae = overrides.pop("sae", {})
    base = dict(sae=SAEConfig(**{"steps": 200, **sae}), faithfulness_max_images=8, faithfulness_steps=5,
                general_vocabulary=False)
    base.update(overrides)
    return AuditConfig(**base)


def assert_same_answer(a: dict, b: dict, *, rel: float = 1e-4, abs_tol: float = 1e-5, path: str = "result") -> None:
    """Two audit results agree: every flag, label, count and reference equal, every float close.

    Where the work ran (timings, environment, artifact keys) may differ.
    """
    import math

    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys differ: {sorted(set(a) ^ set(b))}"
        for key in a:
            if path == "result" and key in ("timings", "environment", "artifacts"):
                continue
            assert_same_answer(a[key], b[key], rel=rel, abs_tol=abs_tol, path=f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_answer(x, y, rel=rel, abs_tol=abs_tol, path=f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
