"""Known-answer benchmark of the flags: planted shortcuts (every artifact tied in turn to each class, several
seeds) and controls, each audited with only what a user who knows the class names would give (default SAE
sizing, default vocabulary, default thresholds), scored against the generator's ground truth.

For every flag the ground truth says what its latent tracks: the metadata columns (artifacts) it fires with
(or, for a latent that fires when an artifact is absent, without) far above their base rate. A flag is
*precise* when one of those concepts really moves the probe for the flag's class: a with/without accuracy gap
of at least ``TRUE_GAP`` on the held-out split.

Each planted case's probe is then corrected for the flags that track the planted artifact (issue 18: a
``project`` and a ``refit`` correction per case, the artifact's latents as one concept) and re-audited with the
same SAE: how much of the way to a probe trained without the correlation its two hurt slices went, how its
overall accuracy changed, and whether the artifact is still flagged.

Where those flags look (issue 19): the heatmaps of the same latents on their reference images that show the
artifact, against the artifact's pixel mask: the share of each map's mass on the artifact, what an even map
scores (chance) and what a map equal to the artifact's coverage of each patch scores (ideal).
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

from .bench_ceiling import ceiling_summary, correction_ceiling, format_ceiling
from .bench_checklist import (TARGET as CHECKLIST_TARGET, checklist_summary, meets_checklist, ratio as _ratio,
                              report_checklist, score_checklist)
from .build import CaseConfig, build_case, default_cache
from .check import TRAINED, correct_case, hurt_slices, recovery_checks
from .images import ARTIFACTS, CLASSES, NOVEL_ARTIFACTS
from .masks import artifact_heatmap_mass, direction_heatmap_mass

BY_COLUMN = " (column)"  # a correction method so named corrects along the artifact's labels.csv column
WIDENED = " (widened)"  # ... along the SAE concept's images widened in the probe's features (directions: widened)
TRUE_GAP = 0.10  # a concept "moves the probe's accuracy" when a with/without gap is at least this
PURITY = 0.75  # a latent tracks an artifact when this share of its activation mass falls on images with it ...
LIFT = 1.3  # ... and that is this many times the artifact's base rate
TARGETS = {"recall": 0.95, "precision": 0.9, "confirmed_precision": 0.9, "control_flags_per_class": 0.2,
           # concepts every SAE seed flags / concepts any seed flags, pooled over the planted cases
           "seed_stability": 0.8,
           "purity": 0.9,  # mean AUROC of the planted cases' flags for the one artifact each tracks
           # the closest concept is the artifact for this share of the flags whose artifact the vocabulary names ...
           "closest_right": 0.7,
           "named_wrong": 0,  # ... and no flag is named (confidence >= label_min_confidence) wrongly
           "planted_probe_share_above_zero_shot": 1.0,
           # issue 30, with the adopted heatmap method over the planted artifacts: the mean over artifacts of the
           # maps' mass on the artifact over the patch-level ideal; the share of artifacts whose maps put at least
           # twice chance on them; the share of maps whose largest cell touches the artifact (pointing game)
           "heatmap_mass_over_ideal": 0.8, "heatmap_twice_chance": 1.0, "heatmap_pointing": 0.9}
# the heatmap methods the benchmark measures side by side: (method, cells per patch side, blocks traced back);
# the audit's default first
HEATMAP_METHODS = (("attnlrp", 1, 3), ("attnlrp", 1, 1), ("attnlrp", 1, 2), ("attnlrp", 1, 4), ("conservative", 1, 3),
                   ("block", 1, 1), ("attnlrp-pixels", 1, 1), ("attnlrp-pixels", 4, 1), ("encoder", 1, 1),
                   ("occlusion", 1, 1))
# what a heatmap row carries: means over the maps (see masks.artifact_heatmap_mass)
MASS_FIELDS = ("mass", "chance", "ideal", "peak_on_artifact", "touched", "touched_chance")


@dataclass
class Grid:
    seeds: tuple = (0, 1, 2)  # three seeds at least: each headline figure carries a 95 % interval
    artifacts: tuple = ARTIFACTS
    classes: tuple = CLASSES
    controls: bool = True
    strength: float = 0.8
    n_audit: int = 2000
    audit_options: dict = field(default_factory=dict)  # overrides on top of the defaults (tests: fast settings)
    # stability: every planted case audited again with these SAE seeds (the first is the audit above)
    sae_seeds: tuple = (0, 1, 2)
    stability_cases: int | None = None  # how many planted cases get that (None: every one; 0: none)
    # each planted case's probe corrected with these methods and re-audited (issue 18's recovery figures); a
    # method named with BY_COLUMN corrects along the artifact's labels.csv column instead of the SAE's concept, one
    # named with WIDENED along the concept's images widened in the probe's features
    corrections: tuple = ("project", "refit", "reweight", *(m + BY_COLUMN for m in ("project", "refit", "reweight")),
                          *(m + WIDENED for m in ("project", "refit")))
    checklist: bool = True  # every artifact asked about as a suspect on every case (issue 32)
    heatmaps: bool = True  # the planted flags' heatmap mass on the artifact's pixels (issues 19 and 30)
    heatmap_methods: tuple = HEATMAP_METHODS  # each measured on the same maps' latents and images (issue 30)
    patch_size: int = 8  # the case models' patch in pixels: 4 makes thin artifacts fill whole patches

    def cases(self) -> list[CaseConfig]:
        out = []
        for seed in self.seeds:
            out += [CaseConfig(seed=seed, artifact=a, toward=c, strength=self.strength, n_audit=self.n_audit,
                               patch_size=self.patch_size)
                    for a in self.artifacts for c in self.classes]
            if self.controls:
                out.append(CaseConfig(seed=seed, strength=0.0, n_audit=self.n_audit, patch_size=self.patch_size))
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
            "closest_concept": f.get("closest_concept"),
            # the closest concept, named or not, against what the latent tracks (None: nothing the vocabulary names)
            "closest_correct": (_label_correct(f.get("closest_concept"), tracked) == "right"
                                if any(a in VOCABULARY_MEANING for a in tracked) else None),
            "novel_artifact": any(a in NOVEL_ARTIFACTS for a in tracked),
            **purity(sum(activity(latent) for latent in f.get("concept_latents") or [f["latent"]]), rows),
            # the ablation counts behind the verdict, kept so a confirmation rule can be weighed without
            # auditing again
            "causal": f.get("causal"),
        })
    out = {"seed": cfg["seed"], "artifact": cfg["artifact"] if planted else None,
           "toward": cfg["toward"] if planted else None, "control": not planted, "flags": flags,
           "n_flags": len(flags), "n_precise": sum(f["precise"] for f in flags),
           "sae_fvu": (result.get("sae") or {}).get("fvu")}
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


def purity(activity: np.ndarray, rows: list[dict]) -> dict:
    """How cleanly a concept's activation (summed over its latents, per image) tells one artifact apart: its AUROC
    for each artifact's presence, read as the AUROC for presence or absence, whichever it tracks; ``purity`` is
    the best, ``purity_artifact`` which one ("a ruler" or "a ruler (absent)"), ``next_purity`` the runner-up
    (a mixed concept tracks two artifacts about as well)."""
    from sklearn.metrics import roc_auc_score

    scores = {}
    for a in ARTIFACTS:
        has = np.array([r[a] == "1" for r in rows])
        if has.all() or not has.any():
            continue
        auroc = float(roc_auc_score(has, activity))
        scores[a if auroc >= 0.5 else f"{a} (absent)"] = max(auroc, 1 - auroc)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    return {"purity": round(ranked[0][1], 4) if ranked else None, "purity_artifact": ranked[0][0] if ranked else None,
            "next_purity": round(ranked[1][1], 4) if len(ranked) > 1 else None}


# what each generated artifact means in the built-in vocabulary (semantics.ARTIFACT_MEANINGS); the new artifacts
# have no word there
VOCABULARY_MEANING = {"a ruler": "ruler", "a band-aid": "band-aid", "ink marking": "ink marking", "hair": "hair",
                      "dark corners": "dark corners"}


def _label_correct(label: str | None, tracked: list[str]) -> str:
    """'right' (names, in any phrasing of its meaning, an artifact the latent tracks), 'unlabelled', or 'wrong'."""
    from workers.engine.semantics import ARTIFACT_MEANINGS

    if label in (None, "unlabelled"):
        return "unlabelled"
    meaning = ARTIFACT_MEANINGS.get(label.lower())
    words = set(label.lower().replace("-", " ").split())
    for a in tracked:
        if meaning and meaning == VOCABULARY_MEANING.get(a):
            return "right"
        if set(a.lower().replace("a ", "", 1).replace("-", " ").split()) <= words:
            return "right"
    return "wrong"


def summarize_grid(cases: list[dict], stability: list[dict] | None = None, checklist: bool = True) -> dict:
    """The headline figures of scored cases; ``stability``: the planted cases' SAE-seed runs
    (:func:`sae_seed_stability`), pooled as concepts every seed flags over concepts any seed flags. ``checklist``
    False leaves out the checklist's figures (their own intervals resample the cases again, which
    :func:`intervals` need not do for every draw of its own)."""
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
        # issue 27: of the flags whose artifact the vocabulary names, how many have it as their closest concept;
        # names given with confidence (at or above the default label_min_confidence) that are wrong, any flag
        "closest_right": _ratio(sum(f.get("closest_correct") is True for f in flags),
                                sum(f.get("closest_correct") is not None for f in flags)),
        "named_wrong": sum(f["label_correct"] == "wrong" for c in cases for f in c["flags"]),
        "novel_wrong_confident": sum(f["label_correct"] == "wrong" and (f["label_confidence"] or 0) >= 0.5
                                     for f in novel),
        **_recovery_summary(planted),
        **ceiling_summary(planted),
        **_heatmap_summary(planted),
        **(checklist_summary(cases) if checklist else {}),
        "seed_stability": _ratio(sum(s["every"] for s in stability or []), sum(s["any"] for s in stability or []))
        if stability else None,
        # issue 27: the mean purity (AUROC for the one artifact each tracks) of the planted cases' probe flags
        "purity": _mean([f.get("purity") for f in flags]),
        "stability_cases": len(stability or []),
    }


INTERVAL_KEYS = ("recall", "precision", "confirmed_precision", "control_flags_per_class", "seed_stability", "purity",
                 "closest_right")


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(np.mean(known)), 4) if known else None


def intervals(cases: list[dict], stability: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """A 95 % interval for each headline figure (:data:`INTERVAL_KEYS`): the 2.5th and 97.5th percentiles of the
    figure over the grid resampled case by case (planted cases, controls and the stability runs each drawn with
    replacement from their own kind), so one flag more or less moves a figure within its interval."""
    rng = np.random.default_rng(seed)
    planted = [c for c in cases if not c["control"]]
    controls = [c for c in cases if c["control"]]
    draws: dict[str, list[float]] = {k: [] for k in INTERVAL_KEYS}

    def pick(items):
        return [items[i] for i in rng.integers(0, len(items), len(items))] if items else []

    for _ in range(resamples):
        summary = summarize_grid(pick(planted) + pick(controls), pick(stability), checklist=False)
        for key in INTERVAL_KEYS:
            if summary[key] is not None:
                draws[key].append(summary[key])
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)] if v else None
            for k, v in draws.items()}


DIGESTS = Path(__file__).with_name("model_digests.json")  # model key -> the SHA-256 its first build gave


def model_digests(root: Path, grid: Grid, recorded: Path = DIGESTS) -> dict:
    """Per seed: the SHA-256 of the case model's weights, and whether it equals the one ``recorded`` for the same
    model key (same generator version, seed and training settings). A rebuild elsewhere that differs is a
    different case, so a mismatch is reported (``match`` False), never ignored; a model key with no record yet
    is recorded (``match`` None) for the next machine to compare with."""
    from .build import model_digest

    before = json.loads(recorded.read_text()) if recorded.is_file() else {}
    out = {}
    for cfg in grid.cases():
        name = cfg.seed if cfg.patch_size == 8 else f"{cfg.seed} (patch {cfg.patch_size})"
        if name in out:
            continue
        digest, key = model_digest(build_case(root, cfg, log=lambda line: None)), cfg.model_key()
        out[name] = {"model_key": key, "sha256": digest, "recorded": before.get(key),
                         "match": None if key not in before else before[key] == digest}
    new = {m["model_key"]: m["sha256"] for m in out.values() if m["recorded"] is None}
    if new:
        recorded.write_text(json.dumps({**before, **new}, indent=1, sort_keys=True) + "\n")
    return out


def digest_mismatches(models: dict) -> list[str]:
    """What to say of the case models that differ from their recorded build."""
    return [f"seed {seed}: the case model's SHA-256 {m['sha256'][:16]} differs from the recorded "
            f"{m['recorded'][:16]} (model key {m['model_key']}): this machine built another model, so its figures "
            f"measure other cases" for seed, m in models.items() if m["match"] is False]


def _recovery_summary(planted: list[dict]) -> dict:
    """Per correction method: how many planted cases' corrections met issue 18's bar, how many still flag the
    artifact, and the weakest gap closed (cases that were not corrected count as not meeting the bar)."""
    methods = list(dict.fromkeys(m for c in planted for m in c.get("corrections") or {}))
    out = {}
    for method in methods:
        rows = [c["corrections"][method] for c in planted if method in (c.get("corrections") or {})]
        closed = [g for r in rows for g in (r["gap_closed"] or {}).values() if g is not None]
        out[method] = {"cases": len(rows), "corrected": sum(bool(r["latents"]) for r in rows),
                       "more_than_one_round": sum(len(r.get("rounds") or []) > 1 for r in rows),
                       "meets_bar": _ratio(sum(r["meets_bar"] for r in rows), len(rows)),
                       "still_flagged": sum(bool(r["still_flagged"]) for r in rows),
                       "min_gap_closed": round(min(closed), 4) if closed else None}
    if not out:
        return {}
    # the best method per case: some method of each kind (the SAE's concept, the artifact's column) meets the bar
    kinds = {"sae": [m for m in methods if not m.endswith((BY_COLUMN, WIDENED))],
             "widened": [m for m in methods if m.endswith(WIDENED)],
             "column": [m for m in methods if m.endswith(BY_COLUMN)]}
    some = {kind: sum(any((c.get("corrections") or {}).get(m, {}).get("meets_bar") for m in names) for c in planted)
            for kind, names in kinds.items() if names}
    return {"corrections": out, "corrections_some_method": {"cases": len(planted), **some}}


def _heatmap_summary(planted: list[dict]) -> dict:
    """The planted flags' heatmap figures: for the first method (the audit's default) the means over the planted
    cases with maps and per artifact, as before; and per method (``methods``) per artifact the means over its
    cases, and over the artifacts issue 30's three figures: the mean of mass / patch-level ideal, the share of
    artifacts at least twice chance, the mean pointing game; with the mean time per map."""
    if not any("heatmap" in c for c in planted):
        return {}
    rows = [c["heatmap"] for c in planted if (c.get("heatmap") or {}).get("n_images")]
    means = {k: round(float(np.mean([r[k] for r in rows])), 4) if rows else None for k in MASS_FIELDS}
    labels = list(dict.fromkeys(m for c in planted for m in (c.get("heatmap") or {}).get("methods") or {}))
    methods = {label: _method_summary(planted, label) for label in labels}
    first = methods[labels[0]] if labels else _method_summary(planted, None)
    return {"heatmap": {
        "cases": len(rows), "of": len(planted), **means, "per_artifact": first["per_artifact"],
        "method": labels[0] if labels else None,
        **{k: first[k] for k in ("mass_over_ideal", "twice_chance", "pointing")},
        "mass_over_chance": round(float(np.mean([r["mass"] / r["chance"] for r in rows])), 2) if rows else None,
        "methods": methods,
    }}


def _method_summary(planted: list[dict], label: str | None) -> dict:
    """One heatmap method's figures per artifact (means over its cases with maps) and over the artifacts."""
    def row(c):
        h = c.get("heatmap") or {}
        return (h.get("methods") or {}).get(label) if label else h

    per_artifact = {}
    for artifact in ARTIFACTS:
        mine = [row(c) for c in planted if c["artifact"] == artifact and (row(c) or {}).get("n_images")]
        if mine:
            per_artifact[artifact] = {"cases": len(mine), "n_images": sum(r["n_images"] for r in mine),
                                      **{k: round(float(np.mean([r[k] for r in mine])), 4) for k in MASS_FIELDS},
                                      "seconds_per_map": _mean([r.get("seconds_per_map") for r in mine])}
    ratios = [a["mass"] / a["ideal"] for a in per_artifact.values()]
    return {"per_artifact": per_artifact,
            "mass_over_ideal": round(float(np.mean(ratios)), 4) if ratios else None,
            "twice_chance": _ratio(sum(a["mass"] >= 2 * a["chance"] for a in per_artifact.values()),
                                   len(per_artifact)),
            "pointing": _mean([a["peak_on_artifact"] for a in per_artifact.values()]),
            "seconds_per_map": _mean([a["seconds_per_map"] for a in per_artifact.values()])}


