"""Registering models, probes and datasets through the API."""
import json
import zipfile

import numpy as np
import pytest

from audit_service.registry.models import ClipModel, Dataset, Probe
from workers.engine.tiny import tiny_config

from .conftest import upload

pytestmark = pytest.mark.django_db


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _register_model(client, project, assets, **extra):
    data = {"project": project.id, "name": "tiny", "model_config": upload(assets["config"]),
            "checkpoint": upload(assets["checkpoint"]), **extra}
    return client.post("/api/v1/models/", data, format="multipart")


def test_a_member_registers_a_custom_config_model_with_its_checkpoint(client_for, project, assets):
    response = _register_model(client_for("member"), project, assets, layer=-2)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["embed_dim"], body["n_blocks"], body["width"], body["layer"]) == (32, 3, 48, -2)
    assert len(body["checkpoint_sha256"]) == 64 and body["has_checkpoint"] is True
    assert ClipModel.objects.get().checkpoint.name.endswith("tiny-vit.safetensors")


def test_a_checkpoint_that_does_not_fit_names_the_tensors_and_keeps_nothing(client_for, project, assets, media):
    wide = dict(tiny_config(width=64))
    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "wrong", "model_config": json.dumps(wide),
        "checkpoint": upload(assets["checkpoint"])}, format="multipart")
    assert response.status_code == 400
    message = response.json()["checkpoint"][0]
    assert "shape mismatch" in message and "visual.conv1.weight" in message
    assert ClipModel.objects.count() == 0 and _files(media) == []


def test_a_layer_outside_the_model_is_refused(client_for, project, assets):
    response = _register_model(client_for("member"), project, assets, layer=5)
    assert response.status_code == 400
    assert "layer 5 does not exist" in response.json()["layer"][0]


def test_an_unknown_pretrained_tag_is_refused_with_the_known_ones(client_for, project):
    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "b32", "architecture": "ViT-B-32", "pretrained_tag": "no-such-tag"})
    assert response.status_code == 400
    assert "laion2b_s34b_b79k" in response.json()["pretrained_tag"][0]


