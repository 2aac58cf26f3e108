"""What a latent encodes: reference images, semantic embedding, clarity, alignment and label."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Concepts that are not what a medical or natural-image class should mean, with the
# category a flag gets when its latent is labelled with one of them.
ARTIFACT_VOCABULARY: dict[str, str] = {
    "a ruler": "dataset_artifact",
    "ruler markings with millimetre ticks": "dataset_artifact",
    "a measuring scale": "dataset_artifact",
    "a band-aid": "dataset_artifact",
    "an adhesive bandage": "dataset_artifact",
    "a skin marker ink marking": "dataset_artifact",
    "purple ink drawn on skin": "dataset_artifact",
    "hair": "dataset_artifact",
    "dark hairs over the skin": "dataset_artifact",
    "dark corners": "dataset_artifact",
    "a dark vignette around the image": "dataset_artifact",
    "a colour calibration chart": "dataset_artifact",
    "a chart of coloured squares": "dataset_artifact",
    "gel bubbles": "dataset_artifact",
    "air bubbles": "dataset_artifact",
    "a microscope frame": "dataset_artifact",
    "a round black frame around the image": "dataset_artifact",
    "a blurry image": "dataset_artifact",
    "an out-of-focus photo": "dataset_artifact",
    "a watermark": "visual_text",
    "text": "visual_text",
    "typography": "visual_text",
    "printed text": "visual_text",
    "letters and numbers": "visual_text",
    "a logo": "visual_text",
    "a brand emblem": "visual_text",
}

UNLABELLED = "unlabelled"  # the label of a latent that no concept of the vocabulary describes well
# standard deviations of a latent's scores over the vocabulary: a closest concept that stands out less than this
# over every concept of another meaning is no evidence (on the case study, latents of no nameable artifact stood out
# by 0.0 to 0.35, ruler latents by 0.55 to 1.6)
MIN_MARGIN = 0.5

# Phrasings of one meaning in the built-in artifact vocabulary. A label competes with the best concept of another
# meaning (its synonyms do not count against it), and a name is given only when another phrasing of the same
# meaning agrees (see label_evidence).
ARTIFACT_MEANINGS: dict[str, str] = {
    "a ruler": "ruler", "ruler markings with millimetre ticks": "ruler", "a measuring scale": "ruler",
    "a band-aid": "band-aid", "an adhesive bandage": "band-aid",
    "a skin marker ink marking": "ink marking", "purple ink drawn on skin": "ink marking",
    "hair": "hair", "dark hairs over the skin": "hair",
    "dark corners": "dark corners", "a dark vignette around the image": "dark corners",
    "a colour calibration chart": "colour chart", "a chart of coloured squares": "colour chart",
    "gel bubbles": "bubbles", "air bubbles": "bubbles",
    "a microscope frame": "microscope frame", "a round black frame around the image": "microscope frame",
    "a blurry image": "blur", "an out-of-focus photo": "blur",
    "a watermark": "text", "text": "text", "typography": "text", "printed text": "text",
    "letters and numbers": "text",
    "a logo": "logo", "a brand emblem": "logo",
    # the general vocabulary's (ImageNet's) names of the same things
    "ruler measuring stick": "ruler", "band-aid": "band-aid", "bubble": "bubbles", "website": "text",
}


def general_vocabulary() -> list[str]:
    """The ImageNet class names that ship inside open_clip."""
    from open_clip import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


class ReferenceTracker:
    """Streaming top-m images per latent by activation; merging two trackers is exact.

    ``values``/``indices`` are [n_latents, m], sorted descending; empty slots
    hold -inf / -1.
    """

    def __init__(self, n_latents: int, m: int, device: torch.device | str = "cpu"):
        self.m = m
        self.values = torch.full((n_latents, m), float("-inf"), device=device)
        self.indices = torch.full((n_latents, m), -1, dtype=torch.long, device=device)

    def update(self, activity: Tensor, image_indices: Tensor) -> None:
        """``activity`` [batch, n_latents] (one number per image), ``image_indices`` [batch]."""
        values = torch.cat([self.values, activity.T.to(self.values)], dim=1)
        indices = torch.cat([self.indices, image_indices.to(self.indices.device).unsqueeze(0)
                             .expand(activity.shape[1], -1)], dim=1)
        top, pos = values.topk(self.m, dim=1)
        self.values, self.indices = top, indices.gather(1, pos)

    def merge(self, other: "ReferenceTracker") -> None:
        values = torch.cat([self.values, other.values], dim=1)
        indices = torch.cat([self.indices, other.indices], dim=1)
        top, pos = values.topk(self.m, dim=1)
        self.values, self.indices = top, indices.gather(1, pos)

    def references(self, latent: int) -> list[int]:
        """Image indices where the latent is active, strongest first."""
        keep = self.values[latent] > 0
        return self.indices[latent][keep].tolist()


@dataclass
class Vocabulary:
    """Concept labels with where each came from; one text embedding per concept."""

    concepts: list[str]
    sources: list[str]  # "expected:<class>", "class", "artifact", "general"
    categories: list[str]  # category a flag gets when labelled with this concept
    meanings: list[str] = field(default_factory=list)  # what each concept means: its phrasings share one
    embeddings: Tensor | None = None  # [n_concepts, embed_dim], normalized
    empty: Tensor | None = None  # [embed_dim], the empty prompt
    index: dict = field(default_factory=dict)

    @classmethod
    def build(cls, class_names: Sequence[str], expected: dict, artifacts: dict | Sequence[str] | None,
              general: bool) -> "Vocabulary":
        concepts, sources, categories, meanings = [], [], [], []

        def add(concept: str, source: str, category: str, meaning: str | None = None):
            key = concept.strip().lower()
            if key and key not in {c.lower() for c in concepts}:
                concepts.append(concept.strip())
                sources.append(source)
                categories.append(category)
                meanings.append(meaning or ARTIFACT_MEANINGS.get(key, key))

        for name in class_names:
            for concept in expected.get(name, []):
                add(concept, f"expected:{name}", "other", f"class {name}")
        for name in class_names:
            add(name, "class", "other", f"class {name}")
        if artifacts is None:
            artifacts = ARTIFACT_VOCABULARY
        if not isinstance(artifacts, dict):
            artifacts = {a: ARTIFACT_VOCABULARY.get(a, "dataset_artifact") for a in artifacts}
        for concept, category in artifacts.items():
            add(concept, "artifact", category)
        if general:
            for concept in general_vocabulary():
                add(concept, "general", "other")
        vocab = cls(concepts, sources, categories, meanings)
        vocab.index = {c.lower(): i for i, c in enumerate(concepts)}
        return vocab

    def expected_indices(self, class_name: str, expected: dict) -> list[int]:
        names = list(expected.get(class_name) or []) or [class_name]
        return [self.index[n.strip().lower()] for n in names if n.strip().lower() in self.index]

    def encode(self, bundle, templates: Sequence[str]) -> None:
        from .heads import encode_concepts

        self.embeddings = encode_concepts(bundle, self.concepts, templates)
        self.empty = encode_concepts(bundle, [""], templates)[0]


def semantic_embeddings(ref_indices: Tensor, ref_values: Tensor, image_embeddings: Tensor,
                        chunk: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """Per latent: mean normalized embedding of its references [n_latents, e], clarity [n_latents], count.

    ``ref_indices``/``ref_values`` are a :class:`ReferenceTracker`'s [n_latents, m];
    only references where the latent is active (value > 0) count. Clarity is
    the mean pairwise cosine similarity of the reference embeddings (1: all
    references look alike to the semantic model); a single reference has clarity 1.
    """
    normed = F.normalize(image_embeddings.float(), dim=-1)
    n, m = ref_indices.shape
    emb = torch.zeros(n, normed.shape[1])
    clarity = torch.zeros(n)
    counts = (ref_values > 0).sum(1)
    for lo in range(0, n, chunk):  # chunks bound the [chunk, m, e] gather
        valid = (ref_values[lo:lo + chunk] > 0).float()  # [c, m]
        r = normed[ref_indices[lo:lo + chunk].clamp_min(0)] * valid.unsqueeze(-1)  # [c, m, e]
        cnt = valid.sum(1)
        emb[lo:lo + chunk] = r.sum(1) / cnt.clamp_min(1).unsqueeze(1)
        sim = torch.bmm(r, r.transpose(1, 2))  # zero rows/cols for empty slots
        off_diag = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
        pairs = cnt * (cnt - 1)
        clarity[lo:lo + chunk] = torch.where(pairs > 0, off_diag / pairs.clamp_min(1),
                                             (cnt == 1).float())
    return emb, clarity, counts


def alignment(semantic: Tensor, vocab: Vocabulary) -> Tensor:
    """``A_i(c) = cos(e_i, t_c) - cos(e_i, t_empty)``: [n_latents, n_concepts]."""
    e = F.normalize(semantic, dim=-1)
    return e @ vocab.embeddings.T - (e @ vocab.empty).unsqueeze(1)


def class_alignments(align: Tensor, vocab: Vocabulary, class_names: Sequence[str],
                     expected: dict) -> tuple[Tensor, Tensor]:
    """Per class and latent: alignment with the class's expected concepts, and the class-specific part of it.

    ``expected_alignment[c, i]`` is the best alignment of latent i with class c's
    expected concepts. Part of that is shared by every class (in a skin-lesion
    dataset every class prompt says "a lesion"); the class-specific part
    subtracts the mean over all classes, so a latent that aligns with melanoma
    and nevus alike has a specific alignment near zero. With one class there
    is nothing to contrast and both are the same.
    """
    expected_alignment = torch.stack([align[:, vocab.expected_indices(name, expected)].max(1).values
                                      for name in class_names])  # [C, L]
    if len(class_names) < 2:
        return expected_alignment, expected_alignment.clone()
    return expected_alignment, expected_alignment - expected_alignment.mean(0, keepdim=True)


def _label_scores(align: Tensor, vocab: Vocabulary, expected_alignment: Tensor) -> Tensor:
    score = align.clone()
    if expected_alignment.shape[0] >= 2:
        is_class = torch.tensor([s == "class" or s.startswith("expected:") for s in vocab.sources])
        shared = expected_alignment.mean(0)  # [L]
        score[:, is_class] -= shared.unsqueeze(1)
    return score


def softmax_confidence(align: Tensor, vocab: Vocabulary, expected_alignment: Tensor, logit_scale: float) -> Tensor:
    """[n_latents]: the probability the semantic model gives the closest concept among the whole vocabulary (a
    softmax over the concepts' scores at its own logit scale, as in zero-shot classification). The flag rule
    groups latents and sets aside a class's own concepts by it; a reviewer reads :func:`label_evidence`."""
    score = _label_scores(align, vocab, expected_alignment)
    return torch.softmax(logit_scale * score, dim=1).amax(1)


@dataclass
class LabelEvidence:
    """Why a latent gets (or does not get) a name, per latent (L latents)."""

    runner_up: list  # [L] the best concept of another meaning than the closest (None without a rival)
    margin: Tensor  # [L] the closest concept's score above it, in standard deviations of the latent's scores
    agreeing: list  # [L] other phrasings of the closest concept's meaning among the latent's top concepts
    resampled: Tensor  # [L] share of resamples of the latent's references whose closest meaning is the same


def label_evidence(align: Tensor, vocab: Vocabulary, expected_alignment: Tensor, tracker: "ReferenceTracker",
                   image_embeddings: Tensor, resamples: int = 64, top: int = 5, seed: int = 0,
                   align_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[LabelEvidence, Tensor]:
    """Evidence for each latent's closest concept, none of it tied to the semantic model's logit scale (a small
    model's scores spread over a hundredth of a large one's): the *margin* of the closest concept over the best
    concept of another meaning, in standard deviations of the latent's scores over the whole vocabulary; the
    other phrasings of its meaning that are among the latent's ``top`` concepts (*agreeing*: a real ruler latent
    scores "a ruler" and "a measuring scale" high together; a latent of something the vocabulary has no word for
    lands near one phrase by chance); and how often a resample of its reference images (``tracker``'s, embedded
    in ``image_embeddings``) gives the same closest meaning (*resampled*). ``align_fn`` turns the resampled
    embeddings [L, E] into alignments [L, V] as ``align`` was made (default: :func:`alignment`).

    Returns the evidence and the confidence [L]: the resampled share when another phrasing agrees (or the meaning
    has a single phrasing the user or the artifact vocabulary gave: it was named as a suspect), at most 0.5
    when nothing confirms the guess (the general vocabulary's names have one phrasing each), and 0 when the
    margin is under ``MIN_MARGIN`` standard deviations (the closest concept hardly stands out).
    """
    score = _label_scores(align, vocab, expected_alignment)  # [L, V]
    n_latents = score.shape[0]
    spread = score.std(1, keepdim=True).clamp_min(1e-12)
    z = (score - score.mean(1, keepdim=True)) / spread
    meaning_ids = _meaning_ids(vocab)  # [V]
    best = z.argmax(1)
    same = meaning_ids.unsqueeze(0) == meaning_ids[best].unsqueeze(1)  # [L, V]
    rival_z = z.masked_fill(same, float("-inf"))
    rival = rival_z.argmax(1)
    margin = torch.where(torch.isfinite(rival_z.amax(1)), z.gather(1, best[:, None])[:, 0] - rival_z.amax(1),
                         torch.zeros(n_latents))
    order = z.argsort(1, descending=True)[:, :top]
    agreeing = [[vocab.concepts[j] for j in order[i].tolist() if j != int(best[i]) and bool(same[i, j])]
                for i in range(n_latents)]
    phrasings = torch.bincount(meaning_ids, minlength=int(meaning_ids.max()) + 1)[meaning_ids[best]]  # [L]
    normed = F.normalize(image_embeddings.float(), dim=-1)
    resampled = torch.cat([
        _resampled_agreement(_references(tracker, normed, lo, lo + 512), vocab, meaning_ids,
                             expected_alignment[:, lo:lo + 512], meaning_ids[best[lo:lo + 512]], resamples, seed,
                             align_fn or (lambda e: alignment(e, vocab)))
        for lo in range(0, n_latents, 512)]) if n_latents else torch.zeros(0)
    suspect = torch.tensor([vocab.sources[j] != "general" for j in best.tolist()])
    confirmed = torch.tensor([bool(a) for a in agreeing]) | ((phrasings == 1) & suspect)
    confidence = torch.where(margin < MIN_MARGIN, torch.zeros(n_latents),
                             torch.where(confirmed, resampled, resampled.clamp(max=0.5)))
    evidence = LabelEvidence(
        runner_up=[vocab.concepts[j] if torch.isfinite(rival_z[i, j]) else None for i, j in enumerate(rival.tolist())],
        margin=margin, agreeing=agreeing, resampled=resampled)
    return evidence, confidence


def _references(tracker: "ReferenceTracker", normed: Tensor, lo: int, hi: int) -> Tensor:
    """[hi - lo, m, E]: latents lo..hi's reference images' embeddings, rows of ``normed`` (the images' normalized
    embeddings; zero rows for empty slots)."""
    valid = (tracker.values[lo:hi] > 0).float().cpu()
    return normed[tracker.indices[lo:hi].cpu().clamp_min(0)] * valid.unsqueeze(-1)


def _meaning_ids(vocab: Vocabulary) -> Tensor:
    meanings = vocab.meanings or [c.lower() for c in vocab.concepts]
    ids = {m: i for i, m in enumerate(dict.fromkeys(meanings))}
    return torch.tensor([ids[m] for m in meanings])


def _resampled_agreement(references: Tensor, vocab: Vocabulary, meaning_ids: Tensor, expected_alignment: Tensor,
                         meaning: Tensor, resamples: int, seed: int, align_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """[L]: the share of bootstrap resamples of each latent's references whose closest concept has ``meaning``
    (``meaning_ids`` [V]: each concept's; the class concepts' shared part is the full set's,
    ``expected_alignment``)."""
    n_latents, m, _ = references.shape
    valid = (references.abs().sum(-1) > 0).float()  # [L, m]
    if m == 0 or n_latents == 0:
        return torch.zeros(n_latents)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.where(valid.sum(1, keepdim=True) > 0, valid, torch.ones_like(valid))  # a latent never active
    agree = torch.zeros(n_latents)
    for _ in range(resamples):
        # draw each latent's references with replacement: multinomial counts over its valid slots
        picks = torch.multinomial(weights, m, replacement=True, generator=gen)  # [L, m]
        counts = torch.zeros(n_latents, m).scatter_add_(1, picks, torch.ones(n_latents, m)) * valid
        emb = (counts.unsqueeze(-1) * references).sum(1) / counts.sum(1, keepdim=True).clamp_min(1)
        score = _label_scores(align_fn(emb), vocab, expected_alignment)
        agree += (meaning_ids[score.argmax(1)] == meaning).float()
    return agree / resamples


def choose_labels(align: Tensor, vocab: Vocabulary, expected_alignment: Tensor) -> tuple[Tensor, Tensor]:
    """Each latent's label: the concept it aligns with best, class concepts scored by their class-specific part.

    A class's concepts compete with what they add over the other classes
    (their alignment minus the mean of every class's expected alignment), all
    other concepts with their alignment. A latent whose references all show a
    ruler, half of them melanomas and half nevi, aligns strongly with both
    class prompts (they share "a lesion"), yet it is a ruler latent: this rule
    labels it so. Returns the label indices and their (plain) alignments.
    """
    index = _label_scores(align, vocab, expected_alignment).argmax(1)
    return index, align.gather(1, index.unsqueeze(1)).squeeze(1)

