"""workers.sharded: the step rows of an audit spread over shards, claimed and finished once; its progress; the
error policy of a shard step; a reduce step that waits for its shards."""
import socket
from datetime import timedelta

import pytest
from celery.exceptions import Retry
from django.utils import timezone

from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status
from workers import sharded
from workers.engine.errors import EngineError
from workers.engine.stages import STAGE_NAMES, overall_percent
from workers.storage import SharedWork

from .conftest import FakeTask

pytestmark = pytest.mark.django_db

PLAN = [(0, 7), (7, 7), (14, 7), (21, 7), (28, 4)]


@pytest.fixture
def spread(running) -> Audit:
    """The running audit, spread over five shards; nothing sent."""
    assert running.run_as_shards(PLAN) == "extract"
    return running


def row(audit, stage="extract", index=0) -> AuditShard:
    return AuditShard.objects.get(audit=audit, stage=stage, index=index)


def finish(audit, stage, indices) -> None:
    for index in indices:
        r = row(audit, stage, index)
        assert r.claim("gpu-3:300")
        r.mark_done()


def test_the_steps_follow_the_stage_declaration(spread):
    assert sharded.SHARD_STAGES == ("extract", "attribute", "confirm")
    assert sharded.REDUCE_AFTER == {"extract": "train_sae", "attribute": "label", "confirm": "finish"}
    counts = {stage: AuditShard.objects.filter(audit=spread, stage=stage).count() for stage in STAGE_NAMES}
    assert counts == {"extract": 5, "train_sae": 1, "attribute": 5, "label": 1, "confirm": 5, "finish": 1}
    assert spread.run_as_shards(PLAN) == "extract"  # a later attempt keeps the rows
    assert AuditShard.objects.filter(audit=spread).count() == 18


def test_progress_counts_the_finished_rows_of_each_step_in_order(spread):
    finish(spread, "extract", range(3))
    assert row(spread, "extract", 3).claim("gpu-4:400")
    progress = spread.progress()
    assert list(progress) == list(STAGE_NAMES)
    assert progress["extract"] == {"done": 3, "total": 5} and progress["train_sae"] == {"done": 0, "total": 1}
    assert spread.running_workers() == ["gpu-4:400"]
    spread.record_progress("extract")
    spread.refresh_from_db()
    assert spread.stage == "extract" and spread.percent == overall_percent("extract", 3, 5) == 18.0


def test_an_audit_run_as_one_task_has_no_shard_progress(running):
    assert running.progress() is None and running.running_workers() == []


def test_a_step_row_is_claimed_once(spread):
    first, second = row(spread), row(spread)
    assert first.claim("gpu-1:100") is True
    assert second.claim("gpu-2:200") is False
    assert row(spread).worker_host == "gpu-1:100" and row(spread).attempts == 1


def test_a_step_is_run_once_and_a_duplicate_message_changes_nothing(spread, monkeypatch):
    ran = []
    monkeypatch.setattr(sharded, "_extract", lambda audit, r, progress: ran.append(r.index))
    assert sharded.extract_shard_task.apply(args=[spread.pk, 2]).get() == "done"
    assert sharded.extract_shard_task.apply(args=[spread.pk, 2]).get() == "done before"
    assert ran == [2] and row(spread, "extract", 2).status == ShardStatus.DONE
    assert Audit.objects.get(pk=spread.pk).percent == overall_percent("extract", 1, 5)


def test_a_step_of_a_cancelled_audit_stops_it_and_removes_its_files(spread, monkeypatch):
    SharedWork(spread).write_json("draft.json", {})
    spread.cancel()
    monkeypatch.setattr(sharded, "_extract", lambda *args: pytest.fail("a cancelled audit's step ran"))
    assert sharded.extract_shard_task.apply(args=[spread.pk, 0]).get() == "cancelled"
    assert Audit.objects.get(pk=spread.pk).status == Status.CANCELLED
    assert not SharedWork(spread).path().exists()


def test_a_permanent_error_in_a_shard_fails_the_audit_and_removes_its_files(spread, monkeypatch):
    SharedWork(spread).write_json("draft.json", {})

    def unreadable(audit, r, progress):
        raise EngineError("image 17 cannot be read: truncated file")

    monkeypatch.setattr(sharded, "_extract", unreadable)
    assert sharded.extract_shard_task.apply(args=[spread.pk, 2]).get() == "failed"
    spread.refresh_from_db()
    assert spread.status == Status.FAILED and spread.error == "image 17 cannot be read: truncated file"
    assert not SharedWork(spread).path().exists()


def test_a_shard_that_fails_for_a_transient_reason_is_run_again_by_its_retry(spread, monkeypatch):
    calls = []

    def full_once(audit, r, progress):
        calls.append(r.index)
        if len(calls) == 1:
            raise EngineError("the scratch disk is full", permanent=False)

    monkeypatch.setattr(sharded, "_extract", full_once)
    assert sharded.extract_shard_task.apply(args=[spread.pk, 1]).get() == "done"
    assert calls == [1, 1]  # the retry (the task's own, eager here) claimed the released row again
    assert (row(spread, "extract", 1).status, row(spread, "extract", 1).attempts) == ("done", 2)


def test_a_row_whose_worker_died_makes_the_audit_abandoned_and_a_new_attempt_redoes_it(spread, monkeypatch):
    dead = f"{socket.gethostname()}:{2 ** 22 + 12345}"
    AuditShard.objects.filter(pk=row(spread).pk).update(status="running", worker_host=dead, attempts=1,
                                                        heartbeat_at=timezone.now())
    assert row(spread).is_abandoned() and spread.is_abandoned()
    Audit.objects.get(pk=spread.pk).requeue()
    spread.refresh_from_db()
    assert spread.claim("gpu-1:100")
    sent = []
    monkeypatch.setattr(sharded, "send", lambda *args: sent.append(args))
    sharded.start(spread)
    assert sent == [(spread.pk, 2, "extract")]
    assert (row(spread).status, row(spread).worker_host) == ("pending", "")


def test_a_sharded_audit_with_live_steps_is_not_abandoned_and_one_with_nothing_running_for_long_is(spread,
                                                                                                   settings):
    assert row(spread).claim("gpu-5:500")  # another host, beating
    assert not spread.is_abandoned()
    row(spread).mark_done()
    settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS = 600
    Audit.objects.filter(pk=spread.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=601))
    spread.refresh_from_db()
    assert spread.is_abandoned()  # its messages were lost


def test_a_reduce_step_waits_for_its_shards_and_an_older_attempt_drops_out(spread):
    body = lambda audit, r, progress: pytest.fail("the SAE was trained before every shard was extracted")  # noqa
    with pytest.raises(Retry):
        sharded._reduce(FakeTask(), spread.pk, 1, "train_sae", body)
    assert sharded._reduce(FakeTask(), spread.pk, 0, "train_sae", body) == "an older attempt"
    assert row(spread, "train_sae").status == ShardStatus.PENDING