def test_a_pretrained_tag_whose_weights_are_not_cached_is_refused_at_once_offline(client_for, project,
                                                                                 monkeypatch, tmp_path, settings):
    """Registration records the weights' digest, so it needs the weights: offline and uncached, it says how to
    provide them (nothing is downloaded, no row is made)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.MODEL_CACHE_DIR = str(tmp_path / "models")
    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "b32", "architecture": "ViT-B-32", "pretrained_tag": "laion2b_s34b_b79k"})
    assert response.status_code == 400, response.json()
    message = response.json()["pretrained_tag"][0]
    assert "not in this machine's cache and it is offline" in message and "checkpoint file" in message
    assert not ClipModel.objects.exists()


def test_a_probe_whose_width_does_not_match_the_model_is_refused_clearly(client_for, project, assets, tmp_path,
                                                                        media):
    client = client_for("member")
    model_id = _register_model(client, project, assets).json()["id"]
    before = _files(media)
    wide = tmp_path / "wide.npz"
    np.savez(wide, weight=np.ones((1, 64), np.float32), bias=np.zeros(1, np.float32),
             classes=np.array(["nevus", "melanoma"]))
    response = client.post("/api/v1/probes/", {"project": project.id, "clip_model": model_id, "name": "p",
                                               "file": upload(wide)}, format="multipart")
    assert response.status_code == 400
    assert response.json()["file"] == ["the probe reads 64-dimensional embeddings but the model produces "
                                       "32-dimensional ones; train the probe on this model's image embeddings"]
    assert Probe.objects.count() == 0 and _files(media) == before


def test_a_probe_registers_with_its_classes(client_for, project, assets):
    client = client_for("member")
    model_id = _register_model(client, project, assets).json()["id"]
    response = client.post("/api/v1/probes/", {"project": project.id, "clip_model": model_id, "name": "p",
                                               "file": upload(assets["probe"])}, format="multipart")
    assert response.status_code == 201, response.json()
    assert response.json()["class_names"] == ["melanoma", "nevus"]
    assert response.json()["embed_dim"] == 32


@pytest.mark.parametrize("with_csv", [True, False])
def test_a_dataset_archive_is_counted_validated_and_stored(client_for, project, tmp_path, with_csv):
    from tests.support.synthetic import write_dataset_zip

    archive = write_dataset_zip(tmp_path / "d.zip", per_class=5, with_csv=with_csv)
    response = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                                               "archive": upload(archive)}, format="multipart")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["n_images"] == 10
    assert body["class_counts"] == {"melanoma": 5, "nevus": 5}
    dataset = Dataset.objects.get()

    assert len(dataset.labels()) == 10


def test_a_single_class_dataset_is_refused_and_leaves_nothing(client_for, project, tmp_path, media):
    from tests.support.synthetic import write_dataset_zip

    archive = write_dataset_zip(tmp_path / "d.zip", class_names=("nevus",), per_class=3)
    response = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                                               "archive": upload(archive)}, format="multipart")
    assert response.status_code == 400
    assert "single class (nevus)" in response.json()["archive"][0]
    assert Dataset.objects.count() == 0 and _files(media) == []


def test_labels_that_do_not_match_the_files_are_reported_by_name(client_for, project, tmp_path):
    from tests.support.synthetic import write_dataset_zip

    archive = write_dataset_zip(tmp_path / "d.zip", per_class=3)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("images/stray.png", zf.read("images/nevus-0000.png"))
    response = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                                               "archive": upload(archive)}, format="multipart")
    assert response.status_code == 400
    assert "image without a label: images/stray.png" in response.json()["archive"][0]


def _metadata_zip(path, n: int = 24):
    """A labelled zip whose labels.csv carries a caption (free text), 'a ruler' (0/1) and 'site' columns; the
    CSV lists the images in reverse order (the stored dataset sorts them by path)."""
    import io

    from tests.support.synthetic import draw_image

    rng = np.random.default_rng(0)
    rows = ["image,label,caption,a ruler,site"]
    with zipfile.ZipFile(path, "w") as zf:
        for i in reversed(range(n)):
            label = ("nevus", "melanoma")[i % 2]
            buf = io.BytesIO()
            draw_image(rng, i % 2).save(buf, format="PNG")
            zf.writestr(f"images/{i:03d}.png", buf.getvalue())
            ruler = "1" if i % 3 == 0 else "0"
            site = ("back", "arm", "")[i % 3]
            rows.append(f'images/{i:03d}.png,{label},"a dermoscopy image of a {label}, number {i}",{ruler},{site}')
        zf.writestr("labels.csv", "\n".join(rows) + "\n")
    return path


def expected_metadata(n: int = 24) -> dict:
    return {"a ruler": ["1" if i % 3 == 0 else "0" for i in range(n)],
            "site": [("back", "arm", "")[i % 3] for i in range(n)]}


def test_metadata_columns_of_labels_csv_are_kept_and_free_text_is_dropped(client_for, project, tmp_path):
    from django.core.files.storage import default_storage

    archive = _metadata_zip(tmp_path / "d.zip")
    response = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                                               "archive": upload(archive)}, format="multipart")
    assert response.status_code == 201, response.json()
    assert response.json()["metadata_columns"] == ["a ruler", "site"]  # the caption has 24 distinct values
    assert response.json()["purpose"] == "audit"
    dataset = Dataset.objects.get()
    assert dataset.metadata_columns == ["a ruler", "site"]
    with default_storage.open(f"{dataset.storage_prefix}/labels.csv", "rb") as fh:
        lines = fh.read().decode().splitlines()
    assert lines[0] == "image,label,a ruler,site"
    assert lines[1] == "images/000.png,nevus,1,back" and lines[3] == "images/002.png,nevus,0,"
    rows, metadata = dataset.table()
    assert [rel for rel, _ in rows] == [f"images/{i:03d}.png" for i in range(24)]
    assert metadata == expected_metadata()
    listed = client_for("viewer").get(f"/api/v1/datasets/{dataset.pk}/").json()
    assert listed["metadata_columns"] == ["a ruler", "site"]


def test_the_audit_inputs_carry_the_metadata_in_image_order(project, users, registered, tmp_path):
    from audit_service.audits.services import create_audit
    from audit_service.registry import services
    from workers.inputs import load_inputs

    dataset = services.register_dataset(project=project, user=users["member"], name="with metadata",
                                        archive=upload(_metadata_zip(tmp_path / "d.zip")))
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=dataset)
    images = load_inputs(audit)[2]
    assert images.ids == [f"images/{i:03d}.png" for i in range(24)]
    assert images.metadata == expected_metadata()
    assert images.remap(["nevus", "melanoma"]).metadata == expected_metadata()


def _unlabelled_zip(path, n: int = 6, folder: str = ""):
    import io

    from tests.support.synthetic import draw_image

    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            buf = io.BytesIO()
            draw_image(rng, i % 2).save(buf, format="PNG")
            zf.writestr(f"{folder}img-{i:03d}.png", buf.getvalue())
    return path


@pytest.mark.parametrize("folder", ["", "skin/"])
def test_an_unlabelled_archive_registers_only_for_sae_training(client_for, project, tmp_path, media, folder):
    archive = _unlabelled_zip(tmp_path / "u.zip", folder=folder)
    client = client_for("member")
    refused = client.post("/api/v1/datasets/", {"project": project.id, "name": "u", "archive": upload(archive)},
                          format="multipart")
    assert refused.status_code == 400
    assert "SAE training only" in refused.json()["archive"][0]
    assert Dataset.objects.count() == 0 and _files(media) == []
    response = client.post("/api/v1/datasets/", {"project": project.id, "name": "u", "archive": upload(archive),
                                                 "purpose": "sae_training"}, format="multipart")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["purpose"], body["n_images"], body["class_names"], body["class_counts"]) == (
        "sae_training", 6, [], {})

    assert Dataset.objects.get().labels() == [(f"{folder}img-{i:03d}.png", "") for i in range(6)]


def test_an_unknown_dataset_purpose_is_refused(client_for, project, tmp_path):
    archive = _unlabelled_zip(tmp_path / "u.zip")
    response = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "u",
                                                               "archive": upload(archive), "purpose": "fun"},
                                         format="multipart")
    assert response.status_code == 400 and "purpose" in response.json()


@pytest.mark.django_db
def test_architectures_the_engine_cannot_audit_are_refused_at_registration_naming_the_reason(project, users, assets):
    """docs/engine.md "Supported architectures": timm towers (SigLIP), ResNets and CoCa are refused before anything is
    built or downloaded; a model that needs Hugging Face's transformers is refused while it is not installed."""
    import importlib.util

    from audit_service.registry.models import ClipModel
    from audit_service.registry.services import RegistrationError, register_model

    cases = [("ViT-B-16-SigLIP", "cls", "timm model"), ("RN50", "cls", "ResNet"), ("coca_ViT-B-32", "cls", "CoCa")]
    if importlib.util.find_spec("transformers") is None:  # average-pooled: its last layer is read at every patch
        cases.append(("ViT-L-14-CLIPA", "spatial", "transformers"))
    for architecture, token, words in cases:
        with pytest.raises(RegistrationError, match=words) as refused:
            register_model(project=project, user=users["member"], name=architecture, architecture=architecture,
                           pretrained_tag="any", token=token)
        assert refused.value.field == "architecture", architecture
    assert not ClipModel.objects.exists()
