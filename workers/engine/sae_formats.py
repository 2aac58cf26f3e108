"""SAEs trained elsewhere: read them into a :class:`~workers.engine.sae.TopKSAE`, write ours for other libraries.

Two formats:

``ours``
    ``sae.json`` + ``sae.safetensors`` (:meth:`TopKSAE.save`).
``sae_lens``
    SAELens' folder: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae],
    ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]. SAELens encodes ``x' = x - b_dec`` (when ``apply_b_dec_to_input``,
    the default), ``pre = x' @ W_enc + b_enc``, multiplies ``pre`` by the decoder rows' norms when
    ``rescale_acts_by_decoder_norm``, keeps the k largest and ReLUs them; it decodes ``z @ W_dec + b_dec`` (``z``
    divided by the same norms first when rescaling). Configs from before SAELens 6 name a TopK SAE by
    ``activation_fn_str: "topk"`` with ``activation_fn_kwargs: {"k": ...}`` instead of ``architecture: "topk"``.

What is imported, and what is refused (each refusal names the field and its value):

- ``architecture: "topk"``: imported exactly. ``apply_b_dec_to_input: false`` and ``rescale_acts_by_decoder_norm``
  are folded into the weights (the same latents and reconstruction, up to float rounding). The imported SAE has
  ``input_scale = 1``, its ``W_dec`` columns keep SAELens' norms, so its latent values are SAELens' values.
- ``architecture: "standard"`` (ReLU): a ReLU SAE is a TopK SAE whose k is its width, so it maps exactly only with
  ``k = d_sae``; the engine's attribution gathers k dictionary directions per vector, so that costs d_sae / k times
  the memory of a TopK SAE of the same width. Refused unless ``dense_relu=True`` asks for exactly that.
- Every other architecture (``jumprelu``, ``gated``, ``abstopk``, ``matching_pursuit``, transcoders, ...):
  refused; a threshold, a gate or a signed top-k is not a TopK SAE.
- ``normalize_activations`` other than ``none``: refused; the expected-norm factor is not in the files, and a
  per-vector layer norm or an unfolded whitening cannot be written as a TopK SAE.
- ``reshape_activations: "hook_z"`` (attention heads) and tensors a TopK SAE does not have: refused.

In both formats the config is read with the bounded JSON reader (:mod:`.jsonsafe`), its sizes must be JSON
integers (``96.9``, ``"8"`` or ``true`` is refused, never cut), and the weights' tensor names and shapes are read
from the safetensors header and compared with the config before anything the config sizes is allocated, so a
config claiming a huge width over a small file costs nothing. Weights holding NaN or infinity, and an
``input_scale`` that is not a positive finite number, are refused. :func:`check_hook` accepts only the residual
stream after the audited block (``blocks.N.hook_resid_post``). Messages name files by their names, never by a
path.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import jsonsafe
from .errors import EngineError
from .sae import TopKSAE

FORMATS = ("ours", "sae_lens")
OURS_CONFIG = "sae.json"
OURS_WEIGHTS = "sae.safetensors"
SAE_LENS_CONFIG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
FILES = {"ours": (OURS_CONFIG, OURS_WEIGHTS), "sae_lens": (SAE_LENS_CONFIG, SAE_LENS_WEIGHTS)}
# The SAELens version whose files the exporter writes and the importer was checked against.
SAE_LENS_VERSION = "6.54.12"
_SAE_LENS_TENSORS = {"W_enc", "b_enc", "W_dec", "b_dec"}


@dataclass
class SAEDescription:
    """What a folder holds, read from its config alone (no weights loaded): enough to register it for a model and
    layer and to refuse it early."""

    format: str
    architecture: str
    d_model: int
    n_latents: int
    k: int | None  # None for a ReLU SAE
    hook_name: str | None = None
    model_name: str | None = None
    layer: int | None = None  # block index from a ``blocks.N.hook_resid_post`` hook name
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": self.format, "architecture": self.architecture, "d_model": self.d_model,
                "n_latents": self.n_latents, "k": self.k, "hook_name": self.hook_name,
                "model_name": self.model_name, "layer": self.layer, "metadata": self.metadata}


# ---------------------------------------------------------------------------------------------------------- names
def resid_post_hook(block: int) -> str:
    """The TransformerLens (and vit-prisma) name of the residual stream after block ``block`` (a non-negative
    index), the name SAELens records as ``hook_name``."""
    if block < 0:
        raise EngineError(f"a hook name needs a non-negative block index, got {block}")
    return f"blocks.{block}.hook_resid_post"


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """The block index of a ``blocks.N.hook_resid_post`` hook name; None for any other hook."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook_name if isinstance(hook_name, str) else "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------- the formats
def detect_format(folder: str | os.PathLike) -> str:
    folder = Path(folder)
    if (folder / OURS_CONFIG).is_file() and (folder / OURS_WEIGHTS).is_file():
        return "ours"
    if (folder / SAE_LENS_CONFIG).is_file() and (folder / SAE_LENS_WEIGHTS).is_file():
        return "sae_lens"
    if not folder.is_dir():
        raise EngineError(f"no SAE folder at {folder}")
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise EngineError(f"{folder} holds no SAE this engine reads: expected sae.json + sae.safetensors (ours) or "
                      f"{SAE_LENS_CONFIG} + {SAE_LENS_WEIGHTS} (SAELens); found {present}")


