"""From the merged partial and the latents' labels to an :class:`AuditResult` (flags not yet causally confirmed):
relevance tables, flags with their harm, the probe vs zero-shot comparison, faithfulness, accuracy and latents."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ActivationStore
from .attribution import REGISTRY
from .config import AuditConfig
from .confirmation import baseline_groups
from .context import AuditContext
from .data import ImageSet
from .errors import checkpoint, reserve
from .flags import Evidence, categorize, find_flags, relevance_tables, select_flags
from .harm import HarmInputs, metadata_auroc, slice_accuracy
from .interventions import area_under_curve
from .labelling import LatentLabels
from .partials import Partial
from .result import SCHEMA_VERSION, AuditResult
from .semantics import UNLABELLED
from .stability import best_latents, concept_activity, hold, single

Tables = dict[str, tuple[Tensor, Tensor]]  # head -> (mean relevance [C, L], share of the positive total [C, L])


def summarize(ctx: AuditContext, store: ActivationStore, images: ImageSet, merged: Partial, labelled: LatentLabels,
              sae_metrics: dict, workdir: Path, others: list[tuple] | None = None) -> tuple[AuditResult, list[float]]:
    """Flags, relevance tables, faithfulness, accuracy and latents from the merged partial (stage 'label').

    ``others``: the other dictionaries with their flags (``dictionaries.flags_of_others``), which vote on the
    flags (``stability.hold``); None or empty: the audit has one dictionary and every flag stands alone.
    Returns the result (flags not yet causally confirmed) and, per flag, the amount confirmation inserts.
    Writes the full relevance tables to ``workdir / relevance.npz``.
    """
    config, class_names, heads = ctx.config, ctx.class_names, list(ctx.heads)
    labels = store.labels
    counts = torch.bincount(labels, minlength=len(class_names))
    tables = _tables(ctx, store, merged)
    metadata = getattr(images, "metadata", None) or {}
    flags, stability = _vote(ctx, store, _flags(ctx, labels, merged, labelled, tables), others,
                             lambda concept, column: _express(ctx, store, merged, labelled, tables, concept, column))
    amounts = _describe_flags(ctx, images, labels, counts, merged, labelled, flags, metadata)
    freq = torch.from_numpy(merged.frequency / store.n)
    _save_relevance(workdir, class_names, tables, labelled, freq)
    bundle, device = ctx.bundle, ctx.device
    result = AuditResult(
        schema_version=SCHEMA_VERSION,
        config=config.to_dict(),
        model={"name": bundle.name, "layer": config.layer, "token": config.token, "n_blocks": bundle.n_blocks,
               "width": bundle.width, "embed_dim": bundle.embed_dim},
        classes=list(class_names),
        dataset={"n_images": store.n, "per_class": {n: int(counts[c]) for c, n in enumerate(class_names)}},
        sae=sae_metrics,
        accuracy=_accuracy(merged, labels, counts, class_names),
        latents=_latents(labelled, merged, freq, images.ids, class_names),
        relevance=_relevance(tables, labelled.labels, class_names, config),
        flags=flags,
        comparison=_comparison(flags, tables, class_names, config),
        faithfulness=_faithfulness(merged, class_names),
        slices=slice_accuracy(metadata, {h: merged.heads[h].predictions for h in heads}, labels.numpy(),
                              class_names),
        stability=stability,
        timings={},
        environment={"device": str(device), "torch": torch.__version__, "host": platform.node(),
                     "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        artifacts={"relevance": "relevance.npz", "sae": "sae/", "activations": "activations/"},
    )
    return result, amounts


def _tables(ctx: AuditContext, store: ActivationStore, merged: Partial) -> Tables:
    counts = torch.bincount(store.labels, minlength=ctx.n_classes)
    return {h: relevance_tables(torch.from_numpy(merged.heads[h].relevance_sum), counts) for h in ctx.heads}


def candidate_flags(ctx: AuditContext, store: ActivationStore, merged: Partial, labelled: LatentLabels) -> list[dict]:
    """The flags the audit's rule raises on ``ctx``'s dictionary, before any vote (what another dictionary
    brings to the vote)."""
    return _flags(ctx, store.labels, merged, labelled, _tables(ctx, store, merged))


def _vote(ctx: AuditContext, store: ActivationStore, flags: list[dict], others: list[tuple] | None, express=None):
    """The flags the other dictionaries' vote keeps (and the concepts they agree on that ``express`` finds in this
    audit's SAE), and the audit's stability summary."""
    seeds = [ctx.config.sae.seed + k for k in range(1 + len(others or []))]
    if not others:
        return single(flags, seeds[0])

    def activity(sae, some):
        return concept_activity(sae, store, ctx.config, [f["concept_latents"] for f in some], ctx.device)

    return hold(flags, activity(ctx.sae, flags), [(some, activity(sae, some)) for sae, some in others],
                ctx.config, seeds, express)


def _express(ctx: AuditContext, store: ActivationStore, merged: Partial, labelled: LatentLabels, tables: Tables,
             concept: dict, column: np.ndarray) -> tuple[dict | None, float, str]:
    """A concept other dictionaries flag, as a flag of this audit's SAE: its latents whose summed activation
    matches the concept's (``column``), described as the flag rule describes a candidate (the latent with the
    largest share leads; shares summed), with its harm; None and the reason when no latents match or they show no
    measured harm (unless ``flag_without_harm``)."""
    config = ctx.config
    rho, latents = best_latents(ctx.sae, store, config, column, ctx.device)
    latents = [int(i) for i in latents if labelled.labels[i] is not None]  # a latent never active has no meaning
    if rho < config.match_min_correlation or not latents:
        return None, rho, f"no set of this SAE's latents matches it (best correlation {rho:.2f})"
    head, name = concept["head"], concept["class_name"]
    c = ctx.class_names.index(name)
    mean, share = tables[head]
    lead = max(latents, key=lambda i: float(share[c, i]))
    j = labelled.label_indices[lead]
    flag = {
        "head": head, "class_name": name, "latent": lead, "rank": 0, "share": float(share[c, latents].sum()),
        "mean_relevance": float(mean[c, latents].sum()), "label": labelled.rule_labels[lead],
        "label_source": labelled.vocab.sources[j], "label_alignment": float(labelled.label_alignment[lead]),
        "expected_alignment": float(labelled.expected_alignment[c, lead]), "clarity": float(labelled.clarity[lead]),
        "category": categorize(labelled.rule_labels[lead], j, labelled.vocab, name,
                               bool(config.expected_concepts.get(name)), float(labelled.name_alignment[c, lead]),
                               config),
        "probe_share": float(tables["probe"][1][c, latents].sum()),
        "zero_shot_share": float(tables["zero_shot"][1][c, latents].sum()), "concept_latents": latents,
        "closest_concept": labelled.closest_concepts[lead],
        "harm": HarmInputs(merged, store.labels, ctx.n_classes).evidence(c, lead, head, name=name, config=config),
    }
    if not (flag["harm"]["measured"] or config.flag_without_harm):
        return None, rho, f"its latents here ({', '.join(map(str, latents))}) show no measured harm"
    return flag, rho, ""


def _flags(ctx: AuditContext, labels: Tensor, merged: Partial, labelled: LatentLabels, tables: Tables) -> list[dict]:
    """Candidates of every head (high share, low alignment) with both heads' shares and their harm, then the flags
    a reviewer sees (concepts grouped, what rides along explained away)."""
    config, class_names = ctx.config, ctx.class_names
    flags = []
    for h, (mean, share) in tables.items():
        flags += find_flags(h, mean, share, class_names, labels=labelled.rule_labels,
                            label_indices=labelled.label_indices,
                            label_alignment=labelled.label_alignment, expected_alignment=labelled.expected_alignment,
                            name_alignment=labelled.name_alignment, clarity=labelled.clarity, vocab=labelled.vocab,
                            config=config)
    harm = HarmInputs(merged, labels, len(class_names))
    for flag in flags:
        c = class_names.index(flag["class_name"])
        flag["probe_share"] = float(tables["probe"][1][c, flag["latent"]])
        flag["zero_shot_share"] = float(tables["zero_shot"][1][c, flag["latent"]])
        flag["harm"] = harm.evidence(c, flag["latent"], flag["head"], name=flag["class_name"], config=config)
        # what a flag the vote drops (or another dictionary's flag it misses) is shown with
        flag["closest_concept"] = labelled.closest_concepts[flag["latent"]]
    predictions = {h: np.asarray(head.predictions) for h, head in merged.heads.items()}
    evidence = Evidence(merged.activity, labels.numpy(), predictions, class_names, config)
    return select_flags(flags, labelled.semantic, config, evidence)


def _describe_flags(ctx: AuditContext, images: ImageSet, labels: Tensor, counts: Tensor, merged: Partial,
                    labelled: LatentLabels, flags: list[dict], metadata: dict) -> list[float]:
    """Give each flag what a reviewer reads (references, top images, what the latent tracks in the metadata) and
    the latents its confirmation compares against; returns, per flag, the amount confirmation inserts."""
    config, class_names = ctx.config, ctx.class_names
    class_mean = torch.from_numpy(merged.class_activation) / counts.clamp_min(1).unsqueeze(1)
    amounts = []
    for flag in flags:
        checkpoint()
        c = class_names.index(flag["class_name"])
        latent = flag["latent"]
        flag["references"] = [images.ids[i] for i in labelled.tracker.references(latent)]
        # what the latent means, as a unit vector in the semantic model's embedding space: the audit diff
        # matches flags across audits with it (latent indices differ between SAEs)
        flag["semantic"] = [round(v, 5) for v in F.normalize(labelled.semantic[latent], dim=0).tolist()]
        head = merged.heads[flag["head"]]
        flag["top_images"] = _top_images((head.top_values, head.top_indices), latent, labels, c, images.ids,
                                         config.top_images_per_flag)
        flag["label"] = labelled.labels[latent]  # the name a reviewer reads (the rule grouped by rule_labels)
        flag["label_confidence"] = float(labelled.confidence[latent])
        flag["closest_concept"] = labelled.closest_concepts[latent]
        flag["label_evidence"] = label_evidence_of(labelled, latent)
        flag["metadata_auroc"] = metadata_auroc(merged.activity(latent), metadata)
        flag["baseline_groups"] = baseline_groups(class_mean[c], flag["concept_latents"], exclude=[
            i for f in flags if f["class_name"] == flag["class_name"] for i in f["concept_latents"]])
        amounts.append(float(class_mean[c, latent]))
    return amounts


def _top_images(top_rel, latent: int, labels: torch.Tensor, c: int, ids: list, n: int) -> list[dict]:
    values, indices = top_rel
    hit = (indices == latent) & (labels.numpy() == c)[:, None]
    rows, cols = np.nonzero(hit)
    rel = values[rows, cols]
    order = np.argsort(-rel)[:n]
    return [{"image": ids[int(rows[o])], "relevance": float(rel[o])} for o in order if rel[o] > 0]


def _comparison(flags: list[dict], tables: Tables, class_names: list[str], config: AuditConfig) -> dict:
    """Per class: the probe's and zero-shot's share on the probe's flagged latents, and whether the probe amplifies
    the shortcut."""
    comparison = {}
    for c, name in enumerate(class_names):
        probe_flags = [f for f in flags if f["class_name"] == name and f["head"] == "probe"]
        flagged = sorted({i for f in probe_flags for i in f["concept_latents"]})
        probe_share = float(tables["probe"][1][c, flagged].sum()) if flagged else 0.0
        zs_share = float(tables["zero_shot"][1][c, flagged].sum()) if flagged else 0.0
        comparison[name] = {
            "flagged_latents": flagged, "probe_share": probe_share, "zero_shot_share": zs_share,
            "measured_harm": sum(f["harm"]["measured"] for f in probe_flags),
            # the probe leans on the flagged latents more than zero-shot does: by share, or by measured harm
            # (the probe's with/without gap exceeds zero-shot's)
            "amplified_by_probe": bool(probe_flags) and (
                any(f["harm"]["measured"] for f in probe_flags)
                or (probe_share >= config.flag_min_share and probe_share >= config.amplification_ratio * zs_share)),
        }
    return comparison


def _relevance(tables: Tables, labels_text: list, class_names: list[str], config: AuditConfig) -> dict:
    """Per head and class: the total positive relevance and the top latents by share."""
    relevance = {}
    for h, (mean, share) in tables.items():
        relevance[h] = {}
        for c, name in enumerate(class_names):
            top = torch.argsort(share[c], descending=True)[: config.report_top_n].tolist()
            relevance[h][name] = {
                "total_positive_relevance": float(mean[c].clamp_min(0).sum()),
                "top": [{"latent": i, "mean_relevance": float(mean[c, i]), "share": float(share[c, i]),
                         "label": labels_text[i]} for i in top if float(mean[c, i]) != 0.0],
            }
    return relevance


def _faithfulness(merged: Partial, class_names: list[str]) -> dict:
    """Per head, class and method: the mean deletion curve over the class's faithfulness images and its area."""
    faith_counts = merged.faith_counts
    # as Python floats in the result, then in its JSON: ~60 bytes a point, where the sums took 4
    points = sum(curve.size for head in merged.heads.values() for curve in head.curve_sum.values())
    reserve(60 * points, f"the result's {points} points of deletion curves (faithfulness_steps)")
    faithfulness = {}
    for h, head in merged.heads.items():
        faithfulness[h] = {}
        for c, name in enumerate(class_names):
            if faith_counts[c] == 0:
                continue
            faithfulness[h][name] = {}
            for m in REGISTRY:
                checkpoint()
                curve = torch.from_numpy(head.curve_sum[m][c] / faith_counts[c])
                faithfulness[h][name][m] = {"curve": curve.tolist(), "auc": float(area_under_curve(curve)),
                                            "n_images": int(faith_counts[c])}
    return faithfulness


