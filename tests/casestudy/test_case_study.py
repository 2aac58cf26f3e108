"""The generated skin-lesion case: images with planted artifacts, a tiny CLIP trained from scratch, a biased probe.

The model is trained once per machine (cached under ~/.cache/clip-audit/casestudy), so only the first run on a
machine pays the four or so minutes of training (two threads, deterministic algorithms: see
`pretrain.deterministic`).
"""
import numpy as np
import pytest

from workers.casestudy import images
from workers.casestudy.build import CaseConfig, build_case, default_cache
from workers.casestudy.check import audit_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case():
    return build_case(default_cache(), CaseConfig(seed=0), log=lambda line: None)


def test_the_biased_split_ties_the_ruler_to_melanoma_and_the_held_out_split_does_not(case):
    import csv

    def rate(folder, label):
        with open(f"{folder}/labels.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["label"] == label]
        return np.mean([r["a ruler"] == "1" for r in rows])

    assert rate(case["probe_train_dir"], "melanoma") == pytest.approx(0.9, abs=0.05)
    assert rate(case["probe_train_dir"], "nevus") == pytest.approx(0.1, abs=0.05)
    assert rate(case["audit_dir"], "melanoma") == pytest.approx(0.5, abs=0.06)
    assert rate(case["audit_dir"], "nevus") == pytest.approx(0.5, abs=0.06)


def test_the_tiny_clip_learned_the_classes_and_every_artifact(case):
    metrics = case["metrics"]
    # seven artifacts and several phrasings share the 600 steps: seed 0 reaches 0.70 (0.79 with five artifacts)
    assert metrics["zero_shot_class_accuracy"] > 0.65
    # the two artifacts no audit vocabulary names are learned less well by the tiny CLIP (seed 0: sticker 0.75)
    assert all(auroc > (0.7 if a in images.NOVEL_ARTIFACTS else 0.85)
               for a, auroc in metrics["artifact_auroc"].items()), metrics["artifact_auroc"]


def test_the_probe_takes_the_shortcut_and_the_zero_shot_classifier_does_not(case):
    acc = case["metrics"]["accuracy"]
    probe, zero_shot = acc["probe"]["per_class"], acc["zero_shot"]["per_class"]
    # the probe calls melanomas with rulers melanoma and misses those without; it calls nevi with rulers melanoma
    assert probe["melanoma"]["with a ruler"] - probe["melanoma"]["without a ruler"] > 0.3
    assert probe["nevus"]["without a ruler"] - probe["nevus"]["with a ruler"] > 0.3
    assert abs(zero_shot["melanoma"]["with a ruler"] - zero_shot["melanoma"]["without a ruler"]) < 0.1
    assert abs(zero_shot["nevus"]["with a ruler"] - zero_shot["nevus"]["without a ruler"]) < 0.1


def test_an_audit_of_the_case_finds_a_ruler_latent_whose_references_all_show_a_ruler(case):
    import csv

    result = audit_case(case)
    with open(f"{case['audit_dir']}/labels.csv", newline="") as fh:
        has_ruler = {r["image"]: r["a ruler"] == "1" for r in csv.DictReader(fh)}
    ruler = [l for l in result.latents if l["label"] == "with a ruler"]
    assert ruler
    best = max(ruler, key=lambda l: l["clarity"])
    assert len(best["references"]) == 16 and all(has_ruler[r] for r in best["references"])


def test_captions_name_the_class_and_the_artifacts():
    sample = images.Sample("melanoma", ["a ruler", "hair"])
    assert sample.caption == "a dermoscopy image of a melanoma with a ruler and hair."
    assert sample.partial_caption(False, True) == "a dermoscopy image with a ruler and hair."
    assert images.Sample("nevus").partial_caption(False, True) == "a dermoscopy image."
    with pytest.raises(ValueError):
        images.biased_rates("a ruler", "melanoma", 1.5)


def test_training_under_deterministic_gives_the_same_weights_bit_for_bit():
    """The case model's SHA-256 can only be compared across machines when a rebuild is exact: same seeds, a fixed
    number of threads and deterministic algorithms give the same weights (a few steps on a few images here)."""
    import hashlib

    import torch

    from workers.casestudy.build import LESION_CLIP
    from workers.casestudy.images import Sample
    from workers.casestudy.pretrain import caption_variants, deterministic, train_clip
    from workers.engine.loading import load_clip

    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 255, size=(16, 64, 64, 3), dtype=np.uint8)
    samples = [Sample("melanoma" if i % 2 else "nevus", ["a ruler"] if i % 3 == 0 else []) for i in range(16)]

    def digest():
        torch.manual_seed(0)
        bundle = load_clip(model_config=LESION_CLIP, allow_random=True)
        with deterministic():
            train_clip(bundle, pictures, caption_variants(samples, 0), steps=3, batch_size=8, seed=0)
        weights = b"".join(v.contiguous().numpy().tobytes() for v in bundle.model.state_dict().values())
        return hashlib.sha256(weights).hexdigest()

    threads = torch.get_num_threads()
    assert digest() == digest()
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()  # restored


def test_a_finer_patch_is_a_case_of_its_own_and_the_default_keeps_its_cached_key():
    """Issue 30's resolution option: a 4 px patch gives a 16 x 16 grid and its own model and case keys; the
    default 8 px patch keeps the keys cases were cached under before the option existed."""
    from workers.casestudy.build import GENERATOR_VERSION, LESION_CLIP, _digest, lesion_clip_config

    default, fine = CaseConfig(), CaseConfig(patch_size=4)
    old = {"seed": 0, "n_pretrain": 3000, "pretrain_steps": 600, "batch_size": 128, "n_probe_train": 800,
           "n_audit": 2000, "artifact": "a ruler", "toward": "melanoma", "strength": 0.8}
    assert default.key() == _digest({"v": GENERATOR_VERSION, **old, "clip": LESION_CLIP})
    assert default.clip_config() == LESION_CLIP
    assert fine.clip_config()["vision_cfg"]["patch_size"] == 4 and LESION_CLIP["vision_cfg"]["patch_size"] == 8
    assert fine.key() != default.key() and fine.model_key() != default.model_key()
    with pytest.raises(ValueError, match="the patch size must divide the 64 px image, got 5"):
        lesion_clip_config(5)
