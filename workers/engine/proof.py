"""The proof that a correction worked: old against new probe, overall, per class and on the slices a shortcut hurts.

:func:`compare_probes` is the table (accuracy of each probe on each row, with a reference probe how much of the gap
to it was closed); :func:`harm_slices` names the rows a correction is proven on, from the flags it answers, the
images the shortcut's latents are active on and the images' metadata.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .directions import ShortcutDirections
from .errors import EngineError
from .harm import MAX_SLICE_VALUES, column_values
from .heads import LinearProbe

def gap_closed(old: float | None, new: float | None, reference: float | None) -> float | None:
    """How much of the way from the old accuracy to the reference's the new one went (1: all of it); None where
    there was no gap to close."""
    if old is None or new is None or reference is None or reference - old <= 1e-12:
        return None
    return (new - old) / (reference - old)


@torch.no_grad()
def _predict(probe: LinearProbe, embeddings: Tensor, batch_size: int = 4096) -> np.ndarray:
    device = probe.weight.device
    return torch.cat([probe(embeddings[lo:lo + batch_size].float().to(device)).argmax(1).cpu()
                      for lo in range(0, embeddings.shape[0], batch_size)]).numpy()


def compare_probes(old: LinearProbe, new: LinearProbe, embeddings: Tensor, labels, slices: dict | None = None,
                   reference: LinearProbe | None = None) -> dict:
    """The proof table: accuracy of the old and the new probe overall, per class and on each slice.

    ``embeddings`` [images, embed_dim] raw image embeddings (what a probe reads), ``labels`` [images] class
    indices, ``slices`` name -> boolean mask [images] (:func:`harm_slices`). Every row is ``{"n", "old", "new",
    "change"}`` (accuracies None on an empty row); with a ``reference`` probe (e.g. one trained without the
    correlation) also ``"reference"`` and ``"gap_closed"`` (:func:`gap_closed`).
    """
    if list(old.class_names) != list(new.class_names):
        raise EngineError("the old and the new probe name different classes")
    embeddings = torch.as_tensor(embeddings).detach().cpu()
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise EngineError(f"compare_probes needs one label per embedding: {list(embeddings.shape)} embeddings, "
                          f"{len(labels)} labels")
    for probe in (old, new) + ((reference,) if reference is not None else ()):
        probe.check_fits(embeddings.shape[1])
    heads = {"old": old, "new": new, **({"reference": reference} if reference is not None else {})}
    predicted = {h: _predict(p, embeddings) for h, p in heads.items()}
    correct = {h: pred == labels for h, pred in predicted.items()}

    def row(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        out: dict = {"n": n}
        for h in heads:
            out[h] = float(correct[h][mask].mean()) if n else None
        out["change"] = None if not n else out["new"] - out["old"]
        if reference is not None:
            out["gap_closed"] = gap_closed(out["old"], out["new"], out["reference"])
        return out

    everything = np.ones(len(labels), bool)
    table = {"class_names": list(old.class_names), "overall": row(everything),
             "per_class": {name: row(labels == c) for c, name in enumerate(old.class_names)}, "slices": {},
             "changed_predictions": int((predicted["old"] != predicted["new"]).sum())}
    for name, mask in (slices or {}).items():
        mask = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
        if mask.shape != (len(labels),):
            raise EngineError(f"slice {name!r} has {mask.size} entries, expected one per image ({len(labels)})")
        table["slices"][name] = row(mask)
    return table


def _metadata_indicators(metadata: dict, n: int) -> dict[str, np.ndarray]:
    """Both sides of each metadata column: ``col=1``/``col=0`` for a 0/1 column, ``col=v``/``col!=v`` otherwise
    (empty cells on neither side; a column with more than MAX_SLICE_VALUES values is skipped)."""
    out = {}
    for column, values in metadata.items():
        values, distinct = column_values(values)
        if len(values) != n:
            raise EngineError(f"metadata column {column!r} has {len(values)} values, expected one per image ({n})")
        if len(distinct) > MAX_SLICE_VALUES:
            continue
        known = values != ""
        if set(distinct) <= {"0", "1"}:
            out[f"{column}=1"], out[f"{column}=0"] = values == "1", values == "0"
        else:
            for v in distinct:
                out[f"{column}={v}"], out[f"{column}!={v}"] = values == v, known & (values != v)
    return out


def harm_slices(shortcut: ShortcutDirections, labels, class_names: Sequence[str], flags: Sequence[tuple[str, int]],
                metadata: dict | None = None) -> dict[str, np.ndarray]:
    """The slices a correction is proven on, for the flags ``(class name, latent)`` it answers.

    Per flag, the harm table's four sides: ``"melanoma, latent 12 active"`` / ``"... inactive"`` and the same
    for the other images, named by the other class for a binary probe (``"nevus, latent 12 active"``) and
    ``"not melanoma, ..."`` otherwise. Per metadata column (``{column: [value per image]}``), both of its sides
    overall and within each flagged class and the others (``"melanoma, ruler=0"``, ``"nevus, ruler=1"``).
    Activity is ``shortcut.active``: the images the directions were measured on.
    """
    if shortcut.active is None:
        raise EngineError("these shortcut directions were not measured on images, so no latent's activity is known")
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    active = shortcut.active.numpy().astype(bool)
    if active.shape[0] != len(labels):
        raise EngineError(f"the shortcut was measured on {active.shape[0]} images but {len(labels)} labels are given")
    names = list(class_names)

    def others(class_name: str) -> str:
        return [n for n in names if n != class_name][0] if len(names) == 2 else f"not {class_name}"

    out: dict[str, np.ndarray] = {}
    flagged_classes: list[str] = []
    for class_name, latent in flags:
        if class_name not in names:
            raise EngineError(f"flag class {class_name!r} is not a class of the probe ({', '.join(names)})")
        own = labels == names.index(class_name)
        on = shortcut.activity(latent).numpy().astype(bool)
        out[f"{class_name}, latent {latent} active"] = own & on
        out[f"{class_name}, latent {latent} inactive"] = own & ~on
        out[f"{others(class_name)}, latent {latent} active"] = ~own & on
        out[f"{others(class_name)}, latent {latent} inactive"] = ~own & ~on
        if class_name not in flagged_classes:
            flagged_classes.append(class_name)
    for indicator, mask in _metadata_indicators(metadata or {}, len(labels)).items():
        out[indicator] = mask
        for class_name in flagged_classes:
            own = labels == names.index(class_name)
            out[f"{class_name}, {indicator}"] = own & mask
            out[f"{others(class_name)}, {indicator}"] = ~own & mask
    return out
