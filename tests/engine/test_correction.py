"""Correcting a probe: the shortcut's directions, the two corrections, and the proof that the hurt slices recover.

The recovery tests build embeddings by hand: a class signal plus a shortcut direction that the training split ties
to one class and the test split does not. A probe trained on the tied split leans on the shortcut; the reference is
the same probe trained on a split where the shortcut is independent of the class.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from workers.engine.correction import (REGISTRY, ShortcutDirections, TrainingSplit, compare_probes, correct_probe,
                                       gap_closed, harm_slices, shortcut_directions)
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.hooks import VisionTail, capture_residual, select_tokens
from workers.engine.interventions import shifted_outputs
from workers.engine.sae import TopKSAE, init_from_sample

DIM = 16
RECOVERY_BAR = 0.8  # the bar: at least 80 % of the way to the probe trained without the correlation
SHORTCUT_STRENGTH = 3.0
BINARY = ["nevus", "melanoma"]
THREE = ["nevus", "keratosis", "melanoma"]


def _directions(seed=0):
    """Class signal directions (one per class) and a unit shortcut direction at cosine 0.3 to the first."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, DIM)))
    signal = q[:, :3].T
    shortcut = 0.3 * q[:, 0] + np.sqrt(1 - 0.09) * q[:, 3]
    return signal, shortcut


def _split(n, n_classes, tied, seed, target):
    """(embeddings [n, DIM], labels, shortcut present): tied, the shortcut is on 90 % of class ``target``'s
    images and 10 % of the others'; otherwise on half of every class's."""
    signal, shortcut = _directions()
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    rate = np.where(y == target, 0.9, 0.1) if tied else np.full(n, 0.5)
    has = rng.random(n) < rate
    if n_classes == 2:
        clean = np.outer(2 * y - 1, signal[0])
    else:
        clean = 1.4 * signal[y]
    x = 0.5 + clean + SHORTCUT_STRENGTH * np.outer(has, shortcut) + rng.normal(size=(n, DIM))
    return torch.tensor(x, dtype=torch.float32), y, has


def _fit(x, y, classes, scaler):
    """A logistic-regression probe as a user would train it, optionally behind a StandardScaler."""
    mean = scale = None
    features = x.numpy()
    if scaler:
        sc = StandardScaler().fit(features)
        features, mean, scale = sc.transform(features), sc.mean_, sc.scale_
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(features, y)
    return LinearProbe(clf.coef_, clf.intercept_, classes, "none", mean, scale)


def _problem(n_classes=2, scaler=False, seed=0):
    classes = BINARY if n_classes == 2 else THREE
    target = n_classes - 1  # melanoma
    train = _split(2000, n_classes, True, 100 + seed, target)
    decorrelated = _split(2000, n_classes, False, 200 + seed, target)
    test_x, test_y, test_has = _split(4000, n_classes, False, 300 + seed, target)
    probe = _fit(*train[:2], classes, scaler)
    reference = _fit(*decorrelated[:2], classes, scaler)
    _, shortcut = _directions()
    features = probe.features(test_x)
    # what the shortcut adds to the features the probe reads (exact: the normalization here is affine)
    added = (probe.features(test_x + SHORTCUT_STRENGTH * torch.tensor(shortcut, dtype=torch.float32)) - features)
    directions = ShortcutDirections.from_vectors(added.mean(0, keepdim=True),
                                                 features[torch.tensor(~test_has)].mean(0), latents=[12])
    own = test_y == target
    hurt = {"melanoma, shortcut absent": own & ~test_has, "others, shortcut present": ~own & test_has}
    return dict(probe=probe, reference=reference, directions=directions, train=TrainingSplit(*train[:2]),
                test=(test_x, test_y), hurt=hurt)


def _recovered(table) -> bool:
    """The issue's bar: every hurt slice at least RECOVERY_BAR of the way to the reference, overall not lower."""
    closed = [row["gap_closed"] for row in table["slices"].values()]
    return (all(c is not None and c >= RECOVERY_BAR for c in closed)
            and table["overall"]["new"] >= table["overall"]["old"])


@pytest.fixture(scope="module")
def problems():
    return {key: _problem(*key) for key in [(2, False), (2, True), (3, False)]}


