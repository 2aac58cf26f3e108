"""Which OpenCLIP image towers the engine can audit, and why each other kind is refused.

The engine needs three things of an image tower (``workers.engine.hooks``): blocks whose outputs are the
residual stream [batch, tokens, d] (open_clip's ``transformer.resblocks``), a class token at position 0
followed by one token per patch (what ``token`` 'cls' and 'spatial' select), and a tail after the last block,
``_pool`` then ``proj``, that turns those tokens into the image embedding. Every open_clip ``VisionTransformer``
has them, whatever its pooling (class token, mean of the patch tokens, or an attention pooler), its LayerNorm
placement (``final_ln_after_pool``, ``no_ln_pre``) or its activation (``quick_gelu``), so :class:`VisionTail`
recomputes the embedding exactly and act x grad through the tail equals the full backward pass for all of them
(``tests/engine/test_architectures.py`` checks each kind on random weights).

:data:`ARCHITECTURES` is the table of what is supported and what is refused, one row per kind, as docs/engine.md shows
it. :func:`check_supported` is what registration calls on a built tower with its layer and token;
:func:`config_refusal` says the same about the image tower from a model config, before anything is built;
:func:`text_refusal` refuses a text side that needs Hugging Face's ``transformers`` where it is not installed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from torch import nn

from .errors import EngineError
from .hooks import check_token_reaches_output

SUPPORTED, REFUSED = "supported", "refused"
TOKENS = ("cls", "spatial")


@dataclass(frozen=True)
class Architecture:
    """One kind of image tower: a row of the table in docs/engine.md."""

    key: str  # what the tests and the refusals name the row by
    architectures: str  # open_clip's names for it, or the config keys that make it
    pooling: str
    status: str  # SUPPORTED or REFUSED
    note: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("vit-cls", "ViT-B-32, ViT-B-16, ViT-L-14 and their -quickgelu variants; every built-in ViT-S/M/B/L/"
                 "H/g/bigG/e", "tok: the class token", SUPPORTED,
                 "at layer -1 only token 'cls' reaches the output"),
    Architecture("vit-avg", "vision_cfg.pool_type 'avg'", "avg: the mean of the patch tokens", SUPPORTED,
                 "at layer -1 only token 'spatial' reaches the output"),
    Architecture("vit-final-ln", "vision_cfg.final_ln_after_pool, no_ln_pre (the image towers of ViT-*-CLIPA)",
                 "tok or avg, LayerNorm after pooling", SUPPORTED,
                 "the built-in CLIPA models also need a Hugging Face tokenizer (row hf-text)"),
    Architecture("vit-attn-pool", "vision_cfg.attentional_pool: true (open_clip's AttentionalPooler, MAP-style)",
                 "attn: learned queries attend to every token; query 0, or their mean with pool_type 'avg'",
                 SUPPORTED, "every token reaches the output at every layer"),
    Architecture("timm", "vision_cfg.timm_model_name: every SigLIP and SigLIP2 (MAP head, no class token), EVA, "
                 "PE-Core, ViTamin, MobileCLIP, ConvNeXt, Swin", "timm's (map, token, avg)", REFUSED,
                 "hooks, tail, heatmaps and size checks read open_clip's VisionTransformer layout"),
    Architecture("resnet", "RN50, RN101, RN50x4, RN50x16, RN50x64 (and -quickgelu)",
                 "attention pooling of a feature map", REFUSED, "no token residual stream to decompose"),
    Architecture("coca", "coca_ViT-B-32, coca_ViT-L-14, coca_base (multimodal_cfg)",
                 "attn: 256 queries", REFUSED, "the size checks cannot count the captioning decoder"),
    Architecture("pool-none", "vision_cfg.pool_type 'none'", "none", REFUSED,
                 "one embedding per token (or per query), not one per image"),
    Architecture("attn-pool-pair", "vision_cfg.attentional_pool 'parallel' or 'cascade'",
                 "two attention poolers", REFUSED, "open_clip 3.3 cannot run it"),
    Architecture("output-tokens", "vision_cfg.output_tokens: true in a CLIP model", "any", REFUSED,
                 "encode_image returns (embedding, tokens)"),
    Architecture("hf-text", "text_cfg.hf_tokenizer_name or hf_model_name: ViT-*-CLIPA, ViT-*-worldwide, roberta-, "
                 "xlm-roberta-, mt5-, nllb- built-ins", "any", REFUSED,
                 "only where the transformers package is not installed (it is not in requirements.txt)"),
)


def architecture(key: str) -> Architecture:
    return next(a for a in ARCHITECTURES if a.key == key)


# --------------------------------------------------------------------------- the reasons, worded once

_ONLY_VIT = "only open_clip VisionTransformer towers can be audited"


def _timm_reason(detail: str) -> str:
    return (f"the image tower is a timm model ({detail}), not open_clip's VisionTransformer: the engine hooks "
            "open_clip's transformer.resblocks, reads the class token at position 0 and recomputes the embedding "
            "with its ln_post and proj, which a timm tower lays out otherwise (SigLIP's has no class token and "
            f"pools with a MAP head); {_ONLY_VIT}, so SigLIP, EVA, PE-Core, ViTamin, MobileCLIP, ConvNeXt and "
            "Swin towers are refused")


def _resnet_reason(detail: str) -> str:
    return (f"the image tower is a ResNet ({detail}): it has no residual stream of tokens for the SAE to "
            f"decompose after a block; {_ONLY_VIT}")


COCA_REASON = ("a CoCa model (multimodal_cfg) cannot be audited: the service's size checks cannot count its "
               "captioning decoder, so it is refused before anything is built. Its kind of image tower, open_clip's "
               "attention pooler, is supported in a CLIP config (vision_cfg.attentional_pool: true)")
POOL_NONE_REASON = ("vision_cfg.pool_type 'none' gives one embedding per token (or per attention query), not one "
                    "per image, so no probe can read it; use pool_type 'tok' or 'avg'")
OUTPUT_TOKENS_REASON = ("vision_cfg.output_tokens makes the CLIP model's encode_image return (embedding, tokens), "
                        "and the engine needs the image embedding alone; remove output_tokens (it changes no "
                        "weights)")


def _attn_pool_pair_reason(value) -> str:
    return (f"vision_cfg.attentional_pool {value!r} (two attention poolers, 'parallel' or 'cascade') cannot run in "
            "open_clip 3.3: its ln_post is sized for the pooled output but applied to the tokens; use "
            "attentional_pool: true (one pooler)")


def _hf_reason(what: str, source: str) -> str:
    return (f"the model's text {what} comes from Hugging Face ({source}) and needs the transformers package, "
            "which is not installed here; pick a model with open_clip's own tokenizer and text tower (e.g. "
            "ViT-B-32, ViT-L-14) or install transformers with the Hugging Face files cached")


# --------------------------------------------------------------------------- from a config

def config_refusal(config: dict) -> str | None:
    """Why the image tower a model config describes cannot be audited; None when it can, as far as the kind of
    tower shows. The config's values are typed by ``model_config.size_model_config`` (pool_type 'none' is refused there
    as a value outside 'tok', 'avg'); a layer and token by :func:`hooks.unreachable_token` or
    :func:`check_supported`."""
    if "multimodal_cfg" in config:
        return COCA_REASON
    vision = config.get("vision_cfg")
    if not isinstance(vision, dict):
        return None  # the config's own checks name the missing section
    if vision.get("timm_model_name"):
        return _timm_reason(f"vision_cfg.timm_model_name {vision['timm_model_name']!r}, pooling "
                            f"{vision.get('timm_pool', 'avg')!r}")
    if isinstance(vision.get("layers"), (list, tuple)):
        return _resnet_reason(f"vision_cfg.layers {list(vision['layers'])}")
    pool = vision.get("attentional_pool", False)
    if isinstance(pool, str):
        return _attn_pool_pair_reason(pool)
    if vision.get("output_tokens") is True:
        return OUTPUT_TOKENS_REASON
    return None


def text_refusal(config: dict) -> str | None:
    """Why the text side cannot be built here: a Hugging Face tokenizer or text tower without ``transformers``."""
    text = config.get("text_cfg")
    if not isinstance(text, dict) or importlib.util.find_spec("transformers") is not None:
        return None
    if text.get("hf_model_name"):
        return _hf_reason("tower", repr(text["hf_model_name"]))
    if text.get("hf_tokenizer_name"):
        return _hf_reason("tokenizer", repr(text["hf_tokenizer_name"]))
    return None


# --------------------------------------------------------------------------- from a built tower

def pooling(visual: nn.Module) -> str:
    """How the tower turns the last block's tokens into the embedding: 'tok', 'avg' or 'attn'."""
    return "attn" if getattr(visual, "attn_pool", None) is not None else getattr(visual, "pool_type", "tok")


