"""What a latent encodes: reference tracking, semantic embeddings, clarity, alignment, the vocabulary."""
import pytest
import torch
import torch.nn.functional as F
from open_clip import IMAGENET_CLASSNAMES

from workers.engine.semantics import (ARTIFACT_VOCABULARY, ReferenceTracker, Vocabulary, alignment,
                                      semantic_embeddings)

N_IMAGES, N_LATENTS, M = 120, 10, 8


@pytest.fixture
def activity():
    """[120, 10] non-negative activity: latents 0-7 dense, latent 8 active on 3 images, latent 9 never."""
    gen = torch.Generator().manual_seed(5)
    act = torch.randn(N_IMAGES, N_LATENTS, generator=gen).relu()
    act[:, 8] = 0.0
    act[[4, 50, 99], 8] = torch.tensor([0.3, 2.0, 1.1])
    act[:, 9] = 0.0
    return act


def track(activity, rows, batch_size=17):
    tracker = ReferenceTracker(N_LATENTS, M)
    for lo in range(0, len(rows), batch_size):
        idx = rows[lo:lo + batch_size]
        tracker.update(activity[idx], idx)
    return tracker


def test_streaming_tracker_equals_brute_force_top_m(activity):
    tracker = track(activity, torch.arange(N_IMAGES))
    brute = activity.T.topk(M, dim=1)
    assert torch.equal(tracker.values, brute.values)
    distinct = brute.values > 0  # positive activities are continuous draws, hence distinct
    assert int(distinct.sum()) > 60
    assert torch.equal(tracker.indices[distinct], brute.indices[distinct])


def test_tracker_values_stay_sorted_and_empty_slots_are_marked():
    tracker = ReferenceTracker(3, 5)
    assert torch.equal(tracker.indices, torch.full((3, 5), -1))
    assert bool(torch.isinf(tracker.values).all())
    tracker.update(torch.tensor([[1.0, 0.0, 3.0], [2.0, 0.5, 0.0]]), torch.tensor([10, 11]))
    assert tracker.values[0, :2].tolist() == [2.0, 1.0]
    assert tracker.indices[0, :2].tolist() == [11, 10]
    assert tracker.indices[0, 2:].tolist() == [-1, -1, -1]
    assert tracker.references(0) == [11, 10]
    assert tracker.references(1) == [11]
    assert tracker.references(2) == [10]


def test_merging_trackers_of_two_halves_equals_one_tracker_on_everything(activity):
    order = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(2))
    first, second = track(activity, order[:60]), track(activity, order[60:])
    whole = track(activity, torch.arange(N_IMAGES))
    first.merge(second)
    assert torch.equal(first.values, whole.values)
    distinct = whole.values > 0
    assert torch.equal(first.indices[distinct], whole.indices[distinct])


def test_references_are_only_active_images_strongest_first(activity):
    tracker = track(activity, torch.arange(N_IMAGES))
    assert tracker.references(8) == [50, 99, 4]
    assert tracker.references(9) == []
    refs = tracker.references(0)
    assert len(refs) == M
    strengths = activity[refs, 0]
    assert bool((strengths > 0).all())
    assert strengths.tolist() == sorted(strengths.tolist(), reverse=True)