# --------------------------------------------------------------------------- recovery

@pytest.mark.parametrize("method", ["project", "refit"])
@pytest.mark.parametrize("key", [(2, False), (2, True), (3, False)], ids=["binary", "binary-scaled", "three-class"])
def test_a_correction_closes_most_of_the_gap_on_the_slices_the_shortcut_hurt(problems, method, key):
    case = problems[key]
    old, shortcut = case["probe"], case["directions"]

    new, info = correct_probe(old, shortcut, method, case["train"] if method == "refit" else None)
    table = compare_probes(old, new, *case["test"], case["hurt"], reference=case["reference"])

    for name, row in table["slices"].items():
        assert row["reference"] - row["old"] > 0.15, f"{name}: the shortcut did not hurt this slice to begin with"
        assert row["gap_closed"] >= RECOVERY_BAR, f"{name}: {row}"
    assert table["overall"]["new"] >= table["overall"]["old"]
    assert _recovered(table)
    along = new.weight.double() @ shortcut.basis.double().T
    assert along.abs().max() <= 1e-5 * new.weight.abs().max()  # the new probe reads nothing along the shortcut
    assert (old.weight.double() @ shortcut.basis.double().T).abs().max() > 0.1  # the old one did
    assert info["method"] == method and info["latents"] == [12] and info["reason"] == f"{method}: chosen by option"
    assert info["weight_share_removed"]["melanoma"] > 0.2


def test_a_correction_that_removes_nothing_does_not_pass_the_recovery_bar(problems):
    case = problems[(2, False)]
    nothing = ShortcutDirections.from_vectors(torch.zeros(0, DIM), case["directions"].clean_center)

    new, info = correct_probe(case["probe"], nothing, "project")
    table = compare_probes(case["probe"], new, *case["test"], case["hurt"], reference=case["reference"])

    assert info["rank"] == 0 and table["changed_predictions"] == 0
    assert all(row["gap_closed"] == 0.0 for row in table["slices"].values())
    assert not _recovered(table)


def test_anchoring_at_the_clean_images_keeps_the_bias_the_shortcuts_absence_put_on_them(problems):
    """P-ClArC's reference point makes every image look clean, and a probe that learnt "ruler: melanoma" also
    learnt "no ruler: nevus": melanomas without the shortcut stay missed. Why the default anchor is the midpoint."""
    case = problems[(2, False)]

    clean, info = correct_probe(case["probe"], case["directions"], "project", anchor="clean")
    table = compare_probes(case["probe"], clean, *case["test"], case["hurt"], reference=case["reference"])

    assert info["anchor"] == "clean"
    assert table["slices"]["melanoma, shortcut absent"]["gap_closed"] < 0.2
    assert table["slices"]["others, shortcut present"]["gap_closed"] >= RECOVERY_BAR
    assert not _recovered(table)


def test_without_a_method_it_refits_when_the_training_split_is_given_and_projects_otherwise(problems):
    case = problems[(2, False)]

    _, projected = correct_probe(case["probe"], case["directions"])
    _, refitted = correct_probe(case["probe"], case["directions"], training=case["train"])

    assert projected["method"] == "project" and projected["reason"] == "project: no training split"
    assert projected["anchor"] == "midpoint"
    assert refitted["method"] == "refit" and refitted["reason"] == "refit: training split given"
    assert refitted["n_train"] == 2000 and refitted["C"] in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    assert refitted["C_from"].startswith("3-fold cross-validation")


# --------------------------------------------------------------------------- the probe's file

def _input_file(tmp_path, kind, normalization, scaled, suffix):
    """A probe file as a user uploads it: scikit-learn's one row for a binary probe, or one row per class."""
    gen = torch.Generator().manual_seed(7)
    rows = {"binary-one-row": 1, "binary-two-rows": 2, "three-class": 3}[kind]
    classes = THREE if kind == "three-class" else BINARY
    arrays = {"weight": torch.randn(rows, 8, generator=gen).numpy(), "bias": torch.randn(rows, generator=gen).numpy()}
    if scaled:
        arrays["mean"] = (0.1 * torch.randn(8, generator=gen)).numpy()
        arrays["scale"] = (0.5 + torch.rand(8, generator=gen)).numpy()
    path = tmp_path / f"input{suffix}"
    if suffix == ".npz":
        np.savez(path, classes=np.array(classes), normalization=np.array(normalization), **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(path), metadata={"classes": json.dumps(classes), "normalization": normalization})
    return path


