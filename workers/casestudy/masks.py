"""Ground truth for heatmaps: the artifacts' pixel masks of a case's splits, and how much of a latent's heatmap
falls on them.

A split written by ``images.write_split`` keeps its masks in ``masks/``. A split cached before masks existed
gets them back by rendering it again (:func:`regenerate_masks`): ``write_split`` draws every image, in order,
from one generator seeded by the case, so the same seed and labels.csv give the same images and their masks.
Every re-rendered image is compared with the stored PNG pixel for pixel, so a wrong seed fails loudly instead of
writing masks of other images.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .check import split_images
from .images import ARTIFACTS, mask_path, read_masks, read_split, render_with_masks, samples_of, write_masks

# The generator seed of each split ``build.build_case`` writes, as [case seed, stream]; regenerate_masks checks
# every image against it, so a change in build.py shows up as a refusal here, not as wrong masks.
SPLIT_STREAMS = {"audit": 6, "probe-train": 4, "reference-train": 4, "pretrain": 2}


def has_masks(folder: str | os.PathLike) -> bool:
    rows = read_split(Path(folder))
    return all(mask_path(Path(folder), r["image"]).is_file() for r in rows)


def regenerate_masks(folder: str | os.PathLike, rng: np.random.Generator) -> int:
    """Write the masks of a split written before ``write_split`` wrote them; ``rng`` is the generator the split
    was rendered from, freshly seeded. Returns the number of images; raises ValueError (and writes nothing) when
    an image rendered again differs from the stored one."""
    folder = Path(folder)
    rows = read_split(folder)
    found = []
    for row, sample in zip(rows, samples_of(rows)):
        img, masks = render_with_masks(sample, rng)
        with Image.open(folder / row["image"]) as stored:
            if not np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(img)):
                raise ValueError(f"{row['image']} of {folder} is not what this generator and seed render, so its "
                                 "masks cannot be recovered; rebuild the case (delete its folder under the "
                                 "case-study cache and build it again)")
        found.append((row["image"], masks))
    for name, masks in found:
        write_masks(folder, name, masks)
    return len(rows)


def ensure_masks(case: dict, split: str = "audit") -> Path:
    """The folder of one of ``case``'s splits, with its masks (regenerated once if it was cached without)."""
    folder = Path(case["audit_dir"] if split == "audit" else case[f"{split.replace('-', '_')}_dir"])
    if not has_masks(folder):
        regenerate_masks(folder, np.random.default_rng([case["config"]["seed"], SPLIT_STREAMS[split]]))
    return folder


def artifact_latents(result, artifact: str) -> list[int]:
    """The latents an audit names as ``artifact``: labelled "with <artifact>", or in a flag with that label
    (with every latent its concept is spread over)."""
    label = f"with {artifact}"
    latents = {int(entry["latent"]) for entry in _get(result, "latents") if entry["label"] == label}
    for flag in _get(result, "flags"):
        if flag["label"] == label:
            latents.update(int(i) for i in flag.get("concept_latents") or [flag["latent"]])
    return sorted(latents)


def _get(result, key: str):
    return result[key] if isinstance(result, dict) else getattr(result, key)


