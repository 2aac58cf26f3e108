"""Unexpected reliance: relevance tables, the flag rule and the category guess."""
import numpy as np
import pytest
import torch

from workers.engine.config import AuditConfig
from workers.engine.flags import categorize, find_flags, relevance_tables
from workers.engine.semantics import Vocabulary

from .conftest import build_audit_config

CLASSES = ["melanoma", "nevus"]
EXPECTED = {"melanoma": ["melanoma"], "nevus": ["nevus"]}


def build_vocab() -> Vocabulary:
    concepts = ["melanoma", "nevus", "a ruler", "text", "bell pepper"]
    vocab = Vocabulary(concepts, ["expected:melanoma", "expected:nevus", "artifact", "artifact", "general"],
                       ["other", "other", "dataset_artifact", "visual_text", "other"])
    vocab.index = {c.lower(): i for i, c in enumerate(concepts)}
    return vocab


def build_config(**overrides) -> AuditConfig:
    base = dict(general_vocabulary=False, expected_concepts=EXPECTED, flag_top_n=10, flag_min_share=0.05,
                flag_max_alignment=0.05, flag_relative_alignment=0.0, flag_class_margin=0.0)
    base.update(overrides)
    return AuditConfig(**base)


# Six latents; their labels (index into build_vocab), and what each one tests for class 'melanoma':
LABELS = ["a ruler", "melanoma", "text", "bell pepper", None, "a ruler"]
LABEL_INDICES = [2, 0, 3, 4, None, 2]
MELANOMA_SHARE = [0.40, 0.25, 0.12, 0.10, 0.08, 0.05 - 1e-3]
MELANOMA_EXPECTED_ALIGNMENT = [-0.02, 0.30, 0.0, 0.25, -0.10, -0.05]


def run_flags(expected_alignment=MELANOMA_EXPECTED_ALIGNMENT, **config_overrides):
    share = torch.tensor([MELANOMA_SHARE, [0.0] * 6])  # nevus: only negative relevance, so no shares
    mean = torch.tensor([[s * 2 for s in MELANOMA_SHARE], [-1.0, -0.5, -0.2, -0.1, -0.3, -0.4]])
    expected_alignment = torch.tensor([expected_alignment, [-0.2] * 6])
    name_alignment = torch.tensor([[0.0] * 6, [0.0] * 6])
    return find_flags("probe", mean, share, CLASSES, labels=LABELS, label_indices=LABEL_INDICES,
                      label_alignment=torch.tensor([0.11, 0.12, 0.13, 0.14, 0.0, 0.16]),
                      expected_alignment=expected_alignment, name_alignment=name_alignment,
                      clarity=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.0, 0.5]), vocab=build_vocab(),
                      config=build_config(**config_overrides))


