"""Audit the case and check its known answer; correct the probe's shortcut and check that answer too (used by
`manage.py case_study`, the benchmark and the tests)."""
from __future__ import annotations

import csv
import time
from pathlib import Path

from .build import CaseConfig, audit_options, build_case, default_cache
from .images import CLASSES

MIN_GAP_CLOSED = 0.8  # issue 18: the hurt slices rise at least this share of the way to the reference probe
# issue 18: overall accuracy must not drop. On the audit split the artifact is independent of the class, so a
# correction that stops reading it gains there; 0.005 (10 of 2,000 images) only spares images that sit on the
# decision boundary, and a real loss still fails.
OVERALL_TOLERANCE = 0.005


def split_images(folder: str | Path, metadata_columns: tuple[str, ...] = ()):
    """A split written by the generator (labels.csv and images/) as the engine reads it, with the named columns of
    labels.csv as metadata (e.g. ``("a ruler",)``: a correction's table then has "melanoma, a ruler=0" rows)."""
    from workers.engine.data import ImageFiles

    folder = Path(folder)
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    return ImageFiles([folder / r["image"] for r in rows], [classes.index(r["label"]) for r in rows], classes,
                      ids=[r["image"] for r in rows], metadata={c: [r[c] for r in rows] for c in metadata_columns})


def audit_case(case: dict, *, workdir: str | Path | None = None, **option_overrides):
    """Run the engine's audit of a built case on its held-out split (no service involved); ``workdir`` keeps the
    activations and the SAE (a correction needs them)."""
    from workers.engine import AuditConfig, LinearProbe, load_clip, run_audit

    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    return run_audit(AuditConfig.from_dict(audit_options(**option_overrides)), bundle,
                     LinearProbe.load(case["probe"]), split_images(case["audit_dir"]), workdir=workdir)


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


def check_seeds(seeds, strength: float = 0.8, log=print, patch_size: int = 8) -> list[dict]:
    reports = []
    for seed in seeds:
        case = build_case(default_cache(), CaseConfig(seed=seed, strength=strength, patch_size=patch_size), log=log)
        report = known_answer(case, audit_case(case))
        log(f"seed {seed} strength {strength}: {'PASS' if report['passed'] else 'FAIL'} {report['checks']} "
            f"top probe latents for {case['config']['toward']}: {report['probe_top_latents']}")
        reports.append(report)
    return reports


# --------------------------------------------------------------------------- the corrected probe (issue 18)

TRAINED = ("refit", "reweight")  # the correction methods that read the probe's training split

def _flags(result) -> list[dict]:
    return result["flags"] if isinstance(result, dict) else result.flags


def hurt_slices(case: dict) -> list[str]:
    """The two slices of the correction's table the planted shortcut hurts: the class it is tied to without the
    artifact, and the other class with it ("melanoma, a ruler=0", "nevus, a ruler=1")."""
    cfg = case["config"]
    other = next(c for c in CLASSES if c != cfg["toward"])
    return [f"{cfg['toward']}, {cfg['artifact']}=0", f"{other}, {cfg['artifact']}=1"]


def artifact_flags(case: dict, result) -> list[tuple[str, int]]:
    """What a reviewer corrects after reading the audit: (class, latent) for every probe flag labelled as the
    planted artifact, whatever its class, and every latent its concept is spread over."""
    label = f"with {case['config']['artifact']}"
    pairs = [(f["class_name"], int(latent)) for f in _flags(result) if f["head"] == "probe" and f["label"] == label
             for latent in f.get("concept_latents") or [f["latent"]]]
    return list(dict.fromkeys(pairs))


def _flag_keys(result) -> set[tuple[str, str, int]]:
    return {(f["head"], f["class_name"], int(latent)) for f in _flags(result)
            for latent in f.get("concept_latents") or [f["latent"]]}


