"""The dictionary study's figures (workers.casestudy.bench_sae_quality) on codes whose answer is known."""
import numpy as np

from workers.casestudy.bench_sae_quality import _auroc_matrix, measure


def _truth(n=400, artifacts=3, seed=0):
    return np.random.default_rng(seed).random((n, artifacts)) < 0.3


def test_auroc_matrix_agrees_with_sklearn_and_scores_an_idle_latent_one_half():
    from sklearn.metrics import roc_auc_score

    has = _truth()
    rng = np.random.default_rng(1)
    z = np.stack([has[:, 0] + rng.random(len(has)), rng.random(len(has)), np.zeros(len(has))], 1)
    got = _auroc_matrix(z, has)
    for a in range(has.shape[1]):
        for latent in range(2):
            assert abs(got[a, latent] - roc_auc_score(has[:, a], z[:, latent])) < 1e-9
    assert np.allclose(got[:, 2], 0.5)


def test_one_clean_latent_per_artifact_found_by_every_seed_scores_pure_stable_and_unmixed():
    has = _truth()
    clean = has.astype(float) * (1 + np.random.default_rng(2).random(has.shape))
    codes = [clean, clean[:, [2, 0, 1]], clean[:, [1, 2, 0]]]  # the same concepts, in another order per seed
    got = measure(codes, [0.1, 0.1, 0.1], [1.0, 1.0, 1.0], has, planted=0)
    assert got["purity"] == 1.0 and got["planted"] == 1.0 and got["mixed"] == 0.0
    assert got["latent_stability"] == 1.0 and got["artifact_stability"] == 1.0


def test_mixed_latents_that_change_with_the_seed_score_lower_on_every_figure():
    has = _truth()
    clean = has.astype(float)
    mixes = [np.stack([clean[:, 0] + clean[:, 1], clean[:, 2]], 1),  # seed 0 mixes artifacts 0 and 1
             np.stack([clean[:, 0] + clean[:, 2], clean[:, 1]], 1)]  # seed 1 mixes 0 and 2
    got = measure(mixes, [0.1, 0.1], [1.0, 1.0], has, planted=0)
    assert got["planted"] < 0.9 and got["purity"] < 0.95
    assert got["mixed"] > 0
    assert got["artifact_stability"] < 1.0


def test_a_concept_split_over_two_latents_is_pure_once_its_latents_are_summed():
    has = _truth(n=600)
    rng = np.random.default_rng(3)
    half = rng.random(len(has)) < 0.5  # artifact 0 drawn by one latent on half its images, another on the rest
    split = np.stack([has[:, 0] & half, has[:, 0] & ~half, has[:, 1], has[:, 2]], 1).astype(float)
    got = measure([split, split], [0.1, 0.1], [1.0, 1.0], has, planted=0)
    assert got["planted"] < 0.8  # either half alone misses half the artifact's images
    assert got["concept_planted"] == 1.0 and got["concept_purity"] == 1.0


def test_a_setting_trains_with_its_sae_options_and_reads_codes_back():
    import torch

    from workers.casestudy.bench_sae_quality import train

    vectors = torch.randn(1024, 16) @ torch.randn(16, 16)
    for options in ({"n_latents": 32, "k": 4, "steps": 50}, {"n_latents": 32, "k": 4, "steps": 50,
                                                              "variant": "matryoshka"}):
        encode, reconstruct, seconds = train(vectors, options, seed=0)
        with torch.no_grad():
            z = encode(vectors[:8])
            assert z.shape == (8, 32) and int((z > 0).sum(1).max()) <= 4
            assert reconstruct(vectors[:8]).shape == (8, 16)
        assert seconds > 0


def test_flag_figures_compare_what_each_seeds_flags_track():
    from workers.casestudy.bench_dictionaries import flag_figures

    def run(flags, seconds, fvu):
        return {"flags": [{"class": c, "concepts": concepts, "purity": p} for c, concepts, p in flags],
                "n_flags": len(flags), "n_precise": len(flags) - 1, "recall": bool(flags), "seconds": seconds,
                "sae_fvu": fvu}

    ruler = ("melanoma", ["a ruler"], 0.9)
    got = flag_figures([run([ruler, ("nevus", ["a ruler (absent)"], 0.7)], 2.0, 0.05),
                        run([ruler, ("melanoma", [], None)], 4.0, 0.06)])
    assert got["every"] == 1 and got["any"] == 3 and got["overlap"] == 1 / 3
    assert got["flagged"][1] == ["melanoma: a ruler", "melanoma: none"]
    assert got["flags"] == [2, 2] and got["precise"] == [1, 1] and got["recall"] == [True, True]
    assert abs(got["flag_purity"] - (0.9 + 0.7 + 0.9) / 3) < 1e-12  # a flag without purity does not count
    assert got["seconds"] == 3.0 and got["fvu"] == [0.05, 0.06]
