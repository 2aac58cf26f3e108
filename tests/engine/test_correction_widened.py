"""A correction along the concept's widened images (``directions: widened``): the images its latents are active on
are read again along the direction they share in the probe's features, so that a concept covering part of an
artifact's images gives the artifact's direction, and that one direction is removed."""
import numpy as np
import pytest
import torch

from workers.engine.activations import ActivationStore
from workers.engine.config import AuditConfig, CorrectionOptions
from workers.engine.correct_audit import AuditedInputs, run_correction
from workers.engine.data import TensorImages
from workers.engine.directions import (ShortcutDirections, concept_directions, widened_directions, widened_presence,
                                       within_class_difference)
from workers.engine.errors import EngineError
from workers.engine.hooks import VisionTail

from .test_correction import BINARY
from .test_correction_column import _audited


def _artifact(seed=0, n=600):
    """Two classes (axis 1); an artifact on half the images (axis 0, +4); an SAE concept active on the artifact's
    images of one kind only (axis 2, +2 on those): precise, but a third of the artifact's images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    artifact = rng.random(n) < 0.5
    kind = artifact & (rng.random(n) < 0.35)
    features = rng.normal(size=(n, 6))
    features[:, 0] += 4 * artifact
    features[:, 1] += 3 * labels
    features[:, 2] += 2 * kind
    return torch.tensor(features), labels, artifact, kind


def _cos(vector, axis=0):
    return float(vector[axis] / vector.norm())


def test_widening_a_partial_concept_reaches_the_artifacts_images_and_direction():
    features, labels, artifact, concept = _artifact()
    widened = widened_presence(features, labels, concept)
    # the concept alone: precise, a third of the artifact; widened: nearly all of it, still precise
    assert (concept & artifact).sum() / artifact.sum() < 0.45
    assert (widened & artifact).sum() / artifact.sum() > 0.95 and (widened & artifact).sum() / widened.sum() > 0.95
    own, wide = (within_class_difference(features, labels, p) for p in (concept, widened))
    assert _cos(wide) > 0.95 > _cos(own) + 0.1  # the artifact's axis; the concept's own leans to its kind's
    # no step taken: the concept's own images
    assert np.array_equal(widened_presence(features, labels, concept, steps=0), concept)


def test_a_class_the_concept_is_not_seen_in_keeps_its_images_as_they_were():
    features, labels, _, concept = _artifact(seed=1)
    concept = concept & (labels == 1)  # never active on class 0: nothing there to read a side from
    widened = widened_presence(features, labels, concept)
    assert not widened[labels == 0].any() and widened[labels == 1].sum() > concept.sum()


def test_widened_directions_keep_the_latents_and_their_activity_and_refuse_without_images():
    features, labels, artifact, concept = _artifact(seed=2)
    measured = ShortcutDirections.from_vectors(torch.ones(1, 6), torch.zeros(6), [7])
    active = torch.tensor(np.stack([concept, np.zeros_like(concept)], 1))
    measured.active, measured.active_latents = active, [7, 9]
    out = widened_directions(measured, features, labels)
    marked = widened_presence(features, labels, concept)
    direction = within_class_difference(features, labels, marked)
    assert torch.allclose(out.basis[0].double(), direction / direction.norm(), atol=1e-6)
    assert out.latents == [7] and out.concepts == [[7, 9]] and out.n_active == [int(marked.sum())]
    assert torch.equal(out.activity(7), active[:, 0]) and out.to_dict()["estimate"] == "widened"
    with pytest.raises(EngineError, match="not measured on images"):
        widened_directions(ShortcutDirections.from_vectors(torch.ones(1, 6), torch.zeros(6), [7]), features, labels)


def test_a_widened_correction_removes_the_widened_direction_from_the_probe(tiny, tmp_path):
    px, _, embeddings, sae, latent, probe = _audited(tiny)
    y = torch.arange(40) % 2
    images = TensorImages(px, y, BINARY)
    config = AuditConfig(batch_size=16, device="cpu")
    audited = AuditedInputs(tiny, probe, images, sae, [("melanoma", latent)])

    outcome = run_correction(audited, config, CorrectionOptions(directions="widened"), method="project",
                             workdir=tmp_path)

    # what was removed: the regression's concept images, widened along the probe's features
    store = ActivationStore(tmp_path / "activations")
    measured = concept_directions(VisionTail(tiny.model.visual, config.layer, config.token), sae, probe, store,
                                  [[latent]], y, token=config.token, batch_size=16)
    with torch.no_grad():
        features = probe.features(embeddings[:40].float()).double()
    direction = widened_directions(measured, features, y).vectors[0].double()
    assert outcome.shortcut["estimate"] == "widened"
    new = outcome.probe
    assert float((new.weight.double() @ direction).abs().max()) < 1e-6 * float(direction.norm())
    assert float((probe.weight.double() @ direction).abs().max()) > 1e-3 * float(direction.norm())
    with pytest.raises(EngineError, match="directions: must be 'regression', 'removal' or 'widened', got 'wide'"):
        CorrectionOptions(directions="wide")
