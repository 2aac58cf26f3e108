"""The known-answer benchmark on a small grid: one planted case, one new artifact, one control, defaults only.

The full grid is `python manage.py benchmark_flags` (docs/benchmark.md); this keeps the flag rule honest in CI:
the planted artifact must be the target class's top flag, the flags must be precise, and the control must raise
no false flag. The same grid audited with a rule that flags on share alone must fail those checks. Each planted
case also carries its corrections' recovery figures (issue 18) and where its flags' heatmaps lie (issue 19).
"""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from workers.casestudy.benchmark import (Grid, format_row, intervals, meets_targets, run_grid, scored_report,
                                        summarize_grid, write_report)

FAST = {"faithfulness_max_images": 32, "faithfulness_steps": 5}
# every method along the SAE's concept, one along its widened images and one along the artifact's column (the
# benchmark runs more of both)
METHODS = ("project", "refit", "reweight", "project (widened)", "refit (column)")
SMALL = dict(seeds=(0,), n_audit=1200, stability_cases=0, corrections=METHODS)


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
        assert list(case["corrections"]) == list(METHODS)
        for recovery in case["corrections"].values():
            assert recovery["latents"], case["flags"]  # the planted artifact was flagged, so it was corrected
            assert list(recovery["gap_closed"]) == [f"melanoma, {case['artifact']}=0",
                                                    f"nevus, {case['artifact']}=1"]
            assert all(g is not None for g in recovery["gap_closed"].values())
            assert recovery["overall"]["new"] is not None and isinstance(recovery["still_flagged"], bool)
        # and how far they could go along the artifact's true direction, with the concept's share of its images
        for method in ("project", "refit"):
            assert list(case["ceiling"][method]["gap_closed"]) == list(case["corrections"][method]["gap_closed"])
            assert all(g is not None for g in case["ceiling"][method]["gap_closed"].values())
        assert 0 < case["ceiling"]["coverage"]["recall"] <= 1 and case["ceiling"]["coverage"]["precision"] > 0.5
        # two methods, two different probes
        assert case["corrections"]["project"]["overall"]["new"] != case["corrections"]["refit"]["overall"]["new"] \
            or case["corrections"]["project"]["gap_closed"] != case["corrections"]["refit"]["gap_closed"]
    for method in METHODS:
        assert planted["summary"]["corrections"][method]["corrected"] == len(cases)
    for case in cases:  # along the column: one round, and the direction is the column's
        column = case["corrections"]["refit (column)"]
        assert len(column["rounds"]) == 1 and column["gap_closed"] != case["corrections"]["refit"]["gap_closed"]
        # along the widened images: the same flags, another direction, so other gaps closed
        assert case["corrections"]["project (widened)"]["gap_closed"] != case["corrections"]["project"]["gap_closed"]
    assert all("project" not in format_row(c) and "heatmap" not in format_row(c)
               for c in planted["cases"] if c["control"])


@pytest.mark.slow
def test_the_planted_flags_heatmaps_lie_on_their_artifact_above_chance(planted):
    for case in (c for c in planted["cases"] if not c["control"]):
        heatmap = case["heatmap"]
        # the maps are of the corrected latents (the flags that track the planted artifact) that track it
        assert heatmap["latents"] and set(heatmap["latents"]) <= set(case["corrections"]["project"]["latents"])
        assert heatmap["n_images"] >= len(heatmap["latents"]), heatmap  # references that show the artifact
        assert 0 < heatmap["chance"] < heatmap["ideal"] <= 1 and 0 <= heatmap["mass"] <= 1, heatmap
        assert 0 < heatmap["touched_chance"] < 1 and 0 <= heatmap["touched"] <= 1, heatmap
        # every method side by side on the same maps' latents and images, the default first, and its ceiling
        assert list(heatmap["methods"])[:2] == ["attnlrp, 3 blocks", "attnlrp, 1 block"]
        assert heatmap["method"] == "attnlrp, 3 blocks" and heatmap["mass"] == heatmap["methods"]["attnlrp, 3 blocks"]["mass"]
        assert "attnlrp, 3 blocks on the artifact's direction" in heatmap["methods"]
        # the same maps for every method: counted, or without mass (an inactive latent, a map all zero)
        assert len({m["n_images"] + m["n_empty"] for label, m in heatmap["methods"].items()
                    if "direction" not in label}) == 1
    # the ruler's maps find it (on this small grid the largest cell lies on it in about half the maps; the full
    # benchmark's figures are in docs/benchmark.md); the stain's need not be as good
    ruler = next(c for c in planted["cases"] if c["artifact"] == "a ruler")["heatmap"]
    assert ruler["mass"] >= 2 * ruler["chance"] and ruler["touched"] >= 2 * ruler["touched_chance"], ruler
    assert planted["summary"]["heatmap"]["cases"] == 2


