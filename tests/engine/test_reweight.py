"""The ``reweight`` correction and the data behind the shortcut.

Reweighting retrains the probe on its own training split with every image weighted so that the concept is as
frequent in each class: the weighted counts of the (class, concept present) cells factorize. On the hand-built
problem of ``test_correction.py`` (a shortcut direction the training split ties to melanoma) the reweighted probe
leans on the shortcut far less than the plain fit on the same split. End to end, the SAE reads the training images
and the outcome lists how the concept is spread over the classes and which images have it.
"""
import csv
import io

import numpy as np
import pytest
import torch

from workers.engine.config import AuditConfig, CorrectionOptions
from workers.engine.correct_audit import (AuditedInputs, presence_threshold, run_correction, training_data,
                                         training_data_csv)
from workers.engine.correction import TrainingSplit, balancing_weights, correct_probe, propensity_weights
from workers.engine.data import TensorImages
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.hooks import capture_residual, select_tokens
from workers.engine.sae import TopKSAE, init_from_sample

from .test_correction import BINARY, SHORTCUT_STRENGTH, THREE, _directions, _fit, _problem, _split


@pytest.fixture(scope="module")
def problems():
    return {key: _problem(*key) for key in [(2, False), (3, False)]}


def _tied_split(case, seed=100):
    """The training split the probe of ``_problem`` was fitted on, with where the shortcut is present."""
    n_classes = len(case["probe"].class_names)
    x, y, has = _split(2000, n_classes, True, seed, n_classes - 1)
    return x, y, has


def _weighted_cells(labels, present, weights, n_classes):
    cells = np.zeros((n_classes, 2))
    np.add.at(cells, (labels, present.astype(int)), weights)
    return cells


# --------------------------------------------------------------------------- the weights

def test_the_weighted_counts_of_each_class_and_concept_cell_factorize():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 900)
    present = rng.random(900) < np.array([0.1, 0.35, 0.8])[labels]  # the concept tied to the last class

    weights, counts = balancing_weights(labels, present, 3)

    n_k = np.bincount(labels, minlength=3)
    n_p = np.array([(~present).sum(), present.sum()])
    assert counts.tolist() == [[int(((labels == k) & (present == bool(p))).sum()) for p in (0, 1)] for k in range(3)]
    weighted = _weighted_cells(labels, present, weights, 3)
    assert np.allclose(weighted, np.outer(n_k, n_p) / 900)
    # under the weights the concept is as frequent in every class as overall, and the classes keep their sizes
    assert np.allclose(weighted[:, 1] / weighted.sum(1), present.mean())
    assert np.allclose(weighted.sum(1), n_k)
    assert weights.mean() == pytest.approx(1.0)
    for k in range(3):
        for p in (False, True):
            cell = weights[(labels == k) & (present == p)]
            assert np.allclose(cell, cell[0])
    # the raw counts do not factorize: there was something to balance
    assert not np.allclose(counts, np.outer(n_k, n_p) / 900, atol=5)


def test_an_empty_cell_gets_no_weight_and_is_reported(problems):
    case = problems[(3, False)]
    x, y, has = _tied_split(case)
    has = has & (y != 0)  # no nevus has the concept

    weights, counts = balancing_weights(y, has, 3)
    new, info = correct_probe(case["probe"], case["directions"], "reweight",
                              TrainingSplit(x, y, C=1.0, concept_active=has))

    assert counts[0, 1] == 0 and (counts[1:] > 0).all()
    assert info["empty_cells"] == [{"class": "nevus", "concept": "with"}]
    assert info["counts_before"]["nevus"] == {"with": 0, "without": int((y == 0).sum())}
    assert info["counts_after"]["nevus"]["with"] == 0.0
    n_k, n_1 = np.bincount(y, minlength=3), has.sum()
    for k, name in enumerate(THREE[1:], start=1):  # the other classes' cells still factorize
        assert info["counts_after"][name]["with"] == pytest.approx(n_k[k] * n_1 / len(y), abs=1e-5)
    assert np.allclose(_weighted_cells(y, has, weights, 3)[1:], np.outer(n_k, [len(y) - n_1, n_1])[1:] / len(y))


