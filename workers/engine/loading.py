"""Loading OpenCLIP models, their checkpoints and linear probes, safely.

Four ways to name a model, as the service registers them:

(a) architecture + pretrained tag (``ViT-B-32`` + ``laion2b_s34b_b79k``): the
    weights come from the local open_clip / Hugging Face cache, or are
    downloaded when the machine is online; offline and uncached fails at once;
(b) architecture + checkpoint file (``.safetensors`` preferred; ``.pt``/``.bin``
    only through ``torch.load(weights_only=True)``);
(c) a custom model-config JSON (open_clip's format) + checkpoint file; this is
    how the project's own tiny models are registered;
(d) an open_clip model on the Hugging Face hub, ``hf-hub:ORG/NAME``: its
    ``open_clip_config.json`` and weights come from the cache, downloaded when
    online, like a tag's (:func:`resolve_hf_hub`).

Which image towers can be loaded, and the reason each other kind is refused, is
``workers.engine.architectures``; load_clip refuses the others before anything is
downloaded or built. Checkpoints never run code: a pickle that needs more than
tensors is refused (``workers.engine.checkpoints``).
A custom config is type-checked and sized (:func:`size_model_config`, in ``workers.engine.model_config``) before
open_clip builds anything, and a checkpoint is read before its model is built. Tags' and hub models' weights are
found by ``workers.engine.hub``.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .architectures import config_refusal, model_refusal, text_refusal
from .checkpoints import load_state, read_checkpoint
from .errors import EngineError
from .hub import HF_HUB_PREFIX, resolve_hf_hub, resolve_pretrained, weights_file
from .model_config import _open_clip, register_model_config, size_model_config

# HF_HUB_PREFIX, resolve_hf_hub, weights_file (hub) and size_model_config (model_config) are imported from here too
__all__ = ["ClipBundle", "load_clip", "resolve_device", "HF_HUB_PREFIX", "resolve_hf_hub", "weights_file",
           "size_model_config"]

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- the entry point

class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _check_checkpoint_holds(state: dict[str, torch.Tensor], name: str, filename: str, *, builtin: bool) -> None:
    """Refuse a checkpoint holding less than half the weights its config describes, before the model is built.

    Closer mismatches are left to :func:`check_state_dict`, which names the tensors.
    """
    try:
        size = size_model_config(_open_clip().get_model_config(name), builtin=builtin)
    except EngineError:
        return  # not reached for a tower that cannot be sized (timm, ResNet): load_clip refused it already
    held = sum(t.numel() for t in state.values())
    if 2 * held < size.parameters:
        raise EngineError(f"checkpoint {filename} holds {held:,} weights but {name} has {size.parameters:,} "
                          "parameters, so it was not saved from this model. Check that the architecture (or model "
                          "config) is the one the checkpoint was saved from.")


@contextmanager
def _random_init_notice_dropped(name: str, *, when: bool):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning for ``name`` when weights
    are loaded right after: the model is built empty on purpose, and the warning sends an operator looking for
    a bug that is not there. open_clip logs it on the root logger, so the filter sits there, for this call."""
    if not when:
        yield
        return
    notice = _DropNotice(f"No pretrained weights loaded for model '{name}'")
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _preprocess_kwargs(cfg: dict) -> dict[str, Any]:
    """A tag's or a hub model's preprocessing (mean, std, interpolation, resize mode) as
    ``create_model_and_transforms`` takes it."""
    return {f"image_{key}": tuple(cfg[key]) if key in ("mean", "std") else cfg[key]
            for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}

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
    hub_preprocess = None
    if architecture and architecture.startswith(HF_HUB_PREFIX):
        model_config, checkpoint, hub_preprocess = _hub_model(architecture, model_config, pretrained, checkpoint,
                                                              cache_dir)
        architecture = None
    name = _model_name(architecture, model_config)
    _check_weights_named(name, pretrained, checkpoint, model_config, allow_random)
    _check_auditable(name)
    create_kwargs: dict[str, Any] = {}
    if hub_preprocess:
        create_kwargs.update(_preprocess_kwargs(hub_preprocess))
    tag_file = None
    if pretrained:
        tag_file, tag_cfg = resolve_pretrained(name, pretrained, cache_dir)
        create_kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        create_kwargs.update(_preprocess_kwargs(tag_cfg))
    weights = tag_file or checkpoint
    state = None
    if weights is not None:
        # read before the model is built: a checkpoint far smaller than its config must not cost a model's memory
        state = read_checkpoint(weights)
        _check_checkpoint_holds(state, name, Path(weights).name, builtin=model_config is None)
    model, preprocess = _build(name, create_kwargs, loads_weights=state is not None)
    if state is not None:
        load_state(model, state, what=f"architecture {name}")
        log.info("%s: weights loaded from %s", name, Path(weights).name)
    model.eval().requires_grad_(False)
    model.to(device)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name)


