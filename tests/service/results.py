"""Hand-built audit results with known numbers, stored the way a worker stores them (``store_result``).

``build_result()`` has every key of the result format with measured harm (issue 15: harm, confirmation,
label confidence, metadata AUROC, concept latents, slices, the SAE's dataset); ``without_new_keys`` turns it
into what an engine before it returned.
"""
from __future__ import annotations

import copy

import numpy as np

from audit_service.audits.models import store_result
from audit_service.audits.services import create_audit

CLASSES = ["melanoma", "nevus"]
RULER_SUMMARY = ("melanoma images without it: 33% called melanoma vs 96% with it; nevus images with it called "
                 "melanoma 81% vs 2% without (zero-shot: 71% vs 74%, 20% vs 22%)")


def _unit(i: int, d: int = 8) -> list[float]:
    return np.eye(d)[i].tolist()


def _harm(probe: tuple, zero_shot: tuple, measured: bool, summary: str) -> dict:
    """``probe`` / ``zero_shot``: (n, accuracy) with it, (n, accuracy) without it, (n, called) others with it,
    (n, called) others without it."""
    def head(cells):
        (nw, aw), (nwo, awo), (ow, cw), (owo, cwo) = cells
        return {"class_with": {"n": nw, "accuracy": aw, "mean_logit": 1.0},
                "class_without": {"n": nwo, "accuracy": awo, "mean_logit": -0.5},
                "others_with": {"n": ow, "called_class": cw}, "others_without": {"n": owo, "called_class": cwo},
                "accuracy_gap": None if aw is None or awo is None else aw - awo,
                "called_gap": None if cw is None or cwo is None else cw - cwo}
    return {"probe": head(probe), "zero_shot": head(zero_shot), "measured": measured, "summary": summary}


def _flag(head: str, class_name: str, latent: int, rank: int, label: str, **extra) -> dict:
    return {"head": head, "class_name": class_name, "latent": latent, "rank": rank, "share": 0.4,
            "mean_relevance": 0.2, "label": label, "label_source": "artifact", "category": "dataset_artifact",
            "label_alignment": 0.3, "expected_alignment": -0.1, "clarity": 0.9, "probe_share": 0.4,
            "zero_shot_share": 0.05, "references": [], "top_images": [], "semantic": _unit(latent), **extra}


def _slice(n: int, probe: tuple, zero_shot: tuple) -> dict:
    """``probe`` / ``zero_shot``: (overall accuracy, melanoma accuracy, nevus accuracy)."""
    return {"n": n, **{head: {"accuracy": acc[0], "per_class": dict(zip(CLASSES, acc[1:]))}
                       for head, acc in (("probe", probe), ("zero_shot", zero_shot))}}


