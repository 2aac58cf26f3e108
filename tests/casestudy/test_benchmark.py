"""The known-answer benchmark on a small grid: one planted case, one new artifact, one control, defaults only.

The full grid is `python manage.py benchmark_flags` (docs/benchmark.md); this keeps the flag rule honest in CI:
the planted artifact must be the target class's top flag, the flags must be precise, and the control must raise
no false flag. The same grid audited with a rule that flags on share alone must fail those checks.
"""
import pytest

from workers.casestudy.benchmark import Grid, run_grid

pytestmark = pytest.mark.slow

FAST = {"faithfulness_max_images": 32, "faithfulness_steps": 5}
SMALL = dict(seeds=(0,), n_audit=1200, stability_cases=0)


@pytest.fixture(scope="module")
def planted():
    return run_grid(Grid(artifacts=("a ruler", "a stain"), classes=("melanoma",), controls=True,
                         audit_options=FAST, **SMALL), log=lambda line: None)


def test_the_planted_artifacts_are_found_and_the_flags_are_precise(planted):
    cases = {c["artifact"]: c for c in planted["cases"] if not c["control"]}
    assert cases["a ruler"]["recall"], cases["a ruler"]["flags"]
    assert cases["a stain"]["recall"], cases["a stain"]["flags"]  # an artifact the vocabulary has no word for
    assert planted["summary"]["precision"] >= 0.8, planted["cases"]
    for case in cases.values():
        assert case["planted_probe_share"] > case["planted_zero_shot_share"]


def test_the_control_raises_no_false_flag(planted):
    control = next(c for c in planted["cases"] if c["control"])
    assert [f for f in control["flags"] if not f["precise"]] == []


def test_a_rule_that_flags_on_share_alone_fails_the_same_checks():
    wrong = {**FAST, "flag_without_harm": True, "harm_min_gap": 0.01, "harm_min_z": 0.0}
    report = run_grid(Grid(artifacts=("a ruler",), classes=("melanoma",), controls=True, audit_options=wrong,
                           **SMALL), log=lambda line: None)
    control = next(c for c in report["cases"] if c["control"])
    assert report["summary"]["precision"] < 0.8 or [f for f in control["flags"] if not f["precise"]]
