"""Known-answer benchmark of the flags: planted shortcuts (every artifact tied in turn to each class, several
seeds) and controls, each audited with only what a user who knows the class names would give (default SAE
sizing, default vocabulary, default thresholds), scored against the generator's ground truth.

For every flag the ground truth says what its latent tracks: the metadata columns (artifacts) it fires with
(or, for a latent that fires when an artifact is absent, without) far above their base rate. A flag is
*precise* when one of those concepts really moves the probe for the flag's class: a with/without accuracy gap
of at least ``TRUE_GAP`` on the held-out split.

Each planted case's probe is then corrected for the flags that track the planted artifact (issue 18: one
``project`` correction per case) and re-audited with the same SAE: how much of the way to a probe trained
without the correlation its two hurt slices went, how its overall accuracy changed, and whether the artifact is
still flagged.
"""
from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .build import CaseConfig, build_case, default_cache
from .check import correct_case, hurt_slices, recovery_checks
from .images import ARTIFACTS, CLASSES, NOVEL_ARTIFACTS

TRUE_GAP = 0.10  # a concept "moves the probe's accuracy" when a with/without gap is at least this
PURITY = 0.75  # a latent tracks an artifact when this share of its activation mass falls on images with it ...
LIFT = 1.3  # ... and that is this many times the artifact's base rate
TARGETS = {"recall": 0.9, "precision": 0.8, "confirmed_precision": 0.9, "control_flags_per_class": 0.2,
           "planted_probe_share_above_zero_shot": 1.0}


@dataclass
class Grid:
    seeds: tuple = (0, 1)
    artifacts: tuple = ARTIFACTS
    classes: tuple = CLASSES
    controls: bool = True
    strength: float = 0.8
    n_audit: int = 2000
    audit_options: dict = field(default_factory=dict)  # overrides on top of the defaults (tests: fast settings)
    sae_seeds: tuple = (0, 1, 2)  # stability: the first planted case of the first seeds audited with these SAE seeds
    stability_cases: int = 1
    correct: bool = True  # correct each planted case's probe and re-audit it (issue 18's recovery figures)

    def cases(self) -> list[CaseConfig]:
        out = []
        for seed in self.seeds:
            out += [CaseConfig(seed=seed, artifact=a, toward=c, strength=self.strength, n_audit=self.n_audit)
                    for a in self.artifacts for c in self.classes]
            if self.controls:
                out.append(CaseConfig(seed=seed, strength=0.0, n_audit=self.n_audit))
        return out


