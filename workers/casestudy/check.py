"""Audit the case and check its known answer (used by `manage.py case_study` and the tests)."""
from __future__ import annotations

import csv
from pathlib import Path

from .build import CaseConfig, audit_options, build_case, default_cache


def audit_case(case: dict, **option_overrides):
    """Run the engine's audit of a built case on its held-out split (no service involved)."""
    from workers.engine import AuditConfig, LinearProbe, load_clip, run_audit
    from workers.engine.data import ImageFiles

    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    folder = Path(case["audit_dir"])
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    images = ImageFiles([folder / r["image"] for r in rows], [classes.index(r["label"]) for r in rows], classes,
                        ids=[r["image"] for r in rows])
    return run_audit(AuditConfig.from_dict(audit_options(**option_overrides)), bundle,
                     LinearProbe.load(case["probe"]), images)


def known_answer(case: dict, result) -> dict:
    """The paper's finding, checked: is a latent labelled as the planted artifact flagged for its class?"""
    cfg = case["config"]
    label = f"with {cfg['artifact']}"
    flags = [f for f in result.flags
             if f["head"] == "probe" and f["class_name"] == cfg["toward"] and f["label"] == label]
    best = min(flags, key=lambda f: f["rank"]) if flags else None
    top = [(t["latent"], round(t["share"], 3), t["label"]) for t in result.relevance["probe"][cfg["toward"]]["top"][:5]]
    checks = {
        "flagged": best is not None,
        "rank_at_most_3": bool(best and best["rank"] <= 3),
        "ablation_flips": bool(best and best["causal"]["ablation_flips"] > 0),
        "zero_shot_share_smaller": bool(best and best["zero_shot_share"] < best["probe_share"]),
    }
    return {"seed": cfg["seed"], "strength": cfg["strength"], "checks": checks,
            "passed": all(checks.values()) if cfg["strength"] > 0 else not flags,
            "flag": best, "probe_top_latents": top}


def check_seeds(seeds, strength: float = 0.8, log=print) -> list[dict]:
    reports = []
    for seed in seeds:
        case = build_case(default_cache(), CaseConfig(seed=seed, strength=strength), log=log)
        report = known_answer(case, audit_case(case))
        log(f"seed {seed} strength {strength}: {'PASS' if report['passed'] else 'FAIL'} {report['checks']} "
            f"top probe latents for {case['config']['toward']}: {report['probe_top_latents']}")
        reports.append(report)
    return reports
