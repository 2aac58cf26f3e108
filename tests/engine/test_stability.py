"""The vote of several dictionaries on an audit's flags: matching concepts by their activations, keeping what a
majority finds, joining the parts of one concept, and the audit end to end with three dictionaries."""
import numpy as np
import pytest

from workers.engine import run_audit
from workers.engine.stability import best_match, correlations, hold, single

from .conftest import build_audit_config

N = 400


@pytest.fixture
def concepts():
    """Four independent concepts' activations over N images: sparse, non-negative, as SAE latents are."""
    rng = np.random.default_rng(0)
    return [np.where(rng.random(N) < 0.3, rng.random(N) + 0.5, 0.0) for _ in range(4)]


def _flag(latents, share=0.1, head="probe", class_name="melanoma", label="unlabelled"):
    return {"head": head, "class_name": class_name, "latent": latents[0], "concept_latents": list(latents),
            "rank": 1, "share": share, "probe_share": share, "zero_shot_share": share / 2, "mean_relevance": share,
            "label": label, "closest_concept": "a ruler"}


def _noisy(x, rng, scale=0.1):
    return x + scale * rng.random(len(x))


def test_a_concept_split_over_two_latents_is_matched_by_their_sum(concepts):
    a, b, noise = concepts[0], concepts[1], concepts[2]
    rho, chosen = best_match(a + b, np.stack([noise, a, b], 1))
    assert sorted(chosen) == [1, 2] and rho > 0.99
    rho, chosen = best_match(a, np.stack([noise, b], 1))
    assert rho < 0.3  # nothing there matches it


def test_a_constant_activation_matches_nothing():
    assert correlations(np.zeros(10), np.arange(20.0).reshape(10, 2)).tolist() == [0.0, 0.0]


def test_a_flag_a_majority_finds_is_kept_and_one_found_alone_is_dropped(concepts):
    rng = np.random.default_rng(1)
    ruler, stain = concepts[0], concepts[1]
    flags = [_flag([3]), _flag([7], share=0.08)]
    activity = np.stack([ruler, stain], 1)
    # both other dictionaries flag the ruler (with their own latents); neither flags the stain
    others = [([_flag([11])], np.stack([_noisy(ruler, rng)], 1)),
              ([_flag([5]), _flag([9], class_name="nevus")], np.stack([_noisy(ruler, rng), stain], 1))]
    kept, summary = hold(flags, activity, others, build_audit_config(), seeds=[0, 1, 2])
    assert [f["concept_latents"] for f in kept] == [[3]]
    stability = kept[0]["stability"]
    assert (stability["found_by"], stability["of"]) == (3, 3)
    assert [(d["dictionary"], d["seed"], d["latents"]) for d in stability["dictionaries"]] == \
        [(0, 0, [3]), (1, 1, [11]), (2, 2, [5])]
    assert all(d["correlation"] >= 0.6 for d in stability["dictionaries"])
    # the stain was flagged for nevus by dictionary 2, not for melanoma: it counts for nothing here
    assert [(d["latent"], d["found_by"], d["of"], d["closest_concept"]) for d in summary["dropped"]] == \
        [(7, 1, 3, "a ruler")]
    assert summary["dictionaries"] == 3 and summary["kept"] == 1


def test_a_majority_of_two_needs_both(concepts):
    rng = np.random.default_rng(2)
    flags = [_flag([3])]
    others = [([_flag([11])], np.stack([_noisy(concepts[0], rng)], 1))]
    kept, _ = hold(flags, concepts[0][:, None], others, build_audit_config(dictionaries=2), seeds=[0, 1])
    assert kept and kept[0]["stability"]["found_by"] == 2
    kept, summary = hold(flags, concepts[0][:, None], [([], np.zeros((N, 0)))], build_audit_config(dictionaries=2),
                         seeds=[0, 1])
    assert kept == [] and summary["dropped"][0]["found_by"] == 1
    every = build_audit_config(dictionaries=2, flag_min_stability=0.0)
    assert hold(flags, concepts[0][:, None], [([], np.zeros((N, 0)))], every, seeds=[0, 1])[0]


def test_parts_the_other_dictionaries_see_as_one_concept_become_one_flag(concepts):
    rng = np.random.default_rng(3)
    left, right = concepts[0], concepts[1]  # one artifact the audit's SAE split in two
    flags = [_flag([3], share=0.1), _flag([8], share=0.05)]
    whole = [([_flag([11])], np.stack([_noisy(left + right, rng)], 1)),
             ([_flag([5])], np.stack([_noisy(left + right, rng)], 1))]
    kept, _ = hold(flags, np.stack([left, right], 1), whole, build_audit_config(), seeds=[0, 1, 2])
    assert len(kept) == 1
    assert kept[0]["concept_latents"] == [3, 8] and kept[0]["share"] == pytest.approx(0.15)
    assert kept[0]["stability"]["found_by"] == 3 and kept[0]["stability"]["dictionaries"][0]["latents"] == [3, 8]