def meets_targets(summary: dict) -> dict:
    h = summary.get("heatmap")
    heatmap = {} if not h else {
        "heatmap_mass_over_ideal": (h["mass_over_ideal"] or 0) >= TARGETS["heatmap_mass_over_ideal"],
        "heatmap_twice_chance": (h["twice_chance"] or 0) >= TARGETS["heatmap_twice_chance"],
        "heatmap_pointing": (h["pointing"] or 0) >= TARGETS["heatmap_pointing"]}
    stability = {key: summary[key] >= TARGETS[key] for key in ("seed_stability", "purity", "closest_right")
                 if summary.get(key) is not None}
    return {**heatmap, **stability, **meets_checklist(summary),
        "named_wrong": summary.get("named_wrong", 0) <= TARGETS["named_wrong"],
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


def audit_and_score(case: dict, options: dict, corrections: tuple = (), heatmaps: tuple = (),
                    checklist: bool = False) -> dict:
    """Audit a case in a scratch folder (removed afterwards) and score it; ``seconds`` is the audit's time.
    For a planted case, ``heatmaps`` ((method, cells, blocks) triples): the planted flags' heatmap mass with each
    (``heatmap``, :func:`planted_heatmap_mass`); ``corrections``: the probe
    corrected with each of these methods and re-audited (``corrections``: method -> figures). Each has its own
    ``seconds``. ``checklist``: every artifact asked about as a suspect (:func:`score_checklist`)."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        started = time.time()
        result, activity = audit_with_truth(case, options, work)
        scored = score_case(case, result, activity)
        scored["seconds"] = round(time.time() - started, 1)
        if checklist:  # first: a re-audit below replaces the audit's relevance tables
            started = time.time()
            scored["checklist"] = score_checklist(case, result, work, options)
            scored["checklist_seconds"] = round(time.time() - started, 1)
        if not scored["control"]:
            if heatmaps:  # before the corrections: their re-audits write into the same folder
                scored["heatmap"] = planted_heatmap_mass(case, result, activity, work, heatmaps)
            if corrections:
                latents = [latent for _, latent in planted_flags(case, result, activity)]
                if latents:  # what the corrections below could close along the artifact's true direction
                    scored["ceiling"] = correction_ceiling(case, _rows(case), work, latents, activity)
                scored["corrections"] = {method: correct_and_score(case, result, activity, options, work, method)
                                         for method in corrections}
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


def method_label(method: str, cells: int, blocks: int) -> str:
    """How a heatmap method is named in the benchmark's tables: "attnlrp, 2 blocks" (traced back through two
    blocks), "attnlrp-pixels x4" (4 cells per patch side)."""
    from workers.engine.heatmaps import PIXEL_METHODS

    if method in ("attnlrp", "conservative"):
        return f"{method}, {blocks} block{'s' if blocks > 1 else ''}"
    return f"{method} x{cells}" if method in PIXEL_METHODS and cells > 1 else method


def heatmap_latents(case: dict, result: dict, activity: Callable[[int], np.ndarray]) -> list[int]:
    """The latents of :func:`planted_flags` that themselves track the planted artifact (fire with it): a flag's
    concept may group latents of other artifacts, whose maps have no reason to fall on this one."""
    rows, artifact = _rows(case), case["config"]["artifact"]
    return sorted({latent for _, latent in planted_flags(case, result, activity)
                   if any((artifact, True) == (a, present) for a, present, _ in latent_concepts(activity(latent), rows))})


def planted_heatmap_mass(case: dict, result: dict, activity: Callable[[int], np.ndarray], workdir: Path,
                         methods: tuple = HEATMAP_METHODS) -> dict:
    """Where the planted artifact's flagged latents (:func:`heatmap_latents`) look, with each of ``methods``
    ((method, cells, blocks); the first is the one the flat figures give): per method (``methods``: label ->
    figures) the means of :data:`MASS_FIELDS` over their heatmaps on their reference images that show the
    artifact, ``n_images`` (maps counted), ``n_empty`` (maps without mass, not counted) and ``seconds_per_map``; also ``latents``, ``method`` (the first
    method's label) and ``seconds``. One more entry, "<first> on the artifact's direction", maps a detector
    that means the artifact alone (``masks.direction_heatmap_mass``) with the first method: its ceiling on the
    case. ``workdir`` holds the audit's SAE and activations."""
    started = time.time()
    artifact = case["config"]["artifact"]
    latents = heatmap_latents(case, result, activity)
    per_method = {}
    for method, cells, blocks in methods:
        row = {**dict.fromkeys(MASS_FIELDS), "n_images": 0, "n_empty": 0, "seconds_per_map": None}
        if latents:
            measured = artifact_heatmap_mass(case, result, workdir, latents={artifact: latents}, method=method,
                                             cells=cells, blocks=blocks)[artifact]
            row.update({k: measured[k] for k in (*MASS_FIELDS, "n_images", "n_empty", "seconds_per_map")})
        per_method[method_label(method, cells, blocks)] = row
    first = method_label(*methods[0])
    if latents:  # the first method's ceiling on this case: a detector that means the artifact alone
        method, cells, blocks = methods[0]
        ceiling = direction_heatmap_mass(case, result, workdir, artifact, method=method, cells=cells, blocks=blocks)
        if ceiling is not None:
            per_method[f"{first} on the artifact's direction"] = {
                k: ceiling[k] for k in (*MASS_FIELDS, "n_images", "n_empty", "seconds_per_map")}
    return {**per_method[first], "latents": latents, "method": first, "methods": per_method,
            "seconds": round(time.time() - started, 1)}


def correct_and_score(case: dict, result: dict, activity: Callable[[int], np.ndarray], options: dict,
                      workdir: Path, method: str = "project") -> dict:
    """Correct the audited probe with ``method`` for :func:`planted_flags` (one concept, the default anchor) and
    re-audit it with the same SAE (``workdir`` is the audit's): issue 18's recovery figures for one case. A
    ``refit`` and ``reweight`` need the probe's training split; a case without one is ``skipped`` with the
    reason. A method named with :data:`BY_COLUMN` ("refit (column)") corrects along the artifact's labels.csv
    column (the correction's ``column`` option) instead of the SAE concept's direction, one named with
    :data:`WIDENED` ("project (widened)") along the concept's images widened (``directions: widened``)."""
    started = time.time()
    out = {"method": method, "latents": [], "gap_closed": None, "overall": None, "still_flagged": None,
           "meets_bar": False}
    column, widened = method.endswith(BY_COLUMN), method.endswith(WIDENED)
    method = method.removesuffix(BY_COLUMN).removesuffix(WIDENED)
    if method in TRAINED and not Path(case.get("probe_train_dir", "")).is_dir():
        return {**out, "skipped": "the case has no probe training split", "seconds": 0.0}
    from workers.engine.errors import EngineError

    try:
        figures = correct_case(case, workdir, method=method, audit=result,
                               flags=planted_flags(case, result, activity), options=options, column=column,
                               directions="widened" if widened else None)
    except EngineError as exc:  # e.g. a concept on every training image: nothing for reweight to balance
        return {**out, "skipped": exc.message, "seconds": round(time.time() - started, 1)}
    out["latents"] = [latent for _, latent in figures["flags"]]
    if figures["corrected"]:
        rows = _rows(case)
        artifact = case["config"]["artifact"]
        # the same SAE on the same images: a latent's activity, so what it tracks, is the audit's
        still = [f for f in figures["after"].flags if f["head"] == "probe"
                 and any(a == artifact and present for latent in f.get("concept_latents") or [f["latent"]]
                         for a, present, _ in latent_concepts(activity(latent), rows))]
        out.update({
            "anchor": figures["info"].get("anchor"),
            "gap_closed": {name: (figures["slices"][name] or {}).get("gap_closed") for name in hurt_slices(case)},
            "slices": {name: figures["slices"][name] for name in hurt_slices(case)},
            "overall": {k: figures["overall"][k] for k in ("old", "new", "reference", "change")},
            "clean_change": figures["clean_change"],
            "still_flagged": bool(still),
            # each round: the latents corrected, those its re-audit found still tracking them, the gaps closed
            "rounds": [{"round": r["round"], "latents": r["latents"], "added": r["added"], "split": r.get("split"),
                        "gap_closed": {name: (r["slices"][name] or {}).get("gap_closed") for name in hurt_slices(case)},
                        "overall_new": r["overall"]["new"]} for r in figures.get("rounds") or []],
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
        key = _code_key(grid.audit_options, grid.corrections, _heatmap_specs(grid), grid.checklist)
        cached = Path(case["audit_dir"]).parent / f"benchmark-{key}.json"
        if cached.is_file():
            scored = json.loads(cached.read_text())
        else:
            scored = audit_and_score(case, dict(grid.audit_options), grid.corrections, _heatmap_specs(grid),
                                     grid.checklist)
            cached.write_text(json.dumps(scored, default=float))
        cases.append(scored)
        log(format_row(scored))
    planted = [c for c in grid.cases() if c.strength > 0][:grid.stability_cases]
    stability = [sae_seed_stability(build_case(root, cfg, log=lambda line: None), grid, log) for cfg in planted]
    models = model_digests(root, grid)
    mismatches = digest_mismatches(models)
    for line in mismatches:
        log(f"WARNING: {line}")
    return scored_report({**asdict(grid), "cases": len(cases)}, cases, stability, models, mismatches,
                         round(time.time() - started, 1),
                         {"host": platform.node(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine()})


def scored_report(grid: dict, cases: list[dict], stability: list[dict], models: dict, mismatches: list[str],
                  seconds: float, machine: dict) -> dict:
    """A report of scored cases, as :func:`write_report` takes it: their summary with its intervals and the
    targets met, beside the grid, the case models' digests, the minutes and the machine."""
    summary = summarize_grid(cases, stability)
    summary["intervals"] = intervals(cases, stability)
    return {"grid": grid, "summary": summary, "stability": stability, "targets": TARGETS, "models": models,
            "digest_mismatches": mismatches, "met": meets_targets(summary), "cases": cases, "seconds": seconds,
            "machine": machine}


def pool_reports(reports: list[dict]) -> dict:
    """One report from the scored cases of several runs (each :func:`run_grid`'s report, as its JSON keeps it) of
    the same grid on different seeds: every figure and interval computed again over all their cases, as one run
    of those seeds would give, without auditing anything again; ``pooled`` names each run's command and date. Runs
    that differ in anything but their seeds, or share a seed, are refused: their cases are not one grid's."""
    if len(reports) < 2:
        raise ValueError("pool at least two runs' reports")
    first = reports[0]["grid"]
    fixed = [k for k in first if k not in ("seeds", "cases", "stability_cases")]
    for r in reports[1:]:
        differ = [k for k in fixed if r["grid"].get(k) != first[k]]
        if differ:
            raise ValueError(f"the runs differ in {', '.join(differ)}: pool runs of one grid on other seeds")
    seeds = [s for r in reports for s in r["grid"]["seeds"]]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seed {', '.join(map(str, repeated))} is in more than one run: pool each seed once")
    cases = [c for r in reports for c in r["cases"]]
    stability = [x for r in reports for x in r.get("stability") or []]
    report = scored_report({**first, "seeds": seeds, "cases": len(cases), "stability_cases": len(stability)},
                           cases, stability,
                           {seed: m for r in reports for seed, m in (r.get("models") or {}).items()},
                           [m for r in reports for m in r.get("digest_mismatches") or []],
                           sum(r["seconds"] for r in reports), reports[0]["machine"])
    return {**report, "pooled": [{"command": r.get("command"), "date": r.get("date"), "seeds": r["grid"]["seeds"]}
                                 for r in reports]}


def flagged_concepts(scored: dict) -> set[str]:
    """What a scored audit's probe flags track, one "<class>: <first concept>" each ("none": nothing the ground
    truth names): what seed stability compares across audits."""
    return {f"{f['class']}: {f['concepts'][0] if f['concepts'] else 'none'}" for f in scored["flags"]}


def sae_seed_stability(case: dict, grid: Grid, log: Callable[[str], None] = print) -> dict:
    """The same audit with several SAE seeds: which concepts (what the flagged latents track) each flags, and the
    overlap (concepts every seed flags / concepts any seed flags; ``every`` and ``any`` their counts). Each seed's
    scored audit is kept beside the case like the grid's."""
    flagged = []
    for sae_seed in grid.sae_seeds:
        options = {**grid.audit_options, "sae": {**grid.audit_options.get("sae", {}), "seed": sae_seed}}
        cached = Path(case["audit_dir"]).parent / f"stability-{_code_key(options)}.json"
        if cached.is_file():
            scored = json.loads(cached.read_text())
        else:
            scored = audit_and_score(case, options)
            cached.write_text(json.dumps(scored, default=float))
        flagged.append(sorted(flagged_concepts(scored)))
    every = set.intersection(*map(set, flagged)) if flagged else set()
    anyone = set.union(*map(set, flagged)) if flagged else set()
    cfg = case["config"]
    out = {"seed": cfg["seed"], "case": f"{cfg['artifact']} -> {cfg['toward']}", "sae_seeds": list(grid.sae_seeds),
           "flagged": flagged, "every": len(every), "any": len(anyone),
           "overlap": round(len(every) / len(anyone), 4) if anyone else 1.0}
    log(f"SAE seeds {list(grid.sae_seeds)} on seed {cfg['seed']} {out['case']}: overlap {out['overlap']:.2f} {flagged}")
    return out


def _heatmap_specs(grid: Grid) -> tuple:
    return tuple((m, int(c), int(b)) for m, c, b in grid.heatmap_methods) if grid.heatmaps else ()


def _code_key(options: dict, corrections: tuple = (), heatmaps: tuple = (), checklist: bool = False) -> str:
    """Digest of the audit options, the corrections, heatmaps and checklist asked for, and of the engine and
    benchmark code."""
    import hashlib

    asked = {"options": options, "corrections": list(corrections), "heatmaps": [list(h) for h in heatmaps]}
    if checklist:  # the keys of grids without a checklist stay what they were
        asked["checklist"] = True
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode())
    here = Path(__file__).parent
    for path in sorted((here.parent / "engine").glob("*.py")) + [Path(__file__), here / "check.py",
                                                                 here / "masks.py", here / "bench_checklist.py",
                                                                 here / "bench_ceiling.py"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def format_row(c: dict) -> str:
    what = "control" if c["control"] else f"{c['artifact']} -> {c['toward']}"
    flags = "; ".join(f"{f['class'][:3]}#{f['rank']} {f['label'][:14]} [{', '.join(f['concepts'][:2]) or 'none'}]"
                      f"{' ok' if f['precise'] else ' FALSE'}{' C' if f['confirmed'] else ''}" for f in c["flags"])
    recall = "" if c["control"] else f" recall {'yes' if c['recall'] else 'NO'} (gap {c['planted_gap']:.2f})"
    maps = "" if c.get("heatmap") is None else f" | heatmap: {format_heatmap(c['heatmap'])}"
    fix = "".join(f" | {method}: {format_recovery(r)}" for method, r in (c.get("corrections") or {}).items())
    return f"seed {c['seed']} {what:<24}{recall} flags {c['n_precise']}/{c['n_flags']} precise: {flags}{maps}{fix}"


def format_heatmap(h: dict) -> str:
    """The planted flags' heatmap figures with the first method, in a few words: mass on the artifact vs chance
    and the patch-level ideal, the pointing game, over how many maps."""
    if not h["n_images"]:
        return "no map of the artifact" + ("" if h["latents"] else " (nothing flagged)")
    return (f"{h.get('method', 'block')}: mass {h['mass']:.2f} (chance {h['chance']:.2f}, ideal {h['ideal']:.2f}, "
            f"{h['mass'] / h['ideal']:.0%} of it), peak on it {h['peak_on_artifact']:.2f}, {h['n_images']} maps")


def format_recovery(r: dict) -> str:
    """A correction's figures in a few words: gap closed on each hurt slice, overall change, still flagged?"""
    if r.get("skipped"):
        return f"not run: {r['skipped']}"
    if not r["latents"]:
        return "nothing flagged to correct"
    closed = _closed(r["gap_closed"])
    rounds = r.get("rounds") or []
    first = f"; round 1 of {len(rounds)}: gap closed {_closed(rounds[0]['gap_closed'])}" if len(rounds) > 1 else ""
    return (f"gap closed {closed} ({', '.join(r['gap_closed'])}), overall {r['overall']['old']:.3f} -> "
            f"{r['overall']['new']:.3f}, still flagged {'YES' if r['still_flagged'] else 'no'}"
            f"{'' if r['meets_bar'] else ' (below the bar)'}{first}")


def _closed(gaps: dict) -> str:
    return " / ".join("n/a" if g is None else f"{g:.0%}" for g in gaps.values())


def _heatmap_paragraph(h: dict) -> str:
    """How to read the heatmap figures, with the grid's means for the first method."""
    text = ("Heatmaps (issue 30): for each planted case, the maps of the flagged latents that track the planted "
            "artifact, on those latents' reference images that show it, made by each method below from the same "
            "audit. *mass* is the share of a map's mass on the artifact's pixels (each cell's value spread over its "
            "pixels, so the figure is area-weighted); *chance* is the artifact's share of the image, what a map "
            "spread evenly scores; *ideal* is what a map equal to the artifact's coverage of each patch scores, "
            "the most a map at the model's patch resolution can be expected to reach (a thin artifact such as a "
            "ruler or hair fills no patch, so its ideal is well below 1; a finer map can pass it); *pointing* is "
            "the share of maps whose largest cell touches the artifact. Targets, with the adopted method, over "
            "the artifacts: mean mass / ideal >= 0.8, every artifact at least twice chance, pointing >= 0.9. "
            "The rows \"... on the artifact's direction\" map, with the default method, a detector that means the "
            "artifact alone (a logistic regression of its presence on the audited layer's CLS activations, in "
            "place of a latent, on the 48 images it scores highest): what the method reaches when the latent is "
            "pure. The gap between those rows and the latents' is the latents' mixing of concepts, not the "
            "method's. ")
    if not h["cases"]:
        return text + f"No planted case of the {h['of']} had a map of its artifact."
    return text + (
        f"With the audit's default method ({h['method']}), over the {h['cases']} of {h['of']} planted cases with "
        f"maps: mean mass {h['mass']:.3f} against chance {h['chance']:.3f} (mass / chance {h['mass_over_chance']}) "
        f"and ideal {h['ideal']:.3f}; per artifact, mass / ideal {h['mass_over_ideal']:.2f} on average, twice "
        f"chance for {h['twice_chance']:.0%} of the artifacts, pointing {h['pointing']:.2f}.")


def write_report(report: dict, folder: Path, command: str) -> tuple[Path, Path]:
    import datetime

    report = {**report, "command": command, "date": datetime.date.today().isoformat()}
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "benchmark.json", folder / "benchmark.md"
    json_path.write_text(json.dumps(report, indent=1, default=float))
    s = report["summary"]
    methods = list(s.get("corrections", {}))
    lines = [*_report_header(report, command), *_report_grid(report), *_report_targets(s, report["met"]),
             *_report_stability(report), *_report_models(report), *_report_flag_counts(s),
             *_report_heatmaps(s), *_report_corrections(s), *report_checklist(s),
             *_report_cases(report["cases"], methods)]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, json_path


def _report_header(report: dict, command: str) -> list[str]:
    """The report's title, the run's command, date and machine, and how the cases are built."""
    return ["# Known-answer benchmark of the flags", "",
            f"Command: `{command}`  ", f"Date: {report['date']}  ",
            f"Machine: {report['machine']['host']} ({report['machine']['processor']}, Python "
            f"{report['machine']['python']}), {report['seconds'] / 60:.0f} min", "",
            "Every case is built by the case-study generator (a tiny CLIP trained from scratch per seed, a probe "
            "trained on a split where one artifact is tied to one class with strength "
            f"{report['grid']['strength']}, audited on a held-out split where every artifact is independent of "
            "the class). Controls tie nothing. The audits use only the defaults a user who knows the class names "
            f"gets (overrides: `{json.dumps(report['grid']['audit_options'])}`). "
            f"Artifacts the built-in vocabulary has no word for: {', '.join(NOVEL_ARTIFACTS)}.",
            *_report_pooled(report)]


def _report_pooled(report: dict) -> list[str]:
    """Where a pooled report's cases come from (:func:`pool_reports`): each run's command, date and seeds."""
    if not report.get("pooled"):
        return []
    return ["", "Pooled from these runs' scored cases, every figure computed again over all of them (nothing "
            "audited again); the minutes are the runs' own, summed:", "",
            *[f"- seeds {', '.join(map(str, r['seeds']))}: `{r['command']}` ({r['date']})" for r in report["pooled"]]]


def _report_grid(report: dict) -> list[str]:
    """The grid run, when it is smaller than the default one, and how long the default would take."""
    full = len(Grid().cases())
    g = report["grid"]
    if g["cases"] >= full:
        return []
    return ["", f"Grid: seeds {list(g['seeds'])}, artifacts {', '.join(g['artifacts'])}, classes "
            f"{', '.join(g['classes'])}{', a control per seed' if g['controls'] else ''}: {g['cases']} cases, "
            f"a smaller grid than the default ({full} cases: seeds 0, 1 and 2, every artifact tied to each "
            f"class, a control per seed), which at this run's pace would take about "
            f"{report['seconds'] / g['cases'] * full / 60:.0f} min."]


def _target_rows(s: dict) -> list[tuple[str, str, str]]:
    """The summary's measures with a target: (key, label, target), the optional ones when measured."""
    rows = [("recall", "recall: the planted artifact is the target class's top probe flag", ">= 0.95"),
            ("precision", "precision: probe flags whose concept moves the probe's accuracy (gap >= 0.10)",
             ">= 0.9"),
            ("confirmed_precision", "precision of confirmed flags", ">= 0.9"),
            ("control_flags_per_class", "false flags per class on controls", "<= 0.2"),
            ("planted_probe_share_above_zero_shot", "planted flag's probe share above its zero-shot share",
             "1.0 (every case)")]
    if s.get("seed_stability") is not None:
        rows.append(("seed_stability", f"seed stability: concepts every SAE seed flags / any flags, over "
                     f"{s['stability_cases']} planted cases", ">= 0.8"))
    if s.get("purity") is not None:
        rows.append(("purity", "purity: mean AUROC of a planted case's flag for the one artifact it tracks",
                     ">= 0.9"))
    if s.get("closest_right") is not None:
        rows.append(("closest_right", "closest concept names the artifact, of the flags whose artifact the "
                     "vocabulary names", ">= 0.7"))
    rows.append(("named_wrong", "flags named wrongly (confidence >= 0.6), every case", "0"))
    return rows


def _report_targets(s: dict, met: dict) -> list[str]:
    """The table of measures against their targets, with their 95 % intervals where computed."""
    lines = ["", "| measure | value [95 % interval] | target | met |", "| --- | --- | --- | --- |"]
    bounds = s.get("intervals") or {}
    for key, label, target in _target_rows(s):
        interval = f" [{bounds[key][0]}, {bounds[key][1]}]" if bounds.get(key) else ""
        lines.append(f"| {label} | {s[key]}{interval} | {target} | {'yes' if met[key] else 'NO'} |")
    if "heatmap_mass_over_ideal" in met:
        h = s["heatmap"]
        for key, label, value, target in (
                ("heatmap_mass_over_ideal", "heatmap mass on the artifact / patch-level ideal, mean over artifacts",
                 h["mass_over_ideal"], ">= 0.8"),
                ("heatmap_twice_chance", "artifacts whose maps put at least twice chance on them", h["twice_chance"],
                 "1.0 (every one)"),
                ("heatmap_pointing", "pointing game: maps whose largest cell touches the artifact, mean over "
                 "artifacts", h["pointing"], ">= 0.9")):
            lines.append(f"| {label} ({h['method']}) | {value} | {target} | {'yes' if met[key] else 'NO'} |")
    for kind, r in (s.get("checklist") or {}).items():
        bounds = r.get("right_interval")
        interval = f" [{bounds[0]}, {bounds[1]}]" if bounds else ""
        lines.append(f"| checklist, {kind}: (case, artifact) pairs right, planted and independent | {r['right']}"
                     f"{interval} | >= {CHECKLIST_TARGET} | {'yes' if met[f'checklist_{kind}'] else 'NO'} |")
    return lines


def _report_stability(report: dict) -> list[str]:
    """The concept overlap of each planted case audited with several SAE seeds (nothing when none was)."""
    if not report.get("stability"):
        return ["", "Stability: not measured in this run (`--no-stability`)."]
    return ["", "Stability: each planted case audited with SAE seeds " + "; ".join(
        f"{st['sae_seeds']} on seed {st['seed']} {st['case']}: concept overlap {st['overlap']:.2f} (flagged "
        f"{' | '.join(', '.join(f) or 'nothing' for f in st['flagged'])})" for st in report.get("stability", []))
        + "."]


def _report_models(report: dict) -> list[str]:
    """The case models' weight hashes per seed, against the recorded ones."""
    if not report.get("models"):
        return []
    return ["", "Case models (SHA-256 of the tiny CLIP's weights per seed, built on two threads with "
            "deterministic algorithms; a rebuild elsewhere that differs is a different case): " + "; ".join(
                f"seed {k}: `{m['sha256'][:16]}` ("
                + {True: "as recorded", False: f"DIFFERS from the recorded `{(m['recorded'] or '')[:16]}`",
                   None: "first build, recorded"}[m["match"]] + ")"
                for k, m in report["models"].items()) + "."]


def _report_flag_counts(s: dict) -> list[str]:
    """How many flags the planted cases got, how many were confirmed and how their labels fared."""
    return ["", f"Flags: {s['n_flags']} on planted cases, {s['n_confirmed']} confirmed. Labels of probe flags: "
            f"{s['labels']['right']} right, {s['labels']['unlabelled']} unlabelled, {s['labels']['wrong']} wrong; "
            f"flags on the new artifacts: {s['novel_artifact_flags']}, of which wrong with confidence >= 0.5: "
            f"{s['novel_wrong_confident']}."]


def _report_heatmaps(s: dict) -> list[str]:
    """The heatmap paragraph and the side-by-side table: per artifact and method, mass, ideal, mass / ideal,
    mass / chance, pointing and time per map; then each method over the artifacts."""
    if "heatmap" not in s:
        return []
    h = s["heatmap"]
    lines = ["", _heatmap_paragraph(h)]
    if not h["methods"]:
        return lines
    lines += ["", "| artifact | method | cases | maps | mass | chance | ideal | mass / ideal | mass / chance | pointing "
              "| ms per map |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for artifact in ARTIFACTS:
        for label, m in h["methods"].items():
            r = m["per_artifact"].get(artifact)
            if r:
                lines.append(f"| {artifact} | {label} | {r['cases']} | {r['n_images']} | {r['mass']:.3f} | "
                             f"{r['chance']:.3f} | {r['ideal']:.3f} | {r['mass'] / r['ideal']:.2f} | "
                             f"{r['mass'] / r['chance']:.1f} | {r['peak_on_artifact']:.2f} | "
                             f"{_ms(r['seconds_per_map'])} |")
    lines += ["", "| method | mass / ideal (mean over artifacts) | artifacts at least twice chance | pointing | "
              "ms per map |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {label}{' (default)' if label == h['method'] else ''} | {_fmt2(m['mass_over_ideal'])} | "
              f"{_fmt2(m['twice_chance'])} | {_fmt2(m['pointing'])} | {_ms(m['seconds_per_map'])} |"
              for label, m in h["methods"].items()]
    return lines


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _fmt2(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _report_corrections(s: dict) -> list[str]:
    """How the correction is run and judged, and per method how many cases it corrected."""
    if not s.get("corrections", {}):
        return []
    lines = ["", "Correction (issue 18): each planted case's probe corrected for the probe flags whose latents "
             "track the planted artifact (their latents as one concept, its direction measured within each "
             "class; `project` with the default anchor, the mean features of the audited images; `refit` on "
             "the probe's own training split; `reweight` on that split weighted so the concept is as common "
             "in every class), then re-audited with the same SAE. The bar: the gap to a probe "
             "trained without the correlation closed >= 80 % on the class without the artifact and on the "
             "other class with it, overall accuracy not lower, the artifact no longer flagged (read from the "
             "ground truth: no probe flag whose latents track it)."]
    lines[-1] += (" Each correction runs in rounds (at most the default 3): after each re-audit the flagged "
                  "latents that track the corrected concept (most of their activation on the images that show it, "
                  "read from the SAE, not the ground truth) join it, the concept's latents still flagged become a "
                  "concept of their own too, and the audited probe is corrected again; the figures are the last "
                  "round's, and a case that took more than one round also gives round 1's.")
    if any(m.endswith(BY_COLUMN) for m in s["corrections"]):
        lines[-1] += (f" A method named `...{BY_COLUMN}` corrects the same flags along the artifact's labels.csv "
                      "column instead (the correction's `column` option: the direction between the images the "
                      "column marks and the others, within each class; one round; the training split's column says "
                      "which of its images show it): what a user whose images are annotated gets.")
    if any(m.endswith(WIDENED) for m in s["corrections"]):
        lines[-1] += (f" A method named `...{WIDENED}` corrects them along the concept's images widened in the "
                      "probe's features (the correction's `directions: widened`: the images its latents are active "
                      "on, read again three times along the direction they share, within each class), in rounds: "
                      "what a user without annotations gets where the concept covers part of the artifact.")
    lines += [f"- `{m}`: {r['corrected']} of {r['cases']} cases corrected ({r.get('more_than_one_round', 0)} in "
              f"more than one round); meeting the bar: {r['meets_bar']}; "
              f"still flagged after: {r['still_flagged']}; smallest gap closed: {r['min_gap_closed']}."
              for m, r in s["corrections"].items()]
    some = s.get("corrections_some_method")
    if some:
        lines.append(f"- Some method (the best for each case) meets the bar in {some.get('sae', 0)} of {some['cases']} "
                     "cases along the SAE's concept" + (f", {some['widened']} along its widened images"
                                                       if "widened" in some else "")
                     + (f", {some['column']} along the column" if "column" in some else "") + ".")
    ceiling = s.get("ceiling")
    if ceiling:
        cover = ceiling["coverage"]
        lines += ["", "How far a correction could go: each corrected case's probe also corrected along the artifact's "
                  "true direction (the difference of the probe's mean features between the audited images with and "
                  "without it, within each class, from the ground truth), without re-audit, so only the gap part "
                  "of the bar (both hurt slices >= 80 %) is counted. Where the true direction meets it and the "
                  "SAE's does not, the audit's concept is what falls short, not the method."]
        lines += [f"- `{m}`: gap part met in {ceiling[m]['sae_direction_meets_gap']} of {ceiling[m]['cases']} cases "
                  f"along the SAE concept's direction, {ceiling[m]['true_direction_meets_gap']} along the true one."
                  for m in ("project", "refit") if m in ceiling]
        lines.append(f"- The corrected concepts (their summed activation above its Otsu split) take "
                     f"{cover['recall_mean']} of the artifact's images on average (smallest {cover['recall_min']}), "
                     f"at precision {cover['precision_mean']}.")
    return lines


def _report_cases(cases: list[dict], methods: list[str]) -> list[str]:
    """The table of cases, one row each, with a column per correction method."""
    lines = ["", "## Cases", "",
             "| seed | case | planted gap | recall | probe / zero-shot share of the planted flag | flags "
             "(class#rank label [what the latent tracks], ok = precise, C = confirmed) | heatmap of the planted "
             "flags | " + "".join(f"correction: {m} | " for m in methods)
             + ("correction along the artifact's true direction | " if methods else "") + "s |",
             "| --- " * (8 + len(methods) + bool(methods)) + "|"]
    return lines + [_report_case_row(c, methods) for c in cases]


def _report_case_row(c: dict, methods: list[str]) -> str:
    """One case's row of the report's table of cases."""
    what = "control" if c["control"] else f"{c['artifact']} -> {c['toward']}"
    share = ("" if c["control"] or c["planted_probe_share"] is None
             else f"{c['planted_probe_share']:.3f} / {c['planted_zero_shot_share']:.3f}")
    flags = "; ".join(f"{f['class']}#{f['rank']} {f['label']} [{', '.join(f['concepts']) or 'none'}] "
                      f"{'ok' if f['precise'] else 'FALSE'}{' C' if f['confirmed'] else ''}" for f in c["flags"])
    heatmap = c.get("heatmap")
    corrections = c.get("corrections") or {}
    fixes = "".join(f"{format_recovery(corrections[m]) if m in corrections else ''} | " for m in methods)
    if methods:
        fixes += f"{format_ceiling(c['ceiling']) if c.get('ceiling') else ''} | "
    seconds = " + ".join(str(x) for x in [c["seconds"], heatmap and heatmap["seconds"],
                                          *(r["seconds"] for r in corrections.values())] if x is not None)
    return (f"| {c['seed']} | {what} | {'' if c['control'] else round(c['planted_gap'], 2)} | "
            f"{'' if c['control'] else ('yes' if c['recall'] else 'NO')} | {share} | {flags or '-'} | "
            f"{'' if heatmap is None else format_heatmap(heatmap)} | {fixes}{seconds} |")