def build_result(**overrides) -> dict:
    """Three flags: the ruler under the probe for melanoma (confirmed, measured harm, spread over latents 0 and 3,
    fires on the ruler column), an unlabelled latent for nevus (relied on, no harm) and the ruler under zero-shot
    (not confirmed). Accuracy is sliced by the ruler column; the SAE was trained on a separate dataset."""
    ruler = _flag("probe", "melanoma", 0, 1, "a ruler", label_confidence=0.91, closest_concept="a ruler",
                  label_evidence={"runner_up": "hair", "margin": 2.5, "agreeing": ["a measuring scale"],
                                  "resampled": 0.91},
                  harm=_harm(((25, 0.96), (15, 1 / 3), (16, 0.8125), (24, 1 / 48)),
                             ((25, 0.71), (15, 0.74), (16, 0.20), (24, 0.22)), True, RULER_SUMMARY),
                  confirmation={"status": "confirmed", "text": "confirmed shortcut, measured harm: removing it "
                                                               "fixes 9 of the 13 other images it is active on "
                                                               "that are wrongly called melanoma (69%; latents of "
                                                               "similar activation mass fix 8% of theirs)"},
                  causal={"ablation_images": 25, "ablation_flips": 10, "insertion_images": 24,
                          "insertion_flips_to_class": 5, "insertion_amount": 2.0, "confirmed": True,
                          "flip_rate": 0.41, "baseline_flip_rate": 0.06, "others_fixed": 9,
                          "others_called_before": 13, "fix_rate": 9 / 13, "baseline_called": 60,
                          "baseline_fixed": 5, "baseline_fix_rate": 5 / 60},
                  metadata_auroc={"ruler": 0.97, "site=head": 0.61, "site=back": 0.55, "age_over_60": 0.52},
                  concept_latents=[0, 3])
    unlabelled = _flag("probe", "nevus", 1, 1, "unlabelled", label_confidence=0.12, closest_concept="hair",
                       label_evidence={"runner_up": "kite", "margin": 0.4, "agreeing": [], "resampled": 0.24},
                       harm=_harm(((20, 0.9), (20, 0.88), (20, 0.1), (20, 0.09)),
                                  ((20, 0.8), (20, 0.79), (20, 0.2), (20, 0.2)), False,
                                  "nevus images with and without it: 90% vs 88% called nevus"),
                       confirmation={"status": "relied_on_no_harm", "text": "relied on, no measured harm"},
                       # ablation flips predictions, which alone "confirmed" a flag before harm was measured
                       causal={"ablation_images": 20, "ablation_flips": 3, "insertion_images": 20,
                               "insertion_flips_to_class": 0, "confirmed": True},
                       metadata_auroc={}, concept_latents=[1])
    ruler_zero_shot = _flag("zero_shot", "melanoma", 0, 1, "a ruler", label_confidence=0.91,
                            closest_concept="a ruler",
                            harm=_harm(((25, 0.71), (15, 0.74), (16, 0.20), (24, 0.22)),
                                       ((25, 0.71), (15, 0.74), (16, 0.20), (24, 0.22)), False, "no harm"),
                            confirmation={"status": "not_confirmed", "text": "not confirmed"},
                            metadata_auroc={"ruler": 0.97}, concept_latents=[0])
    latents = [
        {"latent": i, "label": label, "label_source": "artifact", "label_category": "dataset_artifact",
         "label_alignment": 0.3, "clarity": 0.9, "frequency": 0.1, "max_activation": 1.0, "references": [],
         "expected_alignment": {c: 0.0 for c in CLASSES}, "label_confidence": confidence, "closest_concept": closest}
        for i, label, confidence, closest in ((0, "a ruler", 0.91, "a ruler"), (1, "unlabelled", 0.12, "hair"),
                                              (2, "nevus", 0.8, "nevus"), (3, "a ruler", 0.7, "a ruler"))]
    per_class = {"melanoma": 0.9, "nevus": 0.8}
    result = {
        "schema_version": 2, "config": {}, "model": {}, "classes": CLASSES,
        "dataset": {"n_images": 80, "per_class": {"melanoma": 40, "nevus": 40}},
        "sae": {"n_latents": 4, "k": 2, "fvu": 0.1, "mean_l0": 2.0, "dead_fraction": 0.0, "explained_variance": 0.9},
        "accuracy": {h: {"overall": 0.85, "per_class": per_class} for h in ("probe", "zero_shot")},
        "latents": latents,
        "relevance": {h: {c: {"top": [{"latent": 0, "share": 0.4, "label": "a ruler"}]} for c in CLASSES}
                      for h in ("probe", "zero_shot")},
        "flags": [ruler, unlabelled, ruler_zero_shot],
        "comparison": {c: {"probe_share": 0.4, "zero_shot_share": 0.05, "amplified_by_probe": True,
                           "flagged_latents": [0]} for c in CLASSES},
        "faithfulness": {}, "timings": {"extract": 1.0}, "environment": {"torch": "2", "device": "cpu"},
        "slices": {"ruler": {"1": _slice(41, (0.68, 0.96, 0.4), (0.75, 0.7, 0.8)),
                             "0": _slice(39, (0.77, 0.33, 0.98), (0.8, 0.74, 0.85))}},
        "sae_dataset": {"name": "ISIC archive, unlabelled", "n_images": 5000},
    }
    result.update(overrides)
    return result


NEW_FLAG_KEYS = ("harm", "confirmation", "label_confidence", "closest_concept", "metadata_auroc", "concept_latents",
                 "label_evidence")


def without_new_keys(result: dict) -> dict:
    """The same result as an engine before measured harm returned it (it labelled every latent with its closest
    concept)."""
    old = copy.deepcopy(result)
    for key in ("slices", "sae_dataset"):
        old.pop(key)
    for flag in old["flags"]:
        flag["label"] = flag["closest_concept"]
        for key in NEW_FLAG_KEYS:
            flag.pop(key, None)
        for key in ("flip_rate", "baseline_flip_rate", "others_fixed", "others_called_before", "fix_rate",
                    "baseline_called", "baseline_fixed", "baseline_fix_rate"):
            (flag.get("causal") or {}).pop(key, None)
    for latent in old["latents"]:
        latent["label"] = latent["closest_concept"]
        latent.pop("label_confidence")
        latent.pop("closest_concept")
    return old


def stored_audit(project, user, registered, result: dict | None = None):
    """A succeeded audit of the registered model, probe and dataset whose result is ``result``."""
    audit = create_audit(project=project, user=user, clip_model=registered["model"], probe=registered["probe"],
                         dataset=registered["dataset"], options={"sae": {"steps": 10}})
    audit.mark_running("extract", 1.0)
    store_result(audit, result if result is not None else build_result(), {"extract": 1.0})
    audit.refresh_from_db()
    return audit
