"""The engine's checks of what a user registers (a model, a probe, an SAE): the one door the web process uses.

Registration runs in the web process, which must start without torch or open_clip: this module imports only
light modules at its top and loads the heavy ones inside the call that needs them. Each check raises
``EngineError`` with the message a user reads; the caller names the form field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError


def is_hub_name(architecture: str) -> bool:
    """Whether ``architecture`` names a model on the Hugging Face hub (hf-hub:ORG/NAME), which brings its own
    config and weights."""
    from .hub import HF_HUB_PREFIX

    return architecture.startswith(HF_HUB_PREFIX)


def model_config_of(architecture: str) -> dict | None:
    """The config of a built-in OpenCLIP architecture (None: no such architecture)."""
    import open_clip

    return open_clip.get_model_config(architecture)


def size_model(config: dict, *, builtin: bool):
    """The model's ``model_config.ModelSize`` counted from its config (nothing is built)."""
    from .loading import size_model_config

    return size_model_config(config, builtin=builtin)


def layer_and_token_refusal(size, layer: int, token: str, config: dict) -> tuple[str, str] | None:
    """(field, message) when the audited ``layer`` and ``token`` cannot be audited on this model, or its text
    tower cannot build the zero-shot head and the labels; None when they can."""
    from .architectures import text_refusal
    from .hooks import unreachable_token

    n_blocks = size.vision_layers
    if not -n_blocks <= layer < n_blocks:
        return "layer", (f"layer {layer} does not exist: the vision transformer has {n_blocks} blocks (use "
                         f"0..{n_blocks - 1} or -1..-{n_blocks})")
    if token not in ("cls", "spatial"):
        return "token", "token must be 'cls' or 'spatial'"
    unreachable = unreachable_token(n_blocks, layer, token, size.pool_type)
    if unreachable:
        return "layer", unreachable
    text = text_refusal(config)
    return ("config", text) if text else None


def pretrained_tag_refusal(architecture: str, tag: str) -> str | None:
    """Why ``tag`` is not a pretrained tag of ``architecture`` (with the known ones), or None."""
    import open_clip

    if open_clip.get_pretrained_cfg(architecture, tag):
        return None
    known = ", ".join(open_clip.list_pretrained_tags_by_model(architecture)) or "none"
    return f"'{tag}' is not a pretrained tag of {architecture}; known tags: {known}"


def check_checkpoint(architecture: str | None, path: Path, model_config: dict | None) -> None:
    """Build the model with the checkpoint's weights, as a worker will (refused: EngineError)."""
    from .loading import load_clip

    load_clip(architecture, checkpoint=path, model_config=model_config)


def weights_file(architecture: str, pretrained_tag: str, cache_dir) -> Path:
    """The weights file a pretrained tag or an hf-hub: name resolves to (from the cache; downloaded when online)."""
    from .loading import weights_file as resolve

    return resolve(architecture, pretrained_tag, cache_dir)


def hub_model_config(name: str, cache_dir) -> dict:
    """The open_clip config (``model_cfg``) of an hf-hub: model, from the cache (downloaded when online)."""
    from .loading import resolve_hf_hub

    config, _ = resolve_hf_hub(name, cache_dir)
    return config["model_cfg"]


@dataclass(frozen=True)
class SAETarget:
    """Where a registered SAE will be used: the model's width, its audited block, and how to name them."""

    width: int
    block: int
    where: str  # e.g. "block -1 of model 'tiny'"
    layer_name: str  # e.g. "the audited layer of model 'tiny' (layer -1)"
    max_latents: int


def check_sae(folder: Path, format: str, target: SAETarget):
    """(description, SAE) of the SAE files in ``folder``, or ``SAERefused`` naming the field at fault. Everything the config claims is checked before anything is allocated: its sizes, the
    weights' tensor shapes read from the file's header, the bound on the width, the model's width and audited
    block; only then are the weights read (and refused when not finite)."""
    from .sae_formats import check_fits, check_hook, check_weights, describe_sae, load_sae

    try:
        description = describe_sae(folder, format)
    except EngineError as exc:
        raise SAERefused("config", exc.message) from exc
    try:
        check_weights(folder, description)
        if description.n_latents > target.max_latents:
            raise SAERefused("config", f"the SAE has {description.n_latents} latents, over the limit of "
                                       f"{target.max_latents} (SAE_MAX_LATENTS)")
        check_fits(description, target.width, target.where)
        check_hook(description, target.block, target.layer_name)
        return description, load_sae(folder, format)
    except SAERefused:
        raise
    except EngineError as exc:
        raise SAERefused("weights", exc.message) from exc


class SAERefused(EngineError):
    """An SAE refused at registration, with the form field its problem belongs to."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_probe(path: Path, *, class_names: list | None, normalization: str | None, embed_dim: int):
    """The probe in ``path`` (.npz or .safetensors), checked to read ``embed_dim``-wide embeddings."""
    from .heads import LinearProbe

    probe = LinearProbe.load(path, class_names=class_names or None, normalization=normalization or None)
    probe.check_fits(embed_dim)
    return probe
