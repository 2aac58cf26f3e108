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
tensors is refused.
A custom config is type-checked and sized (:func:`size_model_config`) before
open_clip builds anything, and a checkpoint is read before its model is built.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import socket
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from .architectures import config_refusal, model_refusal, text_refusal
from . import jsonsafe
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


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    # Checkpoints saved from older open_clip versions differ in a few harmless ways.
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    check_state_dict(model, state, what=what)
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- model configs

# Top-level keys open_clip's CLIP takes; anything else would fail deep inside open_clip, so it is refused by name.
_TOP_LEVEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                   "nonscalar_logit_scale", "custom_text")
VISION_POOL_TYPES = ("tok", "avg")  # open_clip's "none" gives one embedding per token, not per image
TEXT_POOL_TYPES = ("first", "last", "argmax", "eos")


@dataclass(frozen=True)
class ModelSize:
    """What an open_clip ViT config costs, counted from the config alone: nothing is built to learn it."""

    parameters: int  # every weight of both towers, as model.parameters() counts them
    buffers: int  # values held besides the weights: the text tower's causal attention mask
    vision_layers: int
    vision_width: int
    image_size: int  # the larger side, in pixels
    image_tokens: int  # patches plus the CLS token, per image
    text_layers: int
    text_width: int
    context_length: int
    embed_dim: int
    # how the image tower pools its last block: "tok" (the CLS token), "avg" (the patches) or "attn" (an attention
    # pooler, which reads every token: hooks.unreachable_token finds no token it drops)
    pool_type: str

    @property
    def float32_bytes(self) -> int:
        """Memory the weights and buffers take in float32, the dtype a model is built in."""
        return 4 * (self.parameters + self.buffers)


