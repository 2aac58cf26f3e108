"""The one step runner (workers.steps.run_step) of the one-task and the sharded path: heartbeat, progress,
cancellation, time limit, and the error policy."""
import time

import pytest
from celery.exceptions import Retry
from django.db import OperationalError

from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status
from workers import steps
from workers.engine.errors import EngineError

from .conftest import FakeTask

pytestmark = pytest.mark.django_db


def raising(exc):
    def body(progress):
        raise exc

    return body


@pytest.fixture
def cleaned():
    calls = []
    return calls, lambda: calls.append("cleaned")


@pytest.fixture
def row(running) -> AuditShard:
    running.run_as_shards([(0, 16), (16, 16)])
    row = AuditShard.objects.get(audit=running, stage="extract", index=1)
    assert row.claim("gpu-2:200")
    return row


def test_a_body_that_finishes_is_done_and_nothing_is_cleaned(running, cleaned):
    calls, clean = cleaned
    assert steps.run_step(FakeTask(), running, lambda progress: progress("extract", 2, 4), clean) == "done"
    assert calls == [] and Audit.objects.get(pk=running.pk).percent == 15.0  # half of extract's 30


def test_a_cancelled_audit_stops_and_its_files_are_removed(running, cleaned):
    calls, clean = cleaned
    running.cancel()
    outcome = steps.run_step(FakeTask(), running, lambda progress: progress("extract", 0, 4), clean)
    running.refresh_from_db()
    assert outcome == "cancelled" and running.status == Status.CANCELLED and calls == ["cleaned"]


def test_a_permanent_engine_error_fails_the_audit_with_its_message(running, cleaned):
    calls, clean = cleaned
    outcome = steps.run_step(FakeTask(), running, raising(EngineError("the probe expects 512 features, not 64")), clean)
    running.refresh_from_db()
    assert outcome == "failed" and running.status == Status.FAILED
    assert running.error == "the probe expects 512 features, not 64" and calls == ["cleaned"]


def test_a_transient_engine_error_releases_the_step_for_the_retry(running, row, cleaned):
    calls, clean = cleaned
    with pytest.raises(Retry):
        steps.run_step(FakeTask(), running, raising(EngineError("disk full", permanent=False)), clean, row)
    row.refresh_from_db()
    assert row.status == ShardStatus.PENDING and row.worker_host == "" and row.attempts == 1
    assert Audit.objects.get(pk=running.pk).status == Status.RUNNING and calls == []


def test_a_transient_engine_error_of_a_whole_audit_releases_it_for_the_retry(running, cleaned):
    calls, clean = cleaned
    with pytest.raises(Retry):
        steps.run_step(FakeTask(), running, raising(EngineError("disk full", permanent=False)), clean)
    running.refresh_from_db()
    assert running.status == Status.RUNNING and running.heartbeat_at is None and running.is_abandoned()


def test_a_transient_engine_error_fails_the_audit_once_the_retries_are_used_up(running, row, cleaned):
    calls, clean = cleaned
    outcome = steps.run_step(FakeTask(retries=5), running, raising(EngineError("disk full", permanent=False)), clean, row)
    running.refresh_from_db()
    assert outcome == "failed" and running.error == "disk full (extract shard 1 failed 6 times)"
    assert calls == ["cleaned"]


def test_a_database_error_releases_the_step_and_is_raised_for_autoretry(running, row, cleaned):
    with pytest.raises(OperationalError):
        steps.run_step(FakeTask(), running, raising(OperationalError("connection lost")), cleaned[1], row)
    row.refresh_from_db()
    assert row.status == ShardStatus.PENDING and Audit.objects.get(pk=running.pk).status == Status.RUNNING


def test_any_other_error_fails_the_audit_as_an_internal_error(running, row, cleaned):
    steps.run_step(FakeTask(), running, raising(KeyError("acts")), cleaned[1], row)
    running.refresh_from_db()
    assert running.status == Status.FAILED and running.error == "internal error in extract shard 1: KeyError: 'acts'"


def test_an_internal_error_of_a_whole_audit_names_no_shard(running, cleaned):
    steps.run_step(FakeTask(), running, raising(ValueError("bad")), cleaned[1])
    assert Audit.objects.get(pk=running.pk).error == "internal error: ValueError: bad"


def test_a_stage_over_its_time_limit_fails_the_audit(running, settings, cleaned):
    settings.AUDIT_STAGE_TIME_LIMIT = 0
    def two_batches(progress):
        progress("attribute", 1, 4)
        progress("attribute", 2, 4)  # the clock of a stage starts at its first report

    steps.run_step(FakeTask(), running, two_batches, cleaned[1])
    running.refresh_from_db()
    assert running.status == Status.FAILED and "ran longer than its time limit of 0 s" in running.error


def test_the_heartbeat_beats_while_the_body_runs(running, row, settings, cleaned):
    settings.AUDIT_HEARTBEAT_SECONDS = 0.05
    AuditShard.objects.filter(pk=row.pk).update(heartbeat_at=None)
    beats = []
    real_beat = AuditShard.beat

    def counted(self):
        beats.append(self.pk)
        real_beat(self)

    AuditShard.beat = counted
    try:
        steps.run_step(FakeTask(), running, lambda progress: time.sleep(0.3), cleaned[1], row)
    finally:
        AuditShard.beat = real_beat
    assert beats and set(beats) == {row.pk}


def test_a_failure_after_another_attempt_finished_the_audit_changes_and_removes_nothing(running, cleaned):
    calls, clean = cleaned

    def finished_elsewhere(progress):
        Audit.objects.filter(pk=running.pk).update(status=Status.SUCCEEDED)  # a newer attempt stored its result
        raise EngineError("the scratch disk went away")

    assert steps.run_step(FakeTask(), running, finished_elsewhere, clean) == "failed"
    assert Audit.objects.get(pk=running.pk).status == Status.SUCCEEDED and calls == []
