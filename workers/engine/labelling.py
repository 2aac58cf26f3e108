"""What each latent encodes (stage 'label'): references, semantic embedding, clarity, alignments and a label."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .activations import ActivationStore
from .context import AuditContext
from .data import ImageSet
from .errors import checkpoint
from .loading import ClipBundle
from .partials import Partial
from .semantics import (UNLABELLED, LabelEvidence, ReferenceTracker, Vocabulary, alignment, choose_labels,
                        class_alignments, label_evidence, semantic_embeddings, softmax_confidence)

# the flag rule's labels: the closest concept where the semantic model's softmax over the vocabulary gives it at
# least this probability (they group latents into concepts and set aside a class's own concepts)
RULE_MIN_PROBABILITY = 0.3


@dataclass
class LatentLabels:
    """Every latent's meaning (C classes, L latents, E the semantic model's embedding width)."""

    tracker: ReferenceTracker  # each latent's reference images
    semantic: Tensor  # [L, E] mean semantic embedding of its references
    clarity: Tensor  # [L] how alike its references are
    vocab: Vocabulary
    labels: list  # [L] label text: None without references, UNLABELLED when no concept describes it well
    rule_labels: list  # [L] the labels the flag rule reads (RULE_MIN_PROBABILITY), same None / UNLABELLED
    closest_concepts: list  # [L] the concept it aligns with best, however weakly (None without references)
    confidence: Tensor  # [L] how sure the closest concept is (semantics.label_evidence), 0..1
    evidence: LabelEvidence  # [L] its runner-up, margin, agreeing phrasings and resampled share
    label_indices: list  # [L] the closest concept's index in ``vocab`` (None without references)
    label_alignment: Tensor  # [L] alignment with the closest concept
    expected_alignment: Tensor  # [C, L] alignment with each class's expected concepts
    specific_alignment: Tensor  # [C, L] the part of it the other classes do not share
    name_alignment: Tensor  # [C, L] alignment with each class's name


def label_latents(ctx: AuditContext, store: ActivationStore, images: ImageSet, merged: Partial,
                  semantic_model: ClipBundle | None = None, vocab: Vocabulary | None = None) -> LatentLabels:
    """Each latent's semantic embedding, clarity, alignments and label (stage 'label'). ``vocab``: the
    vocabulary an earlier call encoded with the same semantic model (the other dictionaries reuse it)."""
    config, class_names = ctx.config, ctx.class_names
    tracker = merged.references()
    if semantic_model is None:
        semantic_model, image_embeddings = ctx.bundle, store.embeddings()
    else:
        image_embeddings = _embed_references(semantic_model, images, tracker, ctx.device, config.batch_size)
    sem, clarity, n_refs = semantic_embeddings(tracker.indices, tracker.values, image_embeddings)
    if vocab is None:
        vocab = Vocabulary.build(class_names, config.expected_concepts, config.artifact_vocabulary,
                                 config.general_vocabulary)
        vocab.encode(semantic_model, config.prompt_templates)
    align = alignment(sem, vocab)  # [L, V]
    has_refs = n_refs > 0
    expected_alignment, specific_alignment = class_alignments(align, vocab, class_names,
                                                              config.expected_concepts)  # [C, L] each
    # plain alignment: subtracting what the audited images at large align with would name a latent of a frequent
    # artifact (the planted one is on half the audited images) after a rarer one
    label_index, label_alignment = choose_labels(align, vocab, expected_alignment)
    evidence, confidence = label_evidence(align, vocab, expected_alignment, tracker, image_embeddings,
                                          align_fn=lambda e: alignment(e, vocab))
    scale = float(semantic_model.model.logit_scale.exp().clamp(max=100)) if hasattr(semantic_model.model,
                                                                                     "logit_scale") else 100.0
    probability = softmax_confidence(align, vocab, expected_alignment, scale)
    closest = [vocab.concepts[j] if has_refs[i] else None for i, j in enumerate(label_index.tolist())]
    return LatentLabels(
        tracker=tracker, semantic=sem, clarity=clarity, vocab=vocab,
        # a latent no concept describes well is "unlabelled": its images speak for it, not a confident wrong name
        labels=[None if c is None else (c if confidence[i] >= config.label_min_confidence else UNLABELLED)
                for i, c in enumerate(closest)],
        rule_labels=[None if c is None else (c if probability[i] >= RULE_MIN_PROBABILITY else UNLABELLED)
                     for i, c in enumerate(closest)],
        closest_concepts=closest, confidence=confidence, evidence=evidence,
        label_indices=[j if has_refs[i] else None for i, j in enumerate(label_index.tolist())],
        label_alignment=label_alignment, expected_alignment=expected_alignment,
        specific_alignment=specific_alignment,
        name_alignment=torch.stack([align[:, vocab.index[name.lower()]] for name in class_names]),
    )


def _embed_references(semantic_model: ClipBundle, images: ImageSet, tracker: ReferenceTracker, device,
                      batch_size: int) -> torch.Tensor:
    """Semantic model embeddings of the reference images (others stay zero: they are never read)."""
    needed = sorted({i for i in tracker.indices[tracker.values > 0].tolist()})
    sem_images = images.with_preprocess(semantic_model.preprocess)
    out = None
    model = semantic_model.model.to(device)
    with torch.inference_mode():
        for lo in range(0, len(needed), batch_size):
            checkpoint()
            idx = needed[lo:lo + batch_size]
            pixels = torch.stack([sem_images[i][0] for i in idx]).to(device)
            emb = model.encode_image(pixels).float().cpu()
            if out is None:
                out = torch.zeros(len(images), emb.shape[1])
            out[idx] = emb
    if out is None:
        out = torch.zeros(len(images), semantic_model.embed_dim)
    return out
