"""Reading model checkpoints safely and fitting them to a model.

A checkpoint never runs code: ``.safetensors`` is preferred, and ``.pt``/``.bin``/``.pth``/``.ckpt`` files are
read only through ``torch.load(weights_only=True)``, so a pickle that needs more than tensors is refused. A state
dict that does not fit its model is refused naming the first tensors that differ.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import EngineError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a file without running any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise EngineError(
            f"checkpoint {path.name} has an unsupported type '{suffix}'; "
            f"use one of {', '.join(CHECKPOINT_SUFFIXES)} (.safetensors preferred)")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise EngineError(f"checkpoint {path.name} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = str(exc).splitlines()
            culprit = next((ln.strip() for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), "")
            if not culprit and not any("weights_only" in ln.lower() or "WeightsUnpickler" in ln for ln in lines):
                raise EngineError(f"checkpoint {path.name} is not a PyTorch checkpoint (it cannot be unpickled)") \
                    from exc
            raise EngineError(
                f"checkpoint {path.name} is a pickle that needs code to load, so it was refused and not run"
                + (f" ({culprit})" if culprit else "") + ". "
                "Save only the tensors, e.g. safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), "
                "and register that file.") from exc
        except EOFError as exc:
            raise EngineError(f"checkpoint {path.name} is empty or truncated") from exc
        except (RuntimeError, OSError, ValueError) as exc:
            raise EngineError(f"checkpoint {path.name} could not be read as a PyTorch file: {exc}") from exc
    return _unwrap_state_dict(state, path.name)


def _unwrap_state_dict(state: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise EngineError(f"checkpoint {name} holds no state dict (a mapping of tensor names to tensors)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise EngineError(f"checkpoint {name} has entries that are not tensors: {', '.join(map(str, not_tensors[:5]))}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Raise an error naming the first tensors where ``state`` does not fit ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if mismatched:
        parts.append("shape mismatch: " + ", ".join(mismatched[:5]))
    if missing:
        parts.append("missing from the checkpoint: " + ", ".join(missing[:5]))
    if unexpected:
        parts.append("not in the model: " + ", ".join(unexpected[:5]))
    raise EngineError(f"checkpoint does not fit {what}: " + "; ".join(parts)
                      + ". Check that the architecture (or model config) is the one the checkpoint was saved from.")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    # Checkpoints saved from older open_clip versions differ in a few harmless ways.
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    check_state_dict(model, state, what=what)
    model.load_state_dict(state, strict=True)
