"""The confounder checklist on the planted cases: every artifact the generator draws asked about as a suspect.

For each planted case, right after its audit (before any re-audit replaces its relevance tables), every artifact
of :data:`~workers.casestudy.images.ARTIFACTS` is asked about once per input kind: as ``text`` (its name), as
``examples`` (10 audited images that show it and 10 that do not, drawn from the ground truth with the case's
seed) and as its ``column`` of labels.csv. The planted artifact should come out "relied on, harmful" for the class
it was tied to; every independent one (drawn in both classes alike) should not be relied on ("represented, not
relied on" or "not found by the dictionary"). :func:`checklist_summary` counts the (case, artifact) pairs that
do, per kind.

Each answer's heatmaps (its latents' maps on the images that show it most) are measured against the generator's
pixel masks: the share of each map's mass on the artifact's pixels, beside the artifact's share of the image (what a
map spread evenly scores), over the maps of images that show the artifact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import ARTIFACTS
from .masks import ensure_masks

KINDS = ("text", "examples", "column")
N_EXAMPLES = 10  # images with and without each artifact, for the examples kind
NOT_RELIED = ("represented, not relied on", "not found by the dictionary")
TARGET = 0.95  # issue 32: the share of (case, artifact) pairs right, for each kind


def score_checklist(case: dict, result: dict, workdir: Path, options: dict) -> dict:
    """Ask about every artifact in every kind on the case's audit (run in ``workdir``): per kind, one row per
    artifact with the verdict, its class, the matched latents and whether the verdict is the expected one."""
    from workers.engine import AuditConfig, LinearProbe, load_clip
    from workers.engine.suspects import Suspect, SuspectInputs, attach_suspect_heatmaps, check_suspect, check_suspects

    from .check import split_images

    cfg = case["config"]
    config = AuditConfig.from_dict(options)
    images = split_images(case["audit_dir"], tuple(ARTIFACTS))
    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    probe = LinearProbe.load(case["probe"])
    inputs = SuspectInputs.from_audit(bundle, probe, images, result, workdir, config)
    rng = np.random.default_rng(cfg["seed"])
    ids = np.array(images.ids)
    suspects = []
    for artifact in ARTIFACTS:
        shows = np.array([v == "1" for v in images.metadata[artifact]])
        suspects += [Suspect(f"text: {artifact}", text=artifact), Suspect(f"column: {artifact}", column=artifact),
                     Suspect(f"examples: {artifact}",
                             with_images=tuple(rng.choice(ids[shows], N_EXAMPLES, replace=False)),
                             without_images=tuple(rng.choice(ids[~shows], N_EXAMPLES, replace=False)))]
    # each kind asked as its own list: a suspect is weighed against the others of its list, and a text suspect
    # weighed against a column would borrow the column's truth
    by_kind = {kind: [s for s in suspects if s.kind == kind] for kind in KINDS}
    answered = [a for kind in KINDS for a in check_suspects(inputs, by_kind[kind], config)]
    suspects = [s for kind in KINDS for s in by_kind[kind]]
    attach_suspect_heatmaps(bundle, inputs.sae, images.remap(probe.class_names).with_preprocess(bundle.preprocess),
                            answered, config)
    answers = {a["name"]: a for a in answered}
    # text by meaning alone, the rule before a text's latents could follow CLIP's reading of it, side by side (an
    # answer matched by meaning already is that answer)
    by_meaning = {a["name"]: check_suspect(inputs, s, config, reading=False) if a["match"].get("by") == "reading"
                  else a for s, a in zip(suspects, answered) if s.text}
    folder = ensure_masks(case, "audit")
    planted = cfg["artifact"] if cfg["strength"] > 0 else None
    out = {kind: [] for kind in KINDS}
    for artifact in ARTIFACTS:
        for kind in KINDS:
            a = answers[f"{kind}: {artifact}"]
            right = is_right(a["verdict"], a["verdict_class"], artifact == planted, cfg["toward"])
            before = verdict_on_shares(a, config)  # the rule without the output's shift, side by side
            row = (a["classes"] or {}).get(a["verdict_class"]) or {}
            meaning = by_meaning.get(a["name"])
            extra = {} if meaning is None else {
                "by": a["match"].get("by"),
                "right_by_meaning": is_right(meaning["verdict"], meaning["verdict_class"], artifact == planted,
                                             cfg["toward"])}
            out[kind].append({"artifact": artifact, "planted": artifact == planted, "verdict": a["verdict"],
                              "class": a["verdict_class"], "latents": a["match"]["latents"],
                              "score": a["match"]["score"], "probe_share": row.get("probe_share"),
                              "zero_shot_share": row.get("zero_shot_share"), "right": right,
                              "right_on_shares": is_right(*before, artifact == planted, cfg["toward"]),
                              **extra, **heatmap_mass(a, artifact, folder)})
    return out


def is_right(verdict: str, verdict_class: str | None, planted: bool, toward: str) -> bool:
    """The planted artifact "relied on, harmful" for the class it was tied to; an independent one not relied on."""
    if planted:
        return verdict == "relied on, harmful" and verdict_class == toward
    return verdict in NOT_RELIED


def verdict_on_shares(answer: dict, config) -> tuple[str, str | None]:
    """The verdict on shares alone, from the answer's own figures: as before "relied on" also needed the probe's
    output to move with the suspect (a share amplified over zero-shot's was enough) and to hold beyond the audit's
    probe flags."""
    from workers.engine.suspects import suspect_verdict

    classes = {}
    for name, row in (answer.get("classes") or {}).items():
        relied = row["probe_share"] >= config.flag_min_share and (
            row["harm"]["measured"] or row["probe_share"] >= config.amplification_ratio * row["zero_shot_share"])
        classes[name] = {**row, "relied_on": relied}
    return suspect_verdict(answer["match"], classes)


def heatmap_mass(answer: dict, artifact: str, folder: Path) -> dict:
    """The answer's maps measured on ``artifact``'s pixel masks: mean ``heat_mass`` (share of a map's mass on the
    artifact) and ``heat_chance`` (the artifact's share of the image) over ``heat_maps`` maps of images that show
    it (none: both None)."""
    from workers.engine.heatmaps import decode_map, mass_on_mask

    from .images import read_masks

    rows = []
    for key, encoded in (answer.get("heatmaps") or {}).items():
        masks = read_masks(folder, key)
        if artifact in masks:
            mass, chance = mass_on_mask(decode_map(encoded), masks[artifact])
            if np.isfinite(mass):
                rows.append((mass, chance))
    if not rows:
        return {"heat_mass": None, "heat_chance": None, "heat_maps": 0}
    mass, chance = np.mean(rows, axis=0)
    return {"heat_mass": round(float(mass), 4), "heat_chance": round(float(chance), 4), "heat_maps": len(rows)}


def checklist_summary(cases: list[dict]) -> dict:
    """Per kind: the (case, artifact) pairs whose verdict is the expected one, overall, for the planted artifacts
    and for the independent ones (planted cases only; controls apart)."""
    out = {}
    for kind in KINDS:
        rows = [r for c in cases if not c["control"] for r in (c.get("checklist") or {}).get(kind, [])]
        controls = [r for c in cases if c["control"] for r in (c.get("checklist") or {}).get(kind, [])]
        if not rows and not controls:
            continue
        out[kind] = {"pairs": len(rows), "right": ratio(sum(r["right"] for r in rows), len(rows)),
                     "right_interval": right_interval([c for c in cases if not c["control"]], kind),
                     "right_on_shares": ratio(sum(r.get("right_on_shares", r["right"]) for r in rows), len(rows)),
                     **({"right_by_meaning": ratio(sum(r["right_by_meaning"] for r in rows), len(rows)),
                         "planted_right_by_meaning": ratio(sum(r["right_by_meaning"] for r in rows if r["planted"]),
                                                           sum(r["planted"] for r in rows)),
                         "by_reading": sum(r.get("by") == "reading" for r in rows)}
                        if rows and all("right_by_meaning" in r for r in rows) else {}),
                     "planted_right": ratio(sum(r["right"] for r in rows if r["planted"]),
                                             sum(r["planted"] for r in rows)),
                     "independent_right": ratio(sum(r["right"] for r in rows if not r["planted"]),
                                                 sum(not r["planted"] for r in rows)),
                     "controls_right": ratio(sum(r["right"] for r in controls), len(controls)),
                     "per_seed": per_seed(cases, kind),
                     **_heat(rows),
                     "wrong": [f"{r['artifact']} ({c['artifact']} case): {r['verdict']}"
                               + (f" ({r['class']})" if r["class"] else "")
                               for c in cases if not c["control"] for r in (c.get("checklist") or {}).get(kind, [])
                               if not r["right"]]}
    return {"checklist": out} if out else {}


def per_seed(cases: list[dict], kind: str) -> dict:
    """Per seed of the planted cases: the pairs, the share right and the planted artifacts right (k, n): the target
    is over every pair, and a seed whose case models read the artifacts worse shows here."""
    out = {}
    for seed in sorted({c["seed"] for c in cases if not c["control"]}):
        rows = [r for c in cases if not c["control"] and c["seed"] == seed
                for r in (c.get("checklist") or {}).get(kind, [])]
        if rows:
            out[str(seed)] = {"pairs": len(rows), "right": ratio(sum(r["right"] for r in rows), len(rows)),
                              "planted": [sum(r["right"] for r in rows if r["planted"]),
                                          sum(r["planted"] for r in rows)]}
    return out


def meets_checklist(summary: dict) -> dict:
    """``checklist_KIND``: the kind's pairs right at :data:`TARGET` or more, for each kind scored."""
    return {f"checklist_{kind}": (r["right"] or 0) >= TARGET for kind, r in (summary.get("checklist") or {}).items()}


def right_interval(planted: list[dict], kind: str, resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """A 95 % interval for the share of pairs right: its 2.5th and 97.5th percentiles over the planted cases
    resampled with replacement (a case's pairs share its audit, so they are drawn together)."""
    per_case = [(sum(r["right"] for r in rows), len(rows))
                for rows in ((c.get("checklist") or {}).get(kind, []) for c in planted) if rows]
    if not per_case:
        return None
    rng = np.random.default_rng(seed)
    counts = np.array(per_case, dtype=np.float64)
    draws = [counts[picked, 0].sum() / counts[picked, 1].sum()
             for picked in (rng.integers(0, len(counts), len(counts)) for _ in range(resamples))]
    return [round(float(np.percentile(draws, 2.5)), 4), round(float(np.percentile(draws, 97.5)), 4)]


def _heat(rows: list[dict]) -> dict:
    """The heatmaps of the planted artifacts' answers and of the independent ones that were found: mean mass on
    the artifact and mean chance, over the answers with maps of images that show it."""
    out = {}
    for part, keep in (("planted", lambda r: r["planted"]), ("independent", lambda r: not r["planted"])):
        measured = [r for r in rows if keep(r) and r.get("heat_maps")]
        out[f"heat_{part}"] = ({"answers": len(measured),
                                "mass": round(float(np.mean([r["heat_mass"] for r in measured])), 4),
                                "chance": round(float(np.mean([r["heat_chance"] for r in measured])), 4)}
                               if measured else None)
    return out


def _heat_cell(heat: dict | None) -> str:
    if not heat:
        return "-"
    return f"{heat['mass']:.2f} vs {heat['chance']:.2f} ({heat['mass'] / heat['chance']:.1f}x, {heat['answers']})"


def ratio(k, n) -> float | None:
    """k / n to four places (None when n is 0): how the benchmark reports every share."""
    return round(k / n, 4) if n else None


def report_checklist(summary: dict) -> list[str]:
    """The report's lines on the checklist."""
    rows = summary.get("checklist") or {}
    if not rows:
        return []
    lines = ["", "Confounder checklist (issue 32): on each planted case, every artifact the generator draws asked "
             "about as a suspect, by its name (`text`), by 10 images with it and 10 without (`examples`) and by its "
             "labels.csv column (`column`). Right: the planted artifact \"relied on, harmful\" for its class, an "
             "independent one not relied on (\"represented, not relied on\" or \"not found by the dictionary\"). "
             "Target: >= 95 % of the (case, artifact) pairs for each kind. Heatmaps: the share of each answer's "
             "maps (its latents, on the images that show it most) on the artifact's pixels vs the artifact's share of "
             "the image (chance), mean over answers (how many).", "",
             "*On shares*: the pairs right under the rule before \"relied on\" also needed the probe's output to "
             "move with the suspect (the class's probability higher on the images that show it, by half the harm "
             "gap, at the harm's z) and to hold on the images without each of the audit's probe flags, "
             "from the same answers.", "",
             "*By meaning* (text only): the pairs right, and the planted artifacts found, when a text suspect's "
             "latents are those closest to it in meaning alone, as before they could follow the audited CLIP's "
             "reading of it; *by reading*: the pairs whose latents do follow that reading. Same audits.", "",
             "| kind | pairs | right [95 % interval] | on shares | by meaning (planted) | by reading | planted right | "
             "independent right | controls right | planted maps: mass vs chance | independent maps | wrong |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r in rows.items():
        bounds = r.get("right_interval")
        interval = f" [{bounds[0]}, {bounds[1]}]" if bounds else ""
        meaning = (f"{r['right_by_meaning']} ({r['planted_right_by_meaning']})" if "right_by_meaning" in r else "-")
        lines.append(f"| {kind} | {r['pairs']} | {r['right']}{interval} | {r.get('right_on_shares', '-')} | "
                     f"{meaning} | {r.get('by_reading', '-')} | {r['planted_right']} | {r['independent_right']} | "
                     f"{r['controls_right']} | {_heat_cell(r.get('heat_planted'))} | "
                     f"{_heat_cell(r.get('heat_independent'))} | {'; '.join(r['wrong']) or '-'} |")
    return lines + _report_per_seed(rows)


def _report_per_seed(rows: dict) -> list[str]:
    """The pairs right per seed and kind, with the planted artifacts right (k of n)."""
    seeds = sorted({seed for r in rows.values() for seed in r.get("per_seed") or {}}, key=int)
    if not seeds:
        return []
    lines = ["", "Per seed (pairs right; planted artifacts right): the target is over every pair, a seed apart "
             "shows how far the case models differ.", "",
             "| seed | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
    for seed in seeds:
        cells = []
        for r in rows.values():
            one = (r.get("per_seed") or {}).get(seed)
            cells.append(f"{one['right']} ({one['planted'][0]} of {one['planted'][1]})" if one else "-")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines
