"""A project's room for jobs (``max_concurrent_audits``) holds when requests arrive at once (issue 28, point 2):
simultaneous POSTs of audits, corrections and explanations, each in its own thread with its own database
connection, create no more jobs than the limit.

Each job's insert is slowed down, so that every request would pass a check made before the insert and apart
from it (the race six simultaneous requests won four times out of six); the room must be checked and taken in
one transaction that holds the project's row."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections
from rest_framework.test import APIClient

from audit_service.audits.models import Audit, Correction, Explanation, Status

from .test_corrections import audited, probe_flag  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)

AT_ONCE = 6
LIMIT = 2


def at_once(user, method: str, url: str, body: dict) -> list[int]:
    """The status codes of AT_ONCE requests sent together, each from its own thread and connection."""
    barrier = threading.Barrier(AT_ONCE)

    def send(_):
        client = APIClient()
        client.force_authenticate(user)
        try:
            barrier.wait()
            return getattr(client, method)(url, body, format="json").status_code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(AT_ONCE) as pool:
        return sorted(pool.map(send, range(AT_ONCE)))


@pytest.fixture
def slow_inserts(monkeypatch):
    """Each new job's row takes a while to write."""
    for model in (Audit, Correction, Explanation):
        save = model.save

        def slow_save(self, *args, _save=save, **kwargs):
            if self.pk is None:
                time.sleep(0.3)
            return _save(self, *args, **kwargs)

        monkeypatch.setattr(model, "save", slow_save)


def test_simultaneous_jobs_never_exceed_the_projects_room(audited, users, project, queue, slow_inserts):  # noqa: F811
    project.max_concurrent_audits = LIMIT
    project.save()
    member = users["member"]
    body = {"project": project.id, "clip_model": audited.clip_model_id, "probe": audited.probe_id,
            "dataset": audited.dataset_id}

    codes = at_once(member, "post", "/api/v1/audits/", body)

    assert codes == [201] * LIMIT + [400] * (AT_ONCE - LIMIT), codes
    assert Audit.objects.filter(status=Status.QUEUED).count() == LIMIT
    Audit.objects.filter(status=Status.QUEUED).update(status=Status.CANCELLED)

    codes = at_once(member, "post", f"/api/v1/audits/{audited.pk}/corrections/", {"flags": [probe_flag(audited).pk]})

    assert codes == [201] * LIMIT + [400] * (AT_ONCE - LIMIT), codes
    assert Correction.objects.count() == LIMIT
    Correction.objects.update(status=Status.CANCELLED)

    item = audited.dataset.labels()[0][0]
    codes = at_once(member, "post", f"/api/v1/audits/{audited.pk}/explain/", {"item": item})

    assert codes == [201] * LIMIT + [400] * (AT_ONCE - LIMIT), codes
    assert Explanation.objects.count() == LIMIT