@pytest.mark.slow
def test_a_rule_that_flags_on_share_alone_fails_the_same_checks():
    wrong = {**FAST, "flag_without_harm": True, "harm_min_gap": 0.01, "harm_min_z": 0.0}
    report = run_grid(Grid(artifacts=("a ruler",), classes=("melanoma",), controls=True, audit_options=wrong,
                           heatmaps=False, checklist=False, **{**SMALL, "corrections": ()}), log=lambda line: None)
    control = next(c for c in report["cases"] if c["control"])
    assert report["summary"]["precision"] < 0.8 or [f for f in control["flags"] if not f["precise"]]


def _case(recovery: dict | None = None, refit: dict | None = None, heatmap: dict | None = None,
          artifact: str = "a ruler") -> dict:
    corrections = {m: r for m, r in (("project", recovery), ("refit", refit)) if r is not None}
    case = {"seed": 0, "control": False, "artifact": artifact, "toward": "melanoma", "recall": True,
            "planted_gap": 0.8, "n_flags": 0, "n_precise": 0, "flags": [], "planted_probe_share": None,
            "planted_zero_shot_share": None, "seconds": 90.0}
    if corrections:
        case["corrections"] = corrections
    if heatmap is not None:
        case["heatmap"] = heatmap
    return case


def _recovery(gap_closed: dict, new: float, still_flagged: bool, meets_bar: bool) -> dict:
    return {"latents": [7], "gap_closed": gap_closed, "still_flagged": still_flagged, "meets_bar": meets_bar,
            "overall": {"old": 0.55, "new": new, "reference": 0.8, "change": new - 0.55}, "seconds": 3.0}


def _heatmap(mass: float, chance: float, ideal: float, n_images: int = 40, other: tuple | None = None) -> dict:
    """A planted case's heatmap figures: the default method's, and ``other`` = (mass, pointing) of "block"."""
    row = {"mass": mass, "chance": chance, "ideal": ideal, "peak_on_artifact": 0.9, "touched": 0.8,
           "touched_chance": 0.25, "n_images": n_images, "seconds_per_map": 0.004}
    methods = {"attnlrp, 3 blocks": dict(row)}
    if other:
        methods["block"] = {**row, "mass": other[0], "peak_on_artifact": other[1], "seconds_per_map": 0.002}
    return {**row, "latents": [7, 9], "seconds": 4.0, "method": "attnlrp, 3 blocks", "methods": methods}


def test_a_planted_cases_row_says_how_much_of_the_gap_each_correction_closed():
    good = _recovery({"melanoma, a ruler=0": 0.93, "nevus, a ruler=1": 0.875}, 0.78, False, True)
    bad = _recovery({"melanoma, a ruler=0": 0.2, "nevus, a ruler=1": None}, 0.5, True, False)
    line = format_row(_case(good, bad))
    project, refit = line.split(" | project: ")[1].split(" | refit: ")
    assert "gap closed 93% / 88% (melanoma, a ruler=0, nevus, a ruler=1)" in project
    assert "overall 0.550 -> 0.780" in project and "still flagged no" in project and "below the bar" not in project
    assert "gap closed 20% / n/a" in refit and "still flagged YES (below the bar)" in refit
    nothing = {"latents": [], "gap_closed": None, "overall": None, "still_flagged": None, "meets_bar": False,
               "seconds": 0.1}
    assert "project: nothing flagged to correct" in format_row(_case(nothing))
    skipped = {**nothing, "skipped": "the case has no probe training split"}
    assert "refit: not run: the case has no probe training split" in format_row(_case(nothing, skipped))