def _stored_weight(path):
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["weight"]
    return load_file(str(path))["weight"]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "standardized"])
@pytest.mark.parametrize("normalization", ["l2", "none"])
@pytest.mark.parametrize("kind", ["binary-one-row", "binary-two-rows", "three-class"])
@pytest.mark.parametrize("method", ["project", "refit"])
def test_a_corrected_probe_round_trips_in_the_format_it_came_in(tmp_path, method, kind, normalization, scaled,
                                                                 suffix):
    path = _input_file(tmp_path, kind, normalization, scaled, suffix)
    old = LinearProbe.load(path)
    gen = torch.Generator().manual_seed(8)
    embeddings = 1.0 + torch.randn(120, 8, generator=gen)
    labels = torch.arange(120) % len(old.class_names)
    shortcut = ShortcutDirections.from_vectors(torch.randn(2, 8, generator=gen), torch.zeros(8), latents=[3, 5])
    training = TrainingSplit(embeddings, labels, C=1.0) if method == "refit" else None

    new, _ = correct_probe(old, shortcut, method, training)
    new.save(tmp_path / f"corrected{suffix}")
    loaded = LinearProbe.load(tmp_path / f"corrected{suffix}")

    assert _stored_weight(tmp_path / f"corrected{suffix}").shape == _stored_weight(path).shape
    assert loaded.class_names == old.class_names and loaded.normalization == normalization
    assert loaded.weight.shape == old.weight.shape and loaded.stored_rows == old.stored_rows
    assert torch.equal(loaded.mean, old.mean) and torch.equal(loaded.scale, old.scale)
    assert torch.equal(loaded(embeddings).argmax(1), new(embeddings).argmax(1))
    assert torch.allclose(loaded(embeddings), new(embeddings), atol=1e-5)
    assert not torch.allclose(new.weight, old.weight)  # it is a new probe, not the old one saved again
    assert (new.weight.double() @ shortcut.basis.double().T).abs().max() <= 1e-5


def test_a_binary_refit_on_names_reads_the_training_labels_as_labels_csv_gives_them(problems):
    case = problems[(2, False)]
    x, y = case["train"].embeddings, case["train"].labels
    names = [BINARY[i] for i in y]

    by_index, _ = correct_probe(case["probe"], case["directions"], "refit", TrainingSplit(x, y, C=1.0))
    by_name, _ = correct_probe(case["probe"], case["directions"], "refit", TrainingSplit(x, names, C=1.0))

    assert torch.equal(by_index.weight, by_name.weight) and torch.equal(by_index.bias, by_name.bias)
    with pytest.raises(EngineError, match=r"training labels \['naevus'\] are not classes of the probe"):
        correct_probe(case["probe"], case["directions"], "refit", TrainingSplit(x, ["naevus"] + names[1:], C=1.0))


# --------------------------------------------------------------------------- measuring the directions

def _identity(x):
    return x


def test_a_latents_direction_is_what_removing_it_takes_from_the_features():
    """With an identity tail and no normalization, removing latent i takes exactly z_i D_i from the features."""
    sae = TopKSAE(DIM, 24, 3)
    init_from_sample(sae, torch.randn(256, DIM), seed=0)
    acts = torch.randn(200, DIM)
    z = sae.encode(acts)
    active = (z > 0).float()
    latents = [int(i) for i in active.sum(0).argsort()[-12:-10]]  # two latents active on some images, not all
    probe = LinearProbe(torch.randn(2, DIM), torch.zeros(2), BINARY, "none")

    shortcut = shortcut_directions(_identity, sae, probe, acts, latents, batch_size=64)

    for j, i in enumerate(latents):
        expected = (z[:, i].sum() / active[:, i].sum()) * sae.dictionary[i]
        assert torch.allclose(shortcut.vectors[j], expected, atol=1e-5)
        assert shortcut.n_active[j] == int(active[:, i].sum())
    clean = active[:, latents].sum(1) == 0
    assert shortcut.n_clean == int(clean.sum()) > 0
    assert torch.allclose(shortcut.clean_center, acts[clean].mean(0), atol=1e-5)
    assert torch.equal(shortcut.active, active[:, latents].bool())
    nothing = shortcut_directions(_identity, sae, probe, acts, [])
    assert nothing.rank == 0 and nothing.n_clean == 200
    assert torch.allclose(nothing.clean_center, acts.mean(0), atol=1e-5)


