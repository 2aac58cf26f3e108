"""Issue 18 on the case study: the probe corrected for its ruler flags recovers the slices the ruler hurt.

The bar: melanomas without a ruler and nevi with one rise at least 80 % of the way to a probe trained without
the correlation (same tiny CLIP, same number of training images and recipe, the ruler independent of the
class), overall accuracy does not drop, and a re-audit with the same SAE flags no ruler latent. Seed 1 is held
out: nothing in the correction was chosen by looking at it.
"""
import pytest

from workers.casestudy.build import CaseConfig, build_case, default_cache
from workers.casestudy.check import audit_case, correct_case, format_recovery, recovery_checks

pytestmark = pytest.mark.slow

MET = {"gap closed on melanoma, a ruler=0": True, "gap closed on nevus, a ruler=1": True,
       "overall not lower": True, "not flagged after": True}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """seed -> (case, its audit, the audit's folder with the SAE): one audit per seed, shared by the tests."""
    done = {}

    def get(seed: int):
        if seed not in done:
            case = build_case(default_cache(), CaseConfig(seed=seed), log=lambda line: None)
            work = tmp_path_factory.mktemp(f"seed-{seed}")
            done[seed] = case, audit_case(case, workdir=work), work
        return done[seed]

    return get


# Known to fail with the engine's corrections as they are: each flagged latent's direction ("what removing it takes
# from the features") carries the class signal the SAE folded into the ruler latents, so removing the ruler
# removes most of what the probe reads of the lesion too (seed 0: melanomas without a ruler 0.08 -> 0.05, project).
# Strict: the day the engine meets the bar these tests report it, and the marker goes.
NOT_MET = pytest.mark.xfail(strict=True, raises=AssertionError,
                             reason="issue 18: the engine's correction does not meet the bar yet")


@NOT_MET
@pytest.mark.parametrize("seed, method", [(0, "project"), (1, "project"), (0, "refit"), (1, "refit")])
def test_the_corrected_probe_recovers_the_slices_the_ruler_hurt_and_is_no_longer_flagged(audited, seed, method):
    case, audit, work = audited(seed)
    figures = correct_case(case, work, method=method, audit=audit)
    assert figures["flags"], "the audit flagged no ruler latent to correct"
    assert recovery_checks(figures) == MET, format_recovery(figures)
    assert figures["info"]["method"] == method


def test_a_correction_that_changes_nothing_fails_the_same_checks(audited, monkeypatch):
    import workers.engine.correct_audit

    # the whole path runs (directions, table, re-audit), but the "corrected" probe is the old one
    monkeypatch.setattr(workers.engine.correct_audit, "correct_probe",
                        lambda probe, shortcut, *args, **kwargs: (probe, {"method": "nothing"}))
    case, audit, work = audited(0)
    checks = recovery_checks(correct_case(case, work, audit=audit))
    assert checks == {"gap closed on melanoma, a ruler=0": False, "gap closed on nevus, a ruler=1": False,
                      "overall not lower": True, "not flagged after": False}


def test_without_a_ruler_flag_there_is_nothing_to_correct_and_the_bar_is_not_met(audited):
    case, audit, work = audited(0)
    figures = correct_case(case, work, audit=audit, flags=[])
    assert figures["corrected"] is False and recovery_checks(figures) == {"corrected": False}
