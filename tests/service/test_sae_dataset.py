"""An audit whose SAE is trained on another (larger, unlabelled) dataset of the project."""
import io
import zipfile

import numpy as np
import pytest
from django.test import Client

from audit_service.audits.models import Audit, Status
from audit_service.audits.services import create_audit
from audit_service.projects.models import Membership, Project, Role
from audit_service.registry import services
from audit_service.registry.services import RegistrationError
from tests.support.synthetic import draw_image
from workers import tasks
from workers.celery import app
from workers.storage import SharedWork

from .conftest import FAST_AUDIT, upload

pytestmark = pytest.mark.django_db

N_SAE_IMAGES = 40  # the audited dataset has 32


def unlabelled_zip(path, n: int = N_SAE_IMAGES):
    """Images alone: no labels.csv, no class folders."""
    rng = np.random.default_rng(3)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            buf = io.BytesIO()
            draw_image(rng, i % 2).save(buf, format="PNG")
            zf.writestr(f"img-{i:03d}.png", buf.getvalue())
    return path


@pytest.fixture
def sae_dataset(project, users, tmp_path):
    return services.register_dataset(project=project, user=users["member"], name="unlabelled skin",
                                     archive=upload(unlabelled_zip(tmp_path / "u.zip")), purpose="sae_training")


def submit(client, project, registered, **fields):
    return client.post("/api/v1/audits/", {
        "project": project.id, "clip_model": registered["model"].id, "probe": registered["probe"].id,
        "dataset": registered["dataset"].id, "config": FAST_AUDIT, **fields}, format="json")


def test_an_audit_trains_its_sae_on_its_sae_dataset(client_for, project, registered, sae_dataset):
    response = submit(client_for("member"), project, registered, sae_dataset=sae_dataset.id)
    assert response.status_code == 201, response.json()
    assert response.json()["sae_dataset"] == sae_dataset.id
    audit = Audit.objects.get()
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.result["sae"]["n_train_vectors"] == N_SAE_IMAGES  # CLS token: one vector per image
    assert audit.result["dataset"]["n_images"] == 32  # attribution ran on the audited dataset
    assert audit.result["sae_dataset"] == {"id": sae_dataset.id, "name": "unlabelled skin",
                                           "n_images": N_SAE_IMAGES}
    own = create_audit(project=project, user=sae_dataset.created_by, clip_model=registered["model"],
                       probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    tasks.run_audit.apply(args=[own.pk])
    own.refresh_from_db()
    assert own.result["sae"]["n_train_vectors"] == 32 and own.result["sae_dataset"] is None


@pytest.fixture
def eager():
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def test_a_sharded_audit_trains_its_sae_on_its_sae_dataset(project, users, registered, sae_dataset, settings,
                                                           eager):
    settings.AUDIT_SHARD_SIZE = 7
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT,
                         sae_dataset=sae_dataset)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.shards == 5
    assert audit.result["sae"]["n_train_vectors"] == N_SAE_IMAGES
    assert audit.result["sae_dataset"]["n_images"] == N_SAE_IMAGES
    assert not SharedWork(audit).path().exists()
    assert not (settings.AUDIT_WORK_DIR / f"audit-{audit.pk}").exists()


def test_an_sae_dataset_of_another_project_is_refused(client_for, project, registered, users, tmp_path):
    other = Project.objects.create(name="Radiology")
    Membership.objects.create(project=other, user=users["outsider"], role=Role.OWNER)
    theirs = services.register_dataset(project=other, user=users["outsider"], name="theirs",
                                       archive=upload(unlabelled_zip(tmp_path / "t.zip", n=4)),
                                       purpose="sae_training")
    response = submit(client_for("member"), project, registered, sae_dataset=theirs.id)
    assert response.status_code == 400
    assert response.json() == {"sae_dataset": ["no such dataset in this project"]}
    with pytest.raises(RegistrationError, match="the sae dataset belongs to another project"):
        create_audit(project=project, user=users["member"], clip_model=registered["model"],
                     probe=registered["probe"], dataset=registered["dataset"], sae_dataset=theirs)
    assert not Audit.objects.exists()


def test_a_dataset_registered_for_sae_training_cannot_be_audited(client_for, project, registered, sae_dataset):
    response = submit(client_for("member"), project, registered, dataset=sae_dataset.id)
    assert response.status_code == 400
    message = response.json()["dataset"][0]
    assert "'unlabelled skin' was registered for SAE training" in message and "sae_dataset" in message
    assert not Audit.objects.exists()


def test_a_dataset_that_trains_an_audits_sae_cannot_be_deleted(client_for, project, registered, users,
                                                               sae_dataset):
    create_audit(project=project, user=users["member"], clip_model=registered["model"], probe=registered["probe"],
                 dataset=registered["dataset"], sae_dataset=sae_dataset)
    response = client_for("member").delete(f"/api/v1/datasets/{sae_dataset.id}/")
    assert response.status_code == 400
    assert "trained the SAE of audits" in response.json()["detail"][0]


def test_the_audit_form_takes_an_sae_dataset_and_audits_only_labelled_datasets(project, users, registered,
                                                                               sae_dataset, sent):
    client = Client()
    client.force_login(users["member"])
    page = client.get(f"/projects/{project.pk}/audits/new/").content.decode()
    dataset_select = page[page.index('name="dataset"'):page.index('name="sae_dataset"')]
    assert "unlabelled skin" not in dataset_select and "lesions" in dataset_select
    assert "SAE training dataset" in page
    ok = client.post(f"/projects/{project.pk}/audits/new/", {
        "clip_model": registered["model"].pk, "probe": registered["probe"].pk, "dataset": registered["dataset"].pk,
        "sae_dataset": sae_dataset.pk, "causal": "on"})
    audit = Audit.objects.get()
    assert ok.status_code == 302 and audit.sae_dataset == sae_dataset
    detail = client.get(f"/audits/{audit.pk}/").content.decode()
    assert "SAE trained on unlabelled skin (40 images)" in detail
