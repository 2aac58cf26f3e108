"""Faults with real processes: a worker killed with SIGKILL mid-stage, and Redis restarted mid-audit.

Both run a real Celery worker over real Redis into real PostgreSQL (CI); outside CI without them they skip.
"""
import os
import signal
import subprocess
import time

import pytest
import redis
from django.conf import settings

from audit_service.audits.models import Audit, Flag, Latent, Status
from audit_service.audits.services import create_audit

from .conftest import FAST_AUDIT
from .test_integration import purge_queues, require_real_services, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
# long enough SAE training that the kill lands inside a stage
SLOW_AUDIT = {**FAST_AUDIT, "sae": {"steps": 1500}}


def wait(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(p.read_text()[-3000:] for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def audit_in(pk: int, *statuses, stage: str | None = None):
    audit = Audit.objects.get(pk=pk)
    return audit if audit.status in statuses and (stage is None or audit.stage == stage) else None


def submit(project, users, registered, options) -> Audit:
    return create_audit(project=project, user=users["member"], clip_model=registered["model"],
                        probe=registered["probe"], dataset=registered["dataset"], options=options)


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(process)


def findings(audit: Audit) -> tuple:
    flags = sorted((f.head, f.class_name, f.latent, f.rank, f.label, round(f.share, 4))
                   for f in Flag.objects.filter(audit=audit))
    labels = list(Latent.objects.filter(audit=audit).order_by("latent").values_list("label", flat=True))
    return flags, labels


def test_a_worker_killed_mid_stage_is_replaced_and_the_audit_finishes_once_with_undisturbed_results(
        project, users, registered, tmp_path):
    require_real_services()
    purge_queues()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    killed = submit(project, users, registered, SLOW_AUDIT)
    first = start_worker(tmp_path, "first")
    second = None
    try:
        wait(lambda: audit_in(killed.pk, Status.RUNNING, stage="train_sae"), 240, "the SAE stage", logs)
        kill_group(first)  # SIGKILL to the worker and its pool child, mid-stage
        left = Audit.objects.get(pk=killed.pk)
        assert left.status == Status.RUNNING and left.attempts == 1  # what a crash leaves behind
        second = start_worker(tmp_path, "second")  # reaps at start: the dead process's audit is requeued
        done = wait(lambda: audit_in(killed.pk, Status.SUCCEEDED, Status.FAILED), 300, "the resumed audit", logs)
        assert done.status == Status.SUCCEEDED, done.error
        assert done.attempts == 2 and done.percent == 100.0
        assert Latent.objects.filter(audit=done).count() == done.result["sae"]["n_latents"]
        assert Flag.objects.filter(audit=done).count() == len(done.result["flags"])

        undisturbed = submit(project, users, registered, SLOW_AUDIT)
        clean = wait(lambda: audit_in(undisturbed.pk, Status.SUCCEEDED, Status.FAILED), 300, "the clean run", logs)
        assert clean.status == Status.SUCCEEDED and clean.attempts == 1
        assert findings(done) == findings(clean)
        assert done.result["sae"]["fvu"] == pytest.approx(clean.result["sae"]["fvu"], rel=1e-5)
    finally:
        stop(first)
        if second:
            stop(second)
    assert "reaper" in logs[1].read_text()  # the second worker said what it picked up


def restart_redis() -> None:
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    folder = client.config_get("dir")["dir"]
    port = client.connection_pool.connection_kwargs.get("port", 6379)
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it stops
    wait(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0,
         30, "Redis to stop")
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
                    "--save", "", "--appendonly", "no", "--dir", folder], check=True, capture_output=True)
    wait(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip()
         == b"PONG", 30, "Redis to start")


def test_a_redis_restart_mid_audit_loses_no_audit(project, users, registered, tmp_path):
    require_real_services()
    purge_queues()
    log = tmp_path / "worker.log"
    worker = start_worker(tmp_path, "worker", beat=True, AUDIT_REAP_EVERY_SECONDS=2,
                          AUDIT_REQUEUE_QUEUED_AFTER_SECONDS=5)
    try:
        running = submit(project, users, registered, SLOW_AUDIT)
        waiting = submit(project, users, registered, FAST_AUDIT)  # queued behind it; its message lives in Redis
        wait(lambda: audit_in(running.pk, Status.RUNNING, stage="train_sae"), 240, "the SAE stage", [log])
        restart_redis()  # no persistence: the queued audit's message is gone with it
        for pk in (running.pk, waiting.pk):
            audit = wait(lambda pk=pk: audit_in(pk, Status.SUCCEEDED, Status.FAILED), 300, f"audit {pk}", [log])
            assert audit.status == Status.SUCCEEDED, audit.error
            assert Flag.objects.filter(audit=audit).count() == len(audit.result["flags"])
    finally:
        stop(worker)
    assert "resent" in log.read_text()  # the lost message was sent again by the reaper