def test_the_reweighted_details_report_the_counts_before_and_after(problems):
    case = problems[(2, False)]
    x, y, has = _tied_split(case)

    _, info = correct_probe(case["probe"], case["directions"], "reweight", TrainingSplit(x, y, concept_active=has))

    assert info["method"] == "reweight" and info["reason"] == "reweight: chosen by option"
    assert info["n_train"] == 2000 and info["concept_images"] == int(has.sum()) and info["empty_cells"] == []
    assert info["C"] in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    assert info["C_from"].startswith("3-fold cross-validation (weighted log loss)")
    assert "anchor" not in info
    for k, name in enumerate(BINARY):
        before = info["counts_before"][name]
        assert before == {"with": int((has & (y == k)).sum()), "without": int((~has & (y == k)).sum())}
        after = info["counts_after"][name]
        assert after["with"] + after["without"] == pytest.approx((y == k).sum(), abs=1e-4)
        assert after["with"] / (y == k).sum() == pytest.approx(has.mean(), abs=1e-6)
    # the tied split: melanomas have it nine times as often as nevi before, equally often after
    assert info["counts_before"]["melanoma"]["with"] > 5 * info["counts_before"]["nevus"]["with"]


# --------------------------------------------------------------------------- what it does to the probe

def _flipped(n_classes, seed=400):
    """A test split where the shortcut comes with the other classes: 10 % of melanomas, 90 % of the others."""
    signal, shortcut = _directions()
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, 4000)
    target = n_classes - 1
    has = rng.random(4000) < np.where(y == target, 0.1, 0.9)
    clean = np.outer(2 * y - 1, signal[0]) if n_classes == 2 else 1.4 * signal[y]
    x = 0.5 + clean + SHORTCUT_STRENGTH * np.outer(has, shortcut) + rng.normal(size=(4000, len(shortcut)))
    return torch.tensor(x, dtype=torch.float32), y


def _lean(probe):
    """How much the melanoma-against-the-rest score moves when the artifact is added to an image, per unit of the
    probe's weight norm. (The artifact's direction shares a little with the class signal, so a probe that ignores
    the artifact does not read zero weight along its orthogonal part: it cancels what the artifact mimics.)"""
    _, shortcut = _directions()
    u = torch.tensor(shortcut, dtype=torch.float64)
    w = probe.weight.double()
    return float(w[-1] @ u - w[:-1].mean(0) @ u) / float(w.norm())


@pytest.mark.parametrize("n_classes", [2, 3], ids=["binary", "three-class"])
def test_a_reweighted_probe_leans_on_the_artifact_clearly_less_than_a_plain_refit(problems, n_classes):
    case = problems[(n_classes, False)]
    classes = case["probe"].class_names
    x, y, has = _tied_split(case)
    plain = _fit(x, y, classes, False)  # the same split, the same C, no weights: what the probe learnt

    new, info = correct_probe(plain, case["directions"], "reweight", TrainingSplit(x, y, C=1.0, concept_active=has))

    assert info["C"] == 1.0 and info["C_from"] == "given"
    lean_old, lean_new, lean_reference = _lean(plain), _lean(new), _lean(case["reference"])
    assert lean_old > 0.4 and lean_new < 0.5 * lean_old
    # most of the way to the probe trained where the artifact is independent of the class
    assert abs(lean_new - lean_reference) <= 0.2 * abs(lean_old - lean_reference), (lean_new, lean_reference)
    flipped_x, flipped_y = _flipped(n_classes)
    old_acc, new_acc = (float((p(flipped_x).argmax(1).numpy() == flipped_y).mean()) for p in (plain, new))
    assert new_acc - old_acc > 0.1, (old_acc, new_acc)
    assert info["weight_share_after"]["melanoma"] < 0.5 * info["weight_share_removed"]["melanoma"]


def test_weights_that_ignore_the_concept_give_the_plain_fit_back(problems):
    """The control: a concept independent of the class gets near-uniform weights and moves the probe little."""
    case = problems[(2, False)]
    x, y, _ = _tied_split(case)
    random_concept = np.random.default_rng(9).random(len(y)) < 0.5
    plain = _fit(x, y, BINARY, False)

    new, _ = correct_probe(plain, case["directions"], "reweight",
                           TrainingSplit(x, y, C=1.0, concept_active=random_concept))

    assert abs(_lean(new) - _lean(plain)) < 0.2 * _lean(plain)