def test_a_planted_cases_row_gives_its_heatmap_mass_against_chance_and_the_ideal():
    line = format_row(_case(heatmap=_heatmap(0.42, 0.108, 0.517)))
    assert "heatmap: attnlrp, 3 blocks: mass 0.42 (chance 0.11, ideal 0.52, 81% of it), peak on it 0.90, 40 maps" \
        in line
    empty = {**_heatmap(None, None, None, 0), "latents": []}
    assert "heatmap: no map of the artifact (nothing flagged)" in format_row(_case(heatmap=empty))
    assert "heatmap" not in format_row(_case())


def test_the_summary_counts_the_corrections_that_meet_the_bar_per_method():
    good = _recovery({"melanoma, a ruler=0": 0.93, "nevus, a ruler=1": 0.875}, 0.78, False, True)
    bad = _recovery({"melanoma, a ruler=0": 0.2, "nevus, a ruler=1": 0.9}, 0.5, True, False)
    summary = summarize_grid([_case(good, good), _case(bad, good)])
    project, refit = summary["corrections"]["project"], summary["corrections"]["refit"]
    assert project["corrected"] == 2 and project["meets_bar"] == 0.5
    assert project["still_flagged"] == 1 and project["min_gap_closed"] == 0.2
    assert refit["meets_bar"] == 1.0 and refit["still_flagged"] == 0 and refit["min_gap_closed"] == 0.875
    assert summary["corrections_some_method"] == {"cases": 2, "sae": 2}
    assert "corrections" not in summarize_grid([_case()])


def test_the_summary_counts_the_cases_some_method_of_each_kind_corrects_to_the_bar(tmp_path):
    good = _recovery({"melanoma, a ruler=0": 0.93, "nevus, a ruler=1": 0.875}, 0.78, False, True)
    bad = _recovery({"melanoma, a ruler=0": 0.2, "nevus, a ruler=1": 0.9}, 0.5, True, False)
    cases = [_case(bad, good), _case(bad, bad), _case(bad, bad)]
    cases[0]["corrections"]["refit (column)"] = bad
    cases[1]["corrections"]["project (column)"] = good
    cases[2]["corrections"]["project (column)"] = good
    cases[1]["corrections"]["project (widened)"] = good
    cases[2]["corrections"]["refit (widened)"] = bad
    summary = summarize_grid(cases)
    assert summary["corrections_some_method"] == {"cases": 3, "sae": 1, "widened": 1, "column": 2}
    report = {"summary": summary, "met": meets_targets(summary), "cases": cases, "stability": [], "seconds": 60.0,
              "grid": {**asdict(Grid(seeds=(0,), artifacts=("a ruler",), classes=("melanoma",), controls=False)),
                       "cases": len(cases)},
              "machine": {"host": "h", "processor": "x86_64", "python": "3.11"}}
    text = write_report(report, tmp_path, "python manage.py benchmark_flags")[0].read_text()
    assert "- Some method (the best for each case) meets the bar in 1 of 3 cases along the SAE's concept, 1 along " \
           "its widened images, 2 along the column." in text
    assert "A method named `... (widened)` corrects them along the concept's images widened" in text
    assert "A method named `... (column)` corrects the same flags along the artifact's labels.csv column" in text
    # a run without the stability audits says so rather than listing no seeds
    assert "Stability: not measured in this run (`--no-stability`)." in text and "SAE seeds ." not in text