def test_semantic_embeddings_of_handmade_references():
    # Images 0-2: the same direction (scaled differently); 3-5: orthonormal; 6: another direction.
    e = torch.zeros(7, 6)
    e[0, 0], e[1, 0], e[2, 0] = 1.0, 2.0, 0.5
    e[3, 1], e[4, 2], e[5, 3] = 3.0, 1.0, 1.0
    e[6] = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 4.0])
    ref_indices = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 2, -1], [1, 4, -1]])
    ref_values = torch.tensor([[3.0, 2.0, 1.0],  # identical references
                               [3.0, 2.0, 1.0],  # orthogonal references
                               [5.0, 0.0, float("-inf")],  # one active reference
                               [0.0, 0.0, float("-inf")]])  # no active reference
    emb, clarity, counts = semantic_embeddings(ref_indices, ref_values, e)
    assert counts.tolist() == [3, 3, 1, 0]
    assert clarity[0].item() == pytest.approx(1.0)
    assert torch.allclose(emb[0], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    assert clarity[1].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(emb[1], torch.tensor([0, 1, 1, 1, 0, 0]) / 3.0)
    assert clarity[2].item() == 1.0
    assert torch.allclose(emb[2], torch.tensor([0, 0, 0, 0, 0.6, 0.8]))
    assert clarity[3].item() == 0.0
    assert torch.equal(emb[3], torch.zeros(6))


def test_semantic_embeddings_clarity_is_the_mean_pairwise_cosine(activity):
    gen = torch.Generator().manual_seed(9)
    image_emb = torch.randn(N_IMAGES, 5, generator=gen)
    tracker = track(activity, torch.arange(N_IMAGES))
    # A tiny chunk exercises the chunked loop.
    emb, clarity, counts = semantic_embeddings(tracker.indices, tracker.values, image_emb, chunk=3)
    for latent in (0, 8):
        refs = tracker.references(latent)
        normed = F.normalize(image_emb[refs], dim=-1)
        sim = normed @ normed.T
        n = len(refs)
        expected_clarity = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
        assert int(counts[latent]) == n
        assert clarity[latent].item() == pytest.approx(expected_clarity.item(), abs=1e-6)
        assert torch.allclose(emb[latent], normed.mean(0), atol=1e-6)


def handmade_vocabulary(gen):
    vocab = Vocabulary(["melanoma", "a ruler", "text"], ["expected:melanoma", "artifact", "artifact"],
                       ["other", "dataset_artifact", "visual_text"])
    vocab.embeddings = F.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    vocab.empty = F.normalize(torch.randn(4, generator=gen), dim=0)
    return vocab


def test_alignment_is_cosine_to_concept_minus_cosine_to_empty_prompt():
    gen = torch.Generator().manual_seed(4)
    vocab = handmade_vocabulary(gen)
    semantic = torch.randn(5, 4, generator=gen) * 3  # not normalized: alignment uses cosines
    a = alignment(semantic, vocab)
    assert a.shape == (5, 3)
    for i in range(5):
        for c in range(3):
            expected = (F.cosine_similarity(semantic[i], vocab.embeddings[c], dim=0)
                        - F.cosine_similarity(semantic[i], vocab.empty, dim=0))
            assert a[i, c].item() == pytest.approx(expected.item(), abs=1e-6)


def test_alignment_of_a_latent_pointing_at_a_concept_is_one_minus_its_empty_cosine():
    vocab = Vocabulary(["x", "y"], ["general", "general"], ["other", "other"])
    vocab.embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    vocab.empty = torch.tensor([0.6, 0.0, 0.8])
    a = alignment(torch.tensor([[2.0, 0.0, 0.0]]), vocab)
    assert torch.allclose(a, torch.tensor([[1.0 - 0.6, 0.0 - 0.6]]))


def test_vocabulary_puts_expected_concepts_first_then_class_names():
    vocab = Vocabulary.build(["melanoma", "nevus"], {"melanoma": ["irregular pigment network", "Melanoma"]},
                             artifacts=None, general=False)
    assert vocab.concepts[:3] == ["irregular pigment network", "Melanoma", "nevus"]
    assert vocab.sources[:3] == ["expected:melanoma", "expected:melanoma", "class"]
    # 'melanoma' the class name is a case-insensitive duplicate of the expected 'Melanoma'.
    assert [c.lower() for c in vocab.concepts].count("melanoma") == 1
    assert len(vocab.concepts) == 3 + len(ARTIFACT_VOCABULARY)
    assert vocab.index == {c.lower(): i for i, c in enumerate(vocab.concepts)}


def test_vocabulary_includes_builtin_artifacts_with_their_categories():
    vocab = Vocabulary.build(["cat"], {}, artifacts=None, general=False)
    by_concept = dict(zip(vocab.concepts, vocab.categories))
    assert by_concept["a watermark"] == "visual_text"
    assert by_concept["a ruler"] == "dataset_artifact"
    assert by_concept["cat"] == "other"
    assert vocab.sources[vocab.index["a ruler"]] == "artifact"
    assert set(vocab.concepts[1:]) == set(ARTIFACT_VOCABULARY)


def test_vocabulary_takes_a_custom_artifact_list_and_removes_duplicates():
    vocab = Vocabulary.build(["Ruler"], {}, artifacts=["a watermark", "a stethoscope", "RULER", " a watermark "],
                             general=False)
    assert vocab.concepts == ["Ruler", "a watermark", "a stethoscope"]
    assert vocab.sources == ["class", "artifact", "artifact"]
    # A known artifact keeps its built-in category; an unknown one counts as a dataset artifact.
    assert vocab.categories == ["other", "visual_text", "dataset_artifact"]


def test_general_vocabulary_adds_the_imagenet_names_from_open_clip():
    vocab = Vocabulary.build(["bell"], {}, artifacts=[], general=True)
    general = [c for c, s in zip(vocab.concepts, vocab.sources) if s == "general"]
    assert len(IMAGENET_CLASSNAMES) == 1000
    expected = []
    seen = {"bell"}
    for name in IMAGENET_CLASSNAMES:
        if name.lower() not in seen:
            seen.add(name.lower())
            expected.append(name)
    assert general == expected
    assert len(general) == 998  # 'missile' and 'sunglasses' appear twice in the list
    assert "bell pepper" in general
    assert vocab.concepts[0] == "bell" and vocab.sources[0] == "class"
    without = Vocabulary.build(["bell"], {}, artifacts=[], general=False)
    assert without.concepts == ["bell"]


def test_expected_indices_fall_back_to_the_class_name():
    expected = {"melanoma": ["irregular pigment network", "blue-white veil"]}
    vocab = Vocabulary.build(["melanoma", "nevus"], expected, artifacts=[], general=False)
    assert vocab.expected_indices("melanoma", expected) == [0, 1]
    assert vocab.expected_indices("nevus", expected) == [vocab.index["nevus"]]
    assert vocab.concepts[vocab.expected_indices("nevus", expected)[0]] == "nevus"
    # An empty list counts as no expected concepts; names missing from the vocabulary are skipped.
    assert vocab.expected_indices("nevus", {"nevus": []}) == [vocab.index["nevus"]]
    assert vocab.expected_indices("melanoma", {"melanoma": ["not in vocab", "Blue-White Veil"]}) == [1]
