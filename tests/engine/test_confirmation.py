"""Confirmation: removing a whole concept, against groups of latents of the same activation mass, judged by how
many of the errors it causes removing it undoes."""
import pytest
import torch

from workers.engine.confirmation import apply_confirmation, baseline_groups
from workers.engine.interventions import shifted_outputs
from workers.engine.sae import TopKSAE


def _identity(x):
    return x


def test_removing_several_latents_subtracts_each_ones_part():
    torch.manual_seed(0)
    sae = TopKSAE(8, 16, 4)
    acts = torch.randn(5, 8)
    values, indices = sae.encode_sparse(acts)
    z = torch.zeros(5, 16).scatter(1, indices, values)
    chosen = [int(indices[0, 0]), int(indices[0, 1]), 15]
    expected = acts - sum(z[:, i:i + 1] * sae.dictionary[i] for i in chosen)
    got = shifted_outputs(_identity, sae, _identity, acts, chosen)
    assert torch.allclose(got, expected, atol=1e-5)
    one = int(indices[1, 0])
    assert torch.allclose(shifted_outputs(_identity, sae, _identity, acts, one),
                          shifted_outputs(_identity, sae, _identity, acts, [one]))


def test_baseline_groups_stand_in_latents_of_the_same_mass_for_each_latent_of_the_concept():
    mass = torch.tensor([1.0, 0.1, 0.95, 0.11, 1.05, 0.09, 0.0, 3.0])
    groups = baseline_groups(mass, concept=[0, 1], exclude=[7], n=2)
    # closest in log mass to 1.0: 1.05 (4), then 0.95 (2); to 0.1: 0.11 (3), then 0.09 (5)
    assert groups == [[3, 4], [2, 5]]
    for group in baseline_groups(mass, concept=[0, 1], exclude=[7], n=5):
        assert not {0, 1, 7, 6} & set(group)  # never the concept, an excluded latent or a dead one


def _stats(called, fixed, baseline_called, baseline_fixed):
    return {"ablation_images": 100, "ablation_active": 50, "ablation_flips": 10, "correct_before": 80,
            "correct_after": 75, "insertion_images": 100, "insertion_flips_to_class": 3,
            "others_called_before": called, "others_fixed": fixed, "baseline_active": 250, "baseline_flips": 20,
            "baseline_called": baseline_called, "baseline_fixed": baseline_fixed}


@pytest.mark.parametrize("fixed, baseline_fixed, measured, status", [
    (40, 50, True, "confirmed"),  # 40 % of its errors undone; similar latents undo 10 % of theirs
    (12, 50, True, "not_confirmed"),  # 12 % against 10 %: no more than any latent of that weight
    (40, 50, False, "relied_on_no_harm"),  # undoes errors, but the with/without split shows no harm
])
def test_confirmed_means_it_undoes_its_errors_beyond_the_baseline_and_the_harm_is_measured(
        fixed, baseline_fixed, measured, status):
    flag = {"class_name": "melanoma", "latent": 3, "concept_latents": [3, 9], "baseline_groups": [[1, 2]],
            "harm": {"measured": measured}}
    apply_confirmation([flag], [_stats(100, fixed, 500, baseline_fixed)], [1.0])
    assert flag["confirmation"]["status"] == status
    causal = flag["causal"]
    assert causal["fix_rate"] == fixed / 100 and causal["baseline_fix_rate"] == baseline_fixed / 500
    assert causal["concept_latents"] == [3, 9] and causal["baseline_latents"] == [1, 2]
    assert causal["confirmed"] is (status == "confirmed")
    if measured:
        assert f"fixes {fixed} of the 100 other images" in flag["confirmation"]["text"]