def test_the_summary_and_the_report_carry_the_heatmap_methods_side_by_side_per_artifact(tmp_path):
    cases = [_case(heatmap=_heatmap(0.4, 0.1, 0.5, 30, other=(0.2, 0.5))),
             _case(heatmap=_heatmap(0.7, 0.2, 0.8, 10, other=(0.3, 0.4))),
             _case(heatmap=_heatmap(0.3, 0.2, 0.6, 20, other=(0.5, 1.0)), artifact="hair"),
             _case(heatmap={**_heatmap(None, None, None, 0), "latents": []}, artifact="a stain")]
    summary = summarize_grid(cases)
    h = summary["heatmap"]
    assert (h["cases"], h["of"]) == (3, 4)  # a case without maps is not averaged in
    assert h["mass"] == pytest.approx(0.4667, abs=1e-4) and h["chance"] == pytest.approx(0.1667, abs=1e-4)
    assert h["method"] == "attnlrp, 3 blocks" and list(h["methods"]) == ["attnlrp, 3 blocks", "block"]
    assert h["per_artifact"]["a ruler"] == pytest.approx(
        {"cases": 2, "n_images": 40, "mass": 0.55, "chance": 0.15, "ideal": 0.65, "peak_on_artifact": 0.9,
         "touched": 0.8, "touched_chance": 0.25, "seconds_per_map": 0.004})
    assert list(h["per_artifact"]) == ["a ruler", "hair"]
    # per artifact: ruler 0.55 / 0.65, hair 0.3 / 0.6; both at least twice chance? ruler 3.7x, hair 1.5x
    assert h["mass_over_ideal"] == pytest.approx((0.55 / 0.65 + 0.5) / 2, abs=1e-4)
    assert h["twice_chance"] == 0.5 and h["pointing"] == pytest.approx(0.9)
    block = h["methods"]["block"]
    assert block["per_artifact"]["a ruler"]["mass"] == pytest.approx(0.25)
    assert block["pointing"] == pytest.approx((0.45 + 1.0) / 2)
    met = meets_targets(summary)
    assert met["heatmap_mass_over_ideal"] is False and met["heatmap_twice_chance"] is False
    assert met["heatmap_pointing"] is True
    report = {"summary": summary, "met": met, "cases": cases, "stability": [], "seconds": 600.0,
              "grid": {**asdict(Grid(seeds=(0,), artifacts=("a ruler", "hair", "a stain"), classes=("melanoma",),
                                     controls=False)), "cases": len(cases)},
              "machine": {"host": "h", "processor": "x86_64", "python": "3.11"}}
    md, _ = write_report(report, tmp_path, "python manage.py benchmark_flags --seeds 0")
    text = md.read_text()
    assert "| heatmap mass on the artifact / patch-level ideal, mean over artifacts (attnlrp, 3 blocks) | 0.6731 " \
           "| >= 0.8 | NO |" in text
    assert "| pointing game: maps whose largest cell touches the artifact, mean over artifacts (attnlrp, 3 blocks) " \
           "| 0.9 | >= 0.9 | yes |" in text
    assert "| a ruler | attnlrp, 3 blocks | 2 | 40 | 0.550 | 0.150 | 0.650 | 0.85 | 3.7 | 0.90 | 4.0 |" in text
    assert "| a ruler | block | 2 | 40 | 0.250 | 0.150 | 0.650 | 0.38 | 1.7 | 0.45 | 2.0 |" in text
    assert "| attnlrp, 3 blocks (default) | 0.67 | 0.50 | 0.90 | 4.0 |" in text
    assert "area-weighted" in text
    assert "mass 0.30 (chance 0.20, ideal 0.60, 50% of it)" in text  # the hair case's row
    # 150 s a case, so the default grid's 45 cases would take 112 min
    assert "4 cases, a smaller grid than the default (45 cases" in text and "take about 112 min" in text


def _stability(every: int, anyone: int) -> dict:
    return {"seed": 0, "case": "a ruler -> melanoma", "sae_seeds": [0, 1, 2], "flagged": [], "every": every,
            "any": anyone, "overlap": every / anyone}


def test_seed_stability_pools_every_planted_case_and_each_figure_carries_an_interval():
    cases = [_case(artifact="a ruler"), _case(artifact="hair"), _case(artifact="a stain")]
    stability = [_stability(2, 2), _stability(1, 4), _stability(3, 4)]
    summary = summarize_grid(cases, stability)
    assert summary["seed_stability"] == pytest.approx(6 / 10) and summary["stability_cases"] == 3
    assert meets_targets(summary)["seed_stability"] is False  # 0.6 is below 0.8
    bounds = intervals(cases, stability, resamples=500)
    low, high = bounds["seed_stability"]
    assert low <= 0.6 <= high and low < high  # the cases disagree, so resampling them moves the figure
    assert low >= 0.25 and high <= 1.0  # no resample pools less than 1 of 4 or more than every concept
    assert bounds["recall"] == [1.0, 1.0]  # every case recalls its artifact: nothing to move
    assert summarize_grid(cases)["seed_stability"] is None and "seed_stability" not in meets_targets(
        summarize_grid(cases))