def test_a_binary_probe_keeps_its_rows_and_both_layouts_carry_scikit_learns_logit(problems):
    """One stored row keeps scikit-learn's row (its score is the logit); two rows split the logit in halves, so
    that their softmax is scikit-learn's probability: as ``refit`` stores them."""
    from sklearn.linear_model import LogisticRegression

    case = problems[(2, False)]
    x, y, has = _tied_split(case)
    w, b = case["probe"].weight[1:], case["probe"].bias[1:]
    one_row = LinearProbe(w, b, BINARY, "none")
    two_rows = LinearProbe(torch.cat([-w, w]) / 2, torch.cat([-b, b]) / 2, BINARY, "none")
    training = TrainingSplit(x, y, C=1.0, concept_active=has)

    from_one, _ = correct_probe(one_row, case["directions"], "reweight", training)
    from_two, _ = correct_probe(two_rows, case["directions"], "reweight", training)

    weights, _ = balancing_weights(y, has, 2)
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x.numpy(), y, sample_weight=weights)
    logit = torch.tensor(clf.decision_function(x.numpy()), dtype=torch.float32)
    assert from_one.stored_rows == 1 and from_two.stored_rows == 2
    assert torch.allclose(from_one(x)[:, 1], logit, atol=1e-4)
    assert torch.allclose(from_two(x)[:, 1] - from_two(x)[:, 0], logit, atol=1e-4)
    assert torch.allclose(from_two(x).softmax(1)[:, 1], torch.tensor(clf.predict_proba(x.numpy())[:, 1],
                                                                     dtype=torch.float32), atol=1e-5)


# --------------------------------------------------------------------------- refusals

def test_reweight_without_what_it_needs_is_refused_naming_it(problems):
    case = problems[(2, False)]
    x, y, has = _tied_split(case)

    with pytest.raises(EngineError, match="the 'reweight' correction needs the probe's training split"):
        correct_probe(case["probe"], case["directions"], "reweight")
    with pytest.raises(EngineError, match="needs to know on which training images the concept is active"):
        correct_probe(case["probe"], case["directions"], "reweight", TrainingSplit(x, y))
    with pytest.raises(EngineError, match="2000 images but concept_active says 10"):
        correct_probe(case["probe"], case["directions"], "reweight", TrainingSplit(x, y, concept_active=has[:10]))
    for nowhere_or_everywhere, word in ((np.zeros(len(y), bool), "no"), (np.ones(len(y), bool), "every")):
        with pytest.raises(EngineError, match=f"the concept is active on {word} image of the training split"):
            correct_probe(case["probe"], case["directions"], "reweight",
                          TrainingSplit(x, y, concept_active=nowhere_or_everywhere))


# --------------------------------------------------------------------------- the data behind the shortcut

def _hand_split():
    """Ten images: nevi 0-5 (the concept on 1 of 6), melanomas 6-9 (on 3 of 4)."""
    labels = ["nevus"] * 6 + ["melanoma"] * 4
    active = np.array([0, 0, 1, 0, 0, 0, 1, 1, 0, 1], bool)
    activation = np.array([0, 0, 0.5, 0, 0, 0, 2.25, 0.75, 0, 4.0])
    ids = [f"img{i}.jpg" for i in range(10)]
    return TrainingSplit(torch.zeros(10, 4), labels, concept_active=active, activation=activation, ids=ids)


def test_the_training_data_table_matches_a_hand_count():
    data = training_data(_hand_split(), BINARY)

    assert data["images"] == 10 and data["with_concept"] == 4
    assert data["classes"]["nevus"] == {"images": 6, "with": 1, "without": 5, "share_with": round(1 / 6, 6)}
    assert data["classes"]["melanoma"] == {"images": 4, "with": 3, "without": 1, "share_with": 0.75}
    assert data["imbalance"]["melanoma"] == {"rate_in_class": 0.75, "rate_in_others": round(1 / 6, 6),
                                             "difference": round(0.75 - 1 / 6, 6), "ratio": 4.5}
    assert data["imbalance"]["nevus"]["difference"] == round(1 / 6 - 0.75, 6)
    assert data["imbalance"]["nevus"]["ratio"] == round((1 / 6) / 0.75, 6)
    assert data["points_to"] == "melanoma"
    assert data["rows"] == [{"image": "img9.jpg", "class": "melanoma", "activation": 4.0},
                            {"image": "img6.jpg", "class": "melanoma", "activation": 2.25},
                            {"image": "img7.jpg", "class": "melanoma", "activation": 0.75},
                            {"image": "img2.jpg", "class": "nevus", "activation": 0.5}]


