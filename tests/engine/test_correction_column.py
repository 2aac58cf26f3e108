"""A correction along a labels.csv column: the direction removed is the one between the images the column marks
and the others, within each class, instead of the SAE concept's; refused at once when the column is not there or
not 0/1; one round; a training split with the column says which of its images show the concept."""
import numpy as np
import pytest
import torch

from workers.engine.config import AuditConfig, CorrectionOptions
from workers.engine.correct_audit import AuditedInputs, run_correction
from workers.engine.columns import binary_column
from workers.engine.data import TensorImages
from workers.engine.directions import ShortcutDirections, column_directions, within_class_difference
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.hooks import capture_residual, select_tokens
from workers.engine.rounds import next_round
from workers.engine.sae import TopKSAE, init_from_sample

from .test_correction import BINARY
from .test_reweight import _sometimes_active


def test_the_within_class_difference_is_the_mean_over_classes_of_with_minus_without():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 6)
    shows = np.array([1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0], bool)
    features = torch.tensor(rng.normal(size=(12, 4)))
    expected = ((features[[0, 1]].mean(0) - features[[2, 3, 4, 5]].mean(0))
                + (features[[6, 7, 8, 9]].mean(0) - features[[10, 11]].mean(0))) / 2
    assert torch.allclose(within_class_difference(features, labels, shows), expected)
    one_sided = shows.copy()
    one_sided[:6] = False  # a class seen on one side only gives no difference: the other class's alone counts
    assert torch.allclose(within_class_difference(features, labels, one_sided),
                          features[[6, 7, 8, 9]].mean(0) - features[[10, 11]].mean(0))
    # the class signal is not the concept's: features that differ by class alone give no direction
    by_class = torch.tensor(np.where(labels[:, None] == 1, 3.0, -3.0) * np.ones((12, 4)))
    assert torch.allclose(within_class_difference(by_class, labels, shows), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(EngineError, match="no class has images both with and without"):
        within_class_difference(features, labels, labels == 1)


def test_a_column_gives_the_shortcut_its_direction_and_keeps_the_latents_activity():
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    shows = rng.random(40) < 0.5
    features = torch.tensor(rng.normal(size=(40, 6)))
    active = torch.tensor(rng.random((40, 2)) < 0.3)
    sae_measured = ShortcutDirections.from_vectors(torch.ones(1, 6), torch.zeros(6), [7])
    sae_measured.active, sae_measured.active_latents = active, [7, 9]

    out = column_directions(sae_measured, features, labels, shows, "ruler")

    direction = within_class_difference(features, labels, shows)
    assert torch.allclose(out.basis[0].double(), direction / direction.norm(), atol=1e-6)
    assert out.latents == [7] and out.active_latents == [7, 9] and out.concepts == [[7, 9]]
    assert torch.equal(out.activity(9), active[:, 1]) and out.to_dict()["estimate"] == "column"
    assert torch.allclose(out.anchor(), features.mean(0).float())
    assert torch.allclose(out.anchor("clean"), features[torch.from_numpy(~shows)].mean(0).float())
    for marks, words in ((np.ones(40, bool), "marks every audited image"), (np.zeros(40, bool), "marks no")):
        with pytest.raises(EngineError, match=words):
            column_directions(sae_measured, features, labels, marks, "ruler")


def test_a_column_is_read_as_zero_or_one_and_a_wrong_one_is_refused_naming_what_is_there():
    metadata = {"ruler": ["1", "0", "true", "", "No", "YES"], "site": ["arm"] * 6}
    assert binary_column(metadata, "ruler").tolist() == [True, False, True, False, False, True]
    with pytest.raises(EngineError, match=r"labels.csv has no column 'rulers' \(its extra columns: ruler, site\)"):
        binary_column(metadata, "rulers")
    with pytest.raises(EngineError, match="column 'site' must hold 0/1 .* to mark it; it holds arm"):
        binary_column(metadata, "site", "to mark it")


def test_a_correction_along_a_column_needs_no_next_round():
    tracking = [{"concept": [1, 2], "latents": {"9": 0.9}}]
    assert next_round([[1, 2]], tracking, [9, 2])["changed"] is True
    step = next_round([[1, 2]], tracking, [9, 2], column=True)
    assert step == {"added": [[9]], "split": [], "concepts": [[1, 2]], "changed": False}


def _audited(tiny, n=40, n_train=60, seed=7):
    """A tiny model's images, an SAE on their CLS tokens, a latent active on some of them and a random probe."""
    gen = torch.Generator().manual_seed(seed)
    px, train_px = torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n_train, 3, 32, 32, generator=gen)
    with capture_residual(tiny.model.eval().visual, -1) as store, torch.no_grad():
        embeddings = tiny.model.encode_image(torch.cat([px, train_px]))
    sae = TopKSAE(48, 48, 4)
    init_from_sample(sae, select_tokens(store["h"], "cls"), seed=0)
    with torch.no_grad():
        code = sae.encode(select_tokens(store["h"], "cls"))
    latent = _sometimes_active(code[:n], code[n:])
    probe = LinearProbe(torch.randn(1, 32, generator=gen), torch.zeros(1), BINARY)
    return px, train_px, embeddings, sae, latent, probe


