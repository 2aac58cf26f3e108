"""Ground truth for heatmaps: the generator's artifact masks, and how much of the artifact latents' heatmaps lies
on them in the seed-0 case (issue 19).

The mask tests are fast; the case's are slow (the case is built once per machine, the audit takes a minute).
"""
import csv
import shutil

import numpy as np
import pytest
from scipy import ndimage

from workers.casestudy import images
from workers.casestudy.images import ARTIFACTS, TRANSLUCENT, Sample, read_masks, render, render_with_masks

ISSUE_TARGET = 0.6  # issue 19: the ruler latents' heatmaps put at least this share of their mass on the ruler


def _with_and_without(artifact: str, seed: int):
    """The same image rendered without and with ``artifact``: everything else draws the same random numbers."""
    label = images.CLASSES[seed % 2]
    plain = np.asarray(render(Sample(label, []), np.random.default_rng(seed))).astype(int)
    img, masks = render_with_masks(Sample(label, [artifact]), np.random.default_rng(seed))
    return np.abs(np.asarray(img).astype(int) - plain).max(-1), masks


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_a_mask_covers_the_pixels_its_artifact_changed(artifact):
    for seed in range(12):
        change, masks = _with_and_without(artifact, seed)
        mask = masks[artifact]
        assert mask.dtype == bool and mask.shape == (images.SIZE, images.SIZE)
        assert (change[mask] > 2).mean() >= 0.9, "the mask marks pixels the artifact did not touch"
        beyond = change[~ndimage.binary_dilation(mask)]  # resampling blurs an edge by a pixel
        if artifact in TRANSLUCENT:  # counted from half strength: weaker blending lies outside, and is weaker
            assert beyond.mean() < change[mask].mean() / 2
        else:
            assert beyond.max() <= 20, "the artifact changed pixels its mask misses"


def test_masks_draw_no_random_numbers_and_leave_the_image_unchanged():
    sample = Sample("melanoma", list(ARTIFACTS))
    rng_plain, rng_masked = np.random.default_rng(3), np.random.default_rng(3)
    img, masks = render_with_masks(sample, rng_masked)
    # render() is the image the splits were written with before masks existed
    assert np.array_equal(np.asarray(img), np.asarray(render(sample, rng_plain)))
    assert rng_plain.random() == rng_masked.random()
    assert set(masks) == set(ARTIFACTS) and all(m.any() for m in masks.values())


def test_an_opaque_artifact_drawn_later_takes_its_pixels_out_of_earlier_masks():
    def inside(mask):  # a mask's pixels away from its edge, where the pixel is the artifact's alone
        return ndimage.binary_erosion(mask)

    for seed in range(40):
        masks = render_with_masks(Sample("nevus", ["a ruler", "a sticker", "a band-aid", "a stain"]),
                                  np.random.default_rng(seed))[1]
        # drawn in the order: a band-aid, a ruler, a stain, a sticker (the stain is translucent)
        assert not (masks["a band-aid"] & inside(masks["a ruler"])).any()
        assert not (masks["a ruler"] & inside(masks["a sticker"])).any()
        assert not (masks["a stain"] & inside(masks["a sticker"])).any()


def test_a_written_split_has_the_masks_of_its_images(tmp_path):
    samples = [Sample("melanoma", ["a ruler", "hair"]), Sample("nevus", [])]
    images.write_split(tmp_path, samples, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for row, sample in zip(images.read_split(tmp_path), samples):
        expected = render_with_masks(sample, rng)[1]
        masks = read_masks(tmp_path, row["image"])
        assert set(masks) == set(sample.artifacts)
        assert all(np.array_equal(masks[a], expected[a]) for a in masks)


# --------------------------------------------------------------------------- the seed-0 case

@pytest.fixture(scope="module")
def case():
    from workers.casestudy.build import CaseConfig, build_case, default_cache

    return build_case(default_cache(), CaseConfig(seed=0), log=lambda line: None)


def _head_of_split(case: dict, folder, n: int):
    """The first ``n`` images of the case's audit split, copied without masks: a split as cached before them."""
    source = case["audit_dir"]
    with open(f"{source}/labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))[:n + 1]
    (folder / "images").mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    for row in rows[1:]:
        shutil.copy(f"{source}/{row[0]}", folder / row[0])
    return folder


@pytest.mark.slow
def test_the_masks_of_a_split_cached_without_them_are_rendered_again_from_its_seed(case, tmp_path):
    from workers.casestudy.masks import SPLIT_STREAMS, has_masks, regenerate_masks

    folder = _head_of_split(case, tmp_path / "audit", 60)
    assert not has_masks(folder)
    with pytest.raises(ValueError, match="is not what this generator and seed render"):
        regenerate_masks(folder, np.random.default_rng([case["config"]["seed"], SPLIT_STREAMS["audit"] + 1]))
    assert not has_masks(folder)
    # every image rendered again is compared with the stored PNG: the generator still draws them byte for byte
    assert regenerate_masks(folder, np.random.default_rng([case["config"]["seed"], SPLIT_STREAMS["audit"]])) == 60
    rulers = [r["image"] for r in images.read_split(folder) if r["a ruler"] == "1"]
    assert rulers and all(read_masks(folder, name)["a ruler"].any() for name in rulers)


@pytest.fixture(scope="module")
def measured(case, tmp_path_factory):
    """The case's audit (CLS SAE after the last block, its SAE kept) and the mass table of every artifact."""
    import time

    from workers.casestudy.check import audit_case
    from workers.casestudy.masks import artifact_heatmap_mass, format_mass_table

    workdir = tmp_path_factory.mktemp("audit")
    started = time.perf_counter()
    result = audit_case(case, workdir=workdir)
    audited = time.perf_counter() - started
    table = artifact_heatmap_mass(case, result, workdir)
    print(f"\naudit {audited:.0f} s, heatmaps {time.perf_counter() - started - audited:.0f} s\n"
          + format_mass_table(table))
    return result, table


@pytest.mark.slow
def test_the_ruler_latents_put_their_heatmaps_on_the_ruler_well_above_chance(measured):
    result, table = measured
    ruler = table["a ruler"]
    flagged = {int(latent) for f in result.flags if f["label"] == "with a ruler"
               for latent in f.get("concept_latents") or [f["latent"]]}
    assert flagged and flagged <= set(ruler["latents"])
    assert ruler["n_images"] >= 8 * len(ruler["latents"])  # most references show the ruler
    # a map spread evenly scores the ruler's area; twice that is a map that found it
    assert ruler["mass"] >= 2 * ruler["chance"], ruler
    # the best a patch-level map can do is the ruler's own coverage of the patches (ideal); it gets half the way
    assert ruler["mass"] - ruler["chance"] >= 0.5 * (ruler["ideal"] - ruler["chance"]), ruler


@pytest.mark.slow
def test_on_the_patches_the_ruler_touches_the_ruler_latents_reach_the_issues_target(measured):
    """The target read per patch: a patch the ruler crosses counts whole (the area-weighted reading is below)."""
    _, table = measured
    ruler = table["a ruler"]
    assert ruler["touched"] >= ISSUE_TARGET and ruler["touched"] >= 2 * ruler["touched_chance"], ruler


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not reached on the seed-0 case: the ruler is a 6 px band over 8 px patches, "
                                       "so even a map proportional to the ruler's own coverage of each patch "
                                       "(ideal) puts only about half its mass on it")
def test_the_ruler_latents_reach_the_issues_target_mass(measured):
    _, table = measured
    assert table["a ruler"]["mass"] >= ISSUE_TARGET, table["a ruler"]
