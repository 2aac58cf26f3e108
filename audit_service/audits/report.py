"""The audit report: what the report page and the downloaded files show, built from a stored audit.

One function builds the report's context; the page and the downloaded HTML
render the same template from it. The download embeds every image and plot
as a data URI, so it opens offline; the page embeds them too (they are small
thumbnails and plots), and only the latents table is paginated: an audit with
30 000 latents loads one page of rows, the flags and one array file.
"""
from __future__ import annotations

import base64
import csv
import functools
import io
import json
import re
from typing import Iterator

import numpy as np
from django.core.files.storage import default_storage

from .fields import (FLAG_FIELDS, LATENT_FIELDS, Head, as_json, csv_header, csv_row, harm_cells, page_columns,
                     page_numbers, review_dict)
from .models import Audit, Flag, Review, Status

# of the downloaded JSON; bump when its layout changes. 2: a latent's "alignment" is "label_alignment", as a
# flag's is; flags carry "latest_review"
REPORT_SCHEMA_VERSION = 2
HEADS = dict(Head.choices)
METHODS = {"act_grad": "act x grad", "logit_lens": "Logit Lens", "act_logit_lens": "act x Logit Lens",
           "energy": "energy", "random": "random"}
PROBE_COLOUR, ZERO_SHOT_COLOUR, FLAG_COLOUR = "#2f6fb0", "#d08a2e", "#c0392b"
REFERENCES_SHOWN = 12  # reference images per flag card: the engine maps these (workers.engine.explain)


# --------------------------------------------------------------------------- images

def image_where(dataset, image_key: str):
    """Where one of a dataset's images is read from, as ``_load_image`` takes it: the storage key of an uploaded
    dataset's image, or (dataset id, its digest, image key) for a dataset registered by reference."""
    if dataset.by_reference:
        return (dataset.pk, dataset.sha256, image_key)
    return f"{dataset.storage_prefix}/images/{image_key}"


def _load_image(where):
    """The decoded image at ``where`` (see :func:`image_where`), or None when it cannot be read: a missing or
    unreadable file shows as a gap, not as a broken report."""
    from audit_service.registry.archives import DatasetRejected
    from audit_service.registry.models import Dataset
    from audit_service.registry.references import SourceError, read_image
    from workers.engine.imagefiles import open_image

    try:
        if isinstance(where, tuple):
            fh = io.BytesIO(read_image(Dataset.objects.get(pk=where[0]), where[2]))
        else:
            fh = default_storage.open(where, "rb")
        with fh:
            image = open_image(fh)
            image.load()
        return image
    except (OSError, ValueError, KeyError, SourceError, DatasetRejected, Dataset.DoesNotExist):
        return None