def test_a_correction_along_a_column_removes_the_columns_direction_from_the_probe(tiny, tmp_path):
    px, _, embeddings, sae, latent, probe = _audited(tiny)
    y = torch.arange(40) % 2
    marks = ["1" if i % 3 == 0 else "0" for i in range(40)]
    images = TensorImages(px, y, BINARY, metadata={"ruler": marks, "site": ["arm"] * 40})
    audited = AuditedInputs(tiny, probe, images, sae, [("melanoma", latent)])

    outcome = run_correction(audited, AuditConfig(batch_size=16, device="cpu"), CorrectionOptions(column="ruler"),
                             method="project", workdir=tmp_path)

    with torch.no_grad():
        features = probe.features(embeddings[:40].float()).double()
    direction = within_class_difference(features, y.numpy(), np.array(marks) == "1")
    new = outcome.probe
    assert outcome.shortcut["estimate"] == "column" and outcome.shortcut["n_active"] == [14]
    # the new probe reads nothing along the column's direction; the old one did
    assert float((new.weight.double() @ direction).abs().max()) < 1e-6 * float(direction.norm())
    assert float((probe.weight.double() @ direction).abs().max()) > 1e-3 * float(direction.norm())
    # the SAE's direction is not what was removed
    sae_outcome = run_correction(audited, AuditConfig(batch_size=16, device="cpu"), CorrectionOptions(),
                                 method="project", workdir=tmp_path / "sae")
    assert not torch.allclose(sae_outcome.probe.weight, new.weight, atol=1e-4)

    for column, words in (("rulers", "labels.csv has no column 'rulers'"), ("site", "column 'site' must hold 0/1")):
        with pytest.raises(EngineError, match=words):
            run_correction(audited, AuditConfig(batch_size=16, device="cpu"), CorrectionOptions(column=column),
                           method="project", workdir=tmp_path / column)
        assert not (tmp_path / column).exists()  # refused before any work


def test_a_training_split_with_the_column_says_which_of_its_images_show_the_concept(tiny, tmp_path):
    px, train_px, _, sae, latent, probe = _audited(tiny)
    y, train_y = torch.arange(40) % 2, torch.arange(60) % 2
    marks = ["1" if i % 3 == 0 else "0" for i in range(40)]
    train_marks = ["1" if (i % 2 == 1) == (i % 5 != 0) else "0" for i in range(60)]  # mostly with melanoma
    images = TensorImages(px, y, BINARY, metadata={"ruler": marks})
    audited = AuditedInputs(tiny, probe, images, sae, [("melanoma", latent)])
    ids = [f"train-{i:03d}.png" for i in range(60)]

    outcome = run_correction(audited, AuditConfig(batch_size=16, device="cpu"), CorrectionOptions(column="ruler"),
                             method="reweight",
                             training=TensorImages(train_px, train_y, BINARY, ids=ids, metadata={"ruler": train_marks}),
                             workdir=tmp_path)

    shows = np.array(train_marks) == "1"
    data = outcome.training_data
    assert data["column"] == "ruler" and data["with_concept"] == int(shows.sum())
    assert [row["image"] for row in data["rows"]] == [ids[i] for i in np.flatnonzero(shows)]
    assert all(row["activation"] is None for row in data["rows"])
    assert outcome.info["weighting"] == "cells"
    for k, name in enumerate(BINARY):
        assert outcome.info["counts_before"][name] == {"with": int((shows & (train_y.numpy() == k)).sum()),
                                                       "without": int((~shows & (train_y.numpy() == k)).sum())}
    # without the column in the training split, the SAE says which images show it, as before
    plain = run_correction(audited, AuditConfig(batch_size=16, device="cpu"), CorrectionOptions(column="ruler"),
                           method="reweight", training=TensorImages(train_px, train_y, BINARY, ids=ids),
                           workdir=tmp_path / "plain")
    assert plain.training_data["column"] is None and plain.info["weighting"] == "propensity"
