"""Models by name: an open_clip model on the Hugging Face hub (hf-hub:ORG/NAME), read from the model cache
(MODEL_CACHE_DIR) with the machine offline, its weights' digest recorded at registration and checked by the
worker; an uncached name fails at once, saying how to provide it."""
import hashlib
import json
import shutil

import pytest

from audit_service.audits.models import Status
from audit_service.audits.services import create_audit
from audit_service.registry.models import ClipModel
from workers import tasks

from .conftest import FAST_AUDIT, upload

pytestmark = pytest.mark.django_db
REPO = "acme/tiny-lesion-clip"


@pytest.fixture
def hub_cache(tmp_path, settings, monkeypatch, assets):
    """A Hugging Face cache holding REPO as huggingface_hub lays one out (refs/main -> a snapshot), offline."""
    cache = tmp_path / "models"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    config = {"model_cfg": json.loads(assets["config"].read_text()),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(assets["checkpoint"], snapshot / "open_clip_model.safetensors")
    settings.MODEL_CACHE_DIR = str(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_a_hub_model_registers_from_the_cache_with_its_digest_and_is_audited(client_for, project, users, assets,
                                                                            hub_cache):
    response = client_for("member").post("/api/v1/models/", {"project": project.id, "name": "hub",
                                                             "architecture": f"hf-hub:{REPO}"})
    assert response.status_code == 201, response.json()
    model = ClipModel.objects.get()
    weights = (hub_cache / "open_clip_model.safetensors").read_bytes()
    assert model.checkpoint_sha256 == hashlib.sha256(weights).hexdigest() and not model.checkpoint
    config = json.loads(assets["config"].read_text())
    assert model.source == f"hf-hub:{REPO} (Hugging Face hub)" and model.n_blocks == config["vision_cfg"]["layers"]
    from audit_service.registry import services

    probe = services.register_probe(project=project, user=users["member"], name="probe", clip_model=model,
                                    file=upload(assets["probe"]))
    dataset = services.register_dataset(project=project, user=users["member"], name="lesions",
                                        archive=upload(assets["dataset"]))
    audit = create_audit(project=project, user=users["member"], clip_model=model, probe=probe, dataset=dataset,
                         options=FAST_AUDIT)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error

    # the cache now holds other weights (the repository moved on): the worker refuses them
    weights_file = hub_cache / "open_clip_model.safetensors"
    weights_file.write_bytes(weights[:-8] + bytes(8))
    again = create_audit(project=project, user=users["member"], clip_model=model, probe=probe, dataset=dataset,
                         options=FAST_AUDIT)
    tasks.run_audit.apply(args=[again.pk])
    again.refresh_from_db()
    assert again.status == Status.FAILED and "are not the ones registered" in again.error


def test_an_uncached_hub_model_is_refused_at_once_offline_and_bad_names_are_refused(client_for, project,
                                                                                   hub_cache):
    client = client_for("member")
    for architecture, words in ((f"hf-hub:{REPO}-large", "this machine is offline"),
                                ("hf-hub:no-slash", "write hf-hub:ORG/NAME")):
        response = client.post("/api/v1/models/", {"project": project.id, "name": "hub",
                                                   "architecture": architecture})
        assert response.status_code == 400 and words in response.json()["architecture"][0], response.json()
    response = client.post("/api/v1/models/", {"project": project.id, "name": "hub", "architecture": f"hf-hub:{REPO}",
                                               "pretrained_tag": "openai"})
    assert response.status_code == 400 and "brings its own weights" in response.json()["architecture"][0]
    assert not ClipModel.objects.exists()


def test_a_hub_models_preprocessing_is_the_one_its_config_gives(hub_cache):
    from workers.engine.loading import load_clip

    bundle = load_clip(f"hf-hub:{REPO}", cache_dir=str(hub_cache.parents[2]))
    normalize = [t for t in bundle.preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.25, 0.25, 0.25]