class _Fields:
    """Reads one section of a model config, refusing a value of the wrong type by its dotted name."""

    def __init__(self, section: dict, where: str, allowed: tuple[str, ...] | None):
        self.section, self.where = section, where
        unknown = sorted(str(k) for k in section if allowed is not None and k not in allowed)
        if unknown:
            raise EngineError(f"model config: {self._name(unknown[0])} is not an open_clip setting"
                              + (f" (nor are {', '.join(self._name(u) for u in unknown[1:4])})"
                                 if len(unknown) > 1 else "")
                              + "; remove it or check its spelling")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _refuse(self, key: str, wanted: str, value) -> EngineError:
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
        return EngineError(f"model config: {self._name(key)} must be {wanted}, got {shown}")

    def whole(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._refuse(key, f"a whole number of at least {minimum}", value)
        return value

    def number(self, key: str, default: float) -> float:
        value = self.section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self._refuse(key, "a positive number", value)
        return float(value)

    def optional_number(self, key: str) -> float | None:
        value = self.section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise self._refuse(key, "a number or null", value)
        return value

    def fraction(self, key: str) -> float:
        value = self.section.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise self._refuse(key, "a number in [0, 1)", value)
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.section.get(key, False)
        if not isinstance(value, bool):
            raise self._refuse(key, "true or false", value)
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.section.get(key, default)
        if value not in choices:
            raise self._refuse(key, "one of " + ", ".join(f"'{c}'" for c in choices), value)
        return value

    def pair(self, key: str, default: int) -> tuple[int, int]:
        """An int or a [height, width] pair (image_size, patch_size)."""
        value = self.section.get(key, default)
        if isinstance(value, (list, tuple)) and len(value) == 2 \
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return int(value[0]), int(value[1])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._refuse(key, "a whole number of at least 1 or a [height, width] pair of them", value)
        return value, value

    def mapping(self, key: str) -> None:
        value = self.section.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._refuse(key, "a JSON object or null", value)


def _block_parameters(width: int, mlp_ratio: float, layer_scale: bool) -> int:
    """One open_clip ResidualAttentionBlock: two LayerNorms, attention (qkv and out), the MLP, layer scales."""
    hidden = int(width * mlp_ratio)
    attention = 3 * width * width + 3 * width + width * width + width
    mlp = width * hidden + hidden + hidden * width + width
    return 2 * 2 * width + attention + mlp + (2 * width if layer_scale else 0)


def _tower_name(where: str) -> str:
    return "image" if where == "vision_cfg" else "text"


def size_model_config(config: dict, *, builtin: bool = False) -> ModelSize:
    """Type-check an open_clip ViT config and count its parameters without building it.

    Every value of the wrong type is refused naming its dotted key (``vision_cfg.width``), so a config never
    reaches open_clip with a value it would fail on deep inside. The count follows open_clip 3.3's
    VisionTransformer and TextTransformer (default attention blocks; the norms of custom block types add a
    few thousand parameters at most). ``builtin``: an architecture shipped with open_clip, whose keys are
    trusted and whose Hugging Face text tower (counted as nothing) is allowed.
    """
    if not isinstance(config, dict):
        raise EngineError("a model config must be a JSON object with embed_dim, vision_cfg and text_cfg")
    refusal = config_refusal(config)  # an image tower the engine cannot audit, named before any value is read
    if refusal:
        raise EngineError(f"model config: {refusal}")
    top = _Fields(config, "", None if builtin else _TOP_LEVEL_KEYS + ("multimodal_cfg",))
    embed_dim = top.whole("embed_dim", 512)
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(config.get(key), dict):
            raise EngineError(f"model config: {key} must be a JSON object (open_clip's format)")
    for key in ("quick_gelu", "nonscalar_logit_scale", "custom_text"):
        top.flag(key)
    top.optional_number("init_logit_scale")
    top.optional_number("init_logit_bias")

    open_clip_model = _open_clip().model
    vision_cfg = config["vision_cfg"]
    if "layers" not in vision_cfg:
        raise EngineError("model config must describe an open_clip VisionTransformer (vision_cfg with an "
                          "integer 'layers'); timm and ResNet towers cannot be audited")
    v = _Fields(vision_cfg, "vision_cfg",
                None if builtin else tuple(f.name for f in fields(open_clip_model.CLIPVisionCfg)))
    attention_pooled = v.flag("attentional_pool")
    layers, width = v.whole("layers", 12), v.whole("width", 768)
    head_width, mlp_ratio = v.whole("head_width", 64), v.number("mlp_ratio", 4.0)
    image, patch = v.pair("image_size", 224), v.pair("patch_size", 16)
    pool_type = v.choice("pool_type", "tok", VISION_POOL_TYPES)
    layer_scale = v.optional_number("ls_init_value") is not None
    for key in ("no_ln_pre", "final_ln_after_pool", "output_tokens", "qk_norm", "scaled_cosine_attn",
                "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
        v.flag(key)
    v.choice("pos_embed_type", "learnable", ("learnable", "sin_cos_2d"))
    v.mapping("act_kwargs")
    v.mapping("norm_kwargs")
    v.fraction("patch_dropout")
    if head_width > width or width % (width // head_width):
        raise EngineError(f"model config: vision_cfg.width ({width}) must split into heads of "
                          f"vision_cfg.head_width ({head_width}): give a head_width that divides the width")
    grid = (image[0] // patch[0], image[1] // patch[1])
    if min(grid) < 1:
        raise EngineError(f"model config: vision_cfg.patch_size ({list(patch)}) is larger than "
                          f"vision_cfg.image_size ({list(image)})")
    if int(width * mlp_ratio) < 1:
        raise EngineError(f"model config: vision_cfg.mlp_ratio ({mlp_ratio}) leaves the MLP without units")
    tokens = grid[0] * grid[1] + 1
    pool_dim, pooler = width, 0
    if attention_pooled:  # open_clip's AttentionalPooler; ln_post and proj then act on its embed_dim-wide output
        queries, heads = v.whole("attn_pooler_queries", 256), v.whole("attn_pooler_heads", 8)
        if embed_dim % heads:
            raise EngineError(f"model config: embed_dim ({embed_dim}) must be divisible by "
                              f"vision_cfg.attn_pooler_heads ({heads})")
        pool_dim = embed_dim
        pooler = (queries * embed_dim + 2 * embed_dim + 2 * width  # queries, ln_q, ln_k
                  + embed_dim * (embed_dim + 2 * width) + 3 * embed_dim  # q, k, v projections (keys read the width)
                  + embed_dim * embed_dim + embed_dim)  # out_proj
    vision = (3 * patch[0] * patch[1] * width  # conv1, no bias
              + width + tokens * width  # class and positional embeddings
              + (0 if v.section.get("no_ln_pre") else 2 * width)
              + layers * _block_parameters(width, mlp_ratio, layer_scale)
              + pooler + 2 * pool_dim + pool_dim * embed_dim)  # ln_post, proj

    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_model_name"):
        if not builtin:
            raise EngineError("model config: text_cfg.hf_model_name would download a Hugging Face text tower; "
                              "describe the text tower with width, layers and heads instead")
        text, text_layers, text_width, context, buffers = 0, 0, 0, 0, 0
    else:
        t = _Fields(text_cfg, "text_cfg",
                    None if builtin else tuple(f.name for f in fields(open_clip_model.CLIPTextCfg)))
        context, vocab = t.whole("context_length", 77), t.whole("vocab_size", 49408)
        text_width, heads, text_layers = t.whole("width", 512), t.whole("heads", 8), t.whole("layers", 12)
        text_ratio = t.number("mlp_ratio", 4.0)
        text_scale = t.optional_number("ls_init_value") is not None
        for key in ("embed_cls", "no_causal_mask", "final_ln_after_pool", "proj_bias", "output_tokens", "qk_norm",
                    "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
            t.flag(key)
        t.choice("pool_type", "argmax", TEXT_POOL_TYPES)
        proj_type = t.choice("proj_type", "linear", ("linear", "none"))
        t.mapping("act_kwargs")
        t.mapping("norm_kwargs")
        t.mapping("tokenizer_kwargs")
        if text_width % heads:
            raise EngineError(f"model config: text_cfg.width ({text_width}) must be divisible by "
                              f"text_cfg.heads ({heads})")
        if int(text_width * text_ratio) < 1:
            raise EngineError(f"model config: text_cfg.mlp_ratio ({text_ratio}) leaves the MLP without units")
        positions = context + (1 if t.section.get("embed_cls") else 0)
        projection = 0 if proj_type == "none" else text_width * embed_dim + (
            embed_dim if t.section.get("proj_bias") else 0)
        # CLIP keeps the text tower's parts but its cls_emb; CustomTextCLIP keeps the whole tower
        cls_emb = text_width if t.section.get("embed_cls") and config.get("custom_text") else 0
        text = (vocab * text_width + positions * text_width + cls_emb
                + text_layers * _block_parameters(text_width, text_ratio, text_scale)
                + 2 * text_width + projection)
        buffers = 0 if t.section.get("no_causal_mask") else positions * positions
    logit = 1 + (1 if config.get("init_logit_bias") is not None else 0)
    return ModelSize(parameters=vision + text + logit, buffers=buffers, vision_layers=layers, vision_width=width,
                     image_size=max(image), image_tokens=tokens, text_layers=text_layers, text_width=text_width,
                     context_length=context, embed_dim=embed_dim,
                     pool_type="attn" if attention_pooled else pool_type)


def register_model_config(config: dict | str | os.PathLike) -> str:
    """Register an open_clip model config (dict or JSON path) and return its name.

    The name is derived from the config's content, so the same config always
    gets the same name and can never shadow a built-in architecture.
    """
    if not isinstance(config, dict):
        path = Path(config)
        try:
            config = jsonsafe.loads(path.read_bytes(), what=f"model config {path.name}")
        except (OSError, jsonsafe.JSONLimitError) as exc:
            raise EngineError(f"model config {path.name} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise EngineError("a model config must be a JSON object with embed_dim, vision_cfg and text_cfg")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise EngineError(f"model config lacks {', '.join(missing)}; an open_clip config has "
                          "embed_dim, vision_cfg and text_cfg")
    size_model_config(config)  # every value typed before open_clip sees it
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


HF_HUB_PREFIX = "hf-hub:"  # an open_clip model published on the Hugging Face hub: "hf-hub:org/name"
HF_HUB_CONFIG = "open_clip_config.json"
HF_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hub_file(repo: str, filename: str, cache_dir: str | None, online: bool) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    if isinstance(found, str) and os.path.isfile(found):
        return found
    if not online:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return hf_hub_download(repo, filename, cache_dir=cache_dir)
    except EntryNotFoundError:
        return None


def hub_repo(name: str) -> str:
    """ORG/NAME of ``hf-hub:ORG/NAME``, checked with the hub's own rules for repository ids (letters, digits,
    ``-``, ``_``, ``.``; no ``..`` or ``--``; at most 96 characters a part) before any path is made of it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = name[len(HF_HUB_PREFIX):] if name.startswith(HF_HUB_PREFIX) else name
    try:
        if repo.count("/") != 1:
            raise HFValidationError("it needs exactly one '/'")
        validate_repo_id(repo)
    except HFValidationError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise EngineError(f"'{name[:200]}' is not a Hugging Face model name ({reason}): write hf-hub:ORG/NAME, "
                          "e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") from None
    return repo


def resolve_hf_hub(name: str, cache_dir: str | None = None) -> tuple[dict, str]:
    """(open_clip_config.json's content, the local weights file) of ``hf-hub:org/name``: from the cache, else
    downloaded when online; offline and uncached fails at once, saying how to provide the files."""
    repo = hub_repo(name)
    online = None
    files = {}
    for filename in (HF_HUB_CONFIG, *HF_HUB_WEIGHTS):
        found = _hub_file(repo, filename, cache_dir, online=False)
        if found is None and online is None:
            online = not is_offline()
        if found is None and online:
            try:
                found = _hub_file(repo, filename, cache_dir, online=True)
            except Exception as exc:  # network errors are transient: the worker may retry
                raise EngineError(f"downloading {filename} of {name} failed: {exc}", permanent=False) from exc
        files[filename] = found
        if filename != HF_HUB_CONFIG and found:
            break
    weights = next((files[f] for f in HF_HUB_WEIGHTS if files.get(f)), None)
    if files[HF_HUB_CONFIG] is None or weights is None:
        missing = HF_HUB_CONFIG if files[HF_HUB_CONFIG] is None else " or ".join(HF_HUB_WEIGHTS)
        where = f"the model cache ({cache_dir})" if cache_dir else "the Hugging Face cache (HF_HOME)"
        reason = ("this machine is offline (HF_HUB_OFFLINE is set or huggingface.co cannot be reached)" if not online
                  else f"the repository has no {missing}")
        raise EngineError(f"{name}: {missing} is not in {where} and {reason}. Download the repository once on a "
                          "machine with internet (huggingface-cli download ORG/NAME) and copy the cache here, or "
                          "register the model with a config and checkpoint file")
    try:
        config = jsonsafe.loads(Path(files[HF_HUB_CONFIG]).read_bytes(), what=HF_HUB_CONFIG)
    except (OSError, ValueError) as exc:
        raise EngineError(f"{name}: {HF_HUB_CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise EngineError(f"{name}: {HF_HUB_CONFIG} has no model_cfg object, so it is not an open_clip model")
    return config, weights


def weights_file(architecture: str, pretrained: str = "", cache_dir: str | None = None) -> str:
    """The local file of the weights a registration names (a pretrained tag, or an hf-hub: model): what its
    digest is taken of."""
    if architecture.startswith(HF_HUB_PREFIX):
        return resolve_hf_hub(architecture, cache_dir)[1]
    return resolve_pretrained(architecture, pretrained, cache_dir)[0]


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
    hub_weights = hub_preprocess = None
    if architecture and architecture.startswith(HF_HUB_PREFIX):
        if model_config is not None or pretrained or checkpoint is not None:
            raise EngineError(f"{architecture} brings its own config and weights: give no model config, "
                              "pretrained tag or checkpoint with it")
        hub_config, hub_weights = resolve_hf_hub(architecture, cache_dir)
        model_config, architecture = hub_config["model_cfg"], None
        hub_preprocess = hub_config.get("preprocess_cfg") or None
        checkpoint = hub_weights
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
    config = open_clip.get_model_config(name) or {}
    refusal = config_refusal(config) or text_refusal(config)  # before a download or a build that would be wasted
    if refusal:
        raise EngineError(f"{name}: {refusal}")

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
    try:
        with _random_init_notice_dropped(name, when=state is not None):
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **create_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        # what the config checks above cannot foresee (e.g. act_kwargs a layer does not take) is still a refusal
        raise EngineError(f"open_clip cannot build {name} from its config: {type(exc).__name__}: {exc}") from exc
    refusal = model_refusal(model)
    if refusal:
        raise EngineError(f"{name}: {refusal}")
    if state is not None:
        load_state(model, state, what=f"architecture {name}")
        log.info("%s: weights loaded from %s", name, Path(weights).name)
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
