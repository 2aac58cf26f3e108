"""The case study's known answer: the planted ruler is the probe's shortcut for melanoma, and the audit says so.

Each seed generates its own images, trains its own tiny CLIP from scratch (cached once per machine), fits a
probe on a split where rulers come with melanomas, and audits it on a held-out split where rulers are
independent of the class.
"""
import pytest

from workers.casestudy.build import CaseConfig, build_case, default_cache
from workers.casestudy.check import audit_case, known_answer

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_ruler_latent_is_flagged_for_melanoma_under_the_probe(seed):
    case = build_case(default_cache(), CaseConfig(seed=seed, strength=0.8), log=lambda line: None)
    report = known_answer(case, audit_case(case))
    assert report["checks"] == {"flagged": True, "rank_at_most_3": True, "ablation_flips": True,
                                "zero_shot_share_smaller": True}, report["probe_top_latents"]
    assert report["flag"]["category"] == "dataset_artifact"
    assert report["flag"]["causal"]["confirmed"] is True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_the_correlation_no_ruler_latent_is_flagged_for_melanoma(seed):
    case = build_case(default_cache(), CaseConfig(seed=seed, strength=0.0), log=lambda line: None)
    report = known_answer(case, audit_case(case))
    assert report["passed"] and report["flag"] is None