def correct_case(case: dict, workdir: str | Path, *, method: str = "project", anchor: str | None = None,
                 audit=None, flags: list[tuple[str, int]] | None = None, options: dict | None = None,
                 rounds: int | None = None, column: bool = False, directions: str | None = None) -> dict:
    """Correct the case's probe for the planted artifact's flags and re-audit it with the same SAE: the figures
    issue 18 asks for (:func:`recovery_checks` says whether they meet its bar).

    ``audit``: the audit of the case's probe, run with this ``workdir`` (its SAE and activations are read from
    there); None runs it. ``flags``: (class, latent) pairs to correct; default :func:`artifact_flags`.
    ``options``: the audit's options, for the audit and the re-audit alike (default: :func:`audit_options`).
    ``method`` ``refit`` and ``reweight`` fit on the probe's training split. The reference probe (trained with
    the artifact independent of the class) is what "the way to go" is measured against. ``rounds`` (default: the
    correction options' ``rounds``): after each re-audit, the latents it still flags that track the corrected
    concept (:func:`~workers.engine.correct_audit.next_round_latents`) join it and the original probe is
    corrected again, until none is left or the rounds run out. ``column``: the artifact's labels.csv column marks
    the concept's images (the correction's ``column`` option: its direction instead of the SAE's, one round), in
    the audited split and in the training split alike. ``directions``: the correction's option of that name
    (None: its default).

    Returns plain figures of the last round (the hurt slices' and the overall rows of the correction's table,
    the clean images' change, the re-audit's flags of the artifact, flags new and gone by (head, class, latent),
    ``seconds`` per step) plus ``after``, its re-audit, and ``rounds``, each round's figures in short. The
    re-audits write into ``workdir`` too (their relevance tables replace the audit's).
    """
    from workers.engine import AuditConfig, LinearProbe, load_clip, run_audit
    from workers.engine.config import CorrectionOptions
    from workers.engine.sae import TopKSAE

    cfg = case["config"]
    config = AuditConfig.from_dict(audit_options() if options is None else options)
    correction_options = CorrectionOptions(**({"anchor": anchor} if anchor is not None else {}),
                                           **({"column": cfg["artifact"]} if column else {}),
                                           **({"directions": directions} if directions is not None else {}))
    rounds = correction_options.rounds if rounds is None else rounds
    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    probe = LinearProbe.load(case["probe"])
    # the artifact's column as metadata: the table's slices, and the re-audit's with/without accuracy
    images = split_images(case["audit_dir"], (cfg["artifact"],))
    workdir = Path(workdir)
    seconds = {}
    if audit is None:
        started = time.perf_counter()
        audit = run_audit(config, bundle, probe, images, workdir=workdir)
        seconds["audit"] = round(time.perf_counter() - started, 1)
    chosen = artifact_flags(case, audit) if flags is None else [(c, int(latent)) for c, latent in flags]
    figures = {"seed": cfg["seed"], "artifact": cfg["artifact"], "toward": cfg["toward"], "method": method,
               "anchor": anchor, "flags": [list(p) for p in chosen], "corrected": bool(chosen), "seconds": seconds}
    if not chosen:  # nothing flagged as the artifact: nothing to correct, and the bar is not met
        return figures
    training = (split_images(case["probe_train_dir"], (cfg["artifact"],) if column else ())
                if method in TRAINED else None)
    inputs = (bundle, probe, images, TopKSAE.load(workdir / "sae", "cpu"))
    figures.update(_correct_in_rounds(case, inputs, chosen, audit, config, correction_options, method, training,
                                      rounds, workdir, seconds))
    return figures


def _correct_in_rounds(case: dict, inputs: tuple, chosen: list[tuple[str, int]], audit, config, options, method,
                       training, rounds: int, workdir: Path, seconds: dict) -> dict:
    """:func:`correct_case`'s rounds on (bundle, probe, images, SAE): the last round's figures and ``rounds``."""
    from workers.engine import LinearProbe, run_audit
    from workers.engine.correct_audit import AuditedInputs, run_correction
    from workers.engine.rounds import next_round

    bundle, probe, images, sae = inputs
    concepts = [list(dict.fromkeys(latent for _, latent in chosen))]  # the artifact: one concept
    done = []
    for round_ in range(1, rounds + 1):
        started = time.perf_counter()
        outcome = run_correction(
            AuditedInputs(bundle, probe, images, sae, chosen, concepts=concepts), config, options,
            method=method, training=training, reference=LinearProbe.load(case["reference_probe"]),
            workdir=workdir)  # the audit's activations are reused: they depend on images and model only
        seconds["correction"] = round(seconds.get("correction", 0.0) + time.perf_counter() - started, 1)
        started = time.perf_counter()
        # the same SAE, so a latent means the same thing before and after; the same activations
        after = run_audit(config, bundle, outcome.probe.cpu(), images, workdir=workdir, sae=sae)
        seconds["reaudit"] = round(seconds.get("reaudit", 0.0) + time.perf_counter() - started, 1)
        figures = _recovery_figures(case, chosen, outcome, audit, after, [i for c in concepts for i in c])
        step = next_round(concepts, outcome.shortcut["tracking"], _probe_flagged(after), method,
                          column=options.column is not None)
        done.append({"round": round_, "concepts": concepts, "latents": figures["latents"],
                     "added": [i for a in step["added"] for i in a], "split": step["split"],
                     **{k: figures[k] for k in ("slices", "overall", "clean_change")},
                     "artifact_flags_after": len(figures["artifact_flags_after"])})
        if not step["changed"]:
            break
        concepts = step["concepts"]
    return {**figures, "rounds": done}


