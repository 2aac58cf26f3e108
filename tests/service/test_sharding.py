"""A sharded audit (one task per shard and step, joined by Celery chords) run in-process with eager tasks.

The real thing, with several worker processes over Redis and PostgreSQL, is in test_scale_out.py.
"""
import socket

import pytest
from django.core.files.storage import default_storage
from django.urls import reverse

from audit_service.audits.models import Audit, AuditShard, Flag, Latent, Status
from audit_service.audits.services import create_audit
from tests.engine.conftest import assert_same_answer
from workers import sharded, tasks
from workers.celery import app
from workers.engine import pipeline
from workers.engine.errors import EngineError
from workers.engine.stages import overall_percent
from workers.storage import SharedWork

from .conftest import FAST_AUDIT

pytestmark = pytest.mark.django_db

SHARD = 7  # 32 images: shards of 7, 7, 7, 7 and 4


@pytest.fixture
def eager():
    """Tasks (chords included) run in this process as they are sent."""
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def submit(project, users, registered, options=None) -> Audit:
    return create_audit(project=project, user=users["member"], clip_model=registered["model"],
                        probe=registered["probe"], dataset=registered["dataset"], options=options or FAST_AUDIT)


def answer(audit: Audit) -> dict:
    """The stored result with the latents' rows, as the API and the reports read them."""
    audit.refresh_from_db()
    latents = list(Latent.objects.filter(audit=audit).order_by("latent").values(
        "latent", "label", "label_source", "label_category", "label_alignment", "clarity", "frequency",
        "max_activation", "references", "expected_alignment"))
    flags = list(Flag.objects.filter(audit=audit).order_by("head", "class_name", "rank").values(
        "head", "class_name", "latent", "rank", "share", "mean_relevance", "label", "probe_share",
        "zero_shot_share", "confirmed", "causal", "references", "top_images"))
    return {**audit.result, "latent_rows": latents, "flag_rows": flags}


def one_task_answer(project, users, registered, options=None) -> dict:
    audit = submit(project, users, registered, options)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED and audit.shards == 0
    return answer(audit)


def steps(audit) -> dict:
    return {(r.stage, r.index): (r.status, r.attempts) for r in AuditShard.objects.filter(audit=audit)}


def test_a_sharded_audit_gives_the_answer_of_one_task(project, users, registered, settings, eager):
    expected = one_task_answer(project, users, registered)
    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.shards == 5 and audit.percent == 100.0
    rows = steps(audit)
    assert sorted(rows) == sorted([(s, i) for s in ("extract", "attribute", "confirm") for i in range(5)]
                                  + [("train_sae", 0), ("label", 0), ("finish", 0)])
    assert set(rows.values()) == {("done", 1)}  # every step ran once
    counts = AuditShard.objects.filter(audit=audit, stage="attribute").order_by("index").values_list("count", flat=True)
    assert list(counts) == [7, 7, 7, 7, 4]
    got = answer(audit)
    assert expected["flags"], "the audit should have flags to compare"
    assert_same_answer(expected, got)
    assert got["environment"]["shards"] == 5
    # the artifacts are stored, the intermediate files are gone
    for key in got["artifacts"].values():
        assert default_storage.exists(key)
    work = SharedWork(audit)
    assert not work.path().exists()
    assert not (settings.AUDIT_WORK_DIR / f"audit-{audit.pk}").exists()


def test_patch_tokens_kept_for_the_sae_travel_with_their_shards_and_give_the_answer_of_one_task(
        project, users, registered, settings, eager):
    """sae.patch_tokens: each extraction shard keeps its images' training patch tokens; the worker that trains
    the SAE fetches them with the shards, and trains on what one task trains on."""
    options = {**FAST_AUDIT, "sae": {**FAST_AUDIT.get("sae", {}), "patch_tokens": 3}}
    expected = one_task_answer(project, users, registered, options)
    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered, options)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    got = answer(audit)
    n_images = got["dataset"]["n_images"]
    assert got["sae"]["n_train_vectors"] == expected["sae"]["n_train_vectors"] == 4 * n_images
    assert_same_answer(expected, got)


