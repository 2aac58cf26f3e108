"""The two classifiers whose predictions are attributed: a linear probe and zero-shot prompts.

Both map the raw image embedding ``f`` [batch, embed_dim] (the output of the
vision tower's projection, before any normalization) to one score per class.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import jsonsafe
from .errors import EngineError

NORMALIZATIONS = ("l2", "none")


class Head(nn.Module):
    """y = head(f): scores [batch, classes] from raw image embeddings."""

    class_names: list[str]

    def directions(self) -> Tensor:
        """[classes, embed_dim]: the direction each class reads in the embedding (for Logit Lens)."""
        raise NotImplementedError


class LinearProbe(Head):
    """``y_c = w_c . g(f) + b_c`` with ``g`` the normalization the probe was trained with.

    ``g`` is ``f / ||f||`` ("l2") or the identity ("none"), optionally followed
    by standardization ``(. - mean) / scale`` as scikit-learn's StandardScaler
    does. A binary probe (one weight row, two class names) is expanded to two
    scores ``-s`` and ``+s`` so the argmax gives scikit-learn's prediction and
    each class has its own evidence to attribute. Such a probe remembers it
    came as one row (:attr:`stored_rows`) and is saved as one row again.
    """

    def __init__(self, weight, bias, class_names: Sequence[str], normalization: str = "l2",
                 mean=None, scale=None):
        super().__init__()
        weight = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
        bias = torch.as_tensor(np.asarray(bias), dtype=torch.float32).reshape(-1)
        class_names = [str(c) for c in class_names]
        if weight.ndim != 2:
            raise EngineError(f"probe weight must be a matrix [classes, embed_dim], got shape {list(weight.shape)}")
        if len(class_names) != len(set(class_names)):
            raise EngineError("probe class names must be distinct")
        if len(class_names) < 2:
            raise EngineError("a probe needs at least two classes")
        one_row = weight.shape[0] == 1 and len(class_names) == 2 and bias.numel() == 1
        if weight.shape[0] == 1 and len(class_names) == 2:
            weight = torch.cat([-weight, weight])
            bias = torch.cat([-bias, bias]) if bias.numel() == 1 else bias
        if weight.shape[0] != len(class_names):
            raise EngineError(f"probe has {weight.shape[0]} weight rows but {len(class_names)} class names")
        if bias.numel() != weight.shape[0]:
            raise EngineError(f"probe bias has {bias.numel()} entries, expected {weight.shape[0]}")
        if normalization not in NORMALIZATIONS:
            raise EngineError(f"probe normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        dim = weight.shape[1]
        mean_t = None if mean is None else torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        scale_t = None if scale is None else torch.as_tensor(np.asarray(scale), dtype=torch.float32).reshape(-1)
        for name, t in (("mean", mean_t), ("scale", scale_t)):
            if t is not None and t.numel() != dim:
                raise EngineError(f"probe {name} has {t.numel()} entries, expected {dim} (the weight width)")
        for name, t in (("weight", weight), ("bias", bias), ("mean", mean_t), ("scale", scale_t)):
            if t is not None and not torch.isfinite(t).all():
                raise EngineError(f"probe {name} contains NaN or infinite values")
        if scale_t is not None and (scale_t <= 0).any():
            raise EngineError("probe scale must be positive")
        self.class_names = class_names
        self.normalization = normalization
        self.stored_rows = 1 if one_row else weight.shape[0]  # rows of the file it came from (and is saved as)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("mean", mean_t if mean_t is not None else torch.zeros(dim))
        self.register_buffer("scale", scale_t if scale_t is not None else torch.ones(dim))

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def features(self, f: Tensor) -> Tensor:
        if self.normalization == "l2":
            f = F.normalize(f, dim=-1)
        return (f - self.mean.to(f.dtype)) / self.scale.to(f.dtype)

    def forward(self, f: Tensor) -> Tensor:  # [batch, embed_dim] -> [batch, classes]
        return self.features(f) @ self.weight.to(f.dtype).T + self.bias.to(f.dtype)

    def directions(self) -> Tensor:
        return self.weight / self.scale

    def check_fits(self, embed_dim: int) -> None:
        if self.embed_dim != embed_dim:
            raise EngineError(f"the probe reads {self.embed_dim}-dimensional embeddings but the model produces "
                              f"{embed_dim}-dimensional ones; train the probe on this model's image embeddings")

    def with_weights(self, weight, bias) -> "LinearProbe":
        """A probe of this one's format (classes, normalization, mean, scale, stored rows) reading ``weight``
        [classes, embed_dim] and ``bias`` [classes], given in the expanded form :meth:`forward` uses.

        For a probe stored as one row the rows must be ``[-w, w]`` and ``[-b, b]``; it keeps ``w`` and ``b``.
        """
        weight = torch.as_tensor(weight).detach().cpu().float()
        bias = torch.as_tensor(bias).detach().cpu().float().reshape(-1)
        if tuple(weight.shape) != tuple(self.weight.shape) or bias.numel() != self.bias.numel():
            raise EngineError(f"new probe weights must have this probe's shape {list(self.weight.shape)} and "
                              f"{self.bias.numel()} biases, got {list(weight.shape)} and {bias.numel()}")
        if self.stored_rows == 1:
            if not (torch.allclose(weight[0], -weight[1], atol=1e-6) and torch.allclose(bias[0], -bias[1], atol=1e-6)):
                raise EngineError("a binary probe stored as one row needs new weights of the form [-w, w], [-b, b]")
            weight, bias = weight[1:], bias[1:]
        return LinearProbe(weight, bias, self.class_names, self.normalization, self.mean.detach().cpu(),
                           self.scale.detach().cpu())

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        weight, bias = self.weight.detach().cpu(), self.bias.detach().cpu()
        if self.stored_rows == 1:  # the shape it came in: scikit-learn's coef_ [1, embed_dim] for two classes
            weight, bias = weight[1:], bias[1:]
        arrays = {"weight": weight.numpy(), "bias": bias.numpy(), "mean": self.mean.detach().cpu().numpy(),
                  "scale": self.scale.detach().cpu().numpy()}
        if path.suffix == ".npz":
            np.savez(path, classes=np.array(self.class_names), normalization=np.array(self.normalization), **arrays)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
                      metadata={"classes": json.dumps(self.class_names), "normalization": self.normalization})
        else:
            raise EngineError("probes are saved as .npz or .safetensors")

    @classmethod
    def load(cls, path: str | os.PathLike, class_names: Sequence[str] | None = None,
             normalization: str | None = None) -> "LinearProbe":
        """Read a probe from ``.npz`` (never unpickled) or ``.safetensors``.

        Arrays: ``weight`` (or scikit-learn's ``coef``) [classes or 1, embed_dim],
        ``bias`` (or ``intercept``), optional ``mean``/``scale``; class names and
        normalization come from the file (``classes``, ``normalization``) or the arguments.
        """
        path = Path(path)
        if path.suffix == ".npz":
            arrays, meta = _read_npz_probe(path)
        elif path.suffix == ".safetensors":
            arrays, meta = _read_safetensors_probe(path)
        else:
            raise EngineError(f"probe {path.name}: only .npz and .safetensors probes are accepted")
        weight = arrays.get("weight", arrays.get("coef"))
        bias = arrays.get("bias", arrays.get("intercept"))
        if weight is None or bias is None:
            raise EngineError(f"probe {path.name} needs arrays 'weight' (or 'coef') and 'bias' (or 'intercept'); "
                              f"found {', '.join(sorted(arrays)) or 'none'}")
        for name in ("weight", "bias", "mean", "scale"):
            arr = arrays.get(name, weight if name == "weight" else bias if name == "bias" else None)
            if arr is not None and arr.dtype.kind not in "fiu":
                raise EngineError(f"probe {name} must hold real numbers, got dtype {arr.dtype}")
        names = list(class_names) if class_names is not None else meta.get("classes")
        if not names:
            raise EngineError(f"probe {path.name} names no classes; store a 'classes' array or give class names")
        return cls(weight, bias, names, normalization or meta.get("normalization", "l2"),
                   arrays.get("mean"), arrays.get("scale"))


def _read_npz_probe(path: Path) -> tuple[dict, dict]:
    """A probe's arrays and its metadata (``classes``, ``normalization``) from an .npz, never unpickled."""
    meta: dict = {}
    try:
        with path.open("rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise EngineError(f"probe {path.name} cannot be read: {exc}") from exc
    if not is_zip:
        raise EngineError(f"probe {path.name} is not a readable .npz file (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:
        raise EngineError(f"probe {path.name} holds Python objects (pickled arrays), which are refused; "
                          "save plain numeric arrays and a string array of class names") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise EngineError(f"probe {path.name} is not a readable .npz file: {exc}") from exc
    if "classes" in arrays:
        classes = arrays.pop("classes")
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise EngineError(f"probe {path.name}: 'classes' must be a 1-d array of class-name strings")
        meta["classes"] = [str(c) for c in classes.tolist()]
    if "normalization" in arrays:
        meta["normalization"] = str(arrays.pop("normalization"))
    return arrays, meta


def _read_safetensors_probe(path: Path) -> tuple[dict, dict]:
    """A probe's arrays (floats as float32) and its metadata (``classes``, ``normalization``) from a .safetensors."""
    from safetensors import SafetensorError, safe_open

    meta: dict = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            arrays = {k: fh.get_tensor(k).float().numpy() if fh.get_tensor(k).is_floating_point()
                      else fh.get_tensor(k).numpy() for k in fh.keys()}
            file_meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise EngineError(f"probe {path.name} is not a readable safetensors file: {exc}") from exc
    if "classes" in file_meta:
        try:
            classes = jsonsafe.loads(file_meta["classes"], what="the probe's classes")
        except jsonsafe.JSONLimitError:
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise EngineError(f"probe {path.name}: the 'classes' metadata must be a JSON list of "
                              "class-name strings")
        meta["classes"] = classes
    if "normalization" in file_meta:
        meta["normalization"] = file_meta["normalization"]
    return arrays, meta


class ZeroShotHead(Head):
    """``y_c = cos(f, t_c)`` with ``t_c`` the normalized mean embedding of class c's prompts."""

    def __init__(self, text_embeddings: Tensor, class_names: Sequence[str]):
        super().__init__()
        if text_embeddings.shape[0] != len(class_names):
            raise EngineError("one text embedding per class is needed")
        self.class_names = list(class_names)
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(f, dim=-1) @ self.text.to(f.dtype).T

    def directions(self) -> Tensor:
        return self.text

    @classmethod
    def build(cls, bundle, class_names: Sequence[str], templates: Sequence[str],
              class_prompts: dict | None = None) -> "ZeroShotHead":
        class_prompts = class_prompts or {}
        embeddings = torch.stack([
            encode_concepts(bundle, class_prompts.get(name) or [name], templates).mean(0)
            for name in class_names])
        return cls(embeddings, class_names)


class Centred(Head):
    """A head's scores minus their mean over the classes: ``y_c - mean_k y_k``.

    This is the class's evidence against the others (``(C-1)/C`` times its
    margin over the mean of the other classes) and puts every head on one
    footing. A zero-shot cosine has a large part every class shares (each class
    prompt says "a lesion"); attributing the raw cosine hands that shared part,
    mostly negative through the norm, to every latent. Predictions (argmax)
    and a binary probe's ``-s``/``+s`` scores are unchanged.
    """

    def __init__(self, head: Head):
        super().__init__()
        self.head = head
        self.class_names = list(head.class_names)

    def forward(self, f: Tensor) -> Tensor:
        y = self.head(f)
        return y - y.mean(-1, keepdim=True)

    def directions(self) -> Tensor:
        d = self.head.directions()
        return d - d.mean(0, keepdim=True)


@torch.inference_mode()
def encode_concepts(bundle, concepts: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> Tensor:
    """[len(concepts), embed_dim] normalized text embeddings, each averaged over the templates."""
    model, tokenizer = bundle.model, bundle.tokenizer
    device = next(model.parameters()).device
    texts = [t.format(c) if c else t.replace("{}", "").strip() for c in concepts for t in templates]
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(chunks).reshape(len(concepts), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).cpu()
