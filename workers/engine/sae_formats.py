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
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import EngineError
from .sae import TopKSAE

FORMATS = ("ours", "sae_lens")
SAE_LENS_CONFIG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
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
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook_name or "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------- the formats
def detect_format(folder: str | os.PathLike) -> str:
    folder = Path(folder)
    if (folder / "sae.json").is_file() and (folder / "sae.safetensors").is_file():
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
    read."""
    _check_format(format)
    folder = Path(folder)
    format = detect_format(folder) if format == "auto" else format
    if format == "ours":
        cfg = _read_json(folder / "sae.json")
        try:
            return SAEDescription("ours", "topk", int(cfg["d_model"]), int(cfg["n_latents"]), int(cfg["k"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{folder / 'sae.json'} is not an SAE config: {exc}") from exc
    return _describe_sae_lens(_read_json(folder / SAE_LENS_CONFIG), folder, dense_relu)


def load_sae(folder: str | os.PathLike, format: str = "auto", *, device: str | torch.device = "cpu",
             dense_relu: bool = False) -> TopKSAE:
    """An SAE folder in any of :data:`FORMATS` as a :class:`TopKSAE` on ``device`` (float32, eval mode).

    ``dense_relu`` imports a SAELens ReLU SAE (``architecture: "standard"``) as a TopK SAE with k = its width,
    which is exact but makes every per-vector cost of the audit scale with the width (see the module doc)."""
    _check_format(format)
    folder = Path(folder)
    format = detect_format(folder) if format == "auto" else format
    if format == "ours":
        sae = TopKSAE.load(folder, device)
    else:
        sae = _load_sae_lens(folder, dense_relu).to(device)
    return sae.eval().requires_grad_(False)


def check_fits(sae: TopKSAE | SAEDescription, d_model: int, where: str = "the audited layer") -> None:
    """Refuse an SAE whose input width is not the residual stream's (``d_model``: the vision transformer's
    width, ``visual.transformer.width`` in open_clip)."""
    width = sae.d_model
    if width != d_model:
        raise EngineError(f"the SAE reads {width}-dimensional activations but {where} of this model is "
                          f"{d_model}-dimensional: it was trained on another model (or another part of it)")


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


# ------------------------------------------------------------------------------------------------------ SAELens
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object")
    return data


def _sae_lens_architecture(cfg: dict) -> tuple[str, int | None]:
    """(architecture, k) of a SAELens config of any version."""
    architecture = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if architecture == "standard" and activation == "topk":  # before SAELens 6
        architecture = "topk"
    if architecture == "standard" and activation not in ("relu", None):
        raise EngineError(f"SAELens activation_fn {activation!r} is not supported: the engine reads TopK SAEs "
                          "(and ReLU ones as TopK with k = d_sae)")
    k = cfg.get("k", kwargs.get("k")) if architecture == "topk" else None
    return architecture, k


def _describe_sae_lens(cfg: dict, folder: Path, dense_relu: bool) -> SAEDescription:
    where = folder / SAE_LENS_CONFIG
    architecture, k = _sae_lens_architecture(cfg)
    if architecture == "standard":
        if not dense_relu:
            raise EngineError(
                f"{where}: SAELens architecture 'standard' is a ReLU SAE, not a TopK one; it maps exactly only "
                "as a TopK SAE with k = d_sae (every latent may fire), which makes the audit's per-image cost "
                "grow with the width; import it with dense_relu=True to accept that")
    elif architecture != "topk":
        raise EngineError(f"{where}: SAELens architecture {architecture!r} is not supported: the engine reads "
                          "TopK SAEs (architecture 'topk'); a threshold (jumprelu), a gate (gated) or a signed "
                          "top-k (abstopk) has no TopK equivalent")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise EngineError(
            f"{where}: normalize_activations {norm!r} is not supported: the SAE expects rescaled or normalized "
            "activations and the files do not hold how (fold the normalization into the weights with SAELens, "
            "e.g. fold_activation_norm_scaling_factor, and save it again)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise EngineError(f"{where}: reshape_activations {cfg['reshape_activations']!r} (attention heads) is not "
                          "supported: the engine reads the residual stream")
    meta = cfg.get("metadata") or {}
    hook_name = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    try:
        d_model, n_latents = int(cfg["d_in"]), int(cfg["d_sae"])
        k = n_latents if architecture == "standard" else int(k)
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{where} lacks a valid d_in, d_sae or k: {exc}") from exc
    if not 1 <= k <= n_latents:
        raise EngineError(f"{where}: k = {k} must lie in 1..d_sae ({n_latents})")
    return SAEDescription("sae_lens", architecture, d_model, n_latents, None if architecture == "standard" else k,
                          hook_name=hook_name, model_name=meta.get("model_name", cfg.get("model_name")),
                          layer=layer_from_hook_name(hook_name), metadata=dict(meta))


def _load_sae_lens(folder: Path, dense_relu: bool) -> TopKSAE:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = _read_json(folder / SAE_LENS_CONFIG)
    info = _describe_sae_lens(cfg, folder, dense_relu)
    try:
        state = load_file(str(folder / SAE_LENS_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise EngineError(f"{folder / SAE_LENS_WEIGHTS} cannot be read: {exc}") from exc
    scaling = state.pop("scaling_factor", None)  # older SAELens wrote an all-ones factor that it ignores
    if scaling is not None and not torch.all(scaling == 1):
        raise EngineError(f"{folder / SAE_LENS_WEIGHTS} holds a fine-tuning scaling_factor other than 1, which "
                          "SAELens 6 does not read either")
    extra, missing = sorted(set(state) - _SAE_LENS_TENSORS), sorted(_SAE_LENS_TENSORS - set(state))
    if extra or missing:
        raise EngineError(f"{folder / SAE_LENS_WEIGHTS} is not a TopK SAE's: "
                          + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                      + ([f"unexpected {', '.join(extra)}"] if extra else [])))
    W_enc, b_enc, W_dec, b_dec = (state[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d, n = info.d_model, info.n_latents
    expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    wrong = [f"{name} is {list(state[name].shape)}, expected {list(shape)}" for name, shape in expected.items()
             if tuple(state[name].shape) != shape]
    if wrong:
        raise EngineError(f"{folder}: the weights do not match cfg.json (d_in={d}, d_sae={n}): {'; '.join(wrong)}")
    W_enc, b_enc, W_dec = _fold_sae_lens(cfg, W_enc, b_enc, W_dec, b_dec)
    sae = TopKSAE(d, n, info.k or n, input_scale=1.0)
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