def test_a_shard_that_fails_for_a_transient_reason_is_retried_alone(project, users, registered, settings, eager,
                                                                    monkeypatch):
    settings.AUDIT_SHARD_SIZE = SHARD
    real = pipeline.attribute_shard
    failures = []

    def flaky(ctx, store, start, count, progress=None):
        if start == 7 and not failures:
            failures.append(start)
            raise EngineError("the scratch disk is full", permanent=False)
        return real(ctx, store, start, count, progress)

    monkeypatch.setattr(pipeline, "attribute_shard", flaky)
    audit = submit(project, users, registered)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert failures == [7]
    rows = steps(audit)
    assert rows[("attribute", 1)] == ("done", 2)  # the failed shard ran again
    assert all(v == ("done", 1) for k, v in rows.items() if k != ("attribute", 1))  # nothing else was redone


def test_a_shard_that_fails_for_good_fails_the_audit_and_leaves_no_files(project, users, registered, settings,
                                                                         eager, monkeypatch):
    settings.AUDIT_SHARD_SIZE = SHARD

    def broken(ctx, store, start, count, progress=None):
        if start == 14:
            raise EngineError("image 17 cannot be read: truncated file")
        return real(ctx, store, start, count, progress)

    real = pipeline.attribute_shard
    monkeypatch.setattr(pipeline, "attribute_shard", broken)
    audit = submit(project, users, registered)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED and audit.error == "image 17 cannot be read: truncated file"
    assert not Latent.objects.filter(audit=audit).exists() and not Flag.objects.filter(audit=audit).exists()
    assert not SharedWork(audit).path().exists()
    prefix = f"projects/{audit.project_id}/audits/{audit.pk}"
    assert not default_storage.exists(f"{prefix}/sae/sae.safetensors")


def test_a_shard_left_by_a_dead_worker_is_redone_in_a_new_attempt_and_finished_shards_are_not(
        project, users, registered, settings, eager, monkeypatch):
    expected = one_task_answer(project, users, registered)
    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered)
    sent = []
    monkeypatch.setattr(sharded, "send", lambda *args: sent.append(args))
    tasks.run_audit.apply(args=[audit.pk])  # plans the shards, sends the extract chord (captured)
    assert sent == [(audit.pk, 1, "extract")]
    for index in range(4):
        assert sharded.extract_shard_task.apply(args=[audit.pk, index]).get() == "done"
    # shard 4 was taken by a worker that died: its process is gone
    dead = f"{socket.gethostname()}:{2 ** 22 + 12345}"
    AuditShard.objects.filter(audit=audit, stage="extract", index=4).update(status="running", worker_host=dead,
                                                                           attempts=1)
    assert sharded.extract_shard_task.apply(args=[audit.pk, 0]).get() == "done before"  # a duplicate message
    assert tasks.reap_stale_audits()["requeued"] == [audit.pk]
    monkeypatch.undo()
    tasks.run_audit.apply(args=[audit.pk])  # attempt 2 resumes at the unfinished shard
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.attempts == 2
    rows = steps(audit)
    assert rows[("extract", 4)] == ("done", 2)
    assert all(rows[("extract", i)] == ("done", 1) for i in range(4))
    assert_same_answer(expected, answer(audit))


def test_a_reduce_step_of_an_older_attempt_drops_out(project, users, registered, settings, eager, monkeypatch):
    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered)
    monkeypatch.setattr(sharded, "send", lambda *args: None)
    tasks.run_audit.apply(args=[audit.pk])
    Audit.objects.filter(pk=audit.pk).update(attempts=2)  # a newer attempt started meanwhile
    assert sharded.train_sae_task.apply(args=[audit.pk, 1]).get() == "an older attempt"
    assert AuditShard.objects.get(audit=audit, stage="train_sae").status == "pending"


