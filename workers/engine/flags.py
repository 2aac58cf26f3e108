"""Unexpected reliance: latents a class leans on that do not mean that class."""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor

from .config import AuditConfig
from .harm import harm_size, measured_harm, subset_table
from .semantics import UNLABELLED, Vocabulary


NOISE_FLOOR = 1e-4  # relevance below this fraction of a class's largest |mean relevance| is rounding noise


def relevance_tables(relevance_sum: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per class: mean relevance [C, L] over the class's images and each latent's share of the positive total.

    Means within ``NOISE_FLOOR`` of zero, relative to the class's largest, get
    no share: otherwise a class whose evidence is all negative would hand its
    whole "share" to float rounding errors.
    """
    mean = relevance_sum / counts.clamp_min(1).unsqueeze(1).to(relevance_sum.dtype)
    floor = NOISE_FLOOR * mean.abs().amax(1, keepdim=True)
    positive = torch.where(mean > floor, mean, torch.zeros_like(mean))
    share = positive / positive.sum(1, keepdim=True).clamp_min(1e-12)
    return mean, share


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - {"a", "an", "the", "of", "and", "with", "on", "in"}


def categorize(label: str | None, label_index: int | None, vocab: Vocabulary, class_name: str,
               explicit_expected: bool, name_alignment: float, config: AuditConfig) -> str:
    """A guess at the kind of shortcut from the latent's label (see docs/method.md, "Flag categories")."""
    if label_index is None or label == UNLABELLED:
        return "other"
    category = vocab.categories[label_index]
    if category in ("dataset_artifact", "visual_text"):
        return category
    if vocab.sources[label_index] == "class" or vocab.sources[label_index].startswith("expected:"):
        return "other"  # another class's concept: not a second sense of this class's name
    # The latent matches the class's name but not what the class means: another sense of the word.
    if explicit_expected and name_alignment >= config.flag_max_alignment:
        return "polysemy"
    class_words = _words(class_name)
    if len(_words(label)) > 1 and class_words & _words(label) and vocab.sources[label_index] != "class":
        return "compound_noun"
    return "other"


def find_flags(head: str, mean: Tensor, share: Tensor, class_names: list[str], *, labels: list,
               label_indices: list, label_alignment: Tensor, expected_alignment: Tensor,
               name_alignment: Tensor, clarity: Tensor, vocab: Vocabulary, config: AuditConfig) -> list[dict]:
    """Flag, per class, latents with a high relevance share whose alignment with the expected concepts is low.

    A latent is flagged for class c when it is among the class's
    ``flag_top_n`` latents by share, holds at least ``flag_min_share`` of the
    class's positive relevance, its label is not one of c's expected concepts,
    and its alignment with them is low: below ``flag_max_alignment``, or below
    ``flag_relative_alignment`` times its alignment with its own label, or
    above the best other class's expected alignment by less than
    ``flag_class_margin``, or its class-specific alignment (the expected
    alignment minus the mean over all classes) is below
    ``flag_relative_alignment`` times its own (the last three keep the rule
    meaningful for models whose alignments are all large: a ruler seen on both
    classes aligns with both classes alike, so it does not mean either).
    """
    flags = []
    for c, name in enumerate(class_names):
        expected = set(vocab.expected_indices(name, config.expected_concepts))
        if name.lower() in vocab.index:  # the class's own name always means the class
            expected.add(vocab.index[name.lower()])
        explicit = bool(config.expected_concepts.get(name))
        ranked = torch.argsort(share[c], descending=True)[: config.flag_top_n].tolist()
        for rank, latent in enumerate(ranked, start=1):
            s = float(share[c, latent])
            if s < config.flag_min_share or s <= 0:
                break
            if labels[latent] is None:
                continue
            # a confident label that is one of the class's own concepts means the class; an unlabelled latent is
            # judged by its alignments alone
            if labels[latent] != UNLABELLED and label_indices[latent] in expected:
                continue
            a = float(expected_alignment[c, latent])
            own = float(label_alignment[latent])
            others = [float(expected_alignment[o, latent]) for o in range(len(class_names)) if o != c]
            distinct = not others or a - max(others) >= config.flag_class_margin
            # the part of the alignment this class does not share with the others, e.g. melanoma's "irregular"
            # but not the "lesion" every class prompt says
            specific = a - (a + sum(others)) / (1 + len(others)) if others else a
            if (a >= config.flag_max_alignment and a >= config.flag_relative_alignment * own and distinct
                    and specific >= config.flag_relative_alignment * own):
                continue
            flags.append({
                "head": head, "class_name": name, "latent": int(latent), "rank": rank,
                "share": s, "mean_relevance": float(mean[c, latent]),
                "label": labels[latent], "label_source": vocab.sources[label_indices[latent]],
                "label_alignment": float(label_alignment[latent]), "expected_alignment": a,
                "clarity": float(clarity[latent]),
                "category": categorize(labels[latent], label_indices[latent], vocab, name, explicit,
                                       float(name_alignment[c, latent]), config),
            })
    return flags


def _centred_semantics(semantic: Tensor) -> Tensor:
    """Unit semantic embeddings with their common part removed: every image of a dataset looks alike to CLIP
    ("a photo of skin"), so plain cosines between latents are all high; centred ones say what differs."""
    alive = semantic.norm(dim=1) > 0
    centre = semantic[alive].mean(0) if alive.any() else torch.zeros(semantic.shape[1])
    return torch.nn.functional.normalize(semantic - centre, dim=1)


def select_flags(candidates: list[dict], semantic: Tensor, config: AuditConfig,
                 evidence: "Evidence | None" = None) -> list[dict]:
    """From candidate flags (with shares and harm), the flags a reviewer sees.

    Per head and class, candidates whose latents mean the same thing (the same
    confident label; where one is unlabelled, centred semantic cosine >=
    ``flag_group_similarity``) are one concept, reported once with its summed share. A concept is kept
    when its harm is measured (the head's with/without gap is large,
    significant and clearly above the other head's) and still measured on the
    images where every concept kept before it (for any class) is inactive.
    Concepts are taken strongest first: by harm, discounted for latents that
    fire on more than half of the images, so a latent that shows the artifact
    comes before one that fires whenever it is absent. That explains away what only rides along: a
    latent that fires with the ruler inherits the ruler's harm, and a latent
    that fires on every image without a sticker is the sticker shortcut seen
    from the other class; neither is flagged as a shortcut of its own. Kept
    concepts keep that order as their rank. With ``flag_without_harm``,
    concepts the head leans on ``amplification_ratio`` times more than the
    other head does are kept too, below them ("relied on, no measured harm").
    """
    centred = _centred_semantics(semantic)
    out = []
    for head in sorted({f["head"] for f in candidates}):
        other_head = "zero_shot" if head == "probe" else "probe"
        leads = []
        for class_name in sorted({f["class_name"] for f in candidates if f["head"] == head}):
            group = sorted([f for f in candidates if (f["head"], f["class_name"]) == (head, class_name)],
                           key=lambda f: -f["share"])
            leads += [_lead(members) for members in _concepts(group, centred, config)]

        def strength(flag):
            # a latent that fires on most images is more likely the absence of something than a thing
            frequency = evidence.frequency(flag["concept_latents"]) if evidence is not None else 0.0
            return harm_size(flag["harm"][head]) * min(1.0, 2.0 * (1.0 - frequency))

        kept: list[dict] = []
        for flag in sorted([f for f in leads if f["harm"]["measured"]], key=lambda f: -strength(f)):
            if evidence is not None and kept:
                exclude = [i for f in kept for i in f["concept_latents"]]
                if not evidence.measured_without(head, other_head, flag["class_name"], flag["concept_latents"],
                                                 exclude):
                    continue
            kept.append(flag)
        if config.flag_without_harm:
            for flag in sorted([f for f in leads if not f["harm"]["measured"]], key=lambda f: -f["share"]):
                own, other = ((flag["probe_share"], flag["zero_shot_share"]) if head == "probe"
                              else (flag["zero_shot_share"], flag["probe_share"]))
                if own >= config.flag_min_share and own >= config.amplification_ratio * other:
                    kept.append(flag)
        for class_name in {f["class_name"] for f in kept}:
            for rank, flag in enumerate([f for f in kept if f["class_name"] == class_name], start=1):
                flag["rank"] = rank
        out += sorted(kept, key=lambda f: (f["class_name"], f["rank"]))
    return out


def _concepts(group: list[dict], centred: Tensor, config: AuditConfig) -> list[list[dict]]:
    concepts: list[list[dict]] = []
    for flag in group:
        for concept in concepts:
            labels = {flag["label"], concept[0]["label"]}
            if UNLABELLED not in labels:  # two confident labels decide: the same concept only if they agree
                alike = len(labels) == 1
            else:
                alike = float(centred[flag["latent"]] @ centred[concept[0]["latent"]]) >= config.flag_group_similarity
            if alike:
                concept.append(flag)
                break
        else:
            concepts.append([flag])
    return concepts


def _lead(members: list[dict]) -> dict:
    """One flag for a concept: its measured member with the largest share (or its largest), shares summed."""
    measured = [f for f in members if f["harm"]["measured"]]
    lead = dict(measured[0] if measured else members[0])
    lead["concept_latents"] = [f["latent"] for f in members]
    for key in ("share", "probe_share", "zero_shot_share", "mean_relevance"):
        lead[key] = sum(f[key] for f in members)
    return lead


class Evidence:
    """Per-image activity and predictions, to measure a concept's harm on the images where others are inactive."""

    def __init__(self, activity, labels, predictions: dict, class_names: list[str], config: AuditConfig):
        self.activity, self.labels, self.predictions = activity, labels, predictions
        self.class_names, self.config = class_names, config
        self._fires: dict[int, np.ndarray] = {}  # each latent's activity is read once, however often it is excluded

    def _active(self, latents: list[int]) -> np.ndarray:
        for i in latents:
            if i not in self._fires:
                self._fires[i] = self.activity(i) > 0
        return np.logical_or.reduce([self._fires[i] for i in latents])

    def frequency(self, latents: list[int]) -> float:
        """Share of images on which any of ``latents`` is active."""
        return float(self._active(latents).mean())

    def measured_without(self, head: str, other_head: str, class_name: str, latents: list[int],
                         exclude: list[int]) -> bool:
        keep = ~self._active(exclude)
        active = self._active(latents)
        c = self.class_names.index(class_name)
        tables = {h: subset_table(active, keep, self.labels, self.predictions[h], c) for h in (head, other_head)}
        return measured_harm(tables[head], tables[other_head], self.config.harm_min_gap, self.config.harm_min_z)[0]
