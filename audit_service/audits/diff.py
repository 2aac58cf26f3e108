"""Comparing two audits: which flags are new, gone or changed.

Two audits train two SAEs, so latent 17 of one has nothing to do with latent
17 of the other. Flags are matched by what their latents mean instead: the
cosine similarity of their semantic embeddings (the mean embedding of each
latent's reference images), within the same head and class, one-to-one,
most similar pairs first, above ``threshold``. Two audits of one SAE (a corrected probe's re-audit reuses the
original audit's) share their latents, so their flags are matched latent by latent.
"""
from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.9


def match_flags(baseline: list[dict], current: list[dict], threshold: float = DEFAULT_THRESHOLD,
                same_sae: bool = False) -> dict:
    """``baseline`` / ``current``: dicts with head, class_name, latent, label, share, semantic (unit vector or
    None), verdict (latest review or None). Returns new / gone / changed / unchanged lists of entries.
    ``same_sae``: both audits' latents come from one SAE; a pair is the same latent (similarity 1)."""
    out = {"new": [], "gone": [], "changed": [], "unchanged": []}
    groups = sorted({(f["head"], f["class_name"]) for f in baseline + current})
    for head, class_name in groups:
        old = [f for f in baseline if (f["head"], f["class_name"]) == (head, class_name)]
        new = [f for f in current if (f["head"], f["class_name"]) == (head, class_name)]
        pairs = []
        for i, a in enumerate(old):
            for j, b in enumerate(new):
                if same_sae:
                    if a["latent"] == b["latent"]:
                        pairs.append((1.0, i, j))
                elif a.get("semantic") is not None and b.get("semantic") is not None:
                    sim = float(np.dot(a["semantic"], b["semantic"]))
                    if sim >= threshold:
                        pairs.append((sim, i, j))
        used_old, used_new = set(), set()
        for sim, i, j in sorted(pairs, reverse=True):
            if i in used_old or j in used_new:
                continue
            used_old.add(i)
            used_new.add(j)
            a, b = old[i], new[j]
            entry = {"head": head, "class_name": class_name, "similarity": round(sim, 4),
                     "baseline": _brief(a), "current": _brief(b), "share_change": b["share"] - a["share"],
                     "inherited_verdict": a.get("verdict") if a.get("verdict") == "benign" else None}
            changed = a["label"] != b["label"] or abs(entry["share_change"]) >= 0.02
            out["changed" if changed else "unchanged"].append(entry)
        out["gone"] += [{"head": head, "class_name": class_name, "baseline": _brief(a)}
                        for i, a in enumerate(old) if i not in used_old]
        out["new"] += [{"head": head, "class_name": class_name, "current": _brief(b)}
                       for j, b in enumerate(new) if j not in used_new]
    return out


def _brief(flag: dict) -> dict:
    return {k: flag.get(k) for k in ("id", "latent", "label", "category", "rank", "share", "verdict",
                                     "confirmation_status", "harm_measured")}


def flag_dicts(audit) -> list[dict]:
    rows = []
    for f in audit.flags.prefetch_related("reviews"):
        latest = f.latest_review
        rows.append({"id": f.pk, "head": f.head, "class_name": f.class_name, "latent": f.latent,
                     "label": f.label, "category": f.category, "rank": f.rank, "share": f.share,
                     "semantic": f.semantic, "verdict": latest.verdict if latest else None,
                     "confirmation_status": f.confirmation_status, "harm_measured": f.harm_measured})
    return rows


def audit_diff(baseline, current, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The diff of two succeeded audits of one project, with what the numbers can and cannot be trusted for."""
    same_sae = (current.sae_from_id == baseline.pk or baseline.sae_from_id == current.pk
                or (current.sae_from_id is not None and current.sae_from_id == baseline.sae_from_id))
    result = match_flags(flag_dicts(baseline), flag_dicts(current), threshold, same_sae)
    same_model = baseline.clip_model_id == current.clip_model_id
    result.update({
        "baseline": baseline.pk, "audit": current.pk, "threshold": threshold, "same_model": same_model,
        "same_sae": same_sae, "matched_by": "latent (one SAE)" if same_sae else "meaning (semantic embedding)",
        "counts": {k: len(result[k]) for k in ("new", "gone", "changed", "unchanged")},
        "note": "" if same_model else (
            "the audits use different models, so their latents' meanings are compared across two embedding "
            "spaces; matches are less reliable"),
    })
    return result