def _check_format(format: str) -> None:
    if format not in ("auto", *FORMATS):
        raise EngineError(f"unknown SAE format {format!r}: use one of auto, {', '.join(FORMATS)}")


def describe_sae(folder: str | os.PathLike, format: str = "auto", *, dense_relu: bool = False) -> SAEDescription:
    """Read a folder's config (no weights): its format, widths, k and, for SAELens, the hook it was trained on.

    Refuses what :func:`load_sae` would refuse for the config, so a registration fails before the weights are
    read; :func:`check_weights` then compares the weights' header with it."""
    _check_format(format)
    folder = Path(folder)
    format = detect_format(folder) if format == "auto" else format
    return _describe(format, _read_json(folder / FILES[format][0]), dense_relu)


def check_weights(folder: str | os.PathLike, sae: SAEDescription) -> None:
    """Refuse weights whose tensors are not those of the SAE the config describes, from the names and shapes in
    the safetensors header alone: no tensor is read and nothing is allocated, so a config claiming millions of
    latents over a small file is refused at the cost of reading a few hundred bytes."""
    from safetensors import SafetensorError, safe_open

    config_name, weights_name = FILES[sae.format]
    try:
        with safe_open(str(Path(folder) / weights_name), framework="pt") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except OSError as exc:
        raise EngineError(f"{weights_name} cannot be read: {exc.strerror}") from None
    except SafetensorError as exc:
        raise EngineError(f"{weights_name} is not a safetensors file: {exc}") from None
    expected = expected_tensors(sae)
    if sae.format == "sae_lens":
        shapes.pop("scaling_factor", None)  # older SAELens' all-ones factor: its values are checked when read
    extra, missing = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
    if extra or missing:
        raise EngineError(f"{weights_name} is not a TopK SAE's: "
                          + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                      + ([f"unexpected {', '.join(n[:40] for n in extra[:10])}"] if extra else [])))
    wrong = [f"{name} is {list(shapes[name])}, expected {list(shape)}" for name, shape in expected.items()
             if shapes[name] != shape]
    if wrong:
        sizes = ("d_model={}, n_latents={}" if sae.format == "ours" else "d_in={}, d_sae={}").format(
            sae.d_model, sae.n_latents)
        raise EngineError(f"the weights do not match {config_name} ({sizes}): {'; '.join(wrong)}")


