"""Service test fixtures: three personas in a project (owner, member, viewer), an outsider, and input files."""
import json
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from audit_service.audits.services import AUDIT
from audit_service.projects.models import Membership, Project, Role
from tests.support import synthetic
from workers.celery import app as celery_app


@pytest.fixture(autouse=True)
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.AUDIT_WORK_DIR = tmp_path / "work"
    return settings.MEDIA_ROOT


@pytest.fixture(autouse=True)
def fresh_cache():
    """Rate-limit counters and cached plots live in the cache: every test starts with an empty one."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture
def queue(monkeypatch) -> list[tuple[str, int]]:
    """(task name, id) of every job message sent; none reaches a broker."""
    calls = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, args=None, **kw: calls.append((name, args[0])))
    return calls


@pytest.fixture
def sent(monkeypatch) -> list[int]:
    """The ids of the audits sent to the workers (by task name, as the web process sends them); none of these
    messages reaches a broker."""
    calls = []
    send_task = celery_app.send_task

    def send_or_record(name, args=None, kwargs=None, **options):
        if name != AUDIT.task:
            return send_task(name, args, kwargs, **options)
        calls.append(args[0])

    monkeypatch.setattr(celery_app, "send_task", send_or_record)
    return calls


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """A tiny model (config + safetensors), a dataset zip and a probe fitted on it; built once per session."""
    folder = tmp_path_factory.mktemp("assets")
    config, ckpt = synthetic.write_tiny_model(folder)
    dataset = synthetic.write_dataset_zip(folder / "lesions.zip", per_class=16)
    probe = synthetic.fit_probe(config, ckpt, dataset, folder / "probe.npz")
    return {"config": config, "checkpoint": ckpt, "dataset": dataset, "probe": probe, "folder": folder}


def upload(path: Path, name: str | None = None) -> SimpleUploadedFile:
    return SimpleUploadedFile(name or path.name, path.read_bytes())


@pytest.fixture
def users(db):
    User = get_user_model()
    return {name: User.objects.create_user(name, password="pw-" + name)
            for name in ("owner", "member", "viewer", "outsider")}


@pytest.fixture
def web(users):
    """A Django test client signed in as one persona (the web pages' sessions)."""
    from django.test import Client

    def make(name: str | None) -> Client:
        client = Client()
        if name:
            client.force_login(users[name])
        return client

    return make


@pytest.fixture
def project(users):
    project = Project.objects.create(name="Dermatology")
    for name, role in (("owner", Role.OWNER), ("member", Role.MEMBER), ("viewer", Role.VIEWER)):
        Membership.objects.create(project=project, user=users[name], role=role)
    return project


@pytest.fixture
def client_for(users):
    def make(name: str | None) -> APIClient:
        client = APIClient()
        if name:
            client.force_authenticate(users[name])
        return client

    return make


@pytest.fixture
def registered(project, users, assets):
    """A model, a probe and a dataset registered in the project through the service layer."""
    from audit_service.registry import services

    model = services.register_model(project=project, user=users["member"], name="tiny",
                                    model_config=json.loads(assets["config"].read_text()),
                                    checkpoint=upload(assets["checkpoint"]))
    probe = services.register_probe(project=project, user=users["member"], name="melanoma probe",
                                    clip_model=model, file=upload(assets["probe"]))
    dataset = services.register_dataset(project=project, user=users["member"], name="lesions",
                                        archive=upload(assets["dataset"]))
    return {"model": model, "probe": probe, "dataset": dataset}


# flag_without_harm: the random tiny model harms nothing measurably, and the service tests need flags to store
FAST_AUDIT = {"sae": {"steps": 150}, "general_vocabulary": False, "faithfulness_max_images": 8,
              "faithfulness_steps": 4, "batch_size": 16, "flag_without_harm": True}


@pytest.fixture
def roots(settings, tmp_path):
    """A folder an admin allowed for datasets by reference."""
    root = tmp_path / "shared-data"
    root.mkdir()
    settings.DATASET_ROOTS = [str(root)]
    return root
