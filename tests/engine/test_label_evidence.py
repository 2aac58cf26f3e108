"""Labels that say what they see: a name only with evidence that does not hang on the semantic model's scale.

A latent's closest concept is named when it stands out from every concept of another meaning (margin in standard
deviations of the latent's own scores), another phrasing of its meaning agrees, and resamples of its reference
images keep it. Otherwise the latent is reported with its likely concept and that evidence, never with a
confident wrong name.
"""
import torch
import torch.nn.functional as F

from workers.engine.semantics import (ARTIFACT_MEANINGS, MIN_MARGIN, ReferenceTracker, Vocabulary, alignment,
                                      label_evidence)

CONCEPTS = ["melanoma", "nevus", "a ruler", "a measuring scale", "hair", "golf ball", "teapot", "kite", "canoe"]
SOURCES = ["class", "class", "artifact", "artifact", "artifact", "general", "general", "general", "general"]
DIM = 16


def vocabulary() -> Vocabulary:
    vocab = Vocabulary.build(["melanoma", "nevus"], {}, artifacts=["a ruler", "a measuring scale", "hair"],
                             general=False)
    for concept in ("golf ball", "teapot", "kite", "canoe"):  # four general names, one phrasing each
        vocab.concepts.append(concept)
        vocab.sources.append("general")
        vocab.categories.append("other")
        vocab.meanings.append(concept)
    vocab.index = {c.lower(): i for i, c in enumerate(vocab.concepts)}
    assert vocab.concepts == CONCEPTS and vocab.sources == SOURCES
    basis = torch.eye(DIM)
    text = basis[:len(CONCEPTS)].clone()
    text[3] = F.normalize(basis[2] + 0.35 * basis[3], dim=0)  # "a measuring scale" reads close to "a ruler"
    vocab.embeddings = text
    vocab.empty = basis[15]
    return vocab


def latent_images(directions: list[torch.Tensor], n: int = 12, noise: float = 0.25, seed: int = 0) -> torch.Tensor:
    """[len(directions) * n, DIM] image embeddings: n noisy images around each latent's direction."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([F.normalize(d + noise * torch.randn(n, DIM, generator=gen), dim=-1) for d in directions])


def evidence_for(directions, scale: float = 1.0):
    """Label evidence of one latent per direction, its references the n images drawn around it; ``scale``
    multiplies every score, as a semantic model with another logit scale or embedding spread would."""
    vocab = vocabulary()
    n = 12
    images = latent_images(directions, n)
    tracker = ReferenceTracker(len(directions), n)
    activity = torch.zeros(len(images), len(directions))
    for k in range(len(directions)):
        activity[k * n:(k + 1) * n, k] = torch.linspace(2.0, 1.0, n)
    tracker.update(activity, torch.arange(len(images)))
    semantic = torch.stack([images[k * n:(k + 1) * n].mean(0) for k in range(len(directions))])
    align = alignment(semantic, vocab) * scale
    expected = torch.zeros(2, len(directions))
    return label_evidence(align, vocab, expected, tracker, images), vocab


def test_a_ruler_latent_is_named_with_its_agreeing_phrasing_and_a_clear_margin():
    basis = torch.eye(DIM)
    (evidence, confidence), vocab = evidence_for([basis[2] + 0.3 * basis[3]])
    # the closest phrasing of the ruler meaning is named; the other one agrees
    assert set(evidence.agreeing[0]) | {"a ruler", "a measuring scale"} == {"a ruler", "a measuring scale"}
    assert len(evidence.agreeing[0]) == 1
    assert evidence.margin[0] >= MIN_MARGIN
    assert evidence.runner_up[0] not in ("a ruler", "a measuring scale")  # a synonym is no rival
    assert evidence.resampled[0] == 1.0 and confidence[0] == 1.0


def test_a_latent_near_one_general_name_alone_is_at_most_half_sure_so_never_named():
    basis = torch.eye(DIM)
    (evidence, confidence), _ = evidence_for([basis[5]])  # clearly "golf ball", a name with one phrasing
    assert evidence.margin[0] >= MIN_MARGIN and evidence.agreeing[0] == []
    assert confidence[0] == 0.5  # a guess nothing confirms: below the default label_min_confidence (0.6)


def test_a_latent_between_meanings_has_no_margin_and_no_confidence():
    basis = torch.eye(DIM)
    (evidence, confidence), _ = evidence_for([basis[6] + basis[7]])  # teapot and kite alike
    assert evidence.margin[0] < MIN_MARGIN
    assert confidence[0] == 0.0


def test_the_evidence_is_the_same_whatever_the_scale_of_the_scores():
    basis = torch.eye(DIM)
    directions = [basis[2] + 0.3 * basis[3], basis[5], basis[6] + basis[7], basis[4]]
    (small, small_conf), _ = evidence_for(directions, scale=0.01)  # a small model's scores spread little
    (large, large_conf), _ = evidence_for(directions, scale=1.0)
    assert torch.allclose(small.margin, large.margin, atol=1e-4)
    assert torch.equal(small_conf, large_conf)
    assert small.agreeing == large.agreeing and small.runner_up == large.runner_up


def test_resamples_of_mixed_references_disagree():
    """Half the references show hair, half a kite: resampling them flips the closest meaning often."""
    vocab = vocabulary()
    gen = torch.Generator().manual_seed(1)
    basis = torch.eye(DIM)
    images = torch.cat([F.normalize(basis[4] + 0.2 * torch.randn(6, DIM, generator=gen), dim=-1),
                        F.normalize(basis[7] + 0.2 * torch.randn(6, DIM, generator=gen), dim=-1)])
    tracker = ReferenceTracker(1, 12)
    tracker.update(torch.linspace(2.0, 1.0, 12)[:, None], torch.arange(12))
    align = alignment(images.mean(0, keepdim=True), vocab)
    evidence, confidence = label_evidence(align, vocab, torch.zeros(2, 1), tracker, images, resamples=200)
    assert 0.1 < float(evidence.resampled[0]) < 0.9
    assert confidence[0] <= evidence.resampled[0]


def test_builtin_phrasings_share_a_meaning_and_imagenet_names_join_them():
    vocab = Vocabulary.build(["cat"], {}, artifacts=None, general=True)
    meaning = dict(zip(vocab.concepts, vocab.meanings))
    assert meaning["a ruler"] == meaning["a measuring scale"] == meaning["ruler measuring stick"] == "ruler"
    assert meaning["a band-aid"] == meaning["Band-Aid"] == "band-aid"
    assert meaning["cat"] == "class cat"
    # every built-in meaning but the general names has at least two phrasings
    counts = {}
    for m in ARTIFACT_MEANINGS.values():
        counts[m] = counts.get(m, 0) + 1
    assert min(counts.values()) >= 2, counts

