"""Worker test fixtures: audit rows to claim and run, with media and scratch folders of their own.

These tests run no engine (the steps' work is replaced by small functions) and register no real model: the rows
they need are written directly. The engine end to end through the workers is in tests/service/
(test_audit_lifecycle.py, test_sharding.py).
"""
from types import SimpleNamespace

import pytest
from celery.exceptions import Retry

from audit_service.audits.models import Audit, Status
from audit_service.projects.models import Project
from audit_service.registry.models import ClipModel, Dataset, Probe
from tests.service.conftest import media, sent  # noqa: F401  (media: autouse)

N_IMAGES = 32


class FakeTask:
    """What the step runner reads of a bound Celery task: its retries so far and its limit; ``retry()`` returns
    the exception Celery's would raise (no message is sent)."""

    max_retries = 5

    def __init__(self, retries: int = 0):
        self.request = SimpleNamespace(retries=retries)

    def retry(self, exc=None, countdown=None, max_retries=None):
        return Retry(exc=exc, when=countdown)


@pytest.fixture
def new_audit(db):
    project = Project.objects.create(name="Dermatology")
    model = ClipModel.objects.create(project=project, name="tiny", embed_dim=64, n_blocks=2, width=64)
    probe = Probe.objects.create(project=project, clip_model=model, name="probe", file="probe.npz", sha256="0" * 64,
                                 class_names=["melanoma", "nevus"], embed_dim=64)
    dataset = Dataset.objects.create(project=project, name="lesions", sha256="1" * 64, storage_prefix="lesions",
                                     n_images=N_IMAGES, class_names=["melanoma", "nevus"],
                                     class_counts={"melanoma": 16, "nevus": 16})

    def make() -> Audit:
        return Audit.objects.create(project=project, clip_model=model, probe=probe, dataset=dataset)

    return make


@pytest.fixture
def audit(new_audit) -> Audit:
    return new_audit()


@pytest.fixture
def running(audit) -> Audit:
    """The audit, claimed by a worker on another host and running."""
    assert audit.claim("gpu-1:100")
    audit.mark_running("extract", 10.0)
    assert audit.status == Status.RUNNING
    return audit
