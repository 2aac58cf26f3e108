"""An audit submitted through the API runs on a real Celery worker process over real Redis, into real Postgres."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from .conftest import FAST_AUDIT, upload

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
REPO = Path(__file__).resolve().parents[2]


def require_real_services():
    missing = []
    if connection.vendor != "postgresql":
        missing.append("DATABASE_URL (PostgreSQL)")
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        missing.append("CELERY_BROKER_URL (Redis)")
    if missing:
        message = f"needs {' and '.join(missing)}; `bash .ci/run` sets them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def database_url() -> str:
    db = settings.DATABASES["default"]
    return (f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
            f"/{db['NAME']}")


def start_worker(tmp_path, name: str, beat: bool = False, **env_overrides) -> subprocess.Popen:
    """A real worker process in its own process group (``os.killpg`` kills it with its pool children)."""
    env = {**os.environ, "DATABASE_URL": database_url(), "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
           "MEDIA_ROOT": str(settings.MEDIA_ROOT), "AUDIT_WORK_DIR": str(settings.AUDIT_WORK_DIR),
           "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in env_overrides.items()}}
    command = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "gpu,default", "-c", "1",
               "--loglevel=INFO", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]
    if beat:
        command += ["-B", "-s", str(tmp_path / f"{name}-beat-schedule")]
    log = open(tmp_path / f"{name}.log", "a")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def purge_queues():
    import redis

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete("gpu", "default", "unacked", "unacked_index", "unacked_mutex")


def wait_for(client, audit_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/audits/{audit_id}/").json()
        seen.append((body["status"], body["stage"], body["percent"]))
        if body["status"] in ("succeeded", "failed", "cancelled"):
            body["seen"] = seen
            return body
        time.sleep(0.5)
    raise AssertionError(f"audit {audit_id} did not finish in {timeout}s; last states: {seen[-5:]}")


def test_an_audit_submitted_through_the_api_is_run_by_a_real_worker(client_for, project, assets, tmp_path):
    require_real_services()
    purge_queues()
    client = client_for("member")
    model = client.post("/api/v1/models/", {"project": project.id, "name": "tiny",
                                            "model_config": upload(assets["config"]),
                                            "checkpoint": upload(assets["checkpoint"])}, format="multipart")
    probe = client.post("/api/v1/probes/", {"project": project.id, "clip_model": model.json()["id"], "name": "p",
                                            "file": upload(assets["probe"])}, format="multipart")
    dataset = client.post("/api/v1/datasets/", {"project": project.id, "name": "lesions",
                                                "archive": upload(assets["dataset"])}, format="multipart")
    assert (model.status_code, probe.status_code, dataset.status_code) == (201, 201, 201)
    worker = start_worker(tmp_path, "itest")
    try:
        response = client.post("/api/v1/audits/", {
            "project": project.id, "clip_model": model.json()["id"], "probe": probe.json()["id"],
            "dataset": dataset.json()["id"], "config": FAST_AUDIT}, format="json")
        assert response.status_code == 201, response.json()
        final = wait_for(client, response.json()["id"])
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    log = (tmp_path / "itest.log").read_text()
    assert final["status"] == "succeeded", (final["error"], log[-3000:])
    assert final["percent"] == 100.0 and final["worker_host"] and final["device"] == "cpu"
    assert "workers.tasks.run_audit" in log and "succeeded" in log
    audit_id = final["id"]
    flags = client.get(f"/api/v1/audits/{audit_id}/flags/").json()
    summary = client.get(f"/api/v1/audits/{audit_id}/summary/").json()
    latents = client.get(f"/api/v1/audits/{audit_id}/latents/?ordering=-frequency").json()
    assert flags["count"] == sum(c["flags"]["probe"] + c["flags"]["zero_shot"] for c in summary["classes"].values())
    assert set(summary["classes"]) == {"melanoma", "nevus"}
    assert summary["classes"]["melanoma"]["images"] == 16
    assert latents["count"] == summary["sae"]["n_latents"] and latents["results"][0]["frequency"] > 0
    from audit_service.audits.models import Audit

    assert Audit.objects.get(pk=audit_id).result["classes"] == ["melanoma", "nevus"]