def artifact_heatmap_mass(case: dict, result, workdir: str | os.PathLike, *, batch_size: int = 16,
                          artifacts: tuple[str, ...] = ARTIFACTS,
                          latents: dict[str, list[int]] | None = None, method: str | None = None,
                          cells: int | None = None, blocks: int | None = None) -> dict[str, dict]:
    """How much of their heatmaps the latents of each artifact put on that artifact's pixels.

    ``result`` is the audit of ``case`` run with ``workdir`` (its SAE is read from ``workdir/sae``), as a result
    or its dict. For every latent :func:`artifact_latents` gives (or ``latents`` names: artifact -> latents, e.g.
    the flags a ground truth ties to it when the audit left them unlabelled; ``artifacts`` is then not read) and
    each of its reference images that shows the artifact, from the map (``workers.engine.heatmaps.mass_on_mask``):

    - ``mass``: the share of the map's mass on the artifact's pixels;
    - ``chance``: the artifact's share of the image, what a map spread evenly scores;
    - ``ideal``: what a map equal to the artifact's coverage of each patch scores, the most a patch-level map
      can be expected to score (a thin artifact fills no patch, so its ideal is well below 1); always at the
      model's patch grid, also for a finer map;
    - ``peak_on_artifact``: whether the map's largest cell touches the artifact (the pointing game);
    - ``touched``: the share of the map's mass on the patches the artifact touches at all, however little, and
      ``touched_chance``, those patches' share of the grid: a coarser reading that credits a whole patch.

    Per artifact: these as means over the maps, ``n_images`` (maps counted), ``latents``, ``per_latent``
    (latent -> the same means and count), ``n_without`` (references that do not show the artifact, not counted)
    and ``n_empty`` (maps without positive mass, not counted), ``seconds_per_map`` (the maps' wall time over
    their number). Artifacts without latents are absent. ``method``, ``cells`` and ``blocks``: how the maps
    are made (``workers.engine.heatmaps.latent_heatmaps``; by default the audit's own options).
    """
    import time

    import torch

    from workers.engine.heatmaps import DEFAULT_BLOCKS, DEFAULT_CELLS, DEFAULT_METHOD, heatmaps_for
    from workers.engine.loading import load_clip
    from workers.engine.sae import TopKSAE

    folder = ensure_masks(case, "audit")
    config = _get(result, "config")
    images = split_images(folder)
    index = {key: i for i, key in enumerate(images.ids)}
    entries = {int(e["latent"]): e for e in _get(result, "latents")}
    chosen = ({a: sorted({int(i) for i in named}) for a, named in latents.items()} if latents is not None
              else {a: artifact_latents(result, a) for a in artifacts})
    chosen = {a: measured for a, measured in chosen.items() if measured}
    wanted: dict[int, list[int]] = {}
    for measured in chosen.values():
        for latent in measured:
            wanted[latent] = [index[key] for key in entries[latent]["references"]]
    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    sae = TopKSAE.load(Path(workdir) / "sae")
    method = method or config.get("heatmap_method", DEFAULT_METHOD)
    cells = cells or config.get("heatmap_cells", DEFAULT_CELLS)
    blocks = blocks or config.get("heatmap_blocks", DEFAULT_BLOCKS)
    started = time.perf_counter()
    with torch.no_grad():
        maps = heatmaps_for(bundle, sae, config["layer"], config["token"], images.with_preprocess(bundle.preprocess),
                            wanted, batch_size=batch_size, method=method, cells=cells, blocks=blocks)
    per_map = (time.perf_counter() - started) / max(1, sum(len(rows) for rows in wanted.values()))
    masks = {i: read_masks(folder, images.ids[i]) for rows in wanted.values() for i in rows}
    patches = tuple(int(g) for g in bundle.model.visual.grid_size)
    return {artifact: {**_artifact_mass(artifact, measured, maps, masks, patches), "seconds_per_map": per_map}
            for artifact, measured in chosen.items()}


def direction_heatmap_mass(case: dict, result, workdir: str | os.PathLike, artifact: str, *, method: str,
                           cells: int, blocks: int, n_images: int = 48) -> dict | None:
    """The same figures as :func:`artifact_heatmap_mass` for a detector that means only ``artifact``: a logistic
    regression of the artifact's presence on the audited layer's CLS activations (``workdir/activations``), put
    in place of a latent (a one-latent SAE whose encoder is the regression) and mapped on the ``n_images``
    audited images it scores highest. What the method reaches with a pure detector is the ceiling a latent that
    means the artifact alone would give; the gap to the latents' own figure is the latents' mixing, not the
    method's. None for a spatial SAE's audit (its maps are its activations)."""
    import time

    import torch
    from sklearn.linear_model import LogisticRegression

    from workers.engine.activations import ActivationStore
    from workers.engine.heatmaps import latent_heatmaps
    from workers.engine.hooks import select_tokens
    from workers.engine.loading import load_clip
    from workers.engine.sae import TopKSAE

    config = _get(result, "config")
    if config["token"] != "cls":
        return None
    folder = ensure_masks(case, "audit")
    images = split_images(folder)
    store = ActivationStore(Path(workdir) / "activations")
    cls = select_tokens(store.read(0, store.n)[0], "cls").float().numpy()
    present = np.array([artifact in read_masks(folder, key) for key in images.ids])
    fit = LogisticRegression(max_iter=2000).fit(cls, present)
    detector = TopKSAE(cls.shape[1], 1, 1)
    with torch.no_grad():
        detector.W_enc[0] = torch.as_tensor(fit.coef_[0], dtype=torch.float32)
        detector.b_enc[0] = float(fit.intercept_[0])
    top = np.argsort(-(cls @ fit.coef_[0]))[:n_images]
    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    preprocessed = images.with_preprocess(bundle.preprocess)
    pixels = torch.stack([preprocessed[int(i)][0] for i in top])
    started = time.perf_counter()
    grids = latent_heatmaps(bundle.model.visual, detector.requires_grad_(False), config["layer"], "cls", pixels, [0],
                            method=method, cells=cells, blocks=blocks)[:, 0].numpy()
    per_map = (time.perf_counter() - started) / len(top)
    maps = {0: {int(i): grid for i, grid in zip(top, grids)}}
    masks = {int(i): read_masks(folder, images.ids[int(i)]) for i in top}
    patches = tuple(int(g) for g in bundle.model.visual.grid_size)
    return {**_artifact_mass(artifact, [0], maps, masks, patches), "seconds_per_map": per_map}