@pytest.mark.parametrize("layer, token", [(-1, "cls"), (-2, "cls"), (-2, "spatial")])
def test_shortcut_directions_on_a_tiny_vit_are_unit_orthogonal_and_as_wide_as_the_embedding(tiny, layer, token):
    model = tiny.model.eval()
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with capture_residual(model.visual, layer) as store, torch.no_grad():
        embeddings = model.encode_image(images)
    h = store["h"]
    sae = TopKSAE(h.shape[-1], 48, 4)
    init_from_sample(sae, select_tokens(h, token).reshape(-1, h.shape[-1]), seed=0)
    tail = VisionTail(model.visual, layer, token)
    gen = torch.Generator().manual_seed(3)
    probe = LinearProbe(torch.randn(3, 32, generator=gen), torch.randn(3, generator=gen), THREE, "l2",
                        mean=0.01 * torch.randn(32, generator=gen), scale=0.1 + torch.rand(32, generator=gen))
    acts = h[:, 0] if tail.cls_only else h
    pooled = sae.encode(select_tokens(acts, token))
    activity = (pooled.amax(1) if pooled.ndim == 3 else pooled) > 0
    frequency = activity.float().mean(0).masked_fill(~activity.any(0), 2.0)
    latents = frequency.argsort()[:3].tolist()  # the three rarest of the latents active somewhere

    shortcut = shortcut_directions(tail, sae, probe, acts, latents, token=token, batch_size=16)

    assert shortcut.basis.shape == (3, embeddings.shape[1])
    assert torch.allclose(shortcut.basis @ shortcut.basis.T, torch.eye(3), atol=1e-5)
    assert shortcut.redundant_latents == [] and shortcut.n_clean > 0
    assert torch.equal(shortcut.active, activity[:, latents])
    # the corrected probe's scores no longer move on average when a latent is removed from its images
    new, _ = correct_probe(probe, shortcut, "project")
    for j, latent in enumerate(latents):
        rows = activity[:, latent]
        before, after = tail(acts[rows]), shifted_outputs(tail, sae, _identity, acts[rows], latent, token=token)
        old_move = (probe(before) - probe(after)).mean(0)
        new_move = (new(before) - new(after)).mean(0)
        assert old_move.abs().max() > 1e-3
        assert new_move.abs().max() <= 1e-4 * max(1.0, float(old_move.abs().max()))


def test_a_latent_the_other_latents_already_span_adds_no_basis_vector():
    v, w = torch.randn(DIM), torch.randn(DIM)

    shortcut = ShortcutDirections.from_vectors(torch.stack([v, w, 2 * v - w]), torch.zeros(DIM), latents=[4, 9, 1])

    assert shortcut.rank == 2 and shortcut.redundant_latents == [1]
    assert torch.allclose(shortcut.basis @ shortcut.basis.T, torch.eye(2), atol=1e-6)


def test_a_latent_active_on_no_image_is_an_engine_error_naming_it():
    sae = TopKSAE(DIM, 24, 3)
    init_from_sample(sae, torch.randn(256, DIM), seed=0)
    silent = 5
    with torch.no_grad():
        sae.b_enc[silent] = -1e3  # never among the top k
    acts = torch.randn(50, DIM)
    assert int((sae.encode(acts)[:, silent] > 0).sum()) == 0
    probe = LinearProbe(torch.randn(2, DIM), torch.zeros(2), BINARY, "none")

    with pytest.raises(EngineError, match=rf"latents \[{silent}\] are active on no image"):
        shortcut_directions(_identity, sae, probe, acts, [silent])
    with pytest.raises(EngineError, match=r"latents \[24\] do not exist: the SAE has 24 latents"):
        shortcut_directions(_identity, sae, probe, acts, [24])


