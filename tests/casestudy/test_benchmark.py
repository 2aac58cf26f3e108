"""The known-answer benchmark on a small grid: one planted case, one new artifact, one control, defaults only.

The full grid is `python manage.py benchmark_flags` (docs/benchmark.md); this keeps the flag rule honest in CI:
the planted artifact must be the target class's top flag, the flags must be precise, and the control must raise
no false flag. The same grid audited with a rule that flags on share alone must fail those checks. Each planted
case also carries its correction's recovery figures (issue 18).
"""
import pytest

from workers.casestudy.benchmark import Grid, format_row, run_grid, summarize_grid

FAST = {"faithfulness_max_images": 32, "faithfulness_steps": 5}
SMALL = dict(seeds=(0,), n_audit=1200, stability_cases=0)


@pytest.fixture(scope="module")
def planted():
    return run_grid(Grid(artifacts=("a ruler", "a stain"), classes=("melanoma",), controls=True,
                         audit_options=FAST, **SMALL), log=lambda line: None)


@pytest.mark.slow
def test_the_planted_artifacts_are_found_and_the_flags_are_precise(planted):
    cases = {c["artifact"]: c for c in planted["cases"] if not c["control"]}
    assert cases["a ruler"]["recall"], cases["a ruler"]["flags"]
    assert cases["a stain"]["recall"], cases["a stain"]["flags"]  # an artifact the vocabulary has no word for
    assert planted["summary"]["precision"] >= 0.8, planted["cases"]
    for case in cases.values():
        assert case["planted_probe_share"] > case["planted_zero_shot_share"]


@pytest.mark.slow
def test_every_planted_case_reports_its_corrections_recovery(planted):
    cases = [c for c in planted["cases"] if not c["control"]]
    for case in cases:
        recovery = case["recovery"]
        assert recovery["latents"], case["flags"]  # the planted artifact was flagged, so it was corrected
        assert list(recovery["gap_closed"]) == [f"melanoma, {case['artifact']}=0", f"nevus, {case['artifact']}=1"]
        assert all(g is not None for g in recovery["gap_closed"].values())
        assert recovery["overall"]["new"] is not None and isinstance(recovery["still_flagged"], bool)
    assert planted["summary"]["corrected"] == len(cases)
    assert all("correction" not in format_row(c) for c in planted["cases"] if c["control"])


@pytest.mark.slow
def test_a_rule_that_flags_on_share_alone_fails_the_same_checks():
    wrong = {**FAST, "flag_without_harm": True, "harm_min_gap": 0.01, "harm_min_z": 0.0}
    report = run_grid(Grid(artifacts=("a ruler",), classes=("melanoma",), controls=True, audit_options=wrong,
                           correct=False, **SMALL), log=lambda line: None)
    control = next(c for c in report["cases"] if c["control"])
    assert report["summary"]["precision"] < 0.8 or [f for f in control["flags"] if not f["precise"]]


def _case(recovery: dict | None) -> dict:
    return {"seed": 0, "control": False, "artifact": "a ruler", "toward": "melanoma", "recall": True,
            "planted_gap": 0.8, "n_flags": 0, "n_precise": 0, "flags": [], "planted_probe_share": None,
            "planted_zero_shot_share": None, "recovery": recovery}


def _recovery(gap_closed: dict, new: float, still_flagged: bool, meets_bar: bool) -> dict:
    return {"latents": [7], "gap_closed": gap_closed, "still_flagged": still_flagged, "meets_bar": meets_bar,
            "overall": {"old": 0.55, "new": new, "reference": 0.8, "change": new - 0.55}, "seconds": 3.0}


def test_a_planted_cases_row_says_how_much_of_the_gap_its_correction_closed():
    good = _recovery({"melanoma, a ruler=0": 0.93, "nevus, a ruler=1": 0.875}, 0.78, False, True)
    line = format_row(_case(good))
    assert "gap closed 93% / 88% (melanoma, a ruler=0, nevus, a ruler=1)" in line
    assert "overall 0.550 -> 0.780" in line and "still flagged no" in line and "below the bar" not in line
    bad = _recovery({"melanoma, a ruler=0": 0.2, "nevus, a ruler=1": None}, 0.5, True, False)
    line = format_row(_case(bad))
    assert "gap closed 20% / n/a" in line and "still flagged YES (below the bar)" in line
    nothing = {"latents": [], "gap_closed": None, "overall": None, "still_flagged": None, "meets_bar": False,
               "seconds": 0.1}
    assert "correction: nothing flagged to correct" in format_row(_case(nothing))


def test_the_summary_counts_the_corrections_that_meet_the_bar():
    good = _recovery({"melanoma, a ruler=0": 0.93, "nevus, a ruler=1": 0.875}, 0.78, False, True)
    bad = _recovery({"melanoma, a ruler=0": 0.2, "nevus, a ruler=1": 0.9}, 0.5, True, False)
    summary = summarize_grid([_case(good), _case(bad)])
    assert summary["corrected"] == 2 and summary["recovery_meets_bar"] == 0.5
    assert summary["still_flagged_after_correction"] == 1 and summary["min_gap_closed"] == 0.2
    assert "recovery_meets_bar" not in summarize_grid([_case(None)])