def _artifact_mass(artifact: str, measured: list[int], maps: dict, masks: dict, patches: tuple[int, int]) -> dict:
    """One artifact's figures over the maps of its latents (``maps``: latent -> image -> map) that show it;
    ``patches`` is the model's patch grid, where the ideal is measured."""
    from workers.engine.heatmaps import mass_on_mask

    per_latent, rows_all = {}, []
    n_without = n_empty = 0
    for latent in measured:
        rows = []
        for i, grid in maps[latent].items():
            if artifact not in masks[i]:
                n_without += 1
                continue
            mask = masks[i][artifact]
            mass, chance = mass_on_mask(grid, mask)
            if math.isnan(mass):
                n_empty += 1
                continue
            rows.append(_map_row(grid, mask, mass, chance, patches))
        per_latent[latent] = _summary(rows)
        rows_all += rows
    return {**_summary(rows_all), "latents": measured, "per_latent": per_latent,
            "n_without": n_without, "n_empty": n_empty}


def _map_row(grid: np.ndarray, mask: np.ndarray, mass: float, chance: float,
             patches: tuple[int, int]) -> tuple[float, ...]:
    """One map's figures, in the order of ``_MEASURES``, given its ``mass`` and ``chance`` on ``mask``; the ideal
    at the patch grid ``patches``, the rest at the map's own grid."""
    from workers.engine.heatmaps import mask_coverage, mass_on_mask

    coverage = mask_coverage(mask, grid.shape)
    peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
    touched = coverage > 0
    ideal = mass_on_mask(mask_coverage(mask, patches), mask)[0]
    return (mass, chance, ideal, float(touched[peak]),
            float(grid[touched].sum() / grid.sum()), float(touched.mean()))


_MEASURES = ("mass", "chance", "ideal", "peak_on_artifact", "touched", "touched_chance")


def _summary(rows: list[tuple[float, ...]]) -> dict:
    if not rows:
        return {**dict.fromkeys(_MEASURES), "n_images": 0}
    means = np.asarray(rows).mean(0)
    return {**{name: float(v) for name, v in zip(_MEASURES, means)}, "n_images": len(rows)}


def format_mass_table(table: dict[str, dict]) -> str:
    """One line per artifact: mass on the artifact vs chance and ideal, the pointing game, mass on the patches it
    touches vs their share, over how many maps, of which latents."""
    lines = [f"{'artifact':<14} {'mass':>6} {'chance':>7} {'ideal':>6} {'peak on':>8} {'touched':>8} {'(share)':>8} "
             f"{'maps':>5}  latents (mass each)"]
    for artifact, row in table.items():
        each = ", ".join(f"{latent}: {_fmt(v['mass'], 2)}" for latent, v in row["per_latent"].items())
        lines.append(f"{artifact:<14} {_fmt(row['mass']):>6} {_fmt(row['chance']):>7} {_fmt(row['ideal']):>6} "
                     f"{_fmt(row['peak_on_artifact'], 2):>8} {_fmt(row['touched']):>8} "
                     f"{_fmt(row['touched_chance']):>8} {row['n_images']:>5}  {each}")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