def expected_tensors(sae: SAEDescription) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) of the weights file of the SAE a config describes."""
    d, n = sae.d_model, sae.n_latents
    if sae.format == "ours":
        return {"W_enc": (n, d), "b_enc": (n,), "W_dec": (d, n), "b_pre": (d,), "input_scale": ()}
    return {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}


def load_sae(folder: str | os.PathLike, format: str = "auto", *, device: str | torch.device = "cpu",
             dense_relu: bool = False) -> TopKSAE:
    """An SAE folder in any of :data:`FORMATS` as a :class:`TopKSAE` on ``device`` (float32, eval mode).

    ``dense_relu`` imports a SAELens ReLU SAE (``architecture: "standard"``) as a TopK SAE with k = its width,
    which is exact but makes every per-vector cost of the audit scale with the width (see the module doc). The
    weights' header is checked against the config before the SAE is built (:func:`check_weights`)."""
    _check_format(format)
    folder = Path(folder)
    format = detect_format(folder) if format == "auto" else format
    config_name, weights_name = FILES[format]
    cfg = _read_json(folder / config_name)
    info = _describe(format, cfg, dense_relu)
    check_weights(folder, info)
    state = _read_weights(folder / weights_name)
    if format == "ours":
        sae = TopKSAE(info.d_model, info.n_latents, info.k)
        sae.load_state_dict(state)  # names and shapes checked above; the input scale is the file's
    else:
        sae = _sae_lens_sae(cfg, info, state)
    return sae.to(device).eval().requires_grad_(False)


def check_fits(sae: TopKSAE | SAEDescription, d_model: int, where: str = "the audited layer") -> None:
    """Refuse an SAE whose input width is not the residual stream's (``d_model``: the vision transformer's
    width, ``visual.transformer.width`` in open_clip)."""
    width = sae.d_model
    if width != d_model:
        raise EngineError(f"the SAE reads {width}-dimensional activations but {where} of this model is "
                          f"{d_model}-dimensional: it was trained on another model (or another part of it)")


def check_hook(sae: SAEDescription, block: int, where: str = "the audited layer") -> None:
    """Refuse an SAE trained on anything but the residual stream after ``block`` (the audited block, a
    non-negative index): a recorded hook must be exactly :func:`resid_post_hook` of it. Another block's
    residual stream, the stream before a block, attention or MLP hooks and any other name are refused; a config
    that records no hook (ours) claims none and passes, its width still checked by :func:`check_fits`."""
    hook = sae.hook_name
    accepted = resid_post_hook(block)
    if hook is None or hook == accepted:
        return
    trained = layer_from_hook_name(hook)
    if trained is not None and trained != block:
        raise EngineError(f"the SAE was trained on block {trained} ({hook}) but {where} is block {block}; audit "
                          f"layer {trained} to use it")
    raise EngineError(f"the SAE reads hook {_shown(hook)}, which is not the residual stream of {where}: only "
                      f"{accepted!r} (the output of block {block}, the audited block) is accepted")