def test_a_sharded_audit_can_be_cancelled_between_shards_and_leaves_no_files(project, users, registered, settings,
                                                                              eager, monkeypatch):
    settings.AUDIT_SHARD_SIZE = SHARD
    real = pipeline.attribute_shard

    def cancel_on_the_second_shard(ctx, store, start, count, progress=None):
        if start == 7:
            Audit.objects.get(pk=audit.pk).cancel()
        return real(ctx, store, start, count, progress)

    monkeypatch.setattr(pipeline, "attribute_shard", cancel_on_the_second_shard)
    audit = submit(project, users, registered)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.CANCELLED
    rows = steps(audit)
    assert rows[("attribute", 2)] == ("pending", 0) and rows[("label", 0)] == ("pending", 0)  # nothing after it ran
    assert not Latent.objects.filter(audit=audit).exists()
    assert not SharedWork(audit).path().exists()


def test_progress_of_a_sharded_audit_counts_shards_in_the_api_and_on_the_page(project, users, registered, settings,
                                                                              eager, monkeypatch, client_for):
    from django.test import Client

    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered)
    monkeypatch.setattr(sharded, "send", lambda *args: None)
    tasks.run_audit.apply(args=[audit.pk])
    for index in range(3):
        sharded.extract_shard_task.apply(args=[audit.pk, index])
    audit.refresh_from_db()
    assert audit.stage == "extract" and audit.percent == pytest.approx(overall_percent("extract", 3, 5))
    body = client_for("viewer").get(f"/api/v1/audits/{audit.pk}/").json()
    assert body["shards"] == 5
    assert body["shard_progress"]["extract"] == {"done": 3, "total": 5}
    assert body["shard_progress"]["attribute"] == {"done": 0, "total": 5}
    assert body["shard_progress"]["finish"] == {"done": 0, "total": 1}
    page = Client()
    page.force_login(users["viewer"])
    progress = page.get(reverse("web:audit_status", args=[audit.pk])).json()
    assert progress["stage"] == "extract (3/5 shards)"
    # a status poll reads the shard rows once, for the stage shown and the shard counts alike
    read = []
    real = Audit.progress
    monkeypatch.setattr(Audit, "progress", lambda self: read.append(1) or real(self))
    view = Audit.objects.get(pk=audit.pk).progress_view()
    assert len(read) == 1 and view["stage"] == "extract (3/5 shards)" and view["shards"]["extract"]["done"] == 3


def test_a_shard_that_keeps_failing_for_a_transient_reason_fails_the_audit_after_its_retries(
        project, users, registered, settings, eager, monkeypatch):
    settings.AUDIT_SHARD_SIZE = SHARD
    calls = []

    def always_full(ctx, store, start, count, progress=None):
        calls.append(start)
        raise EngineError("the scratch disk is full", permanent=False)

    monkeypatch.setattr(pipeline, "attribute_shard", always_full)
    audit = submit(project, users, registered)
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED
    assert audit.error == "the scratch disk is full (attribute shard 0 failed 6 times)"
    assert calls == [0] * 6  # the first shard, retried 5 times; the others never ran
    assert not SharedWork(audit).path().exists()


def test_the_reaper_removes_intermediate_files_a_stopped_worker_left_after_the_result(project, users, registered,
                                                                                     settings, eager):
    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered)
    tasks.run_audit.apply(args=[audit.pk])
    work = SharedWork(audit)
    assert not work.path().exists()
    work.path("attribution").mkdir(parents=True)  # as if the worker was stopped between result and clean-up
    (work.path("attribution") / "partial-00000.npz").write_bytes(b"left over")
    assert tasks.reap_stale_audits()["cleaned"] == [audit.pk]
    assert not work.path().exists()
    assert tasks.reap_stale_audits()["cleaned"] == []


def test_a_sharded_audit_of_a_token_the_pooling_drops_fails_before_any_shard_work(project, users, registered,
                                                                                  settings, eager):
    """Registration refuses such a layer/token pair now; a model registered before must not run for nothing."""
    settings.AUDIT_SHARD_SIZE = SHARD
    audit = submit(project, users, registered)
    audit.config = {**audit.config, "layer": -1, "token": "spatial"}  # the tiny model pools its CLS token
    audit.save(update_fields=["config"])
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.FAILED
    assert "spatial tokens do not reach" in audit.error and "pick layer -2 or token cls" in audit.error
    assert not SharedWork(audit).path().exists()