# --------------------------------------------------------------------------- refusals

def test_an_unknown_method_is_an_engine_error_naming_the_known_ones(problems):
    case = problems[(2, False)]

    with pytest.raises(EngineError, match="unknown correction method 'erase'; known: project, refit, reweight"):
        correct_probe(case["probe"], case["directions"], "erase")
    assert sorted(REGISTRY) == ["project", "refit", "reweight"]


def test_directions_of_the_wrong_width_are_an_engine_error_naming_both_widths(problems):
    case = problems[(2, False)]
    narrow = ShortcutDirections.from_vectors(torch.randn(1, 8), torch.zeros(8))

    for method in REGISTRY:
        with pytest.raises(EngineError, match="directions are 8 wide but the probe reads 16-dimensional features"):
            correct_probe(case["probe"], narrow, method, case["train"])


def test_a_refit_needs_the_training_split_and_every_class_in_it(problems):
    case = problems[(2, False)]
    x, y = case["train"].embeddings, np.asarray(case["train"].labels)

    with pytest.raises(EngineError, match="'refit' correction needs the probe's training split"):
        correct_probe(case["probe"], case["directions"], "refit")
    with pytest.raises(EngineError, match="no image of class.*melanoma"):
        correct_probe(case["probe"], case["directions"], "refit", TrainingSplit(x[y == 0], y[y == 0]))
    with pytest.raises(EngineError, match=r"training embeddings must be \[images, 16\]"):
        correct_probe(case["probe"], case["directions"], "refit", TrainingSplit(x[:, :8], y))


# --------------------------------------------------------------------------- the proof table

def test_compare_probes_counts_accuracy_overall_per_class_and_on_each_slice():
    # the old probe calls everything melanoma, the new one reads the first coordinate's sign
    old = LinearProbe(torch.zeros(1, 2), torch.tensor([1.0]), BINARY, "none")
    new = LinearProbe(torch.tensor([[1.0, 0.0]]), torch.zeros(1), BINARY, "none")
    x = torch.tensor([[-1.0, 0], [-1.0, 0], [1.0, 0], [1.0, 0], [-1.0, 0]])
    labels = np.array([0, 0, 1, 1, 1])  # the last melanoma looks like a nevus
    slices = {"nevus, ruler=1": np.array([1, 1, 0, 0, 0], bool), "empty": np.zeros(5, bool)}

    table = compare_probes(old, new, x, labels, slices, reference=new)

    assert table["overall"] == {"n": 5, "old": 0.6, "new": 0.8, "reference": 0.8, "change": pytest.approx(0.2),
                                "gap_closed": 1.0}
    assert table["per_class"]["nevus"] == {"n": 2, "old": 0.0, "new": 1.0, "reference": 1.0, "change": 1.0,
                                           "gap_closed": 1.0}
    assert table["per_class"]["melanoma"]["old"] == 1.0 and table["per_class"]["melanoma"]["new"] == 2 / 3
    assert table["slices"]["nevus, ruler=1"]["new"] == 1.0
    assert table["slices"]["empty"] == {"n": 0, "old": None, "new": None, "reference": None, "change": None,
                                        "gap_closed": None}
    assert table["changed_predictions"] == 3
    assert gap_closed(0.2, 0.6, 0.7) == pytest.approx(0.8)


def test_harm_slices_split_each_flag_and_metadata_column():
    active = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [0, 0], [1, 0]], dtype=torch.bool)
    shortcut = ShortcutDirections.from_vectors(torch.eye(4)[:2], torch.zeros(4), latents=[12, 30])
    shortcut.active = active
    labels = np.array([1, 1, 0, 0, 1, 0])
    metadata = {"ruler": ["1", "0", "1", "", "0", "1"], "site": ["head", "arm", "arm", "leg", "head", "arm"]}

    slices = harm_slices(shortcut, labels, BINARY, [("melanoma", 12)], metadata)

    assert slices["melanoma, latent 12 active"].tolist() == [True, False, False, False, False, False]
    assert slices["melanoma, latent 12 inactive"].tolist() == [False, True, False, False, True, False]
    assert slices["nevus, latent 12 active"].tolist() == [False, False, True, False, False, True]
    assert slices["nevus, latent 12 inactive"].tolist() == [False, False, False, True, False, False]
    assert slices["ruler=0"].tolist() == [False, True, False, False, True, False]  # an empty cell is neither side
    assert slices["melanoma, ruler=0"].tolist() == [False, True, False, False, True, False]
    assert slices["nevus, ruler=1"].tolist() == [False, False, True, False, False, True]
    assert slices["site!=arm"].tolist() == [True, False, False, True, True, False]
    assert not any("latent 30" in name for name in slices)  # only the flags asked for
    with pytest.raises(EngineError, match="latent 7 is not one of the shortcut's latents"):
        harm_slices(shortcut, labels, BINARY, [("melanoma", 7)])