def tower_refusal(visual: nn.Module) -> str | None:
    """Why a built image tower cannot be audited; None when it can."""
    kind = type(visual).__name__
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # open_clip's TimmModel
        pool = getattr(trunk, "global_pool", "")
        no_cls = getattr(trunk, "cls_token", True) is None
        return _timm_reason(f"{type(trunk).__name__} {pool!r}-pooled" + (", no class token" if no_cls else ""))
    if kind == "ModifiedResNet":
        return _resnet_reason(kind)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not all(hasattr(visual, a) for a in ("_pool", "ln_post", "proj", "class_embedding")):
        return f"the image tower is a {kind}, not open_clip's VisionTransformer; {_ONLY_VIT}"
    if getattr(visual, "attn_pool_contrastive", None) is not None:
        return _attn_pool_pair_reason(getattr(visual, "attn_pool_type", "parallel"))
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        return POOL_NONE_REASON
    if getattr(visual, "output_tokens", False):
        return OUTPUT_TOKENS_REASON
    return None


def model_refusal(model: nn.Module) -> str | None:
    """:func:`tower_refusal` of ``model.visual``, and a CoCa model refused as a whole."""
    if type(model).__name__ == "CoCa":
        return COCA_REASON
    visual = getattr(model, "visual", None)
    if visual is None:
        return f"the model ({type(model).__name__}) has no image tower (model.visual)"
    return tower_refusal(visual)


def check_supported(visual: nn.Module, layer: int = -1, token: str = "cls") -> None:
    """Refuse, with an :class:`EngineError` naming the reason, a tower the engine cannot audit, a layer it does
    not have, or a token whose relevance at that layer is zero by construction."""
    reason = tower_refusal(visual)
    if reason:
        raise EngineError(reason)
    if token not in TOKENS:
        raise EngineError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    check_token_reaches_output(visual, layer, token)