def test_the_training_data_csv_has_the_header_and_one_row_per_image_with_the_concept():
    text = training_data_csv(training_data(_hand_split(), BINARY))

    assert text.splitlines()[0] == "image,class,activation"
    assert text == ("image,class,activation\nimg9.jpg,melanoma,4.0\nimg6.jpg,melanoma,2.25\n"
                    "img7.jpg,melanoma,0.75\nimg2.jpg,nevus,0.5\n")


def test_a_concept_spread_evenly_points_to_no_class_and_one_never_seen_has_no_rows():
    even = TrainingSplit(torch.zeros(4, 2), [0, 0, 1, 1], concept_active=np.array([1, 0, 1, 0], bool))
    never = TrainingSplit(torch.zeros(4, 2), [0, 0, 1, 1], concept_active=np.zeros(4, bool))

    assert training_data(even, BINARY)["points_to"] is None
    assert [row["image"] for row in training_data(even, BINARY)["rows"]] == ["0", "2"]
    assert training_data(never, BINARY)["rows"] == [] and training_data(never, BINARY)["points_to"] is None
    assert training_data(never, BINARY)["imbalance"]["nevus"]["ratio"] is None
    assert training_data_csv(training_data(never, BINARY)) == "image,class,activation\n"
    with pytest.raises(EngineError, match="does not say where the concept is active"):
        training_data(TrainingSplit(torch.zeros(4, 2), [0, 0, 1, 1]), BINARY)


# --------------------------------------------------------------------------- end to end

def _pooled_code(sae, h, token):
    """[images, latents] the SAE's code of the residual streams ``h``, a spatial one's largest over the patches."""
    z = sae.encode(select_tokens(h, token))
    return z.amax(1) if z.ndim == 3 else z


def _sometimes_active(*codes):
    """The latent whose share of active images is furthest from 0 and 1 in every one of ``codes``."""
    shares = torch.stack([(code > 0).float().mean(0) for code in codes])
    latent = int(torch.minimum(shares, 1 - shares).amin(0).argmax())
    assert ((shares[:, latent] >= 0.1) & (shares[:, latent] <= 0.9)).all(), shares[:, latent]
    return latent


@pytest.mark.parametrize("layer, token", [(-1, "cls"), (-2, "spatial")])
def test_run_correction_reweights_and_returns_the_data_behind_the_shortcut(tiny, tmp_path, layer, token):
    gen = torch.Generator().manual_seed(5)
    audited_px, training_px = torch.randn(40, 3, 32, 32, generator=gen), torch.randn(60, 3, 32, 32, generator=gen)
    audited_y, training_y = torch.arange(40) % 2, torch.arange(60) % 2
    model = tiny.model.eval()
    with capture_residual(model.visual, layer) as store, torch.no_grad():
        model.encode_image(torch.cat([audited_px, training_px]))
    h = store["h"]
    sae = TopKSAE(h.shape[-1], 48, 4)
    init_from_sample(sae, select_tokens(h, token).reshape(-1, h.shape[-1]), seed=0)
    with torch.no_grad():
        code = _pooled_code(sae, h, token)
    latent = _sometimes_active(code[:40], code[40:])
    probe = LinearProbe(torch.randn(1, 32, generator=gen), torch.zeros(1), BINARY)
    ids = [f"train-{i:03d}.png" for i in range(60)]
    audited = AuditedInputs(tiny, probe, TensorImages(audited_px, audited_y, BINARY), sae, [("melanoma", latent)])

    outcome = run_correction(audited, AuditConfig(layer=layer, token=token, batch_size=16, device="cpu"),
                             CorrectionOptions(), method="reweight",
                             training=TensorImages(training_px, training_y, BINARY, ids=ids),
                             workdir=tmp_path)

    assert outcome.info["method"] == "reweight" and outcome.info["n_train"] == 60
    data = outcome.training_data
    assert outcome.to_dict()["training_data"] == data and data["latents"] == [latent]
    expected = code[40:, latent].double().numpy()  # what the SAE reads on the training images, computed here
    has = expected > presence_threshold(expected)
    for k, name in enumerate(BINARY):
        mine = training_y.numpy() == k
        assert data["classes"][name] == {"images": 30, "with": int((has & mine).sum()),
                                         "without": int((~has & mine).sum()),
                                         "share_with": round(float((has & mine).sum()) / 30, 6)}
        assert outcome.info["counts_before"][name] == {"with": int((has & mine).sum()),
                                                       "without": int((~has & mine).sum())}
    assert len(data["rows"]) == int(has.sum()) > 0
    order = np.argsort(-expected[has], kind="stable")
    assert [row["image"] for row in data["rows"]] == [ids[i] for i in np.flatnonzero(has)[order]]
    assert np.allclose([row["activation"] for row in data["rows"]], expected[has][order], atol=1e-4)
    assert all(row["class"] == BINARY[int(training_y[ids.index(row["image"])])] for row in data["rows"])
    rows = list(csv.reader(io.StringIO(training_data_csv(data))))
    assert rows[0] == ["image", "class", "activation"]
    assert [r[:2] for r in rows[1:]] == [[row["image"], row["class"]] for row in data["rows"]]


