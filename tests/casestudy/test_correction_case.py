"""Issue 18 on the case study: the probe corrected for its ruler flags recovers the slices the ruler hurt.

The bar: melanomas without a ruler and nevi with one rise at least 80 % of the way to a probe trained without
the correlation (same tiny CLIP, same number of training images and recipe, the ruler independent of the
class), overall accuracy does not drop, and a re-audit with the same SAE flags no ruler latent. The ruler's
latents are one concept, whose direction is measured within each class (``concept_directions``). Seed 1 is
held out: the estimate was chosen on seed 0 only. A refit on the probe's training split meets the whole bar on
seed 0 and the accuracy parts on seed 1, where a ruler flag after depends on the machine; a projection meets the
accuracy parts and leaves a ruler flag (both marked below).
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


METHODS = ("project", "refit", "reweight")


@pytest.fixture(scope="module")
def corrected(audited):
    """(seed, method) -> the case's correction figures (in rounds, as a user runs it), once per module."""
    done = {}

    def get(seed: int, method: str) -> dict:
        if (seed, method) not in done:
            case, audit, work = audited(seed)
            done[seed, method] = correct_case(case, work, method=method, audit=audit)
        return done[seed, method]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_corrected_probe_recovers_the_slices_the_ruler_hurt(corrected, seed, method):
    figures = corrected(seed, method)
    assert figures["flags"], "the audit flagged no ruler latent to correct"
    assert figures["info"]["method"] == method
    checks = recovery_checks(figures)
    assert {k: v for k, v in checks.items() if k != "not flagged after"} == \
        {k: v for k, v in MET.items() if k != "not flagged after"}, format_recovery(figures)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_corrected_probe_is_no_longer_flagged_for_the_ruler(corrected, seed, method):
    figures = corrected(seed, method)
    assert recovery_checks(figures)["not flagged after"], format_recovery(figures)


@pytest.mark.parametrize("method", METHODS)
def test_each_round_corrects_the_concept_as_the_last_reaudit_left_it(corrected, method):
    figures = corrected(0, method)
    rounds = figures["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1)) and 1 <= len(rounds) <= 3
    for before, after in zip(rounds, rounds[1:]):  # a next round only for latents its re-audit added
        assert before["added"] and after["latents"] == sorted({*before["latents"], *before["added"]})
    assert rounds[-1]["latents"] == figures["latents"] and rounds[-1]["overall"] == figures["overall"]
    assert not rounds[-1]["added"] or len(rounds) == 3


def test_a_correction_that_changes_nothing_fails_the_same_checks(audited, monkeypatch):
    import workers.engine.correct_audit

    # the whole path runs (directions, table, re-audit), but the "corrected" probe is the old one
    monkeypatch.setattr(workers.engine.correct_audit, "correct_probe",
                        lambda probe, shortcut, *args, **kwargs: (probe, {"method": "nothing"}))
    case, audit, work = audited(0)
    checks = recovery_checks(correct_case(case, work, audit=audit, rounds=1))
    assert checks == {"gap closed on melanoma, a ruler=0": False, "gap closed on nevus, a ruler=1": False,
                      "overall not lower": True, "not flagged after": False}


def test_without_a_ruler_flag_there_is_nothing_to_correct_and_the_bar_is_not_met(audited):
    case, audit, work = audited(0)
    figures = correct_case(case, work, audit=audit, flags=[])
    assert figures["corrected"] is False and recovery_checks(figures) == {"corrected": False}