def test_purity_says_which_artifact_a_concept_tracks_and_how_cleanly():
    from workers.casestudy.benchmark import purity
    from workers.casestudy.images import ARTIFACTS

    rng = np.random.default_rng(0)
    rows = [{a: str(int(rng.random() < 0.4)) for a in ARTIFACTS} for _ in range(300)]
    ruler = np.array([float(r["a ruler"] == "1") for r in rows])
    clean = purity(ruler * (1 + rng.random(300)), rows)
    assert clean["purity_artifact"] == "a ruler" and clean["purity"] == 1.0 and clean["next_purity"] < 0.7
    absent = purity((1 - ruler) * rng.random(300), rows)
    assert absent["purity_artifact"] == "a ruler (absent)" and absent["purity"] > 0.9
    hair = np.array([float(r["hair"] == "1") for r in rows])
    mixed = purity(ruler + hair, rows)  # one latent for two artifacts: neither told apart cleanly
    assert mixed["purity"] < 0.9 and mixed["next_purity"] > 0.7


def test_the_summary_averages_the_flags_purity_against_the_target():
    cases = [_case(artifact="a ruler"), _case(artifact="hair")]
    cases[0]["flags"] = [{"precise": True, "confirmed": True, "label_correct": "unlabelled", "novel_artifact": False,
                          "label_confidence": 0.0, "purity": p} for p in (0.95, 0.75)]
    summary = summarize_grid(cases)
    assert summary["purity"] == pytest.approx(0.85)
    assert meets_targets(summary)["purity"] is False


def test_the_label_figures_count_closest_concepts_on_named_artifacts_and_every_wrong_name():
    def flag(label, closest, correct, closest_correct):
        return {"precise": True, "confirmed": False, "label_correct": correct, "novel_artifact": False,
                "label_confidence": 0.9 if correct != "unlabelled" else 0.1, "label": label,
                "closest_concept": closest, "closest_correct": closest_correct, "purity": 0.9}

    cases = [_case(artifact="a ruler"), _case(artifact="a stain")]
    cases[0]["flags"] = [flag("a ruler", "a ruler", "right", True),
                         flag("unlabelled", "ruler measuring stick", "unlabelled", True),
                         flag("unlabelled", "golf ball", "unlabelled", False)]
    cases[1]["flags"] = [flag("unlabelled", "baseball", "unlabelled", None)]  # the vocabulary has no word for it
    summary = summarize_grid(cases)
    assert summary["closest_right"] == pytest.approx(2 / 3, abs=1e-4) and summary["named_wrong"] == 0
    met = meets_targets(summary)
    assert met["closest_right"] is False and met["named_wrong"] is True
    cases[1]["flags"] = [flag("a colour calibration chart", "a colour calibration chart", "wrong", None)]
    assert meets_targets(summarize_grid(cases))["named_wrong"] is False  # one confident wrong name fails it


def test_a_name_is_right_in_any_phrasing_of_the_artifacts_meaning():
    from workers.casestudy.benchmark import _label_correct

    assert _label_correct("ruler measuring stick", ["a ruler"]) == "right"
    assert _label_correct("dark hairs over the skin", ["hair"]) == "right"
    assert _label_correct("a dark vignette around the image", ["dark corners"]) == "right"
    assert _label_correct("hair clip", ["a sticker"]) == "wrong"
    assert _label_correct("unlabelled", ["a ruler"]) == "unlabelled"
    assert _label_correct(None, ["a ruler"]) == "unlabelled"