@functools.lru_cache(maxsize=4096)
def _thumbnail(where, size: int) -> str | None:
    image = _load_image(where)
    if image is None:
        return None
    image = image.convert("RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def thumbnail(audit: Audit, image_key: str, size: int = 112) -> str | None:
    """A data URI of a small JPEG of one of the audit's dataset images (None when it cannot be read)."""
    return _thumbnail(image_where(audit.dataset, image_key), size)


@functools.lru_cache(maxsize=4096)
def _heat_overlay(where, grid: tuple, size: int) -> str | None:
    """A data URI of the image's centre square (the crop the model saw: open_clip resizes the short side, then
    crops the centre) with ``grid`` (rows of 0..255 over the patches) laid over it in the inferno colours."""
    from matplotlib import colormaps
    from PIL import Image

    image = _load_image(where)
    if image is None:
        return None
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    heat = np.asarray(Image.fromarray(np.asarray(grid, dtype=np.uint8)).resize((size, size), Image.BILINEAR),
                      dtype=np.float32) / 255.0
    colours = colormaps["inferno"](heat)[..., :3]
    alpha = (0.75 * heat)[..., None]
    blended = (np.asarray(image, dtype=np.float32) / 255.0) * (1 - alpha) + colours * alpha
    out = io.BytesIO()
    Image.fromarray((blended * 255).round().astype(np.uint8)).save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def heat_overlay(where, grid, size: int = 112) -> str | None:
    """The image at ``where`` (a storage key, or see :func:`image_where`) with a latent's heatmap (an encoded
    grid) over it; None without a grid."""
    if not grid:
        return None
    return _heat_overlay(where, tuple(tuple(int(v) for v in row) for row in grid), size)


def _labels_by_key(audit: Audit) -> dict:
    return dict(audit.dataset.labels())


# --------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.set_layout_engine("constrained")
    return fig


def _svg(fig) -> str:
    out = io.StringIO()
    fig.savefig(out, format="svg")
    text = out.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue so the SVG can sit inline in HTML


def _png(fig) -> str:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def relevance_arrays(audit: Audit) -> dict | None:
    """The full per-latent tables (share per head and class, expected alignment) the worker stored."""
    key = (audit.result or {}).get("artifacts", {}).get("relevance.npz")
    if not key:
        return None
    try:
        with default_storage.open(key, "rb") as fh:
            data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
            tables = {name: data[name] for name in data.files}
    except (OSError, ValueError):
        return None
    if "alignment_expected" in tables:  # the name audits before the one-name rename wrote into the file
        tables["expected_alignment"] = tables.pop("alignment_expected")
    return tables


def scatter_plot(arrays: dict, c: int, class_name: str, flagged: set[int]) -> str:
    """Relevance share under the probe against alignment with the class's concepts, one dot per latent.

    The paper's "semantic outliers": relevant latents far left of the others
    mean something the class should not. PNG, so 30 000 dots stay light.
    """
    share = arrays["probe_share"][c]
    align = arrays["expected_alignment"][c]
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    ax.scatter(align, share, s=9, c="#8a9bb0", alpha=0.6, linewidths=0, label="latent", rasterized=True)
    if flagged:
        idx = np.array(sorted(flagged))
        ax.scatter(align[idx], share[idx], s=40, c=FLAG_COLOUR, edgecolors="white", linewidths=0.8, label="flagged")
        for i in idx:
            ax.annotate(str(i), (align[i], share[i]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"alignment with what '{class_name}' should mean")
    ax.set_ylabel("relevance share (probe)")
    ax.set_title(f"{class_name}: relevance vs alignment", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def top_latents_plot(result: dict, class_name: str, n: int = 10) -> str:
    """Horizontal bars: the class's top latents by probe share, next to their zero-shot share."""
    probe_top = result["relevance"]["probe"][class_name]["top"][:n]
    zs = {t["latent"]: t["share"] for t in result["relevance"]["zero_shot"][class_name]["top"]}
    if not probe_top:
        return ""
    names = [f"{t['latent']}: {(t['label'] or 'no label')[:28]}" for t in probe_top][::-1]
    p = [t["share"] for t in probe_top][::-1]
    z = [zs.get(t["latent"], 0.0) for t in probe_top][::-1]
    y = np.arange(len(names))
    fig = _figure(5.6, 0.34 * len(names) + 1.0)
    ax = fig.add_subplot()
    ax.barh(y + 0.2, p, height=0.38, color=PROBE_COLOUR, label="linear probe")
    ax.barh(y - 0.2, z, height=0.38, color=ZERO_SHOT_COLOUR, label="zero-shot")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("share of the class's positive relevance")
    ax.set_title(f"{class_name}: top latents, probe vs zero-shot", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.25)
    return _svg(fig)


def deletion_plot(result: dict, head: str, class_name: str) -> str:
    """The class's logit as the top-n latents by each attribution method are removed (lower is more faithful)."""
    curves = result.get("faithfulness", {}).get(head, {}).get(class_name)
    if not curves:
        return ""
    fig = _figure(4.6, 3.0)
    ax = fig.add_subplot()
    for method, data in curves.items():
        ax.plot(range(len(data["curve"])), data["curve"], marker="o", markersize=2.5, linewidth=1.4,
                label=f"{METHODS.get(method, method)} (AUC {data['auc']:.3g})")
    ax.set_xlabel("latents removed, most relevant first")
    ax.set_ylabel("class logit")
    ax.set_title(f"{HEADS[head]}, {class_name}: deletion curves", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7)
    return _svg(fig)


# --------------------------------------------------------------------------- the report

def label_evidence_text(row) -> str:
    """One sentence under a latent's label: what stands behind the name, or behind the likely concept when no
    name is given ("" for rows from engines before labels carried evidence)."""
    ev = row.label_evidence
    if not ev or not row.closest_concept:
        return ""
    parts = [f"{ev['margin']:.1f} SD above the next concept of another meaning"
             + (f", “{ev['runner_up']}”" if ev.get("runner_up") else "")]
    parts.append("also " + ", ".join(f"“{a}”" for a in ev["agreeing"]) if ev.get("agreeing")
                 else "no other phrasing of it among the closest concepts")
    parts.append(f"the same meaning in {ev['resampled'] * 100:.0f} % of resamples of its reference images")
    head = "" if row.label and row.label != "unlabelled" else f"likely “{row.closest_concept}”, not named: "
    return head + "; ".join(parts) + "."


def _flag_card(audit: Audit, flag: Flag, labels_by_key: dict, images: bool) -> dict:
    heatmaps = flag.heatmaps or {}

    def pictures(keys):
        return [{"key": k, "label": labels_by_key.get(k, "?"), "src": thumbnail(audit, k) if images else None,
                 "heat": heat_overlay(image_where(audit.dataset, k), heatmaps.get(k))
                 if images else None}
                for k in keys]

    causal = flag.causal or {}
    return {
        "flag": flag,
        "references": pictures(flag.references[:REFERENCES_SHOWN]),
        "top_images": [{**p, "relevance": t["relevance"]}
                       for p, t in zip(pictures([t["image"] for t in flag.top_images]), flag.top_images)],
        "causal": causal,
        "label_evidence": label_evidence_text(flag),
        "numbers": page_numbers(FLAG_FIELDS, flag),
        "harm": harm_rows(flag.harm),
        "metadata": metadata_hits(flag.metadata_auroc or {}),
        "reviews": list(flag.reviews.all()),
        "latest": flag.latest_review,
    }


def harm_rows(harm: dict | None) -> list[dict]:
    """A flag's measured harm as table rows, one per head; each cell a percentage and its number of images."""
    return [{"head": title, "cells": [{"percent": _percent(value), "n": n} for value, n in harm_cells(harm, head)]}
            for head, title in HEADS.items() if (harm or {}).get(head)]


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def metadata_hits(metadata_auroc: dict, n: int = 3) -> list[dict]:
    """The labels.csv columns a latent tracks, the most telling first (AUROC farthest from 0.5). A 0/1 column reads
    as "ruler=1" when the latent fires with it and "ruler=0" when it fires where it is absent (AUROC then given for
    that reading, so it is always above 0.5)."""
    ranked = sorted(((k, v) for k, v in metadata_auroc.items() if v is not None), key=lambda kv: -abs(kv[1] - 0.5))
    hits = []
    for name, auroc in ranked[:n]:
        if "=" in name:
            hits.append({"name": name if auroc >= 0.5 else f"not {name}", "auroc": max(auroc, 1 - auroc)})
        else:
            hits.append({"name": f"{name}={1 if auroc >= 0.5 else 0}", "auroc": max(auroc, 1 - auroc)})
    return hits


def slice_tables(result: dict) -> list[dict]:
    """Per extra metadata column of labels.csv: n and both heads' accuracy for each of its values, overall and
    per class (in the order of ``result["classes"]``)."""
    tables = []
    for column, values in (result.get("slices") or {}).items():
        tables.append({"column": column, "rows": [{
            "value": value, "n": s["n"], "probe": s["probe"]["accuracy"], "zero_shot": s["zero_shot"]["accuracy"],
            "per_class": [{head: s[head]["per_class"].get(c) for head in HEADS} for c in result["classes"]],
        } for value, s in values.items()]})
    return tables


def flag_filters(params) -> dict:
    """The report's flag filters from a query string: head, class, category, verdict ('unreviewed' too)."""
    return {k: params.get(k, "") for k in ("head", "class_name", "category", "verdict")}


def filtered_flags(audit: Audit, filters: dict):
    from django.db.models import OuterRef, Subquery

    latest = Review.objects.filter(flag=OuterRef("pk")).order_by("-created_at", "-id").values("verdict")[:1]
    flags = audit.flags.annotate(verdict=Subquery(latest)).prefetch_related("reviews__reviewer")
    for field in ("head", "class_name", "category"):
        if filters.get(field):
            flags = flags.filter(**{field: filters[field]})
    if filters.get("verdict") == "unreviewed":
        flags = flags.filter(verdict__isnull=True)
    elif filters.get("verdict"):
        flags = flags.filter(verdict=filters["verdict"])
    return flags


def class_plots(audit: Audit, flags: list[Flag]) -> dict:
    """Per class: scatter, bars and deletion curves. A finished audit never changes, so they are cached."""
    from django.core.cache import cache

    key = f"report-plots:{audit.pk}:{audit.finished_at.timestamp() if audit.finished_at else 0}"
    plots = cache.get(key)
    if plots is None:
        result, arrays = audit.result, relevance_arrays(audit)
        plots = {}
        for c, name in enumerate(result["classes"]):
            flagged = {f.latent for f in flags if f.class_name == name}
            plots[name] = {"scatter": scatter_plot(arrays, c, name, flagged) if arrays is not None else "",
                           "bars": top_latents_plot(result, name),
                           "deletion": [deletion_plot(result, h, name) for h in HEADS]}
        cache.set(key, plots, 3600)
    return plots


def class_summary(audit: Audit, flags: list[Flag] | None = None) -> dict[str, dict]:
    """Per class of a succeeded audit, in the result's order: its images, both heads' accuracy, its flags per
    head, how many are confirmed and how many have measured harm, and the engine's probe vs zero-shot comparison
    (its keys spread in). The summary API returns it; the report's class table shows it."""
    result = audit.result
    flags = list(audit.flags.all()) if flags is None else flags
    summary = {}
    for name in result["classes"]:
        mine = [f for f in flags if f.class_name == name]
        summary[name] = {
            "images": result["dataset"]["per_class"].get(name, 0),
            "probe_accuracy": result["accuracy"]["probe"]["per_class"].get(name),
            "zero_shot_accuracy": result["accuracy"]["zero_shot"]["per_class"].get(name),
            "flags": {h: sum(f.head == h for f in mine) for h in HEADS},
            "confirmed_flags": sum(f.confirmed is True for f in mine),
            "flags_with_measured_harm": sum(f.harm_measured for f in mine),
            **result["comparison"].get(name, {}),
        }
    return summary


# the latents page's number columns, and its orders: by number, or by one of those numbers, highest first
LATENT_PAGE_COLUMNS = page_columns(LATENT_FIELDS)
LATENT_ORDERS = {"latent": "number", **{f"-{f.name}": f"{f.title}, highest first" for f in LATENT_PAGE_COLUMNS}}


def latent_rows(audit: Audit, page) -> None:
    """Give each latent of a page of the latents page its thumbnails and the numbers the page shows."""
    for row in page:
        row.thumbs = [thumbnail(audit, k, 64) for k in row.references[:4]]
        row.numbers = page_numbers(LATENT_FIELDS, row)
        row.evidence_text = label_evidence_text(row)


def report_context(audit: Audit, *, filters: dict | None = None, images: bool = True) -> dict:
    """Everything the report template shows, for a succeeded audit."""
    result = audit.result
    filters = filters or {}
    labels_by_key = _labels_by_key(audit) if images else {}
    flags = list(filtered_flags(audit, filters))
    all_flags = list(audit.flags.all())
    plots = class_plots(audit, all_flags)
    classes = [{
        "name": name, **summary,
        "cards": [_flag_card(audit, f, labels_by_key, images) for f in flags if f.class_name == name],
        **plots[name],
    } for name, summary in class_summary(audit, all_flags).items()]
    faithfulness = [
        {"head": HEADS[h], "class_name": name, "methods": [
            {"method": METHODS.get(m, m), "auc": d["auc"], "n_images": d["n_images"]} for m, d in per_class.items()]}
        for h, by_class in result.get("faithfulness", {}).items() for name, per_class in by_class.items()]
    return {
        "audit": audit, "result": result, "classes": classes, "sae": result["sae"],
        "faithfulness": faithfulness, "slices": slice_tables(result), "sae_dataset": result.get("sae_dataset"),
        "stability": result.get("stability"),
        "heatmap_method": heatmap_method_of(audit.config),
        "filters": filters, "n_flags": len(all_flags),
        "n_shown": len(flags), "categories": sorted({f.category for f in all_flags}),
        "verdicts": Review._meta.get_field("verdict").choices, "heads": HEADS,
        "config_json": json.dumps(audit.config, indent=2, sort_keys=True),
        "context_json": json.dumps(audit.context, indent=2, sort_keys=True) if audit.context else "",
        "corrections": [correction_view(c) for c in audit.corrections.select_related("new_probe", "reaudit")
                        .prefetch_related("flags")],
        "reaudit_of": getattr(audit, "reaudit_of", None),
        "checklist": checklist_view(audit, images),
    }


# the badge each checklist verdict wears (workers.engine.checklist.VERDICTS, in order): the report's colours for a
# confirmed shortcut, work left, benign and nothing, plus a class of its own
VERDICT_BADGES = {"relied on, harmful": "confirmed_shortcut verdict-harmful",
                  "relied on, no measured harm": "needs_work verdict-relied",
                  "represented, not relied on": "benign verdict-represented",
                  "not found by the dictionary": "cancelled verdict-not-found"}


def checklist_view(audit: Audit, images: bool = True) -> dict | None:
    """The report's "Confounder checklist": the audit's latest succeeded checklist, one row per suspect (how it
    was given, the verdict and its class, that class's probe and zero-shot share, the harm sentence, the
    evidence: matched latents and score, and ``pictures``: the images that show it most, each with the heatmap
    of its latents when ``images``); None when no checklist of the audit has succeeded."""
    latest = audit.checklists.filter(status=Status.SUCCEEDED).order_by("-finished_at", "-pk").first()
    if latest is None:
        return None
    rows = []
    for answer in (latest.result or {}).get("suspects") or []:
        worst = answer.get("verdict_class")
        row = (answer.get("classes") or {}).get(worst) or {}
        match = answer.get("match") or {}
        rows.append({"name": answer.get("name"), "given": suspect_given(answer), "verdict": answer.get("verdict"),
                     "badge": VERDICT_BADGES.get(answer.get("verdict"), ""), "class_name": worst,
                     "probe_share": row.get("probe_share"), "zero_shot_share": row.get("zero_shot_share"),
                     "harm": (row.get("harm") or {}).get("summary") or "", "latents": match.get("latents") or [],
                     "score": match.get("score"), "found": match.get("found"), "evidence": answer.get("evidence") or "",
                     # the evidence's match part: its shares and harm have their own columns
                     "match": (answer.get("evidence") or "").split("; probe share")[0],
                     "pictures": _suspect_pictures(audit, answer) if images else []})
    return {"checklist": latest, "rows": rows, "shipped": latest.shipped,
            "others": audit.checklists.exclude(pk=latest.pk).count()}


def _suspect_pictures(audit: Audit, answer: dict) -> list[dict]:
    """The images that show a suspect most (its answer's ``top_images``), each over its latents' heatmap."""
    heatmaps = answer.get("heatmaps") or {}
    return [{"key": key, "heat": heat_overlay(image_where(audit.dataset, key), heatmaps.get(key)),
             "src": thumbnail(audit, key)} for key in answer.get("top_images") or []]


def suspect_given(suspect: dict) -> str:
    """How a suspect was named, in words: its text, its labels.csv column, or how many example images."""
    if suspect.get("text"):
        return f"text “{suspect['text']}”"
    if suspect.get("column"):
        return f"column {suspect['column']}"
    return f"examples ({len(suspect.get('with') or [])} with, {len(suspect.get('without') or [])} without)"


def correction_view(correction) -> dict:
    """What the report and the correction's page show of a correction: its flags, the old-vs-new table (rows with
    old, new, change; the reference column when the table has one), the verdict and the re-audit's diff counts."""
    result = correction.result or {}
    table = (result.get("correction") or {}).get("table")
    rows = []
    if table:
        clean = table.get("clean_slice")
        rows = [{"name": "all images", "kind": "overall", **table["overall"]}]
        rows += [{"name": f"class {name}", "kind": "class", **row} for name, row in table["per_class"].items()]
        rows += [{"name": name, "kind": "clean" if name == clean else "slice", **row}
                 for name, row in table["slices"].items() if row["n"]]
    reaudit = result.get("reaudit") or {}
    diff = reaudit.get("diff") or {}
    return {"correction": correction, "flags": list(correction.flags.all()), "rows": rows,
            "training": training_view((result.get("correction") or {}).get("training_data")),
            "has_reference": bool(rows) and "reference" in rows[0], "info": (result.get("correction") or {}).get("info"),
            "method": result.get("method"), "reason": result.get("reason"), "verdict": result.get("verdict"),
            "diff": diff, "diff_counts": diff.get("counts"), "rounds": rounds_view(result.get("rounds")),
            "changed_predictions": table.get("changed_predictions") if table else None}


def rounds_view(rounds: list | None) -> list[dict]:
    """A correction's rounds as its card lists them (only when there was more than one, or one that asked for
    another): per round the latents it corrected, overall accuracy old and new, each hurt slice's gap before and
    after, its re-audit, whether it passed, the latents its re-audit found still tracking the concept (they join
    it) and the concept's latents it still flagged (corrected as a concept of their own)."""
    rounds = rounds or []
    if len(rounds) < 2 and not any(any(r.get("added") or []) or r.get("split") for r in rounds):
        return []
    out = []
    for r in rounds:
        overall = (r.get("table") or {}).get("overall") or {}
        out.append({"round": r["round"], "latents": [i for c in r.get("concepts") or [] for i in c],
                    "old": overall.get("old"), "new": overall.get("new"), "audit": r.get("audit"),
                    "passed": r.get("passed"), "slices": r.get("slices") or [],
                    "added": [i for a in r.get("added") or [] for i in a], "split": r.get("split") or [],
                    "remains": r.get("remains") or []})
    return out


def heatmap_method_of(config: dict | None) -> str:
    """How an audit's heatmaps were made, in words ("attnlrp, traced back 3 blocks"); audits run before the
    option existed used "block"."""
    config = config or {}
    method = config.get("heatmap_method", "block")
    if method in ("attnlrp", "conservative"):
        return f"{method}, traced back {config.get('heatmap_blocks', 3)} blocks"
    if method in ("attnlrp-pixels", "occlusion"):
        return f"{method}, {config.get('heatmap_cells', 2)} cells per patch side"
    return method


GALLERY_SIZE = 6  # latents an explanation shows as large maps next to the image
GALLERY_PX = 224  # the side of those maps: the model's crop at a size a reviewer can read


TRAINING_ROWS_SHOWN = 12  # training images with the concept a correction's card lists (the CSV has them all)


def training_view(data: dict | None) -> dict | None:
    """The data behind the shortcut as a correction's card shows it: per class the training images with and
    without the concept, the rate in the class against the others, and the images with the strongest
    activation; None when the correction had no training split."""
    if not data:
        return None
    imbalance = data.get("imbalance") or {}
    classes = [{"name": name, **row, **{f"imbalance_{k}": v for k, v in (imbalance.get(name) or {}).items()}}
               for name, row in (data.get("classes") or {}).items()]
    return {"classes": classes, "points_to": data.get("points_to"), "images": data.get("images"),
            "with_concept": data.get("with_concept"), "latents": data.get("latents"), "column": data.get("column"),
            "top": (data.get("rows") or [])[:TRAINING_ROWS_SHOWN], "rows_kept": data.get("rows_kept"),
            "rows_total": len(data.get("rows") or [])}


def training_csv(correction) -> Iterator[str]:
    """The training images on which the corrected concept is active (image, class, activation), strongest first:
    for relabelling or rebalancing the probe's training split."""
    data = ((correction.result or {}).get("correction") or {}).get("training_data") or {}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image", "class", "activation"])
    yield out.getvalue()
    for row in data.get("rows") or []:
        out.seek(0)
        out.truncate()
        writer.writerow([row["image"], row["class"], row["activation"]])
        yield out.getvalue()


def training_response(correction):
    """:func:`training_csv` as a download, or a 409 that says why there is none."""
    from django.http import JsonResponse, StreamingHttpResponse

    data = ((correction.result or {}).get("correction") or {}).get("training_data")
    if not data:
        why = ("it was made without the probe's training split (give training_dataset, with method refit or "
               "reweight)" if correction.training_dataset_id is None else f"it is {correction.status} and has not "
                                                                            "read the training split yet")
        return JsonResponse({"detail": f"correction {correction.pk} has no training data: {why}"}, status=409)
    response = StreamingHttpResponse(training_csv(correction), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="correction-{correction.pk}-training-data.csv"'
    return response


def explanation_view(explanation) -> dict:
    """What the explanation's page shows: the image, per head its prediction and, per class, the latents for
    and against it, each with its heatmap over the image; and ``gallery``, the latents with the largest
    relevance as large maps beside the image."""
    result = explanation.result or {}
    key = (image_where(explanation.audit.dataset, explanation.item) if explanation.item
           else explanation.image.name)
    maps = result.get("heatmaps") or {}
    heads, strongest = [], {}
    for head, answer in (result.get("heads") or {}).items():
        classes = []
        for name, side in answer["classes"].items():
            rows = [{**row, "direction": direction, "heat": heat_overlay(key, maps.get(str(row["latent"])), 96)}
                    for direction in ("for", "against") for row in side[direction]]
            classes.append({"name": name, "probability": side["probability"], "rows": rows})
            for row in rows:
                seen = strongest.get(row["latent"])
                if seen is None or abs(row["relevance"]) > abs(seen["relevance"]):
                    strongest[row["latent"]] = {**row, "head": HEADS.get(head, head), "class_name": name}
        heads.append({"head": head, "title": HEADS.get(head, head), "prediction": answer["prediction"],
                      "classes": classes, "without": answer.get("without_flagged")})
    shown = sorted((r for r in strongest.values() if maps.get(str(r["latent"]))),
                   key=lambda r: -abs(r["relevance"]))[:GALLERY_SIZE]
    gallery = [{**r, "large": heat_overlay(key, maps[str(r["latent"])], GALLERY_PX)} for r in shown]
    return {"image": _thumbnail(key, GALLERY_PX) if explanation.item or explanation.image else None,
            "label": (result.get("image") or {}).get("label"), "heads": heads, "gallery": gallery,
            # an explanation made after the audit says how its own maps were made
            "method": heatmap_method_of(result.get("heatmap_options") or explanation.audit.config)}


def explanations_for_report(audit: Audit) -> list[dict]:
    """The audit's succeeded explanations, newest first, as the offline report shows them: each one's image,
    predictions and large maps (:func:`explanation_view`)."""
    done = audit.explanations.filter(status=Status.SUCCEEDED).order_by("-pk")[:20]
    return [{"explanation": e, "ev": explanation_view(e)} for e in done]


# --------------------------------------------------------------------------- downloads

def full_json(audit: Audit) -> dict:
    """The whole result: audit facts, the engine's result, every latent and every flag with its reviews."""
    flags = [{"id": f.pk, **as_json(FLAG_FIELDS, f), "reviews": [review_dict(r) for r in f.reviews.all()]}
             for f in audit.flags.prefetch_related("reviews__reviewer")]
    return {
        "report_schema_version": REPORT_SCHEMA_VERSION,
        "audit": {"id": audit.pk, "project": audit.project.name, "status": audit.status,
                  "created_at": audit.created_at.isoformat(),
                  "finished_at": audit.finished_at.isoformat() if audit.finished_at else None,
                  "model": {"name": audit.clip_model.name, "source": audit.clip_model.source,
                            "layer": audit.clip_model.layer, "token": audit.clip_model.token},
                  "probe": {"name": audit.probe.name, "sha256": audit.probe.sha256,
                            "classes": audit.probe.class_names},
                  "dataset": {"name": audit.dataset.name, "sha256": audit.dataset.sha256,
                              "n_images": audit.dataset.n_images},
                  "config": audit.config, "context": audit.context, "timings": audit.timings,
                  "device": audit.device},
        "result": {k: v for k, v in (audit.result or {}).items() if k not in ("flags", "artifacts")},
        "latents": [as_json(LATENT_FIELDS, row) for row in audit.latents.all().iterator(chunk_size=2000)],
        "flags": flags,
        "corrections": [{"id": c.pk, "status": c.status, "flags": [f.pk for f in c.flags.all()],
                         "method": c.method, "options": c.options, "error": c.error, "new_probe": c.new_probe_id,
                         "reaudit": c.reaudit_id, "result": c.result}
                        for c in audit.corrections.prefetch_related("flags")],
        "probe_parent": audit.probe.parent_id,
    }


class _Echo:
    def write(self, value):
        return value


# What a spreadsheet reads as the start of a formula (OWASP, "CSV injection"): a class name, a label, an image's
# name or a review note starting so would run when the CSV is opened.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def csv_safe(cell):
    """The cell as a spreadsheet should show it: text that would start a formula gets a leading single quote, so it
    shows as the text it is; a number ("-0.12", "-1e-05") stays a number."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def _csv_rows(fields, rows) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(csv_header(fields))
    for row in rows:
        yield writer.writerow([csv_safe(cell) for cell in csv_row(fields, row)])


def latents_csv(audit: Audit) -> Iterator[str]:
    """CSV rows, streamed: 30 000 latents never sit in memory as one string."""
    return _csv_rows(LATENT_FIELDS, audit.latents.all().iterator(chunk_size=2000))


def flags_csv(audit: Audit) -> Iterator[str]:
    return _csv_rows(FLAG_FIELDS, audit.flags.prefetch_related("reviews__reviewer"))


DOWNLOADS = ("html", "json", "latents.csv", "flags.csv")


def download_response(audit: Audit, fmt: str):
    """One download of a succeeded audit as an HTTP response (used by the web UI and the API)."""
    from django.http import Http404, HttpResponse, StreamingHttpResponse
    from django.template.loader import render_to_string

    stem = f"audit-{audit.pk}"
    if fmt == "html":
        context = report_context(audit)
        context.update(standalone=True, project=audit.project, can_review=False,
                       explained=explanations_for_report(audit))
        response = HttpResponse(render_to_string("web/report.html", context), content_type="text/html; charset=utf-8")
        name = f"{stem}-report.html"
    elif fmt == "json":
        response = HttpResponse(json.dumps(full_json(audit), indent=1), content_type="application/json")
        name = f"{stem}.json"
    elif fmt in ("latents.csv", "flags.csv"):
        rows = latents_csv(audit) if fmt == "latents.csv" else flags_csv(audit)
        response = StreamingHttpResponse(rows, content_type="text/csv; charset=utf-8")
        name = f"{stem}-{fmt}"
    else:
        raise Http404(f"no download '{fmt}': use one of {', '.join(DOWNLOADS)}")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
