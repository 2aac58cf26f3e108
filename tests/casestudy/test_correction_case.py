"""Issues 18 and 31 on the case study: the probe corrected for its ruler flags recovers the slices the ruler hurt.

The bar: melanomas without a ruler and nevi with one rise at least 80 % of the way to a probe trained without
the correlation (same tiny CLIP, same number of training images and recipe, the ruler independent of the
class), overall accuracy does not drop, and a re-audit with the same SAE flags no ruler latent. The ruler's
latents are one concept, whose direction is measured within each class (``concept_directions``), corrected in
rounds as a user runs it (default 3: after each re-audit the flagged latents that track the concept join it and
the concept's latents still flagged become a concept of their own). Every method on seeds 0 and 1; seed 1 is held
out (the estimate and the reweighting were chosen on seed 0). Measured on a case rebuilt on this machine
(2026-12-07): the whole bar is met by ``refit`` on both seeds, ``project`` on seed 1 and ``reweight`` on seed 0;
the three misses are marked below with their figures.
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

# Strict: the day the engine meets them, these report it and the marker goes.
RESIDUE = {
    # after three rounds (latents 12, 22, 38, 48, 52, 54, 61) the gaps close 89 % / 96 %, and a ruler latent the
    # SAE's concept does not track is still flagged
    ("flagged", 0, "project"): "issue 31: after 'project' on seed 0 the re-audit still flags a ruler latent",
    # reweighting on seed 1 closes 87 % of the melanoma gap but 58 % of the nevus one, and a ruler flag remains
    ("slices", 1, "reweight"): "issue 31: 'reweight' on seed 1 closes 58 % of the gap on nevi with a ruler",
    ("flagged", 1, "reweight"): "issue 31: after 'reweight' on seed 1 the re-audit still flags a ruler latent",
}


def _cases(part: str):
    return [pytest.param(seed, method, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                               reason=RESIDUE[part, seed, method]))
            if (part, seed, method) in RESIDUE else pytest.param(seed, method)
            for seed in (0, 1) for method in METHODS]


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


@pytest.mark.parametrize("seed, method", _cases("slices"))
def test_the_corrected_probe_recovers_the_slices_the_ruler_hurt(corrected, seed, method):
    figures = corrected(seed, method)
    assert figures["flags"], "the audit flagged no ruler latent to correct"
    assert figures["info"]["method"] == method
    checks = recovery_checks(figures)
    assert {k: v for k, v in checks.items() if k != "not flagged after"} == \
        {k: v for k, v in MET.items() if k != "not flagged after"}, format_recovery(figures)


@pytest.mark.parametrize("seed, method", _cases("flagged"))
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