def _probe_flagged(result) -> list[int]:
    """The latents an audit flags for the probe: each flag's latent and the latents of its concept."""
    return list(dict.fromkeys(int(latent) for f in _flags(result) if f["head"] == "probe"
                              for latent in [f["latent"], *(f.get("concept_latents") or [])]))


def _recovery_figures(case: dict, chosen: list[tuple[str, int]], outcome, audit, after,
                      corrected: list[int]) -> dict:
    """What :func:`correct_case` reports of a correction (``outcome``, of the ``corrected`` latents) and its
    re-audit (``after``)."""
    from workers.engine.correct_audit import clean_accuracy_change

    table = outcome.table
    corrected = set(corrected)
    label = f"with {case['config']['artifact']}"
    still = [f for f in after.flags if f["head"] == "probe"
             and (f["label"] == label or corrected & set(f.get("concept_latents") or [f["latent"]]))]
    return {
        "latents": sorted(corrected), "info": outcome.info,
        "slices": {name: table["slices"].get(name) for name in hurt_slices(case)},
        "overall": table["overall"], "per_class": table["per_class"],
        "clean_change": clean_accuracy_change(table),
        "artifact_flags_after": [{"class_name": f["class_name"], "latent": f["latent"], "label": f["label"],
                                  "rank": f["rank"], "concept_latents": f.get("concept_latents")} for f in still],
        "new_flags": sorted(map(list, _flag_keys(after) - _flag_keys(audit))),
        "gone_flags": sorted(map(list, _flag_keys(audit) - _flag_keys(after))),
        "after": after,
    }


def recovery_checks(figures: dict, min_gap_closed: float = MIN_GAP_CLOSED,
                    tolerance: float = OVERALL_TOLERANCE) -> dict[str, bool]:
    """Issue 18's bar on :func:`correct_case`'s figures: each hurt slice closed at least ``min_gap_closed`` of its
    gap to the reference probe, overall accuracy did not drop (beyond ``tolerance``), and the re-audit flags the
    artifact no more (no probe flag with its label or on a corrected latent)."""
    if not figures.get("corrected"):
        return {"corrected": False}
    checks = {f"gap closed on {name}": (row or {}).get("gap_closed") is not None
              and row["gap_closed"] >= min_gap_closed for name, row in figures["slices"].items()}
    overall = figures["overall"]
    checks["overall not lower"] = overall["new"] >= overall["old"] - tolerance
    checks["not flagged after"] = not figures["artifact_flags_after"]
    return checks


def format_recovery(figures: dict) -> str:
    """One line: gap closed per hurt slice (old -> new, reference), overall old -> new, still flagged?"""
    if not figures.get("corrected"):
        return f"seed {figures['seed']} {figures['method']}: nothing flagged as {figures['artifact']}, no correction"
    parts = [f"{name}: {_pct(row)} ({row['old']:.2f} -> {row['new']:.2f}, reference {row['reference']:.2f})"
             for name, row in figures["slices"].items() if row]
    overall = figures["overall"]
    return (f"seed {figures['seed']} {figures['method']} latents {figures['latents']}: " + "; ".join(parts)
            + f"; overall {overall['old']:.3f} -> {overall['new']:.3f}; still flagged after: "
            + ("yes" if figures["artifact_flags_after"] else "no"))


def _pct(row: dict) -> str:
    return "gap closed n/a" if row.get("gap_closed") is None else f"gap closed {row['gap_closed']:.0%}"