def _hub_model(architecture: str, model_config: dict | str | os.PathLike | None, pretrained: str | None,
               checkpoint: str | os.PathLike | None, cache_dir: str | None) -> tuple[dict, str, dict | None]:
    """(model config, weights file, preprocessing or None) of an ``hf-hub:`` model, which brings its own."""
    if model_config is not None or pretrained or checkpoint is not None:
        raise EngineError(f"{architecture} brings its own config and weights: give no model config, "
                          "pretrained tag or checkpoint with it")
    hub_config, hub_weights = resolve_hf_hub(architecture, cache_dir)
    return hub_config["model_cfg"], hub_weights, hub_config.get("preprocess_cfg") or None


def _model_name(architecture: str | None, model_config: dict | str | os.PathLike | None) -> str:
    """The open_clip name to build: a built-in architecture's, or the one a custom config is registered under."""
    if model_config is not None:
        if architecture:
            raise EngineError("give either an architecture name or a model config, not both")
        return register_model_config(model_config)
    if architecture:
        if architecture not in _open_clip().list_models():
            raise EngineError(f"unknown OpenCLIP architecture '{architecture}'; "
                              "pick one from open_clip.list_models() or supply a model config")
        return architecture
    raise EngineError("a model needs an architecture name or a model config")


def _check_weights_named(name: str, pretrained: str | None, checkpoint: str | os.PathLike | None,
                         model_config: dict | str | os.PathLike | None, allow_random: bool) -> None:
    """Refuse a request that names no weights, or names them twice or in a way its kind of model cannot take."""
    if pretrained and checkpoint:
        raise EngineError("give either a pretrained tag or a checkpoint file, not both")
    if pretrained and model_config is not None:
        raise EngineError("pretrained tags belong to built-in architectures; a custom config needs a checkpoint file")
    if not pretrained and checkpoint is None and not allow_random:
        raise EngineError(f"{name} needs weights: a pretrained tag or a checkpoint file")


def _check_auditable(name: str) -> None:
    """Refuse a model whose towers the engine cannot audit, from its config, before any download or build."""
    config = _open_clip().get_model_config(name) or {}
    refusal = config_refusal(config) or text_refusal(config)  # before a download or a build that would be wasted
    if refusal:
        raise EngineError(f"{name}: {refusal}")


def _build(name: str, create_kwargs: dict[str, Any], *, loads_weights: bool) -> tuple[torch.nn.Module, Callable]:
    """Build ``name`` with empty weights, refusing what open_clip cannot build or the engine cannot audit."""
    try:
        with _random_init_notice_dropped(name, when=loads_weights):
            model, _, preprocess = _open_clip().create_model_and_transforms(name, pretrained=None, **create_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        # what the config checks above cannot foresee (e.g. act_kwargs a layer does not take) is still a refusal
        raise EngineError(f"open_clip cannot build {name} from its config: {type(exc).__name__}: {exc}") from exc
    refusal = model_refusal(model)
    if refusal:
        raise EngineError(f"{name}: {refusal}")
    return model, preprocess


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