def export_sae_lens(sae: TopKSAE, folder: str | os.PathLike, *, hook_name: str, model_name: str | None = None,
                    metadata: dict | None = None, dtype: str = "float32") -> Path:
    """Write ``sae`` as a SAELens TopK SAE (``cfg.json`` + ``sae_weights.safetensors``) that SAELens'
    ``SAE.load_from_disk`` reads, and :func:`load_sae` reads back with the same latents and reconstruction.

    ``hook_name``: where the activations come from, in TransformerLens' words (:func:`resid_post_hook`);
    ``metadata``: more keys for the config's ``metadata`` (e.g. the token the SAE reads). Our input scale is
    folded into the weights: ``W_enc = (W_enc / s)^T``, ``W_dec = dictionary``, ``b_dec = b_pre``."""
    from safetensors.torch import save_file

    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise EngineError(f"cannot write SAELens weights as {dtype!r}: use float32, float16, bfloat16 or float64")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    with torch.no_grad():
        s = sae.input_scale.detach().float().cpu()
        tensors = {
            "W_enc": (sae.W_enc.detach().float().cpu() / s).T,  # [d_in, d_sae]
            "b_enc": sae.b_enc.detach().float().cpu(),  # [d_sae]
            "W_dec": sae.dictionary.detach().float().cpu(),  # [d_sae, d_in]
            "b_dec": sae.b_pre.detach().float().cpu(),  # [d_in]
        }
    save_file({k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}, str(folder / SAE_LENS_WEIGHTS))
    meta = {"sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": None, "hook_name": hook_name,
            "model_name": model_name, **(metadata or {})}
    cfg = {"d_in": sae.d_model, "d_sae": sae.n_latents, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": meta, "k": sae.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk"}
    (folder / SAE_LENS_CONFIG).write_text(json.dumps(cfg, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------- reading files
def _read_json(path: Path) -> dict:
    """A config file's JSON object, read with the bounded JSON reader; messages name the file, not its path."""
    try:
        data = jsonsafe.loads(path.read_bytes(), what=path.name)
    except OSError as exc:
        raise EngineError(f"{path.name} cannot be read: {exc.strerror}") from None
    except jsonsafe.JSONLimitError as exc:
        raise EngineError(str(exc)) from None
    if not isinstance(data, dict):
        raise EngineError(f"{path.name} is not a JSON object")
    return data


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file whose header :func:`check_weights` accepted; NaN or infinity anywhere, or an
    input scale that is not positive, is refused naming the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except OSError as exc:
        raise EngineError(f"{path.name} cannot be read: {exc.strerror}") from None
    except SafetensorError as exc:
        raise EngineError(f"{path.name} cannot be read: {exc}") from None
    for name, tensor in state.items():
        values = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
            else tensor.float()
        if not torch.isfinite(values).all():
            raise EngineError(f"{path.name}: {name} holds NaN or infinite values; an SAE's weights must all be "
                              "finite")
    scale = state.get("input_scale")
    if scale is not None and not float(scale) > 0:
        raise EngineError(f"{path.name}: input_scale is {float(scale)}; it must be a positive finite number")
    return state


def _shown(value, limit: int = 80) -> str:
    """``value`` as a message shows it, cut to ``limit`` characters (a config may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _whole(value, name: str, where: str) -> int:
    """A width or count of a config: a JSON integer of at least 1. ``96.9``, ``64.0``, ``"8"`` and ``true`` are
    refused rather than cut or converted: a size that is not an integer says the file is not what it claims."""
    if value is None:
        raise EngineError(f"{where} lacks {name}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"{where}: {name} must be a whole number, got {_shown(value)}")
    if value < 1:
        raise EngineError(f"{where}: {name} must be at least 1, got {value}")
    return value


def _check_k(k: int, n_latents: int, where: str, width: str) -> None:
    if not 1 <= k <= n_latents:
        raise EngineError(f"{where}: k = {k} must lie in 1..{width} ({n_latents})")


def _describe(format: str, cfg: dict, dense_relu: bool) -> SAEDescription:
    if format == "ours":
        return _describe_ours(cfg)
    return _describe_sae_lens(cfg, dense_relu)


def _describe_ours(cfg: dict) -> SAEDescription:
    d_model, n_latents, k = (_whole(cfg.get(key), key, OURS_CONFIG) for key in ("d_model", "n_latents", "k"))
    _check_k(k, n_latents, OURS_CONFIG, "n_latents")
    scale = cfg.get("input_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise EngineError(f"{OURS_CONFIG}: input_scale must be a positive finite number, got {_shown(scale)}")
    return SAEDescription("ours", "topk", d_model, n_latents, k)


# ------------------------------------------------------------------------------------------------------ SAELens
def _sae_lens_architecture(cfg: dict) -> tuple[str, int | None]:
    """(architecture, k) of a SAELens config of any version."""
    architecture = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise EngineError(f"{SAE_LENS_CONFIG}: activation_fn_kwargs must be a JSON object, got {_shown(kwargs)}")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if architecture == "standard" and activation == "topk":  # before SAELens 6
        architecture = "topk"
    if architecture == "standard" and activation not in ("relu", None):
        raise EngineError(f"SAELens activation_fn {_shown(activation)} is not supported: the engine reads TopK "
                          "SAEs (and ReLU ones as TopK with k = d_sae)")
    k = cfg.get("k", kwargs.get("k")) if architecture == "topk" else None
    return architecture, k


def _check_sae_lens_arithmetic(cfg: dict, architecture: str, dense_relu: bool) -> None:
    """Refuse what a TopK SAE cannot compute exactly: other architectures, normalized or reshaped inputs."""
    where = SAE_LENS_CONFIG
    if architecture == "standard":
        if not dense_relu:
            raise EngineError(
                f"{where}: SAELens architecture 'standard' is a ReLU SAE, not a TopK one; it maps exactly only "
                "as a TopK SAE with k = d_sae (every latent may fire), which makes the audit's per-image cost "
                "grow with the width; import it with dense_relu=True to accept that")
    elif architecture != "topk":
        raise EngineError(f"{where}: SAELens architecture {_shown(architecture)} is not supported: the engine "
                          "reads TopK SAEs (architecture 'topk'); a threshold (jumprelu), a gate (gated) or a "
                          "signed top-k (abstopk) has no TopK equivalent")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise EngineError(
            f"{where}: normalize_activations {_shown(norm)} is not supported: the SAE expects rescaled or "
            "normalized activations and the files do not hold how (fold the normalization into the weights with "
            "SAELens, e.g. fold_activation_norm_scaling_factor, and save it again)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise EngineError(f"{where}: reshape_activations {_shown(cfg['reshape_activations'])} (attention heads) "
                          "is not supported: the engine reads the residual stream")


def _describe_sae_lens(cfg: dict, dense_relu: bool) -> SAEDescription:
    where = SAE_LENS_CONFIG
    architecture, k = _sae_lens_architecture(cfg)
    _check_sae_lens_arithmetic(cfg, architecture, dense_relu)
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise EngineError(f"{where}: metadata must be a JSON object, got {_shown(meta)}")
    hook_name = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    if hook_name is not None and not isinstance(hook_name, str):
        raise EngineError(f"{where}: hook_name must be a string, got {_shown(hook_name)}")
    d_model, n_latents = _whole(cfg.get("d_in"), "d_in", where), _whole(cfg.get("d_sae"), "d_sae", where)
    k = n_latents if architecture == "standard" else _whole(k, "k", where)
    _check_k(k, n_latents, where, "d_sae")
    model_name = meta.get("model_name", cfg.get("model_name"))
    return SAEDescription("sae_lens", architecture, d_model, n_latents, None if architecture == "standard" else k,
                          hook_name=hook_name, model_name=model_name if isinstance(model_name, str) else None,
                          layer=layer_from_hook_name(hook_name), metadata=dict(meta))


def _sae_lens_sae(cfg: dict, info: SAEDescription, state: dict[str, Tensor]) -> TopKSAE:
    """The TopK SAE of SAELens tensors whose names and shapes :func:`check_weights` accepted."""
    scaling = state.pop("scaling_factor", None)  # older SAELens wrote an all-ones factor that it ignores
    if scaling is not None and not torch.all(scaling == 1):
        raise EngineError(f"{SAE_LENS_WEIGHTS} holds a fine-tuning scaling_factor other than 1, which SAELens 6 "
                          "does not read either")
    W_enc, b_enc, W_dec, b_dec = (state[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    W_enc, b_enc, W_dec = _fold_sae_lens(cfg, W_enc, b_enc, W_dec, b_dec)
    n = info.n_latents
    sae = TopKSAE(info.d_model, n, info.k or n, input_scale=1.0)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.T)
        sae.b_pre.copy_(b_dec)
    return sae


def _fold_sae_lens(cfg: dict, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Weights that encode as ``(x - b_dec) @ W_enc + b_enc`` and decode as ``z @ W_dec + b_dec`` whatever the
    config's options, with the same latents."""
    if not cfg.get("apply_b_dec_to_input", True):
        # x @ W_enc = (x - b_dec) @ W_enc + b_dec @ W_enc
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens multiplies the pre-activations by the decoder rows' norms and divides the codes by them before
        # decoding: the same as unit decoder rows and an encoder scaled by those norms (clamped as SAELens clamps
        # them when it folds them itself).
        norms = W_dec.norm(dim=-1).clamp_min(1e-8)  # [d_sae]
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    return W_enc, b_enc, W_dec