def test_the_service_knows_the_engines_methods_and_anchors_by_their_names():
    from workers.engine.config import ANCHORS, CORRECTION_METHODS, CorrectionOptions

    assert tuple(REGISTRY) == CORRECTION_METHODS
    assert CorrectionOptions.from_dict({"anchor": "clean"}).anchor == "clean"
    for bad, words in (({"anchor": "middle"}, "anchor"), ({"C": 0}, "C"), ({"C": "1"}, "C"),
                       ({"max_clean_drop": 2}, "max_clean_drop"), ({"tolerance": 1}, "tolerance")):
        with pytest.raises(EngineError, match=words):
            CorrectionOptions.from_dict(bad)
    assert set(ANCHORS) == {"mean", "midpoint", "clean"}


def test_a_concepts_direction_is_its_within_class_regression_slope_scaled_to_where_it_is_active():
    """With an identity tail and no normalization the features are the activations: the direction is the mean over
    classes of Cov_k(x, s) / Var_k(s), times the mean of s where the concept is active, computed here by hand."""
    from workers.engine.correction import concept_directions

    sae = TopKSAE(DIM, 24, 3)
    init_from_sample(sae, torch.randn(256, DIM), seed=0)
    acts = torch.randn(300, DIM)
    labels = torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(1))
    z = sae.encode(acts)
    order = (z > 0).float().sum(0).argsort()
    concept = [int(order[-12]), int(order[-11])]  # two latents active on some images, not all
    probe = LinearProbe(torch.randn(2, DIM), torch.zeros(2), BINARY, "none")

    shortcut = concept_directions(_identity, sae, probe, acts, [concept], labels, batch_size=64)

    x, s = acts.double(), z[:, concept].sum(1).double()
    slopes = [((x[labels == k] - x[labels == k].mean(0)) * (s[labels == k] - s[labels == k].mean())[:, None]).mean(0)
              / s[labels == k].var(unbiased=False) for k in (0, 1)]
    expected = torch.stack(slopes).mean(0) * s[s > 0].mean()
    assert torch.allclose(shortcut.vectors[0].double(), expected, atol=1e-4)
    assert shortcut.latents == [concept[0]] and shortcut.concepts == [concept] and shortcut.rank == 1
    assert shortcut.active_latents == concept and torch.equal(shortcut.active, z[:, concept] > 0)
    assert torch.allclose(shortcut.mean_center, acts.mean(0), atol=1e-5)
    assert torch.allclose(shortcut.anchor(), acts.mean(0), atol=1e-5)  # the default anchor: the mean
    assert shortcut.to_dict()["estimate"] == "regression" and shortcut.n_active == [int((s > 0).sum())]
    # each latent of the concept keeps its own activity, for the flag's slices
    assert torch.equal(shortcut.activity(concept[1]), z[:, concept[1]] > 0)
    with pytest.raises(EngineError, match="labels for"):
        concept_directions(_identity, sae, probe, acts, [concept], labels[:-1])
    silent = int(order[0])
    if int((z[:, silent] > 0).sum()) == 0:
        with pytest.raises(EngineError, match=rf"the concept of latents \[{silent}\] is active on no image"):
            concept_directions(_identity, sae, probe, acts, [[silent]], labels)


def test_flags_of_one_concept_are_corrected_as_one_concept():
    from workers.engine.correction import concept_groups

    assert concept_groups([[48, 38, 61], [7], [38, 12], [9, 7]]) == [[48, 38, 61, 12], [7, 9]]
    assert concept_groups([[3], [3]]) == [[3]]
