"""Loading OpenCLIP models, their checkpoints and linear probes, safely.

Three ways to name a model, as the service registers them:

(a) architecture + pretrained tag (``ViT-B-32`` + ``laion2b_s34b_b79k``): the
    weights come from the local open_clip / Hugging Face cache, or are
    downloaded when the machine is online; offline and uncached fails at once;
(b) architecture + checkpoint file (``.safetensors`` preferred; ``.pt``/``.bin``
    only through ``torch.load(weights_only=True)``);
(c) a custom model-config JSON (open_clip's format) + checkpoint file; this is
    how the project's own tiny models are registered.

Checkpoints never run code: a pickle that needs more than tensors is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import EngineError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_OFFLINE_PROBE_HOST = ("huggingface.co", 443)
_OFFLINE_PROBE_SECONDS = 3.0
_config_lock = threading.Lock()


@dataclass
class ClipBundle:
    """An OpenCLIP model with what is needed to feed it."""

    model: torch.nn.Module
    preprocess: Callable  # PIL image -> [3, H, W] tensor
    tokenizer: Callable  # list[str] -> [n, context_length] token ids
    name: str  # architecture name or the registered name of a custom config

    @property
    def n_blocks(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.model.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        return self.model.visual.output_dim


def _open_clip():
    import open_clip  # imported late: it is slow and only workers need it

    return open_clip


# --------------------------------------------------------------------------- checkpoints

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


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, what: str) -> None:
    state = read_checkpoint(path)
    # Checkpoints saved from older open_clip versions differ in a few harmless ways.
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    check_state_dict(model, state, what=what)
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- model configs

def register_model_config(config: dict | str | os.PathLike) -> str:
    """Register an open_clip model config (dict or JSON path) and return its name.

    The name is derived from the config's content, so the same config always
    gets the same name and can never shadow a built-in architecture.
    """
    if not isinstance(config, dict):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"model config {path.name} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise EngineError("a model config must be a JSON object with embed_dim, vision_cfg and text_cfg")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise EngineError(f"model config lacks {', '.join(missing)}; an open_clip config has "
                          "embed_dim, vision_cfg and text_cfg")
    if not isinstance(config["vision_cfg"], dict) or not isinstance(config["text_cfg"], dict):
        raise EngineError("vision_cfg and text_cfg of a model config must be JSON objects")
    if "timm_model_name" in config["vision_cfg"] or "layers" not in config["vision_cfg"] \
            or not isinstance(config["vision_cfg"].get("layers"), int):
        raise EngineError("model config must describe an open_clip VisionTransformer "
                          "(vision_cfg with an integer 'layers'); timm and ResNet towers cannot be audited")
    canonical = json.dumps(config, sort_keys=True)
    name = "custom-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
    open_clip = _open_clip()
    with _config_lock:
        if name not in open_clip.list_models():
            folder = Path(tempfile.gettempdir()) / "clip-audit-model-configs"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{name}.json"
            target.write_text(canonical)
            open_clip.add_model_config(target)
    return name


# --------------------------------------------------------------------------- pretrained tags

def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when Hugging Face is switched offline or cannot be reached within a few seconds."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        with socket.create_connection(_OFFLINE_PROBE_HOST, timeout=_OFFLINE_PROBE_SECONDS):
            return False
    except OSError:
        return True


def _cached_pretrained_file(cfg: dict, cache_dir: str | None) -> str | None:
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def resolve_pretrained(architecture: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """Return the local file of a pretrained tag's weights, downloading it only when online."""
    open_clip = _open_clip()
    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(architecture)
        raise EngineError(f"'{tag}' is not a pretrained tag of {architecture}; known tags: "
                          f"{', '.join(known) if known else 'none'}")
    cached = _cached_pretrained_file(cfg, cache_dir)
    if cached:
        return cached, cfg
    if is_offline():
        raise EngineError(
            f"the weights of {architecture} / {tag} are not in this machine's cache and it is offline "
            "(HF_HUB_OFFLINE is set or huggingface.co cannot be reached), so they cannot be downloaded. "
            f"Either run open_clip.create_model('{architecture}', pretrained='{tag}') once on a machine with "
            "internet and copy its Hugging Face cache (HF_HOME) here, or register the model with a checkpoint "
            "file (.safetensors) instead of a tag.")
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir), cfg
    except Exception as exc:  # network errors are transient: the worker may retry
        raise EngineError(f"downloading {architecture} / {tag} failed: {exc}", permanent=False) from exc


# --------------------------------------------------------------------------- the entry point

def load_clip(
    architecture: str | None = None,
    *,
    pretrained: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    model_config: dict | str | os.PathLike | None = None,
    allow_random: bool = False,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> ClipBundle:
    """Load an OpenCLIP model in one of the three registered ways (see the module doc).

    ``allow_random`` permits a model with neither tag nor checkpoint (random
    weights); tests and benchmarks use it, registered models never do.
    """
    open_clip = _open_clip()
    if model_config is not None:
        if architecture:
            raise EngineError("give either an architecture name or a model config, not both")
        name = register_model_config(model_config)
    elif architecture:
        if architecture not in open_clip.list_models():
            raise EngineError(f"unknown OpenCLIP architecture '{architecture}'; "
                              "pick one from open_clip.list_models() or supply a model config")
        name = architecture
    else:
        raise EngineError("a model needs an architecture name or a model config")
    if pretrained and checkpoint:
        raise EngineError("give either a pretrained tag or a checkpoint file, not both")
    if pretrained and model_config is not None:
        raise EngineError("pretrained tags belong to built-in architectures; a custom config needs a checkpoint file")
    if not pretrained and checkpoint is None and not allow_random:
        raise EngineError(f"{name} needs weights: a pretrained tag or a checkpoint file")

    create_kwargs: dict[str, Any] = {}
    tag_file = None
    if pretrained:
        tag_file, tag_cfg = resolve_pretrained(name, pretrained, cache_dir)
        create_kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        create_kwargs["force_preprocess_cfg"] = {
            k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **create_kwargs)
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise EngineError(f"{name} has no open_clip VisionTransformer image tower; only ViT towers can be audited")
    if getattr(visual, "attn_pool", None) is not None:
        raise EngineError(f"{name} pools with attention (CoCa style); only token or average pooling is supported")
    weights = tag_file or checkpoint
    if weights is not None:
        load_weights(model, weights, what=f"architecture {name}")
    model.eval().requires_grad_(False)
    model.to(device)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(f"unknown device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} was asked for but this worker has no CUDA GPU")
    return resolved
