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
    # the ruler's harm is measured; removing one of its latents does not always flip more than removing latents
    # of similar mass does (seed 2: the ruler is spread over latents), so "confirmed" is not asserted here
    assert report["flag"]["harm"]["measured"] is True
    assert report["flag"]["confirmation"]["status"] in ("confirmed", "not_confirmed")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_the_correlation_no_ruler_latent_is_flagged_for_melanoma(seed):
    case = build_case(default_cache(), CaseConfig(seed=seed, strength=0.0), log=lambda line: None)
    report = known_answer(case, audit_case(case))
    assert report["passed"] and report["flag"] is None


def test_the_diff_against_a_probe_trained_without_the_shortcut_shows_the_ruler_flag_gone():
    from audit_service.audits.diff import match_flags

    biased = build_case(default_cache(), CaseConfig(seed=0, strength=0.8), log=lambda line: None)
    clean = build_case(default_cache(), CaseConfig(seed=0, strength=0.0), log=lambda line: None)
    assert biased["checkpoint"] == clean["checkpoint"]  # one model, two probes: old (biased) vs new (clean)
    diff = match_flags(audit_case(biased).flags, audit_case(clean).flags)
    gone = [e for e in diff["gone"] if e["head"] == "probe" and e["class_name"] == "melanoma"]
    assert "with a ruler" in [e["baseline"]["label"] for e in gone], diff["gone"]
    assert not [e for e in diff["new"] if e["head"] == "probe" and e["class_name"] == "melanoma"
                and e["current"]["label"] == "with a ruler"]