def test_relevance_tables_mean_is_sum_over_count_and_share_is_the_normalized_positive_part():
    relevance_sum = torch.tensor([[6.0, -3.0, 3.0, 0.0], [-4.0, -2.0, -8.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([3, 2, 0])
    mean, share = relevance_tables(relevance_sum, counts)
    assert torch.allclose(mean, torch.tensor([[2.0, -1.0, 1.0, 0.0], [-2.0, -1.0, -4.0, -0.5],
                                              [1.0, 2.0, 3.0, 4.0]]))  # a class with no images: count 1
    assert torch.allclose(share[0], torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    assert torch.equal(share[1], torch.zeros(4))
    assert torch.allclose(share[2], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert share[0].sum().item() == pytest.approx(1.0)


def test_relevance_tables_give_no_share_to_rounding_noise_next_to_large_relevance():
    # Class 0: all evidence negative except a float-rounding crumb; class 1: a small but real positive.
    relevance_sum = torch.tensor([[-2.0, 1e-7, -1.0], [-2.0, 1e-2, 1.0]])
    mean, share = relevance_tables(relevance_sum, torch.tensor([1, 1]))
    assert mean[0, 1].item() == pytest.approx(1e-7)
    assert torch.equal(share[0], torch.zeros(3))
    assert torch.allclose(share[1], torch.tensor([0.0, 1e-2 / 1.01, 1.0 / 1.01]))


def test_it_flags_a_high_share_ruler_latent_as_a_dataset_artifact():
    flags = run_flags()
    ruler = [f for f in flags if f["latent"] == 0]
    assert ruler == [{
        "head": "probe", "class_name": "melanoma", "latent": 0, "rank": 1, "share": pytest.approx(0.40),
        "mean_relevance": pytest.approx(0.80), "label": "a ruler", "label_source": "artifact",
        "label_alignment": pytest.approx(0.11), "expected_alignment": pytest.approx(-0.02),
        "clarity": pytest.approx(0.9), "category": "dataset_artifact",
    }]


def test_it_flags_exactly_the_unexpected_latents_above_the_share_threshold():
    flags = run_flags()
    # 1: labelled 'melanoma' (expected); 3: aligned with the expected concept; 4: dead; 5: share below 0.05.
    assert [(f["class_name"], f["latent"], f["rank"]) for f in flags] == [("melanoma", 0, 1), ("melanoma", 2, 3)]


def test_a_text_label_gives_the_visual_text_category():
    text = [f for f in run_flags() if f["latent"] == 2]
    assert len(text) == 1
    assert text[0]["label"] == "text"
    assert text[0]["category"] == "visual_text"
    assert text[0]["share"] == pytest.approx(0.12)


def test_a_latent_labelled_with_the_expected_concept_is_not_flagged_even_when_its_alignment_is_low():
    flags = run_flags(expected_alignment=[-0.02, -0.30, 0.0, 0.25, -0.10, -0.05])
    assert 1 not in {f["latent"] for f in flags}
    assert [f["latent"] for f in flags] == [0, 2]


def test_the_alignment_threshold_decides_whether_an_unexpected_latent_is_flagged():
    # Latent 3 ('bell pepper') has expected alignment 0.25: flagged once the threshold is above it.
    assert [f["latent"] for f in run_flags(flag_max_alignment=0.25)] == [0, 2]  # at the threshold: not flagged
    assert [f["latent"] for f in run_flags(flag_max_alignment=0.26)] == [0, 2, 3]
    # Latent 2 aligns at exactly 0: a threshold of 0 stops it, latent 0 (-0.02) stays.
    assert [f["latent"] for f in run_flags(flag_max_alignment=0.0)] == [0]


def test_a_latent_much_closer_to_its_own_label_than_to_the_class_is_flagged_on_any_scale():
    # Bell pepper (latent 3) aligns 0.25 with melanoma's concepts, above the absolute threshold 0.05, and 0.14
    # with its own label: not flagged. A model with larger alignments: its label 0.6 -> 0.25 < 0.5 * 0.6.
    assert [f["latent"] for f in run_flags(flag_relative_alignment=0.5)] == [0, 2]
    flags = find_flags("probe", torch.tensor([[s * 2 for s in MELANOMA_SHARE], [-1.0] * 6]),
                       torch.tensor([MELANOMA_SHARE, [0.0] * 6]), CLASSES, labels=LABELS, label_indices=LABEL_INDICES,
                       label_alignment=torch.tensor([0.11, 0.12, 0.13, 0.6, 0.0, 0.16]),
                       expected_alignment=torch.tensor([MELANOMA_EXPECTED_ALIGNMENT, [-0.2] * 6]),
                       name_alignment=torch.zeros(2, 6), clarity=torch.ones(6), vocab=build_vocab(),
                       config=build_config(flag_relative_alignment=0.5))
    assert [f["latent"] for f in flags] == [0, 2, 3]


def test_a_latent_that_aligns_with_every_class_alike_does_not_mean_the_class():
    # Bell pepper (latent 3) aligns 0.25 with melanoma: above both other thresholds. Nevus' concepts: 0.24 -> the
    # latent tells the classes apart by only 0.01, below the margin 0.02, so it is flagged; at 0.0 it is not.
    def flags(margin):
        return find_flags("probe", torch.tensor([[s * 2 for s in MELANOMA_SHARE], [-1.0] * 6]),
                          torch.tensor([MELANOMA_SHARE, [0.0] * 6]), CLASSES, labels=LABELS,
                          label_indices=LABEL_INDICES, label_alignment=torch.tensor([0.11, 0.12, 0.13, 0.14, 0.0, 0.16]),
                          expected_alignment=torch.tensor([MELANOMA_EXPECTED_ALIGNMENT, [-0.2, -0.2, -0.2, 0.24, -0.2, -0.2]]),
                          name_alignment=torch.zeros(2, 6), clarity=torch.ones(6), vocab=build_vocab(),
                          config=build_config(flag_class_margin=margin))

    assert [f["latent"] for f in flags(0.02)] == [0, 2, 3]
    assert [f["latent"] for f in flags(0.0)] == [0, 2]


def test_a_latent_below_the_minimum_share_is_not_flagged():
    assert [f["latent"] for f in run_flags(flag_min_share=0.2)] == [0]
    assert [f["latent"] for f in run_flags(flag_min_share=0.5)] == []
    # With no minimum, latent 5 (share 0.049) is flagged at rank 6.
    flags = run_flags(flag_min_share=0.0)
    assert [(f["latent"], f["rank"]) for f in flags] == [(0, 1), (2, 3), (5, 6)]


def test_only_the_top_n_latents_by_share_are_considered():
    assert [f["latent"] for f in run_flags(flag_top_n=1)] == [0]
    assert [f["latent"] for f in run_flags(flag_top_n=2)] == [0]  # latent 2 is rank 3
    assert [f["latent"] for f in run_flags(flag_top_n=3)] == [0, 2]


def test_a_dead_latent_is_never_flagged():
    flags = run_flags(flag_min_share=0.0, flag_max_alignment=1.0)
    assert 4 not in {f["latent"] for f in flags}
    assert [f["latent"] for f in flags] == [0, 2, 3, 5]


def test_a_class_with_no_positive_relevance_gets_no_flags():
    flags = run_flags(flag_min_share=0.0, flag_max_alignment=1.0)
    assert {f["class_name"] for f in flags} == {"melanoma"}


def test_categorize_calls_an_expected_class_matched_by_name_polysemy():
    vocab = Vocabulary(["bell", "bell pepper"], ["class", "general"], ["other", "other"])
    config = build_config(expected_concepts={"bell": ["church bell"]})
    assert categorize("bell pepper", 1, vocab, "bell", True, 0.3, config) == "polysemy"
    assert categorize("bell pepper", 1, vocab, "bell", True, 0.05, config) == "polysemy"  # at the threshold


def test_categorize_calls_a_multiword_label_sharing_the_class_word_a_compound_noun():
    vocab = Vocabulary(["bell", "bell pepper"], ["class", "general"], ["other", "other"])
    config = build_config(expected_concepts={})
    assert categorize("bell pepper", 1, vocab, "bell", False, 0.3, config) == "compound_noun"
    # Explicit expected concepts but low name alignment: not polysemy, still a compound noun.
    assert categorize("bell pepper", 1, vocab, "bell", True, 0.0, config) == "compound_noun"


def test_categorize_falls_back_to_other():
    vocab = build_vocab()
    config = build_config()
    assert categorize("nevus", 1, vocab, "melanoma", False, 0.0, config) == "other"
    assert categorize(None, None, vocab, "melanoma", True, 0.9, config) == "other"
    # A label that is itself a class name is no compound noun.
    class_vocab = Vocabulary(["bell pepper"], ["class"], ["other"])
    assert categorize("bell pepper", 0, class_vocab, "bell", False, 0.0, config) == "other"
    # A single-word label is no compound noun either.
    one_word = Vocabulary(["bell"], ["general"], ["other"])
    assert categorize("bell", 0, one_word, "bell", False, 0.0, config) == "other"


def test_artifact_categories_win_over_polysemy():
    vocab = build_vocab()
    config = build_config()
    assert categorize("a ruler", 2, vocab, "melanoma", True, 0.9, config) == "dataset_artifact"
    assert categorize("text", 3, vocab, "melanoma", True, 0.9, config) == "visual_text"


def test_a_latent_labelled_with_its_own_class_name_is_never_flagged_for_that_class():
    from workers.engine.semantics import Vocabulary

    config = AuditConfig(general_vocabulary=False, artifact_vocabulary=("a ruler",), flag_relative_alignment=0.0,
                         flag_class_margin=0.0, expected_concepts={"melanoma": ["of a melanoma"],
                                                                   "nevus": ["of a nevus"]})
    vocab = Vocabulary.build(CLASSES, config.expected_concepts, config.artifact_vocabulary, False)
    labels = ["nevus", "of a melanoma"]
    flags = find_flags("probe", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
                       CLASSES, labels=labels, label_indices=[vocab.index[l] for l in labels],
                       label_alignment=torch.tensor([0.3, 0.3]), expected_alignment=torch.full((2, 2), -0.1),
                       name_alignment=torch.zeros(2, 2), clarity=torch.ones(2), vocab=vocab, config=config)
    # latent 0 ("nevus") is relevant for nevus: its own name, not flagged; latent 1 ("of a melanoma") is relevant
    # for melanoma: its own concept, not flagged
    assert flags == []


def test_class_concepts_compete_for_a_label_with_what_they_add_over_the_other_classes():
    from workers.engine.semantics import choose_labels, class_alignments

    vocab = Vocabulary.build(CLASSES, {"melanoma": ["of a melanoma"], "nevus": ["of a nevus"]},
                             ["with a ruler"], False)
    col = vocab.index
    align = torch.zeros(3, len(vocab.concepts))
    # latent 0: a ruler seen on both classes; both class prompts share "a lesion" and align 0.94 alike
    align[0, [col["of a melanoma"], col["of a nevus"], col["with a ruler"]]] = torch.tensor([0.94, 0.93, 0.45])
    # latent 1: a melanoma latent, clearly more melanoma than nevus
    align[1, [col["of a melanoma"], col["of a nevus"], col["with a ruler"]]] = torch.tensor([0.40, -0.20, 0.10])
    # latent 2: a ruler on melanomas only: the class part (0.64 - 0.56) / 2 = 0.04 is below the ruler's 0.41
    align[2, [col["of a melanoma"], col["of a nevus"], col["with a ruler"]]] = torch.tensor([0.64, 0.56, 0.41])
    expected, specific = class_alignments(align, vocab, CLASSES, {"melanoma": ["of a melanoma"],
                                                                  "nevus": ["of a nevus"]})
    assert torch.allclose(specific[0], torch.tensor([0.005, 0.30, 0.04]), atol=1e-6)
    index, value = choose_labels(align, vocab, expected)
    assert [vocab.concepts[i] for i in index] == ["with a ruler", "of a melanoma", "with a ruler"]
    assert torch.allclose(value, torch.tensor([0.45, 0.40, 0.41]))  # reported alignment: the plain one
    # with plain argmax latents 0 and 2 would have been labelled "of a melanoma"
    assert [vocab.concepts[i] for i in align.argmax(1)] == ["of a melanoma", "of a melanoma", "of a melanoma"]


def test_a_latent_whose_class_alignment_is_mostly_shared_with_other_classes_is_flagged():
    # 'a ruler' (latent 0) aligns 0.64 with melanoma's concepts and 0.56 with nevus': above the absolute
    # threshold and half its own 0.41, and distinct by 0.08 > margin; but melanoma-specific only 0.04 < 0.5 * 0.41
    def flags(relative):
        return find_flags("probe", torch.tensor([[0.8] + [0.0] * 5, [-1.0] * 6]),
                          torch.tensor([[1.0] + [0.0] * 5, [0.0] * 6]), CLASSES, labels=LABELS,
                          label_indices=LABEL_INDICES, label_alignment=torch.tensor([0.41, 0.1, 0.1, 0.1, 0.0, 0.1]),
                          expected_alignment=torch.tensor([[0.64] + [0.0] * 5, [0.56] + [0.0] * 5]),
                          name_alignment=torch.zeros(2, 6), clarity=torch.ones(6), vocab=build_vocab(),
                          config=build_config(flag_relative_alignment=relative, flag_class_margin=0.02))

    assert [f["latent"] for f in flags(0.5)] == [0]
    assert [f["latent"] for f in flags(0.05)] == []  # 0.04 >= 0.05 * 0.41: specific enough, not flagged


def _candidate(latent, label, share, measured=True, gap=0.5, class_name="melanoma"):
    table = {"accuracy_gap": gap, "called_gap": gap}
    return {"head": "probe", "class_name": class_name, "latent": latent, "label": label, "share": share,
            "probe_share": share, "zero_shot_share": 0.0, "mean_relevance": share, "rank": 0,
            "harm": {"probe": table, "zero_shot": {"accuracy_gap": 0.0, "called_gap": 0.0}, "measured": measured}}


def test_flags_of_one_concept_are_reported_once_with_the_summed_share():
    from workers.engine.flags import select_flags

    semantic = torch.eye(4)
    semantic[1] = semantic[0]  # latents 0 and 1 look alike; 2 and 3 do not
    config = build_audit_config()
    flags = select_flags([_candidate(0, "with a ruler", 0.3), _candidate(1, "unlabelled", 0.2),
                          _candidate(2, "with a ruler", 0.1), _candidate(3, "with hair", 0.1)], semantic, config)
    assert [(f["latent"], f["concept_latents"], round(f["share"], 3)) for f in flags] == \
        [(0, [0, 1, 2], 0.6), (3, [3], 0.1)]
    # two confident, different labels stay two concepts however alike their images are
    flags = select_flags([_candidate(0, "with a ruler", 0.3), _candidate(1, "with hair", 0.2)], semantic, config)
    assert [f["concept_latents"] for f in flags] == [[0], [1]]


def test_a_concept_whose_harm_rides_along_with_a_stronger_one_is_explained_away():
    from workers.engine.flags import Evidence, select_flags

    rng = np.random.default_rng(0)
    n = 400
    labels = (rng.random(n) < 0.5).astype(int)
    ruler = rng.random(n) < 0.5
    rider = ruler & (rng.random(n) < 0.5)  # fires only on ruler images: its harm is the ruler's
    own = ~ruler & (rng.random(n) < 0.5)  # a second, independent shortcut among the images without a ruler
    predicted = np.where(ruler | own, 1, 0)  # class 1 ("melanoma") is called exactly when either shows
    activity = {0: ruler.astype(float), 1: rider.astype(float), 2: own.astype(float)}
    config = build_audit_config()
    evidence = Evidence(lambda i: activity[i], labels, {"probe": predicted, "zero_shot": labels},
                        ["nevus", "melanoma"], config)
    semantic = torch.eye(3)
    flags = select_flags([_candidate(0, "a", 0.3, gap=0.9), _candidate(1, "b", 0.2, gap=0.6),
                          _candidate(2, "c", 0.1, gap=0.5)], semantic, config, evidence)
    assert [f["latent"] for f in flags] == [0, 2]
    assert [f["rank"] for f in flags] == [1, 2]