def test_case_model_digests_are_recorded_once_and_a_rebuild_that_differs_is_reported(tmp_path, monkeypatch):
    from workers.casestudy import benchmark

    weights = {0: tmp_path / "seed0.safetensors", 1: tmp_path / "seed1.safetensors"}
    for seed, path in weights.items():
        path.write_bytes(f"weights of seed {seed}".encode())
    monkeypatch.setattr(benchmark, "build_case", lambda root, cfg, log=None: {"checkpoint": str(weights[cfg.seed])})
    record = tmp_path / "model_digests.json"
    grid = Grid(seeds=(0, 1), artifacts=("a ruler",), classes=("melanoma",))
    first = benchmark.model_digests(tmp_path, grid, recorded=record)
    assert [m["match"] for m in first.values()] == [None, None]  # nothing recorded yet: recorded now
    assert benchmark.digest_mismatches(first) == []
    assert benchmark.model_digests(tmp_path, grid, recorded=record)[0]["match"] is True
    weights[1].write_bytes(b"another machine's weights")
    again = benchmark.model_digests(tmp_path, grid, recorded=record)
    assert (again[0]["match"], again[1]["match"]) == (True, False)
    [line] = benchmark.digest_mismatches(again)
    assert line.startswith("seed 1: the case model's SHA-256") and "measure other cases" in line
    assert again[1]["recorded"] == first[1]["sha256"]  # the record is not overwritten by the mismatch


def test_the_checklists_heatmaps_are_measured_on_the_artifacts_masks_and_reported_beside_chance(tmp_path):
    from workers.casestudy.bench_checklist import checklist_summary, heatmap_mass, meets_checklist, report_checklist
    from workers.casestudy.images import write_masks
    from workers.engine.heatmaps import encode_map

    ruler = np.zeros((64, 64), bool)
    ruler[:, :16] = True  # the ruler covers a quarter of the image: chance 0.25
    write_masks(tmp_path, "images/a.png", {"a ruler": ruler})
    write_masks(tmp_path, "images/b.png", {})
    on = np.zeros((4, 4))
    on[:, 0] = 1.0  # all of the map on the ruler's column of patches
    spread = np.ones((4, 4))
    answer = {"heatmaps": {"images/a.png": encode_map(on), "images/b.png": encode_map(spread)}}
    row = heatmap_mass(answer, "a ruler", tmp_path)
    assert row == {"heat_mass": pytest.approx(1.0), "heat_chance": pytest.approx(0.25), "heat_maps": 1}
    assert heatmap_mass(answer, "hair", tmp_path) == {"heat_mass": None, "heat_chance": None, "heat_maps": 0}
    assert heatmap_mass({"heatmaps": {"images/a.png": encode_map(spread)}}, "a ruler", tmp_path)["heat_mass"] == \
        pytest.approx(0.25)

    def answer_row(artifact, planted, right, mass=None, chance=None, maps=0):
        return {"artifact": artifact, "planted": planted, "verdict": "relied on, harmful" if planted else
                "represented, not relied on", "class": "melanoma", "right": right, "heat_mass": mass,
                "heat_chance": chance, "heat_maps": maps}

    cases = [{"control": False, "seed": 0, "artifact": "a ruler", "checklist": {"text": [
        answer_row("a ruler", True, True, 0.6, 0.2, 4), answer_row("hair", False, True, 0.1, 0.1, 2),
        answer_row("a stain", False, False)]}},
             {"control": False, "seed": 1, "artifact": "hair", "checklist": {"text": [
                 answer_row("hair", True, True, 0.4, 0.2, 3), answer_row("a ruler", False, True, 0.3, 0.1, 4)]}}]
    summary = checklist_summary(cases)["checklist"]["text"]
    assert summary["heat_planted"] == {"answers": 2, "mass": 0.5, "chance": 0.2}
    assert summary["heat_independent"] == {"answers": 2, "mass": 0.2, "chance": 0.1}
    table = "\n".join(report_checklist({"checklist": {"text": summary}}))
    # the interval resamples whole cases: both of the first (4 of 6 right) to both of the second (all right)
    assert summary["right_interval"] == [0.6667, 1.0]
    assert "| text | 5 | 0.8 [0.6667, 1.0] | 0.8 | - | - | 1.0 | 0.6667 |" in table and "0.50 vs 0.20 (2.5x, 2)" in table
    assert "0.20 vs 0.10 (2.0x, 2)" in table
    # per seed, and against the 95 % target over every pair: 4 of 5 misses it though seed 1 alone is all right
    assert summary["per_seed"] == {"0": {"pairs": 3, "right": 0.6667, "planted": [1, 1]},
                                   "1": {"pairs": 2, "right": 1.0, "planted": [1, 1]}}
    assert "| seed | text |" in table and "| 0 | 0.6667 (1 of 1) |" in table and "| 1 | 1.0 (1 of 1) |" in table
    assert meets_checklist({"checklist": {"text": summary}}) == {"checklist_text": False}
    cases[0]["checklist"]["text"][2]["right"] = True
    assert meets_checklist(checklist_summary(cases)) == {"checklist_text": True}
    cases[0]["checklist"]["text"][2]["right"] = False
    # text scored by meaning alone beside it, from the same answers: here the planted ruler was found by reading
    by_meaning = [False, True, False, True, True]
    for row, meaning, by in zip([r for c in cases for r in c["checklist"]["text"]], by_meaning,
                                ["reading", "meaning", "meaning", "meaning", "reading"]):
        row.update(right_by_meaning=meaning, by=by)
    summary = checklist_summary(cases)["checklist"]["text"]
    assert (summary["right_by_meaning"], summary["planted_right_by_meaning"], summary["by_reading"]) == (0.6, 0.5, 2)
    assert "| text | 5 | 0.8 [0.6667, 1.0] | 0.8 | 0.6 (0.5) | 2 | 1.0 | 0.6667 |" in \
        "\n".join(report_checklist({"checklist": {"text": summary}}))


