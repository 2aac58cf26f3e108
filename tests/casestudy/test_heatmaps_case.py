"""Ground truth for heatmaps: the generator's artifact masks, and how much of the artifact latents' heatmaps lies
on them in the seed-0 case (issues 19 and 30).

The mask tests are fast; the case's are slow (the case is built once per machine, the audit takes a minute).
"""
import csv
import shutil

import numpy as np
import pytest
from scipy import ndimage

from workers.casestudy import images
from workers.casestudy.check import audit_case
from workers.casestudy.images import ARTIFACTS, TRANSLUCENT, Sample, read_masks, render, render_with_masks



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
def audited(case, tmp_path_factory):
    """The case's audit (CLS SAE after the last block) and its workdir (SAE, activations and tables kept), with the
    seconds it took."""
    import time

    workdir = tmp_path_factory.mktemp("audit")
    started = time.perf_counter()
    result = audit_case(case, workdir=workdir)
    return result, workdir, time.perf_counter() - started


@pytest.fixture(scope="module")
def measured(case, audited):
    """The case's audit, the mass table of every artifact with the audit's default heatmap method and with the one
    used before it ("block"), and the ruler's figures for a detector that means only the ruler
    (``masks.direction_heatmap_mass``) with the default method."""
    import time

    from workers.casestudy.masks import artifact_heatmap_mass, direction_heatmap_mass, format_mass_table
    from workers.engine.heatmaps import DEFAULT_BLOCKS, DEFAULT_CELLS, DEFAULT_METHOD

    result, workdir, audited = audited
    started = time.perf_counter() - audited
    table = artifact_heatmap_mass(case, result, workdir)
    old = artifact_heatmap_mass(case, result, workdir, method="block")
    ceiling = direction_heatmap_mass(case, result, workdir, "a ruler", method=DEFAULT_METHOD, cells=DEFAULT_CELLS,
                                     blocks=DEFAULT_BLOCKS)
    print(f"\naudit {audited:.0f} s, heatmaps {time.perf_counter() - started - audited:.0f} s\n"
          + format_mass_table(table) + "\nblock:\n" + format_mass_table(old))
    return result, table, old, ceiling


@pytest.mark.slow
def test_the_ruler_latents_put_their_heatmaps_on_the_ruler_well_above_chance(measured):
    result, table, _, _ = measured
    ruler = table["a ruler"]
    flagged = {int(latent) for f in result.flags if f["label"] == "with a ruler"
               for latent in f.get("concept_latents") or [f["latent"]]}
    assert flagged and flagged <= set(ruler["latents"])
    assert ruler["n_images"] >= 8 * len(ruler["latents"])  # most references show the ruler
    # a map spread evenly scores the ruler's area; twice that is a map that found it
    assert ruler["mass"] >= 2 * ruler["chance"], ruler


@pytest.mark.slow
def test_the_case_studys_ruler_holds_its_figure(measured):
    """Issue 30 measured the seed-0 case's ruler latents with the default method at 0.69 of the patch-level
    ideal, the largest cell on the ruler in 0.67 of the maps (docs/heatmaps.md); a change that loses a tenth of
    either fails here."""
    _, table, _, _ = measured
    ruler = table["a ruler"]
    assert ruler["mass"] / ruler["ideal"] >= 0.6 and ruler["peak_on_artifact"] >= 0.6, ruler


@pytest.mark.slow
def test_the_default_method_puts_more_of_the_maps_on_the_artifacts_than_the_one_before(measured):
    """Over the seven artifacts (the band-aid, sticker and stain latents' maps lay elsewhere with "block")."""
    _, table, old, _ = measured
    assert set(table) == set(old) == set(ARTIFACTS)

    def mean_ratio(t):
        return np.mean([row["mass"] / row["ideal"] for row in t.values()])

    assert mean_ratio(table) >= mean_ratio(old) + 0.1, (mean_ratio(table), mean_ratio(old))
    assert sum(row["mass"] >= 2 * row["chance"] for row in table.values()) >= 6


@pytest.mark.slow
def test_a_detector_that_means_only_the_ruler_meets_the_issues_targets_with_the_same_method(measured):
    """The targets of issue 30 (mass >= 0.8 of the ideal, pointing >= 0.9) are met by the default method when
    what it explains means the ruler alone: what keeps the latents below them is their mixing, not the map."""
    _, _, _, ceiling = measured
    assert ceiling["n_images"] >= 40
    assert ceiling["mass"] >= 0.8 * ceiling["ideal"] and ceiling["peak_on_artifact"] >= 0.9, ceiling
    assert ceiling["mass"] >= 2 * ceiling["chance"], ceiling


@pytest.mark.slow
def test_a_checklists_ruler_heatmaps_lie_on_the_ruler_whether_asked_by_text_or_by_column(case, audited):
    """Issue 32: each suspect's answer maps its latents on the images that show it most; asked about the planted
    ruler, those maps put their mass on the ruler's pixels well above what an even map scores."""
    from workers.casestudy.bench_checklist import heatmap_mass
    from workers.casestudy.check import split_images
    from workers.casestudy.masks import ensure_masks
    from workers.engine import AuditConfig, LinearProbe, load_clip
    from workers.engine.suspects import Suspect, SuspectInputs, attach_suspect_heatmaps, check_suspects

    result, workdir, _ = audited
    config = AuditConfig.from_dict(result.config)
    images = split_images(case["audit_dir"], tuple(ARTIFACTS))
    bundle, probe = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"]), \
        LinearProbe.load(case["probe"])
    inputs = SuspectInputs.from_audit(bundle, probe, images, result, workdir, config)
    answers = check_suspects(inputs, [Suspect("ruler", text="a ruler"), Suspect("ruler column", column="a ruler")],
                             config)
    attach_suspect_heatmaps(bundle, inputs.sae, images.remap(probe.class_names).with_preprocess(bundle.preprocess),
                            answers, config)
    folder = ensure_masks(case, "audit")
    for answer in answers:
        assert answer["verdict"] == "relied on, harmful" and len(answer["top_images"]) == 4, answer["name"]
        row = heatmap_mass(answer, "a ruler", folder)
        assert row["heat_maps"] == 4 and row["heat_mass"] >= 2 * row["heat_chance"], (answer["name"], row)