def label_evidence_of(labelled: LatentLabels, latent: int) -> dict | None:
    """What a reviewer reads under a latent's label: the runner-up of another meaning, the margin over it (standard
    deviations of the latent's scores over the vocabulary), the other phrasings that agree, and the share of
    resamples of its references that give the same meaning; None for a latent never active."""
    if labelled.closest_concepts[latent] is None:
        return None
    ev = labelled.evidence
    return {"runner_up": ev.runner_up[latent], "margin": round(float(ev.margin[latent]), 3),
            "agreeing": list(ev.agreeing[latent]), "resampled": round(float(ev.resampled[latent]), 3)}


def _latents(labelled: LatentLabels, merged: Partial, freq: Tensor, ids: list, class_names: list[str]) -> list:
    """One entry per latent: its label and where it came from, alignments, clarity, frequency, references."""
    vocab, labels_text, label_indices = labelled.vocab, labelled.labels, labelled.label_indices

    def entry(i: int) -> dict:
        j = label_indices[i]
        return {
            "latent": i, "label": labels_text[i],
            "label_source": vocab.sources[j] if j is not None else None,
            "label_category": vocab.categories[j] if j is not None and labels_text[i] != UNLABELLED else None,
            "label_confidence": float(labelled.confidence[i]), "closest_concept": labelled.closest_concepts[i],
            "label_evidence": label_evidence_of(labelled, i),
            "label_alignment": float(labelled.label_alignment[i]) if labels_text[i] is not None else None,
            "clarity": float(labelled.clarity[i]), "frequency": float(freq[i]),
            "max_activation": float(merged.max_activation[i]),
            "references": [ids[r] for r in labelled.tracker.references(i)],
            "expected_alignment": {name: float(labelled.expected_alignment[c, i])
                                   for c, name in enumerate(class_names)},
            "specific_alignment": {name: float(labelled.specific_alignment[c, i])
                                   for c, name in enumerate(class_names)},
        }

    return [entry(i) for i in range(len(labels_text))]


def _accuracy(merged: Partial, labels: Tensor, counts: Tensor, class_names: list[str]) -> dict:
    accuracy = {}
    for h, head in merged.heads.items():
        correct = torch.from_numpy(head.predictions) == labels
        accuracy[h] = {"overall": float(correct.float().mean()),
                       "per_class": {name: float(correct[labels == c].float().mean()) if counts[c] else None
                                     for c, name in enumerate(class_names)}}
    return accuracy


def _save_relevance(workdir: Path, class_names: list[str], tables: Tables, labelled: LatentLabels,
                    freq: Tensor) -> None:
    """The full relevance tables, for whoever wants more than the report's top latents."""
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(workdir / "relevance.npz", classes=np.array(class_names),
             **{f"{h}_mean": mean.numpy() for h, (mean, _) in tables.items()},
             **{f"{h}_share": share.numpy() for h, (_, share) in tables.items()},
             expected_alignment=labelled.expected_alignment.numpy(), clarity=labelled.clarity.numpy(),
             frequency=freq.numpy())