def _rows(case: dict) -> list[dict]:
    with open(Path(case["audit_dir"]) / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def true_gaps(rows: list[dict], predictions: np.ndarray, classes: list[str]) -> dict:
    """(artifact, class, present?) -> the probe's gap for that concept and class on the held-out split: how much
    more the class's images with it are called the class, or other classes' images with it are called the class,
    than those without it (``present`` False: the same for the artifact's absence)."""
    y = np.array([classes.index(r["label"]) for r in rows])
    out = {}
    for a in ARTIFACTS:
        has = np.array([r[a] == "1" for r in rows])
        for c, name in enumerate(classes):
            own, other = y == c, y != c
            for present, mask in ((True, has), (False, ~has)):
                acc = _gap(predictions[own & mask] == c, predictions[own & ~mask] == c)
                called = _gap(predictions[other & mask] == c, predictions[other & ~mask] == c)
                out[(a, name, present)] = max(acc, called)
    return out


def _gap(with_: np.ndarray, without: np.ndarray) -> float:
    """Rate with minus rate without; nothing to compare (an empty side) is no gap."""
    return float(with_.mean() - without.mean()) if len(with_) and len(without) else 0.0


def latent_concepts(activity: np.ndarray, rows: list[dict]) -> list[tuple[str, bool, float]]:
    """What a latent tracks: (artifact, present?, purity) for each artifact it fires with (or without) far above
    the base rate, strongest first."""
    active = activity > 0
    if not active.any():
        return []
    weights = activity[active] / activity[active].sum()
    out = []
    for a in ARTIFACTS:
        has = np.array([r[a] == "1" for r in rows])
        base = has.mean()
        purity = float((has[active] * weights).sum())
        if purity >= PURITY and purity >= LIFT * base:
            out.append((a, True, purity))
        elif 1 - purity >= max(PURITY, 0.9) and 1 - purity >= LIFT * (1 - base):
            out.append((a, False, 1 - purity))
    return sorted(out, key=lambda t: -t[2])


def score_case(case: dict, result: dict, activity: Callable[[int], np.ndarray]) -> dict:
    """One audited case against its ground truth. ``activity(latent)`` gives the latent's activation per image."""
    cfg = case["config"]
    rows = _rows(case)
    classes = result["classes"]
    predictions = np.asarray(result["predictions"]["probe"])
    gaps = true_gaps(rows, predictions, classes)
    planted = cfg["strength"] > 0
    flags = []
    for f in result["flags"]:
        if f["head"] != "probe":
            continue
        concepts = []
        for latent in f.get("concept_latents") or [f["latent"]]:
            concepts += latent_concepts(activity(latent), rows)
        true = [(a, present) for a, present, _ in concepts if gaps[(a, f["class_name"], present)] >= TRUE_GAP]
        tracked = sorted({a for a, present, _ in concepts if present})
        flags.append({
            "class": f["class_name"], "latent": f["latent"], "rank": f["rank"], "label": f["label"],
            "label_confidence": f.get("label_confidence"), "concepts": [f"{a}{'' if p else ' (absent)'}"
                                                                        for a, p, _ in concepts],
            "precise": bool(true), "measured_harm": f["harm"]["measured"],
            "confirmed": (f.get("confirmation") or {}).get("status") == "confirmed",
            "probe_share": f["probe_share"], "zero_shot_share": f["zero_shot_share"],
            "label_correct": _label_correct(f["label"], tracked),
            "novel_artifact": any(a in NOVEL_ARTIFACTS for a in tracked),
            # the ablation counts behind the verdict, kept so a confirmation rule can be weighed without
            # auditing again
            "causal": f.get("causal"),
        })
    out = {"seed": cfg["seed"], "artifact": cfg["artifact"] if planted else None,
           "toward": cfg["toward"] if planted else None, "control": not planted, "flags": flags,
           "n_flags": len(flags), "n_precise": sum(f["precise"] for f in flags)}
    if planted:
        target = sorted([f for f in flags if f["class"] == cfg["toward"]], key=lambda f: f["rank"])
        top = target[0] if target else None
        planted_flag = next((f for f in target if cfg["artifact"] in f["concepts"]), None)
        out.update({
            "planted_gap": gaps[(cfg["artifact"], cfg["toward"], True)],
            "recall": bool(top and cfg["artifact"] in top["concepts"]),
            "top_flag": top and {k: top[k] for k in ("latent", "label", "concepts")},
            "planted_probe_share": planted_flag["probe_share"] if planted_flag else None,
            "planted_zero_shot_share": planted_flag["zero_shot_share"] if planted_flag else None,
        })
    return out


def _label_correct(label: str, tracked: list[str]) -> str:
    """'right' (names an artifact the latent tracks), 'unlabelled', or 'wrong'."""
    if label == "unlabelled":
        return "unlabelled"
    words = set(label.lower().replace("-", " ").split())
    for a in tracked:
        if set(a.lower().replace("a ", "", 1).replace("-", " ").split()) <= words:
            return "right"
    return "wrong"


def summarize_grid(cases: list[dict]) -> dict:
    planted = [c for c in cases if not c["control"]]
    controls = [c for c in cases if c["control"]]
    flags = [f for c in planted for f in c["flags"]]
    confirmed = [f for f in flags if f["confirmed"]]
    novel = [f for c in cases for f in c["flags"] if f["novel_artifact"]]
    compared = [c for c in planted if c["planted_probe_share"] is not None]
    n_classes = len(CLASSES)
    return {
        "n_cases": len(planted), "n_controls": len(controls),
        "recall": _ratio(sum(c["recall"] for c in planted), len(planted)),
        "precision": _ratio(sum(f["precise"] for f in flags), len(flags)),
        "confirmed_precision": _ratio(sum(f["precise"] for f in confirmed), len(confirmed)),
        "n_flags": len(flags), "n_confirmed": len(confirmed),
        "control_flags_per_class": _ratio(sum(c["n_flags"] - c["n_precise"] for c in controls),
                                          len(controls) * n_classes),
        "planted_probe_share_above_zero_shot": _ratio(
            sum(c["planted_probe_share"] > c["planted_zero_shot_share"] for c in compared), len(planted)),
        "labels": {k: sum(f["label_correct"] == k for c in cases for f in c["flags"])
                   for k in ("right", "unlabelled", "wrong")},
        "novel_artifact_flags": len(novel),
        "novel_wrong_confident": sum(f["label_correct"] == "wrong" and (f["label_confidence"] or 0) >= 0.5
                                     for f in novel),
        **_recovery_summary(planted),
    }


def _recovery_summary(planted: list[dict]) -> dict:
    """How many planted cases' corrections met issue 18's bar, and the weakest gap closed (cases that were not
    corrected count as not meeting it)."""
    rows = [c["recovery"] for c in planted if c.get("recovery") is not None]
    if not rows:
        return {}
    closed = [g for r in rows for g in (r["gap_closed"] or {}).values() if g is not None]
    return {"corrected": sum(bool(r["latents"]) for r in rows),
            "recovery_meets_bar": _ratio(sum(r["meets_bar"] for r in rows), len(rows)),
            "still_flagged_after_correction": sum(bool(r["still_flagged"]) for r in rows),
            "min_gap_closed": round(min(closed), 4) if closed else None}


def _ratio(k, n) -> float | None:
    return round(k / n, 4) if n else None


def meets_targets(summary: dict) -> dict:
    return {
        "recall": (summary["recall"] or 0) >= TARGETS["recall"],
        "precision": (summary["precision"] or 0) >= TARGETS["precision"],
        "confirmed_precision": summary["confirmed_precision"] is None
        or summary["confirmed_precision"] >= TARGETS["confirmed_precision"],
        "control_flags_per_class": summary["control_flags_per_class"] is None
        or summary["control_flags_per_class"] <= TARGETS["control_flags_per_class"],
        "planted_probe_share_above_zero_shot": (summary["planted_probe_share_above_zero_shot"] or 0)
        >= TARGETS["planted_probe_share_above_zero_shot"],
    }


def audit_with_truth(case: dict, options: dict, workdir: Path) -> tuple[dict, Callable[[int], np.ndarray]]:
    """Audit a case as a user would (options on top of the defaults); the result plus each latent's activity."""
    import torch

    from workers.engine import AuditConfig, LinearProbe, load_clip, run_audit
    from workers.engine.activations import ActivationStore
    from workers.engine.data import ImageFiles
    from workers.engine.hooks import select_tokens
    from workers.engine.sae import TopKSAE

    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    rows = _rows(case)
    folder = Path(case["audit_dir"])
    classes = sorted({r["label"] for r in rows})
    images = ImageFiles([folder / r["image"] for r in rows], [classes.index(r["label"]) for r in rows], classes,
                        ids=[r["image"] for r in rows])
    config = AuditConfig.from_dict(options)
    result = run_audit(config, bundle, LinearProbe.load(case["probe"]), images, workdir=workdir).to_dict()
    sae = TopKSAE.load(workdir / "sae", "cpu")
    store = ActivationStore(workdir / "activations")
    acts, emb = store.read(0, store.n)
    with torch.no_grad():
        z = sae.encode(select_tokens(acts, config.token))
        if z.ndim == 3:
            z = z.amax(1)
        # a fresh copy on the CPU, where the cached embeddings are (the audit moved its own to the device)
        result["predictions"] = {"probe": LinearProbe.load(case["probe"])(emb).argmax(1).numpy()}
    z = z.numpy()
    return result, lambda latent: z[:, latent]


def audit_and_score(case: dict, options: dict, correct: bool = False) -> dict:
    """Audit a case in a scratch folder (removed afterwards) and score it; ``seconds`` is the audit's time.
    ``correct``: a planted case's probe is also corrected and re-audited (``recovery``; its own ``seconds``)."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        started = time.time()
        result, activity = audit_with_truth(case, options, work)
        scored = score_case(case, result, activity)
        scored["seconds"] = round(time.time() - started, 1)
        if correct and not scored["control"]:
            scored["recovery"] = correct_and_score(case, result, activity, options, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return scored


def planted_flags(case: dict, result: dict, activity: Callable[[int], np.ndarray]) -> list[tuple[str, int]]:
    """(class, latent) for every latent of every probe flag whose concept tracks the planted artifact.

    The ground truth stands in for a reviewer who has looked at the flag's reference images, so an unlabelled
    flag on an artifact the vocabulary has no word for is corrected too."""
    rows, artifact = _rows(case), case["config"]["artifact"]
    pairs = []
    for f in result["flags"]:
        latents = f.get("concept_latents") or [f["latent"]]
        if f["head"] == "probe" and any((artifact, True) == (a, present) for latent in latents
                                        for a, present, _ in latent_concepts(activity(latent), rows)):
            pairs += [(f["class_name"], int(latent)) for latent in latents]
    return list(dict.fromkeys(pairs))


def correct_and_score(case: dict, result: dict, activity: Callable[[int], np.ndarray], options: dict,
                      workdir: Path) -> dict:
    """Correct the audited probe (``project``) for :func:`planted_flags` and re-audit it with the same SAE
    (``workdir`` is the audit's): issue 18's recovery figures for one case."""
    started = time.time()
    figures = correct_case(case, workdir, audit=result, flags=planted_flags(case, result, activity), options=options)
    out = {"latents": [latent for _, latent in figures["flags"]], "gap_closed": None, "overall": None,
           "still_flagged": None, "meets_bar": False}
    if figures["corrected"]:
        rows = _rows(case)
        artifact = case["config"]["artifact"]
        # the same SAE on the same images: a latent's activity, so what it tracks, is the audit's
        still = [f for f in figures["after"].flags if f["head"] == "probe"
                 and any(a == artifact and present for latent in f.get("concept_latents") or [f["latent"]]
                         for a, present, _ in latent_concepts(activity(latent), rows))]
        out.update({
            "gap_closed": {name: (figures["slices"][name] or {}).get("gap_closed") for name in hurt_slices(case)},
            "slices": {name: figures["slices"][name] for name in hurt_slices(case)},
            "overall": {k: figures["overall"][k] for k in ("old", "new", "reference", "change")},
            "clean_change": figures["clean_change"],
            "still_flagged": bool(still),
            # issue 18's bar, with "not flagged after" read from the ground truth rather than from labels
            "meets_bar": all({**recovery_checks(figures), "not flagged after": not still}.values()),
        })
    out["seconds"] = round(time.time() - started, 1)
    return out


def run_grid(grid: Grid, root: Path | None = None, log: Callable[[str], None] = print) -> dict:
    root = root or default_cache()
    cases = []
    started = time.time()
    for cfg in grid.cases():
        case = build_case(root, cfg, log=lambda line: None)
        # a scored case is kept beside its case, keyed by the audit options and the code that scored it, so an
        # interrupted or extended grid does not audit a case twice
        cached = Path(case["audit_dir"]).parent / f"benchmark-{_code_key(grid.audit_options, grid.correct)}.json"
        if cached.is_file():
            scored = json.loads(cached.read_text())
        else:
            scored = audit_and_score(case, dict(grid.audit_options), grid.correct)
            cached.write_text(json.dumps(scored, default=float))
        cases.append(scored)
        log(format_row(scored))
    summary = summarize_grid(cases)
    stability = []
    for seed in grid.seeds[:grid.stability_cases]:
        cfg = next((c for c in grid.cases() if c.seed == seed and c.strength > 0), None)
        if cfg is not None:
            stability.append(sae_seed_stability(build_case(root, cfg, log=lambda line: None), grid, log))
    summary["sae_seed_overlap"] = (round(float(np.mean([s["overlap"] for s in stability])), 4)
                                   if stability else None)
    return {"grid": {**asdict(grid), "cases": len(cases)}, "summary": summary, "stability": stability,
            "targets": TARGETS,
            "met": meets_targets(summary), "cases": cases, "seconds": round(time.time() - started, 1),
            "machine": {"host": platform.node(), "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()}}


def sae_seed_stability(case: dict, grid: Grid, log: Callable[[str], None] = print) -> dict:
    """The same audit with several SAE seeds: which concepts (what the flagged latents track) each flags, and the
    overlap (concepts every seed flags / concepts any seed flags)."""
    flagged = []
    for sae_seed in grid.sae_seeds:
        options = {**grid.audit_options, "sae": {**grid.audit_options.get("sae", {}), "seed": sae_seed}}
        scored = audit_and_score(case, options)
        flagged.append(sorted({f"{f['class']}: {f['concepts'][0] if f['concepts'] else 'none'}"
                               for f in scored["flags"]}))
    every = set.intersection(*map(set, flagged)) if flagged else set()
    anyone = set.union(*map(set, flagged)) if flagged else set()
    cfg = case["config"]
    out = {"seed": cfg["seed"], "case": f"{cfg['artifact']} -> {cfg['toward']}", "sae_seeds": list(grid.sae_seeds),
           "flagged": flagged, "overlap": round(len(every) / len(anyone), 4) if anyone else 1.0}
    log(f"SAE seeds {list(grid.sae_seeds)} on seed {cfg['seed']} {out['case']}: overlap {out['overlap']:.2f} {flagged}")
    return out


def _code_key(options: dict, correct: bool = False) -> str:
    """Digest of the audit options, whether cases are corrected, and of the engine and benchmark code."""
    import hashlib

    digest = hashlib.sha256(json.dumps({"options": options, "correct": correct}, sort_keys=True).encode())
    here = Path(__file__).parent
    for path in sorted((here.parent / "engine").glob("*.py")) + [Path(__file__), here / "check.py"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def format_row(c: dict) -> str:
    what = "control" if c["control"] else f"{c['artifact']} -> {c['toward']}"
    flags = "; ".join(f"{f['class'][:3]}#{f['rank']} {f['label'][:14]} [{', '.join(f['concepts'][:2]) or 'none'}]"
                      f"{' ok' if f['precise'] else ' FALSE'}{' C' if f['confirmed'] else ''}" for f in c["flags"])
    recall = "" if c["control"] else f" recall {'yes' if c['recall'] else 'NO'} (gap {c['planted_gap']:.2f})"
    fix = "" if c.get("recovery") is None else f" | correction: {format_recovery(c['recovery'])}"
    return f"seed {c['seed']} {what:<24}{recall} flags {c['n_precise']}/{c['n_flags']} precise: {flags}{fix}"


def format_recovery(r: dict) -> str:
    """A correction's figures in a few words: gap closed on each hurt slice, overall change, still flagged?"""
    if not r["latents"]:
        return "nothing flagged to correct"
    closed = " / ".join("n/a" if g is None else f"{g:.0%}" for g in r["gap_closed"].values())
    return (f"gap closed {closed} ({', '.join(r['gap_closed'])}), overall {r['overall']['old']:.3f} -> "
            f"{r['overall']['new']:.3f}, still flagged {'YES' if r['still_flagged'] else 'no'}"
            f"{'' if r['meets_bar'] else ' (below the bar)'}")


def write_report(report: dict, folder: Path, command: str) -> tuple[Path, Path]:
    import datetime

    report = {**report, "command": command, "date": datetime.date.today().isoformat()}
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "benchmark.json", folder / "benchmark.md"
    json_path.write_text(json.dumps(report, indent=1, default=float))
    s, met = report["summary"], report["met"]
    lines = ["# Known-answer benchmark of the flags", "",
             f"Command: `{command}`  ", f"Date: {report['date']}  ",
             f"Machine: {report['machine']['host']} ({report['machine']['processor']}, Python "
             f"{report['machine']['python']}), {report['seconds'] / 60:.0f} min", "",
             "Every case is built by the case-study generator (a tiny CLIP trained from scratch per seed, a probe "
             "trained on a split where one artifact is tied to one class with strength "
             f"{report['grid']['strength']}, audited on a held-out split where every artifact is independent of "
             "the class). Controls tie nothing. The audits use only the defaults a user who knows the class names "
             f"gets (overrides: `{json.dumps(report['grid']['audit_options'])}`). "
             f"Artifacts the built-in vocabulary has no word for: {', '.join(NOVEL_ARTIFACTS)}.", "",
             "| measure | value | target | met |", "| --- | --- | --- | --- |"]
    for key, label, target in (
            ("recall", "recall: the planted artifact is the target class's top probe flag", ">= 0.9"),
            ("precision", "precision: probe flags whose concept moves the probe's accuracy (gap >= 0.10)",
             ">= 0.8"),
            ("confirmed_precision", "precision of confirmed flags", ">= 0.9"),
            ("control_flags_per_class", "false flags per class on controls", "<= 0.2"),
            ("planted_probe_share_above_zero_shot", "planted flag's probe share above its zero-shot share",
             "1.0 (every case)")):
        lines.append(f"| {label} | {s[key]} | {target} | {'yes' if met[key] else 'NO'} |")
    lines += ["", "Stability: the same audit with SAE seeds " + "; ".join(
        f"{st['sae_seeds']} on seed {st['seed']} {st['case']}: concept overlap {st['overlap']:.2f} (flagged "
        f"{' | '.join(', '.join(f) or 'nothing' for f in st['flagged'])})" for st in report.get("stability", []))
        + "."]
    lines += ["", f"Flags: {s['n_flags']} on planted cases, {s['n_confirmed']} confirmed. Labels of probe flags: "
              f"{s['labels']['right']} right, {s['labels']['unlabelled']} unlabelled, {s['labels']['wrong']} wrong; "
              f"flags on the new artifacts: {s['novel_artifact_flags']}, of which wrong with confidence >= 0.5: "
              f"{s['novel_wrong_confident']}."]
    if "recovery_meets_bar" in s:
        lines += ["", f"Correction (issue 18): each planted case's probe corrected (`project`, midpoint anchor) for "
                  f"the probe flags whose latents track the planted artifact, then re-audited with the same SAE. "
                  f"{s['corrected']} of {s['n_cases']} cases had such a flag; share meeting the bar (gap to a probe "
                  f"trained without the correlation closed >= 80 % on the class without the artifact and on the "
                  f"other class with it, overall accuracy not lower, the artifact no longer flagged): "
                  f"{s['recovery_meets_bar']}; still flagged after the correction: "
                  f"{s['still_flagged_after_correction']}; smallest gap closed: {s['min_gap_closed']}."]
    lines += ["", "## Cases", "",
              "| seed | case | planted gap | recall | probe / zero-shot share of the planted flag | flags "
              "(class#rank label [what the latent tracks], ok = precise, C = confirmed) | correction | s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["cases"]:
        what = "control" if c["control"] else f"{c['artifact']} -> {c['toward']}"
        share = ("" if c["control"] or c["planted_probe_share"] is None
                 else f"{c['planted_probe_share']:.3f} / {c['planted_zero_shot_share']:.3f}")
        flags = "; ".join(f"{f['class']}#{f['rank']} {f['label']} [{', '.join(f['concepts']) or 'none'}] "
                          f"{'ok' if f['precise'] else 'FALSE'}{' C' if f['confirmed'] else ''}" for f in c["flags"])
        recovery = c.get("recovery")
        fix = "" if recovery is None else format_recovery(recovery)
        seconds = c["seconds"] if recovery is None else f"{c['seconds']} + {recovery['seconds']}"
        lines.append(f"| {c['seed']} | {what} | {'' if c['control'] else round(c['planted_gap'], 2)} | "
                     f"{'' if c['control'] else ('yes' if c['recall'] else 'NO')} | {share} | {flags or '-'} | "
                     f"{fix} | {seconds} |")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path
