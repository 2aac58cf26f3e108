"""Finding a model's weights on this machine or on the Hugging Face hub, downloading them only when online.

Two kinds of registration name their weights rather than bring a file: a pretrained tag of an open_clip
architecture (:func:`resolve_pretrained`) and an open_clip model published on the hub, ``hf-hub:ORG/NAME``
(:func:`resolve_hf_hub`). Both look in the local open_clip / Hugging Face cache first; offline
(:func:`is_offline`) and uncached fails at once, saying how to provide the files.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from . import jsonsafe
from .errors import EngineError
from .model_config import _open_clip

_OFFLINE_PROBE_HOST = ("huggingface.co", 443)
_OFFLINE_PROBE_SECONDS = 3.0


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


# --------------------------------------------------------------------------- hf-hub models

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
