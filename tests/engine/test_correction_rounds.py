"""A correction in rounds: which latents track a corrected concept, and which of a re-audit's flags join it."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from workers.engine.correct_audit import TRACK_SHARE, _Run, tracking_latents
from workers.engine.rounds import grown_concepts, next_round, next_round_latents, still_flagged_groups
from workers.engine.sae import TopKSAE


class _Store:
    """Activations given directly: [n, d] CLS vectors, or [n, tokens, d] with the CLS token first."""

    def __init__(self, acts: torch.Tensor):
        self.acts = acts

    def iter_batches(self, batch_size):
        for lo in range(0, len(self.acts), batch_size):
            hi = lo + batch_size
            yield lo, self.acts[lo:hi], torch.zeros(len(self.acts[lo:hi]), 2)


def _identity_sae(n: int) -> TopKSAE:
    """Latent i reads coordinate i of the activation (every latent may be on: k = n)."""
    sae = TopKSAE(n, n, n)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n))
        sae.W_dec.copy_(torch.eye(n))
    return sae


def _run(sae, token="cls", batch_size=7) -> _Run:
    config = SimpleNamespace(token=token, batch_size=batch_size)
    return _Run(None, None, sae, config, torch.device("cpu"), None, lambda *a: None)


def _images(seed=0, n=200):
    """Latent 0 is the concept (on half the images, strongly); latent 1 fires on the same images, weaker
    (another index for the concept); latent 2 fires on 90 % of its images with the concept, latent 3 on every
    image (a generic latent), latent 4 on images without the concept, latent 5 on two of the concept's images."""
    rng = np.random.default_rng(seed)
    present = np.arange(n) < n // 2
    acts = np.zeros((n, 6))
    acts[present, 0] = rng.uniform(2, 3, present.sum())
    acts[present, 1] = rng.uniform(0.5, 1, present.sum())
    on2 = np.flatnonzero(present)[:45].tolist() + np.flatnonzero(~present)[:5].tolist()
    acts[on2, 2] = 1.0
    acts[:, 3] = rng.uniform(0.5, 1, n)
    acts[~present, 4] = 1.0
    acts[np.flatnonzero(present)[:2], 5] = 5.0
    acts[:, 0] += np.where(present, 0, rng.uniform(0, 0.3, n))  # the concept's latent weakly on some others too
    return torch.tensor(acts, dtype=torch.float32), present


def test_the_latents_that_track_a_concept_are_those_whose_activation_falls_on_its_images():
    acts, present = _images()
    [entry] = tracking_latents(_run(_identity_sae(6)), _Store(acts), [[0]])
    assert entry["concept"] == [0] and entry["images_with"] == int(present.sum())
    assert entry["share_needed"] == pytest.approx(max(TRACK_SHARE, 0.5 + 0.25))
    # 1 (all its activation on the concept's images) and 2 (45 of 50) track it; 3 (everywhere), 4 (elsewhere)
    # do not, nor 5 (on two images only), nor the concept's own latent
    assert list(entry["latents"]) == ["1", "2"]
    assert entry["latents"]["1"] == 1.0 and entry["latents"]["2"] == pytest.approx(0.9)


def test_a_spatial_sae_counts_a_latent_by_its_largest_patch():
    acts, present = _images()
    patches = torch.zeros(len(acts), 5, acts.shape[1])  # CLS token first, then 4 patches
    patches[:, 2] = acts  # the image's activations sit on one patch, the others are empty
    flat = tracking_latents(_run(_identity_sae(6)), _Store(acts), [[0]])
    spatial = tracking_latents(_run(_identity_sae(6), token="patches"), _Store(patches), [[0]])
    assert spatial == flat


def test_a_concept_on_every_image_or_on_none_has_no_tracking_latents():
    acts, _ = _images()
    assert tracking_latents(_run(_identity_sae(6)), _Store(acts), [[3]])[0]["latents"] == {}  # on every image
    none = acts.clone()
    none[:, 5] = 0
    assert tracking_latents(_run(_identity_sae(6)), _Store(none), [[5]])[0]["latents"] == {}


def test_each_concept_gets_its_own_tracking_latents():
    acts, _ = _images()
    first, second = tracking_latents(_run(_identity_sae(6)), _Store(acts), [[0], [4]])
    assert list(first["latents"]) == ["1", "2"] and second["concept"] == [4]
    assert "1" not in second["latents"] and "0" not in second["latents"]


def test_a_next_round_adds_the_flagged_latents_that_track_a_concept_to_the_one_they_track_best():
    tracking = [{"concept": [0], "latents": {"1": 1.0, "2": 0.9, "7": 0.85}},
                {"concept": [4], "latents": {"7": 0.95, "8": 0.9}}]
    # 3 tracks nothing, 0 is already the concept, 7 tracks the second concept best
    assert next_round_latents(tracking, [3, 2, 0, 7, 8, 2]) == [[2], [7, 8]]
    assert next_round_latents(tracking, [3, 0, 4]) == [[], []]
    assert grown_concepts([[0], [4]], [[2], [7, 8]]) == [[0, 2], [4, 7, 8]]
    assert grown_concepts([[0, 2]], [[2, 5]]) == [[0, 2, 5]]


def test_a_concepts_latents_still_flagged_are_corrected_as_a_concept_of_their_own_once():
    concepts = [[61, 22, 52, 48, 59], [7]]
    assert still_flagged_groups(concepts, [48, 38, 52, 7]) == [[52, 48]]  # [7] is all of its concept: nothing new
    assert still_flagged_groups([*concepts, [52, 48]], [48, 52]) == []  # already a concept: a round never repeats
    assert still_flagged_groups(concepts, [61, 22, 52, 48, 59]) == []  # all of it flagged: the same concept again
    assert grown_concepts(concepts, [[38], []], [[52, 48]]) == [[61, 22, 52, 48, 59, 38], [7], [52, 48]]


def test_a_next_round_grows_splits_or_says_nothing_changed():
    tracking = [{"concept": [1, 2, 3], "latents": {"9": 0.9}}]
    step = next_round([[1, 2, 3]], tracking, [9, 2, 5])
    assert step == {"added": [[9]], "split": [[2]], "concepts": [[1, 2, 3, 9], [2]], "changed": True}
    step = next_round(step["concepts"], [*tracking, {"concept": [2], "latents": {}}], [2, 5])
    assert step["changed"] is False and step["concepts"] == [[1, 2, 3, 9], [2]]
    # reweight balances the union of the latents: a split changes nothing for it
    assert next_round([[1, 2, 3]], tracking, [2, 5], "reweight")["changed"] is False
    assert next_round([[1, 2, 3]], tracking, [9], "reweight")["concepts"] == [[1, 2, 3, 9]]
    # an old result without tracking: only the split
    assert next_round([[1, 2]], [], [1]) == {"added": [[]], "split": [[1]], "concepts": [[1, 2], [1]],
                                             "changed": True}
