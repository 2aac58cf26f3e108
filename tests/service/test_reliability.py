"""Faults, in-process: the reaper, claiming an audit once, stage time limits, transient database errors."""
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.db import OperationalError
from django.utils import timezone

from audit_service.audits import models as audit_models
from audit_service.audits.liveness import owner_alive
from audit_service.audits.models import Audit, Flag, Latent, Status
from audit_service.audits.services import create_audit
from workers import tasks

from .conftest import FAST_AUDIT

pytestmark = pytest.mark.django_db


@pytest.fixture
def audit(project, users, registered):
    return create_audit(project=project, user=users["member"], clip_model=registered["model"],
                        probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)


@pytest.fixture
def dead_pid():
    """The pid of a process on this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def running(audit, *, owner: str, heartbeat_age: float = 0.0, attempts: int = 1):
    Audit.objects.filter(pk=audit.pk).update(
        status=Status.RUNNING, stage="train_sae", percent=40.0, worker_host=owner, attempts=attempts,
        started_at=timezone.now(), heartbeat_at=timezone.now() - timedelta(seconds=heartbeat_age))
    audit.refresh_from_db()
    return audit


def test_the_reaper_requeues_an_audit_whose_worker_process_died(audit, sent, dead_pid,
                                                                django_capture_on_commit_callbacks):
    running(audit, owner=f"{socket.gethostname()}:{dead_pid}")  # fresh heartbeat, but the process is gone
    with django_capture_on_commit_callbacks(execute=True):
        done = tasks.reap_stale_audits()
    audit.refresh_from_db()
    assert done["requeued"] == [audit.pk] and sent == [audit.pk]
    assert audit.status == Status.QUEUED and audit.stage == "requeued"


def test_the_reaper_requeues_a_silent_worker_elsewhere_and_leaves_live_ones_alone(audit, project, users, registered,
                                                                                   sent, settings,
                                                                                   django_capture_on_commit_callbacks):
    settings.AUDIT_STALE_AFTER_SECONDS = 60
    other = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=registered["dataset"], options=FAST_AUDIT)
    running(audit, owner="gpu-7:1234", heartbeat_age=61)  # another host, heartbeat stopped
    running(other, owner="gpu-8:1234", heartbeat_age=5)  # another host, beating
    with django_capture_on_commit_callbacks(execute=True):
        done = tasks.reap_stale_audits()
    assert done["requeued"] == [audit.pk] and sent == [audit.pk]
    assert Audit.objects.get(pk=other.pk).status == Status.RUNNING


def test_the_reaper_gives_up_an_audit_that_used_all_its_attempts(audit, sent, dead_pid, settings):
    running(audit, owner=f"{socket.gethostname()}:{dead_pid}", attempts=settings.AUDIT_MAX_ATTEMPTS)
    assert tasks.reap_stale_audits()["failed"] == [audit.pk]
    audit.refresh_from_db()
    assert audit.status == Status.FAILED and "given up after AUDIT_MAX_ATTEMPTS" in audit.error
    assert audit.finished_at is not None and sent == []


def test_the_reaper_resends_a_queued_audit_whose_message_a_broker_may_have_lost(audit, sent, settings):
    settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS = 600
    Audit.objects.filter(pk=audit.pk).update(enqueued_at=timezone.now() - timedelta(seconds=300))
    assert tasks.reap_stale_audits()["resent"] == []
    Audit.objects.filter(pk=audit.pk).update(enqueued_at=timezone.now() - timedelta(seconds=601))
    assert tasks.reap_stale_audits()["resent"] == [audit.pk] and sent == [audit.pk]
    assert timezone.now() - Audit.objects.get(pk=audit.pk).enqueued_at < timedelta(seconds=5)


def test_a_delivery_of_an_audit_another_live_worker_runs_is_ignored(audit):
    running(audit, owner=f"{socket.gethostname()}:{os.getppid()}")  # a live process on this host, beating
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.RUNNING and audit.attempts == 1 and not Latent.objects.filter(audit=audit).exists()


def test_a_redelivered_audit_whose_worker_died_is_run_once_more_and_completes(audit, dead_pid):
    running(audit, owner=f"{socket.gethostname()}:{dead_pid}")
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED and audit.attempts == 2
    assert audit.worker_host == f"{socket.gethostname()}:{os.getpid()}"
    n_flags = Flag.objects.filter(audit=audit).count()
    tasks.run_audit.apply(args=[audit.pk])  # the same message delivered again: nothing changes
    assert Flag.objects.filter(audit=audit).count() == n_flags == len(Audit.objects.get(pk=audit.pk).result["flags"])


def test_only_one_of_two_deliveries_that_read_the_same_row_claims_it(audit, monkeypatch):
    # Delivery A reads the queued row; before it claims, delivery B claims and runs the audit.
    real_filter = Audit.objects.filter
    state = {"raced": False}

    def filter_then_race(*args, **kwargs):
        query = real_filter(*args, **kwargs)
        if "attempts" in kwargs and not state["raced"]:
            state["raced"] = True
            real_filter(pk=audit.pk).update(attempts=1, status=Status.RUNNING, worker_host="gpu-9:1",
                                            heartbeat_at=timezone.now())
        return query

    monkeypatch.setattr(audit_models.Audit.objects, "filter", filter_then_race)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.worker_host == "gpu-9:1" and audit.attempts == 1 and audit.status == Status.RUNNING


def test_a_stage_over_its_time_limit_fails_the_audit_with_a_clear_message(audit, settings):
    settings.AUDIT_STAGE_TIME_LIMIT = 0
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED
    assert "ran longer than its time limit of 0 s (AUDIT_STAGE_TIME_LIMIT)" in audit.error
    assert not Latent.objects.filter(audit=audit).exists()


def test_a_transient_database_error_is_retried_and_the_audit_completes(audit, monkeypatch):
    real_store = tasks.store_result
    calls = []

    def flaky_store(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(tasks, "store_result", flaky_store)
    monkeypatch.setattr(tasks.run_audit, "retry_backoff", False)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert len(calls) == 2 and audit.status == Status.SUCCEEDED and audit.attempts == 2


def test_a_zombie_process_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)  # it has exited, but nobody has waited for it: a zombie
    try:
        assert owner_alive(f"{socket.gethostname()}:{child.pid}") is False
        assert owner_alive(f"{socket.gethostname()}:{os.getppid()}") is True
        assert owner_alive(f"another-host:{child.pid}") is None
    finally:
        child.wait()