def test_the_verdict_on_shares_alone_is_recomputed_from_an_answer_for_the_side_by_side_column():
    from workers.casestudy.bench_checklist import is_right, verdict_on_shares
    from workers.engine.config import AuditConfig

    def row(share, zero_shot, measured, moves):
        return {"probe_share": share, "zero_shot_share": zero_shot, "relied_on": measured or moves,
                "harm": {"measured": measured}, "shift": {"moves": moves}}

    answer = {"match": {"found": True}, "verdict": "represented, not relied on", "verdict_class": "melanoma",
              "classes": {"melanoma": row(0.08, 0.02, False, False), "nevus": row(0.01, 0.01, False, False)}}
    config = AuditConfig.from_dict({})
    assert verdict_on_shares(answer, config) == ("relied on, no measured harm", "melanoma")
    assert not is_right(*verdict_on_shares(answer, config), planted=False, toward="melanoma")
    assert is_right(answer["verdict"], answer["verdict_class"], planted=False, toward="melanoma")
    answer["classes"]["melanoma"] = row(0.08, 0.07, False, False)  # zero-shot reads it alike: not relied on either way
    assert verdict_on_shares(answer, config) == ("represented, not relied on", "melanoma")


def _checklist_rows(right: list[bool]) -> dict:
    """A case's text checklist: the planted ruler first, then independent artifacts, each right or not."""
    return {"text": [{"artifact": a, "planted": i == 0, "verdict": "relied on, harmful" if i == 0 else
                      "represented, not relied on", "class": "melanoma", "right": r, "heat_maps": 0}
                     for i, (a, r) in enumerate(zip(("a ruler", "hair", "a stain", "a sticker"), right))]}


def _run_report(tmp_path, seeds: tuple, rights: list[list[bool]], name: str) -> Path:
    """One run's benchmark.json, written as the command writes it, for ``seeds`` with one planted case each."""
    cases = [{**_case(), "seed": seed, "checklist": _checklist_rows(right)} for seed, right in zip(seeds, rights)]
    report = scored_report({**asdict(Grid(seeds=seeds, artifacts=("a ruler",), classes=("melanoma",),
                                          controls=False, stability_cases=0)), "cases": len(cases)},
                           cases, [], {str(s): {"model_key": f"k{s}", "sha256": "ab" * 32, "recorded": "ab" * 32,
                                                "match": True} for s in seeds},
                           [], 120.0, {"host": "h", "processor": "x86_64", "python": "3.11"})
    return write_report(report, tmp_path / name, f"python manage.py benchmark_flags --seeds {seeds[0]}")[1]


