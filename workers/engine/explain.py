"""Where in the image: heatmaps for the images a report shows, and the explanation of one image.

``attach_flag_heatmaps`` gives each flag a map (``workers.engine.heatmaps``) of where its latent is active on
each of its reference images and most affected images: only the images the report shows, so the cost is bounded
by ``flags x (references shown + top_images_per_flag)`` images, each run once for all of its latents.

``explain_image`` answers "why was this image called melanoma?" for one image and a finished audit's SAE: both
heads' predictions, the latents with the largest relevance for and against each class (act x grad, the audit's
own attribution), their labels and flags, a heatmap for each, and what each head predicts once the flagged
latents are removed.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .context import AuditContext
from .data import ImageSet
from .errors import EngineError
from .heatmaps import encode_map, heatmaps_for, latent_heatmaps
from .hooks import capture_residual, select_tokens
from .interventions import shifted_outputs

REFERENCES_SHOWN = 12  # reference images a flag card shows (the report's ``_flag_card``): the ones given maps


def attach_flag_heatmaps(ctx: AuditContext, images: ImageSet, flags: list[dict], batch_size: int = 16) -> None:
    """Set ``flag["heatmaps"] = {image id: encoded map}`` for each flag's references and top images."""
    if not flags:
        return
    index = {key: i for i, key in enumerate(images.ids)}
    wanted: dict[int, set[int]] = {}
    for flag in flags:
        keys = list(flag.get("references", []))[:REFERENCES_SHOWN] + [t["image"] for t in flag.get("top_images", [])]
        wanted.setdefault(int(flag["latent"]), set()).update(index[k] for k in keys if k in index)
    config = ctx.config
    maps = heatmaps_for(ctx.bundle, ctx.sae, config.layer, config.token, images,
                        {latent: sorted(rows) for latent, rows in wanted.items()}, device=ctx.device,
                        batch_size=batch_size, method=config.heatmap_method, cells=config.heatmap_cells,
                        blocks=config.heatmap_blocks)
    for flag in flags:
        per_image = maps.get(int(flag["latent"]), {})
        flag["heatmaps"] = {images.ids[i]: encode_map(grid) for i, grid in sorted(per_image.items())}


def flag_image_keys(flags: Sequence[dict]) -> list[str]:
    """The image ids the flags' heatmaps need (a sharded worker downloads only these)."""
    keys: dict[str, None] = {}
    for flag in flags:
        for key in list(flag.get("references", []))[:REFERENCES_SHOWN] + [t["image"] for t in flag.get("top_images", [])]:
            keys[key] = None
    return list(keys)


@torch.no_grad()
def _residual(visual, layer: int, pixels: Tensor) -> Tensor:
    with capture_residual(visual, layer) as store:
        visual(pixels)
    return store["h"]


def explain_image(ctx: AuditContext, pixels: Tensor, *, flags: Sequence[dict] = (), labels: dict | None = None,
                  top_n: int = 5) -> dict:
    """Explain one image (``pixels`` [3, H, W] or [1, 3, H, W], with the model's preprocessing).

    ``flags``: the audit's flags (dicts with head, class_name, latent, label); ``labels``: latent -> label.
    Returns, per head: the class probabilities and the prediction, per class the ``top_n`` latents for and
    against it (relevance = act x grad of the class's centred score, the audit's attribution), each latent's
    label, whether and for which classes it is flagged, its activation and its heatmap, and the prediction with
    the head's flagged latents that are active here removed.
    """
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4 or pixels.shape[0] != 1:
        raise EngineError(f"explain one image: pixels must be [3, H, W], got shape {list(pixels.shape)}")
    config, sae, device = ctx.config, ctx.sae, ctx.device
    visual = ctx.bundle.model.visual
    pixels = pixels.to(device)
    acts = _residual(visual, config.layer, pixels)
    labels = labels or {}
    values, indices = sae.encode_sparse(select_tokens(acts, config.token))
    activation = torch.zeros(sae.n_latents, device=values.device)
    flat_v, flat_i = values.reshape(-1), indices.reshape(-1)
    activation.scatter_reduce_(0, flat_i, flat_v, reduce="amax")  # a spatial latent: its largest patch value
    flagged: dict[str, dict[int, list[str]]] = {}
    for f in flags:
        flagged.setdefault(f["head"], {}).setdefault(int(f["latent"]), []).append(f["class_name"])

    out: dict = {"classes": list(ctx.class_names), "heads": {}}
    shown: set[int] = set()
    for head_name, centred in ctx.heads.items():
        out["heads"][head_name] = _explain_head(ctx, head_name, centred.head, acts, activation, labels,
                                                flagged.get(head_name, {}), top_n, shown)
    latents = sorted(shown)
    maps = (latent_heatmaps(visual, sae, config.layer, config.token, pixels, latents, method=config.heatmap_method,
                            cells=config.heatmap_cells, blocks=config.heatmap_blocks) if latents else None)
    out["heatmaps"] = {str(i): encode_map(maps[0, j].numpy()) for j, i in enumerate(latents)} if latents else {}
    out["heatmap_options"] = {"heatmap_method": config.heatmap_method, "heatmap_blocks": config.heatmap_blocks,
                              "heatmap_cells": config.heatmap_cells}
    return out


def _explain_head(ctx: AuditContext, head_name: str, raw, acts: Tensor, activation: Tensor, labels: dict,
                  flagged: dict[int, list[str]], top_n: int, shown: set[int]) -> dict:
    """One head's part of :func:`explain_image` (``raw``: the head; ``flagged``: its flagged latents -> classes);
    adds the latents it shows to ``shown``."""
    with torch.no_grad():
        scores = raw(ctx.tail(acts))[0]
    probs = scores.softmax(-1)
    relevance = ctx.methods[head_name]["act_grad"].attribute(acts)[0]  # [classes, n_latents]
    per_class = {}
    for c, name in enumerate(ctx.class_names):
        row = relevance[c]
        order = torch.argsort(row, descending=True)
        top_for = [int(i) for i in order[:top_n] if row[i] > 0]
        top_against = [int(i) for i in torch.flip(order, [0])[:top_n] if row[i] < 0]
        shown.update(top_for + top_against)
        per_class[name] = {
            "score": float(scores[c]), "probability": float(probs[c]),
            "for": [_latent_row(i, row, activation, labels, flagged) for i in top_for],
            "against": [_latent_row(i, row, activation, labels, flagged) for i in top_against]}
    active_flags = sorted(i for i in flagged if activation[i] > 0)
    without = None
    if active_flags:
        after = shifted_outputs(ctx.tail, ctx.sae, raw, acts, active_flags, token=ctx.config.token)[0]
        without = {"removed_latents": active_flags, "prediction": ctx.class_names[int(after.argmax())],
                   "probabilities": {n: float(p) for n, p in zip(ctx.class_names, after.softmax(-1))}}
        shown.update(active_flags)
    return {"prediction": ctx.class_names[int(probs.argmax())],
            "probabilities": {n: float(p) for n, p in zip(ctx.class_names, probs)},
            "classes": per_class, "without_flagged": without}


def _latent_row(i: int, relevance: Tensor, activation: Tensor, labels: dict, flagged: dict) -> dict:
    return {"latent": i, "relevance": float(relevance[i]), "activation": float(activation[i]),
            "label": labels.get(i, ""), "flagged_for": flagged.get(i, [])}
