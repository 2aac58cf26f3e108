"""Harm: the with/without split of a latent, measured for both heads, and the benchmark's ground truth."""
import numpy as np
import pytest
import torch

from workers.casestudy.benchmark import latent_concepts, true_gaps
from workers.engine.config import AuditConfig
from workers.engine.harm import harm_sums, head_table, measured_harm, metadata_auroc, slice_accuracy


def _table(active, labels, predicted, c=1, latent=0, n_classes=2):
    active = torch.tensor(active, dtype=torch.bool).unsqueeze(1)
    labels, predicted = torch.tensor(labels), torch.tensor(predicted)
    onehot = torch.nn.functional.one_hot(labels, n_classes).float()
    sums = harm_sums(active, onehot, predicted, torch.zeros(len(labels)), n_classes)
    sums["active"] = onehot.T @ active.float()
    totals = {"count": np.bincount(labels.numpy(), minlength=n_classes),
              "correct": np.bincount(labels[predicted == labels].numpy(), minlength=n_classes),
              "called": np.bincount(predicted.numpy(), minlength=n_classes)}
    return head_table({k: v.numpy() for k, v in sums.items()}, totals, c, latent)


def _shortcut(n=40):
    """Class 1 is called 1 exactly when the latent is active: on both classes' images."""
    active = [i % 2 == 0 for i in range(2 * n)]
    labels = [0] * n + [1] * n
    return active, labels, [int(a) for a in active]


def test_a_latent_the_head_reads_as_the_class_shows_both_gaps():
    table = _table(*_shortcut())
    assert table["class_with"] == {"n": 20, "accuracy": 1.0, "mean_logit": 0.0}
    assert table["class_without"]["accuracy"] == 0.0
    assert table["others_with"] == {"n": 20, "called_class": 1.0}
    assert table["others_without"]["called_class"] == 0.0
    assert table["accuracy_gap"] == 1.0 and table["called_gap"] == 1.0


def test_harm_is_measured_only_when_the_probe_gap_exceeds_zero_shots():
    shortcut = _table(*_shortcut())
    active, labels, _ = _shortcut()
    blind = _table(active, labels, labels)  # a head that is always right: no gap
    config = AuditConfig()
    assert measured_harm(shortcut, blind, config.harm_min_gap, config.harm_min_z)[0] is True
    # zero-shot has the same gap: the latent means the class for both heads, nothing the probe adds
    assert measured_harm(shortcut, shortcut, config.harm_min_gap, config.harm_min_z)[0] is False
    assert measured_harm(blind, blind, config.harm_min_gap, config.harm_min_z)[0] is False


def test_a_split_with_too_few_images_on_a_side_measures_nothing():
    active = [True] * 78 + [False] * 2
    labels = [0] * 40 + [1] * 40
    table = _table(active, labels, [int(a) for a in active])
    assert table["accuracy_gap"] is None
    assert measured_harm(table, table, 0.1, 3.0)[0] is False


def test_metadata_auroc_and_slices():
    activity = np.array([0.0, 0.0, 1.0, 2.0])
    auroc = metadata_auroc(activity, {"ruler": ["0", "0", "1", "1"], "site": ["a", "b", "a", "b"],
                                      "clean": ["1", "1", "0", "0"]})
    assert auroc["ruler"] == 1.0 and auroc["site=a"] == 0.375 and auroc["clean"] == 0.0
    assert set(list(auroc)[-2:]) == {"site=a", "site=b"}  # the least telling last
    slices = slice_accuracy({"ruler": ["0", "1", "1", "0"]}, {"probe": np.array([0, 1, 0, 1])},
                            np.array([0, 1, 1, 0]), ["nevus", "melanoma"])
    assert slices["ruler"]["1"]["probe"] == {"accuracy": 0.5, "per_class": {"nevus": None, "melanoma": 0.5}}


def _rows(has_ruler, labels):
    return [{"label": lab, **{a: "0" for a in ("a band-aid", "ink marking", "hair", "dark corners", "a sticker",
                                              "a stain")}, "a ruler": "1" if r else "0"}
            for r, lab in zip(has_ruler, labels)]


def test_the_ground_truth_names_what_a_latent_fires_with_and_without():
    has = [i % 2 == 0 for i in range(40)]
    rows = _rows(has, ["melanoma", "nevus"] * 20)
    assert latent_concepts(np.array([1.0 if h else 0.0 for h in has]), rows)[0][:2] == ("a ruler", True)
    assert latent_concepts(np.array([0.0 if h else 1.0 for h in has]), rows)[0][:2] == ("a ruler", False)
    assert latent_concepts(np.ones(40), rows) == []  # fires everywhere: tracks nothing


def test_the_ground_truth_gap_of_a_planted_shortcut():
    has = [i % 4 < 2 for i in range(40)]
    labels = ["melanoma", "nevus"] * 20
    rows = _rows(has, labels)
    predictions = np.array([0 if h else 1 for h in has])  # called melanoma (index 0) exactly when a ruler shows
    gaps = true_gaps(rows, predictions, ["melanoma", "nevus"])
    assert gaps[("a ruler", "melanoma", True)] == pytest.approx(1.0)
    assert gaps[("a ruler", "nevus", False)] == pytest.approx(1.0)
    assert gaps[("hair", "melanoma", True)] == pytest.approx(0.0)