def test_runs_on_other_seeds_are_pooled_into_one_report_with_every_figure_computed_again_over_all_cases(tmp_path):
    from django.core.management import CommandError, call_command

    first = _run_report(tmp_path, (7, 8), [[True, True, True, True], [False, True, True, True]], "a")
    second = _run_report(tmp_path, (9,), [[True, True, True, False]], "b")
    out = tmp_path / "pooled"
    with pytest.raises(CommandError, match="a target was missed"):  # 10 of 12 pairs: below 95 %
        call_command("benchmark_flags", "--pool", str(first), str(second), "--out", str(out))
    pooled = json.loads((out / "benchmark.json").read_text())
    text = pooled["summary"]["checklist"]["text"]
    assert text["pairs"] == 12 and text["right"] == 0.8333 and pooled["met"]["checklist_text"] is False
    assert text["per_seed"] == {"7": {"pairs": 4, "right": 1.0, "planted": [1, 1]},
                                "8": {"pairs": 4, "right": 0.75, "planted": [0, 1]},
                                "9": {"pairs": 4, "right": 0.75, "planted": [1, 1]}}
    assert pooled["grid"]["seeds"] == [7, 8, 9] and pooled["grid"]["cases"] == 3 and pooled["seconds"] == 240.0
    assert sorted(pooled["models"]) == ["7", "8", "9"]
    md = (out / "benchmark.md").read_text()
    assert "Pooled from these runs' scored cases" in md and "- seeds 9: `python manage.py benchmark_flags --seeds 9`" \
        in md
    assert "| checklist, text: (case, artifact) pairs right, planted and independent | 0.8333 [" in md
    assert "| 8 | 0.75 (0 of 1) |" in md
    # runs that are not one grid on other seeds are refused, and nothing is written
    again = _run_report(tmp_path, (9,), [[True, True, True, True]], "c")
    for files, words in (([first, again, second], "seed 9 is in more than one run"),
                         ([first], "pool at least two runs")):
        with pytest.raises(CommandError, match=words):
            call_command("benchmark_flags", "--pool", *map(str, files), "--out", str(tmp_path / "no"))
    other = json.loads(second.read_text())
    other["grid"]["strength"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(CommandError, match="the runs differ in strength"):
        call_command("benchmark_flags", "--pool", str(first), str(tmp_path / "other.json"), "--out",
                     str(tmp_path / "no"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(CommandError, match="not a benchmark.json written by this command"):
        call_command("benchmark_flags", "--pool", str(first), str(tmp_path / "bad.json"), "--out",
                     str(tmp_path / "no"))
    assert not (tmp_path / "no").exists()


def test_the_benchmark_runs_only_the_correction_methods_asked_for_and_refuses_a_contradiction(tmp_path, monkeypatch):
    from django.core.management import CommandError, call_command

    import audit_service.audits.management.commands.benchmark_flags as command

    grids = []
    monkeypatch.setattr(command, "run_grid", lambda grid, log: grids.append(grid) or {})
    monkeypatch.setattr(command.Command, "_finish", lambda self, report, out, line: None)
    call_command("benchmark_flags", "--seeds", "3", "--corrections", "project", "project (widened)",
                 "--out", str(tmp_path))
    call_command("benchmark_flags", "--seeds", "3", "--out", str(tmp_path))
    assert grids[0].corrections == ("project", "project (widened)") and grids[1].corrections == Grid.corrections
    assert "project (widened)" in Grid.corrections and "refit (widened)" in Grid.corrections
    with pytest.raises(CommandError, match="--no-corrections and --corrections ask for opposite things"):
        call_command("benchmark_flags", "--no-corrections", "--corrections", "project", "--out", str(tmp_path))
    with pytest.raises(CommandError, match="invalid choice: 'projekt'"):
        call_command("benchmark_flags", "--corrections", "projekt", "--out", str(tmp_path))
    assert len(grids) == 2 and not list(tmp_path.iterdir())
