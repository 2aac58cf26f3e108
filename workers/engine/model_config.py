"""Type-checking, sizing and registering a custom open_clip model config (open_clip's JSON format).

A config is checked before open_clip builds anything: every value of the wrong type is refused by its dotted
key, and what the model will cost is counted from the config alone (:func:`size_model_config`). A checked
config is registered with open_clip under a name taken from its content (:func:`register_model_config`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from .architectures import config_refusal
from . import jsonsafe
from .errors import EngineError

_config_lock = threading.Lock()


def _open_clip():
    import open_clip  # imported late: it is slow and only workers need it

    return open_clip


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


@dataclass(frozen=True)
class _VisionTower:
    """What :func:`size_model_config` learns of the image tower."""

    parameters: int
    layers: int
    width: int
    image_size: int  # the larger side, in pixels
    tokens: int  # patches plus the CLS token
    pool_type: str  # as ModelSize.pool_type


@dataclass(frozen=True)
class _TextTower:
    """What :func:`size_model_config` learns of the text tower (all zero for a Hugging Face one)."""

    parameters: int
    buffers: int
    layers: int
    width: int
    context_length: int


def size_model_config(config: dict, *, builtin: bool = False) -> ModelSize:
    """Type-check an open_clip ViT config and count its parameters without building it.

    Every value of the wrong type is refused naming its dotted key (``vision_cfg.width``), so a config never
    reaches open_clip with a value it would fail on deep inside. The count follows open_clip 3.3's
    VisionTransformer and TextTransformer (default attention blocks; the norms of custom block types add a
    few thousand parameters at most). ``builtin``: an architecture shipped with open_clip, whose keys are
    trusted and whose Hugging Face text tower (counted as nothing) is allowed.
    """
    embed_dim = _check_top_level(config, builtin)
    open_clip_model = _open_clip().model
    vision = _size_vision_tower(config["vision_cfg"], embed_dim,
                                None if builtin else tuple(f.name for f in fields(open_clip_model.CLIPVisionCfg)))
    text = _size_text_tower(config, embed_dim, builtin,
                            None if builtin else tuple(f.name for f in fields(open_clip_model.CLIPTextCfg)))
    logit = 1 + (1 if config.get("init_logit_bias") is not None else 0)
    return ModelSize(parameters=vision.parameters + text.parameters + logit, buffers=text.buffers,
                     vision_layers=vision.layers, vision_width=vision.width, image_size=vision.image_size,
                     image_tokens=vision.tokens, text_layers=text.layers, text_width=text.width,
                     context_length=text.context_length, embed_dim=embed_dim, pool_type=vision.pool_type)


def _check_top_level(config: dict, builtin: bool) -> int:
    """Type-check the config's top-level keys (the towers only as objects) and return its embed_dim."""
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
    return embed_dim


def _size_vision_tower(vision_cfg: dict, embed_dim: int, allowed: tuple[str, ...] | None) -> _VisionTower:
    """Type-check ``vision_cfg`` (an open_clip VisionTransformer) and count its parameters."""
    if "layers" not in vision_cfg:
        raise EngineError("model config must describe an open_clip VisionTransformer (vision_cfg with an "
                          "integer 'layers'); timm and ResNet towers cannot be audited")
    v = _Fields(vision_cfg, "vision_cfg", allowed)
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
    tokens = _image_tokens(width, head_width, mlp_ratio, image, patch)
    pool_dim, pooler = width, 0
    if attention_pooled:  # open_clip's AttentionalPooler; ln_post and proj then act on its embed_dim-wide output
        pool_dim, pooler = embed_dim, _attention_pooler_parameters(v, embed_dim, width)
    parameters = (3 * patch[0] * patch[1] * width  # conv1, no bias
                  + width + tokens * width  # class and positional embeddings
                  + (0 if v.section.get("no_ln_pre") else 2 * width)
                  + layers * _block_parameters(width, mlp_ratio, layer_scale)
                  + pooler + 2 * pool_dim + pool_dim * embed_dim)  # ln_post, proj
    return _VisionTower(parameters=parameters, layers=layers, width=width, image_size=max(image), tokens=tokens,
                        pool_type="attn" if attention_pooled else pool_type)


def _image_tokens(width: int, head_width: int, mlp_ratio: float, image: tuple[int, int],
                  patch: tuple[int, int]) -> int:
    """Check that the image tower's sizes fit together and return its tokens per image (patches plus CLS)."""
    if head_width > width or width % (width // head_width):
        raise EngineError(f"model config: vision_cfg.width ({width}) must split into heads of "
                          f"vision_cfg.head_width ({head_width}): give a head_width that divides the width")
    grid = (image[0] // patch[0], image[1] // patch[1])
    if min(grid) < 1:
        raise EngineError(f"model config: vision_cfg.patch_size ({list(patch)}) is larger than "
                          f"vision_cfg.image_size ({list(image)})")
    if int(width * mlp_ratio) < 1:
        raise EngineError(f"model config: vision_cfg.mlp_ratio ({mlp_ratio}) leaves the MLP without units")
    return grid[0] * grid[1] + 1


def _attention_pooler_parameters(v: _Fields, embed_dim: int, width: int) -> int:
    """open_clip's AttentionalPooler: its queries, ln_q and ln_k, and an attention whose keys read the width."""
    queries, heads = v.whole("attn_pooler_queries", 256), v.whole("attn_pooler_heads", 8)
    if embed_dim % heads:
        raise EngineError(f"model config: embed_dim ({embed_dim}) must be divisible by "
                          f"vision_cfg.attn_pooler_heads ({heads})")
    return (queries * embed_dim + 2 * embed_dim + 2 * width  # queries, ln_q, ln_k
            + embed_dim * (embed_dim + 2 * width) + 3 * embed_dim  # q, k, v projections (keys read the width)
            + embed_dim * embed_dim + embed_dim)  # out_proj


def _size_text_tower(config: dict, embed_dim: int, builtin: bool, allowed: tuple[str, ...] | None) -> _TextTower:
    """Type-check ``text_cfg`` (an open_clip TextTransformer) and count its parameters and its mask buffer."""
    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_model_name"):
        if not builtin:
            raise EngineError("model config: text_cfg.hf_model_name would download a Hugging Face text tower; "
                              "describe the text tower with width, layers and heads instead")
        return _TextTower(parameters=0, buffers=0, layers=0, width=0, context_length=0)
    t = _Fields(text_cfg, "text_cfg", allowed)
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
    parameters = (vocab * text_width + positions * text_width + cls_emb
                  + text_layers * _block_parameters(text_width, text_ratio, text_scale)
                  + 2 * text_width + projection)
    buffers = 0 if t.section.get("no_causal_mask") else positions * positions
    return _TextTower(parameters=parameters, buffers=buffers, layers=text_layers, width=text_width,
                      context_length=context)


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