def test_one_dictionarys_mixed_latent_joins_nothing(concepts):
    rng = np.random.default_rng(4)
    ruler, clean = concepts[0], concepts[1]
    flags = [_flag([3]), _flag([8])]
    others = [([_flag([11])], np.stack([_noisy(ruler + clean, rng)], 1)),  # a mixture of both
              ([_flag([5]), _flag([6])], np.stack([_noisy(ruler, rng), _noisy(clean, rng)], 1))]
    kept, _ = hold(flags, np.stack([ruler, clean], 1), others, build_audit_config(), seeds=[0, 1, 2])
    assert [f["concept_latents"] for f in kept] == [[3], [8]]
    assert [f["rank"] for f in kept] == [1, 2]


def test_a_concept_the_other_dictionaries_flag_and_the_audits_sae_misses_is_reported(concepts):
    rng = np.random.default_rng(5)
    band_aid = concepts[2]
    others = [([_flag([11], label="a band-aid")], np.stack([_noisy(band_aid, rng)], 1)),
              ([_flag([5], label="a band-aid")], np.stack([_noisy(band_aid, rng)], 1))]
    kept, summary = hold([_flag([3])], concepts[0][:, None], others, build_audit_config(), seeds=[4, 5, 6])
    assert kept == []
    assert [(m["class_name"], m["found_by"], m["of"], m["seeds"]) for m in summary["missed"]] == \
        [("melanoma", 2, 3, [5, 6])]


def test_a_single_dictionary_finds_each_flag_once():
    flags, summary = single([_flag([3])], seed=7)
    assert flags[0]["stability"] == {"found_by": 1, "of": 1, "dictionaries": [
        {"dictionary": 0, "seed": 7, "correlation": 1.0, "latents": [3]}]}
    assert summary["dictionaries"] == 1 and summary["dropped"] == []


def test_an_audit_trains_its_dictionaries_and_every_flag_says_how_many_found_it(tiny, probe, dataset, tmp_path):
    result = run_audit(build_audit_config(dictionaries=3), tiny, probe, dataset, workdir=tmp_path).to_dict()
    stability = result["stability"]
    assert stability["dictionaries"] == 3 and stability["seeds"] == [0, 1, 2]
    assert stability["kept"] == len(result["flags"])
    for flag in result["flags"]:
        assert flag["stability"]["of"] == 3 and flag["stability"]["found_by"] >= 2
        assert flag["stability"]["dictionaries"][0]["latents"] == flag["concept_latents"]
    for k in (1, 2):
        assert (tmp_path / "sae" / "dictionaries" / str(k) / "metrics.json").is_file()
    # the dictionaries differ: each was trained with its own seed
    first = (tmp_path / "sae" / "sae.safetensors").read_bytes()
    assert (tmp_path / "sae" / "dictionaries" / "1" / "sae.safetensors").read_bytes() != first


def test_an_audit_with_one_dictionary_lets_every_flag_stand_alone(tiny, probe, dataset, tmp_path):
    result = run_audit(build_audit_config(dictionaries=1), tiny, probe, dataset, workdir=tmp_path).to_dict()
    assert result["stability"]["dictionaries"] == 1
    assert all(f["stability"]["found_by"] == 1 and f["stability"]["of"] == 1 for f in result["flags"])
    assert not (tmp_path / "sae" / "dictionaries").exists()


def test_a_concept_the_other_dictionaries_flag_is_shown_with_the_audits_own_latents_when_it_holds_them(concepts):
    rng = np.random.default_rng(6)
    band_aid = concepts[2]
    others = [([_flag([11])], np.stack([_noisy(band_aid, rng)], 1)), ([_flag([5])], np.stack([_noisy(band_aid, rng)], 1))]
    asked = []

    def express(concept, column):
        asked.append((concept["class_name"], concept["found_by"], round(float(np.corrcoef(column, band_aid)[0, 1]), 1)))
        return _flag([20, 21], share=0.07), 0.9, ""

    kept, summary = hold([_flag([3])], concepts[0][:, None], others, build_audit_config(), seeds=[0, 1, 2],
                         express=express)
    assert asked == [("melanoma", 2, 1.0)] and summary["missed"] == []
    assert [f["concept_latents"] for f in kept] == [[20, 21]]
    stability = kept[0]["stability"]
    assert (stability["found_by"], stability["of"], stability["expressed"]) == (2, 3, True)
    assert [(d["dictionary"], d.get("flagged", True)) for d in stability["dictionaries"]] == \
        [(0, False), (1, True), (2, True)]


def test_a_concept_the_audits_sae_cannot_hold_stays_missed_with_the_reason(concepts):
    rng = np.random.default_rng(7)
    ruler = concepts[0]
    others = [([_flag([11]), _flag([12])], np.stack([_noisy(ruler, rng), concepts[3]], 1)),
              ([_flag([5]), _flag([6])], np.stack([_noisy(ruler, rng), _noisy(concepts[3], rng)], 1))]
    # the audit's SAE holds the second concept only in a latent of the ruler's flag: it cannot be a flag of its own
    kept, summary = hold([_flag([3])], ruler[:, None], others, build_audit_config(), seeds=[0, 1, 2],
                         express=lambda concept, column: (_flag([3, 4]), 0.8, ""))
    assert [f["concept_latents"] for f in kept] == [[3]]
    assert [m["reason"] for m in summary["missed"]] == ["its latents here are part of a flag already (latents [3])"]
