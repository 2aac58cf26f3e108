"""How far a correction could go on a planted case: the artifact's true direction, the concept's coverage of the
artifact, and how the benchmark's summary and report put them beside the corrections as run."""
from dataclasses import asdict

import numpy as np

from workers.casestudy.bench_ceiling import ceiling_summary, concept_coverage, format_ceiling
from workers.casestudy.benchmark import Grid, meets_targets, summarize_grid, write_report

RULER = ("melanoma, a ruler=0", "nevus, a ruler=1")


def test_the_coverage_compares_the_concepts_otsu_split_with_the_images_that_show_the_artifact():
    # the concept fires strongly on 3 of the 5 images with the artifact and once, strongly, without it; weakly on
    # others (a TopK SAE keeps some latents on everywhere), which the split leaves out
    activation = np.array([9.0, 8.5, 9.2, 0.3, 0.0, 8.8, 0.2, 0.0, 0.1, 0.0])
    shows = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    cover = concept_coverage(activation, shows)
    assert cover == {"images": 4, "precision": 0.75, "recall": 0.6}
    assert concept_coverage(np.zeros(10), shows) == {"images": 0, "precision": None, "recall": 0.0}


def _planted(gaps_run: dict, gaps_true: dict, refit_true: dict | None = None, recall: float = 0.5) -> dict:
    def ceiling(gaps):
        return {"gap_closed": gaps, "overall_new": 0.7, "meets_gap": all(g is not None and g >= 0.8
                                                                         for g in gaps.values())}
    run = {"latents": [7], "gap_closed": gaps_run, "still_flagged": False, "meets_bar": False, "seconds": 3.0,
           "overall": {"old": 0.55, "new": 0.6, "reference": 0.7, "change": 0.05}}
    return {"seed": 0, "control": False, "artifact": "a ruler", "toward": "melanoma", "recall": True,
            "planted_gap": 0.8, "n_flags": 0, "n_precise": 0, "flags": [], "planted_probe_share": None,
            "planted_zero_shot_share": None, "seconds": 90.0,
            "corrections": {"project": run, "refit": run},
            "ceiling": {"project": ceiling(gaps_true), "refit": ceiling(refit_true or gaps_true),
                        "coverage": {"images": 300, "precision": 0.9, "recall": recall}}}


def test_the_summary_counts_the_gap_part_met_along_the_saes_direction_and_along_the_true_one(tmp_path):
    met = dict(zip(RULER, (0.85, 1.01)))
    short = dict(zip(RULER, (0.5, 0.9)))
    cases = [_planted(short, met, recall=0.5), _planted(met, met, dict(zip(RULER, (0.7, None))), recall=0.9),
             _planted(short, short, recall=0.3)]
    ceiling = ceiling_summary(cases)["ceiling"]
    assert ceiling["project"] == {"cases": 3, "true_direction_meets_gap": 2, "sae_direction_meets_gap": 1}
    assert ceiling["refit"] == {"cases": 3, "true_direction_meets_gap": 1, "sae_direction_meets_gap": 1}
    assert ceiling["coverage"] == {"recall_mean": 0.5667, "recall_min": 0.3, "precision_mean": 0.9}
    assert ceiling_summary([{**cases[0], "ceiling": None}]) == {}

    summary = summarize_grid(cases)
    assert summary["ceiling"] == ceiling
    report = {"summary": summary, "met": meets_targets(summary), "cases": cases, "stability": [], "seconds": 60.0,
              "grid": {**asdict(Grid(seeds=(0,), artifacts=("a ruler",), classes=("melanoma",), controls=False)),
                       "cases": len(cases)},
              "machine": {"host": "h", "processor": "x86_64", "python": "3.11"}}
    md, _ = write_report(report, tmp_path, "python manage.py benchmark_flags")
    text = md.read_text()
    assert "- `project`: gap part met in 1 of 3 cases along the SAE concept's direction, 2 along the true one." \
        in text
    assert "take 0.5667 of the artifact's images on average (smallest 0.3), at precision 0.9" in text
    assert "| correction along the artifact's true direction |" in text
    assert ("true direction: project 85% / 101%, refit 70% / n/a (below the bar); the concept takes 90% of the "
            "artifact's images at precision 0.90") in text


def test_a_cases_ceiling_in_words_says_which_method_falls_below_the_bar():
    case = _planted({}, dict(zip(RULER, (0.85, 0.6))), dict(zip(RULER, (0.9, 0.95))), recall=0.28)
    assert format_ceiling(case["ceiling"]) == (
        "true direction: project 85% / 60% (below the bar), refit 90% / 95%; the concept takes 28% of the "
        "artifact's images at precision 0.90")