def test_without_a_training_split_the_outcome_has_no_training_data(tiny, tmp_path):
    gen = torch.Generator().manual_seed(6)
    px, y = torch.randn(40, 3, 32, 32, generator=gen), torch.arange(40) % 2
    model = tiny.model.eval()
    with capture_residual(model.visual, -1) as store, torch.no_grad():
        model.encode_image(px)
    sae = TopKSAE(48, 48, 4)
    init_from_sample(sae, select_tokens(store["h"], "cls"), seed=0)
    with torch.no_grad():
        code = sae.encode(select_tokens(store["h"], "cls"))
    latent = _sometimes_active(code)
    probe = LinearProbe(torch.randn(1, 32, generator=gen), torch.zeros(1), BINARY)

    outcome = run_correction(AuditedInputs(tiny, probe, TensorImages(px, y, BINARY), sae, [("melanoma", latent)]),
                             AuditConfig(batch_size=16, device="cpu"), method="project", workdir=tmp_path)

    assert outcome.training_data is None and outcome.to_dict()["training_data"] is None
    with pytest.raises(EngineError, match="'reweight' correction needs the probe's training split"):
        run_correction(AuditedInputs(tiny, probe, TensorImages(px, y, BINARY), sae, [("melanoma", latent)]),
                       AuditConfig(batch_size=16, device="cpu"), method="reweight", workdir=tmp_path / "again")


def test_presence_is_the_natural_break_of_the_activation_not_any_activation():
    """A TopK SAE keeps k latents on, so a concept is weakly on most images: presence splits the activations
    where the two groups differ most (Otsu), among the images where it is on at all."""
    rng = np.random.default_rng(0)
    weak, strong = rng.uniform(0.05, 0.8, 300), rng.uniform(3.0, 6.0, 100)
    activation = np.concatenate([np.zeros(50), weak, strong])
    threshold = presence_threshold(activation)
    assert 0.8 <= threshold < 3.0
    assert (activation > threshold).sum() == 100
    assert presence_threshold(np.array([0.0, 0.0, 2.0, 2.0])) == 0.0  # one distinct value: nothing to split
    assert presence_threshold(np.zeros(5)) == 0.0


def test_propensity_weights_make_the_activation_say_nothing_about_the_class():
    """The class-conditional mean activation differs fourfold before; under the weights the two classes'
    weighted means are close, the weights average 1 and no image outweighs fifty times its class prior."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 400)
    activation = np.where(rng.random(800) < np.where(y == 1, 0.8, 0.2), rng.uniform(2, 5, 800), 0.0)
    before = [activation[y == k].mean() for k in (0, 1)]
    w = propensity_weights(y, activation, 2)
    after = [np.average(activation[y == k], weights=w[y == k]) for k in (0, 1)]
    assert before[1] > 3 * before[0]
    assert abs(after[1] - after[0]) < 0.15 * max(after)
    assert w.mean() == pytest.approx(1.0) and w.min() > 0
    assert w.max() <= 50 * 1.0 / w.mean() + 1e-9


def test_with_the_activation_a_reweight_weighs_by_propensity_and_says_so(problems):
    """Given the concept's activation (as run_correction passes it), reweight uses the propensity weights and
    leans on the artifact less than the plain probe; given only presence, the cells' weights."""
    case = problems[(2, False)]
    x, y, has = _tied_split(case)
    activation = has * 3.0 + np.random.default_rng(2).uniform(0, 0.5, len(has))
    _, info = correct_probe(case["probe"], case["directions"], "reweight",
                            TrainingSplit(x, y, C=1.0, concept_active=has, activation=activation))
    assert info["weighting"] == "propensity"
    assert info["weight_share_after"]["melanoma"] < 0.5 * info["weight_share_removed"]["melanoma"]
    _, info = correct_probe(case["probe"], case["directions"], "reweight", TrainingSplit(x, y, C=1.0,
                                                                                         concept_active=has))
    assert info["weighting"] == "cells"
