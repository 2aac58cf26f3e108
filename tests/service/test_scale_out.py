"""One audit over several real worker processes, with real Redis, PostgreSQL and an S3-compatible store.

Each worker has its own scratch folder and its own (unused) MEDIA_ROOT: everything they share goes through
the S3 bucket (a local moto server), as workers on different hosts would. Outside CI without PostgreSQL and
Redis these tests skip; in CI they fail instead.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import boto3
import pytest
import requests
from django.core.files.storage import default_storage

from audit_service.audits.models import Audit, AuditShard, Status
from audit_service.audits.services import create_audit
from tests.engine.conftest import assert_same_answer
from workers import tasks
from workers.engine.explain import flag_image_keys

from .conftest import FAST_AUDIT
from .test_faults import stop, wait
from .test_integration import purge_queues, require_real_services, start_worker
from .test_sharding import answer, steps

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SHARD = 7  # 32 images: shards of 7, 7, 7, 7 and 4
BUCKET = "clip-audit-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(settings, tmp_path):
    """A moto S3 server; this process and the workers store files in its bucket."""
    require_real_services()
    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise AssertionError(f"moto_server did not start: {(tmp_path / 'moto.log').read_text()[-2000:]}")
            time.sleep(0.2)
    env = {"STORAGE_BACKEND": "s3", "S3_BUCKET": BUCKET, "S3_ENDPOINT_URL": endpoint, "S3_ACCESS_KEY_ID": "test",
           "S3_SECRET_ACCESS_KEY": "test", "S3_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    settings.STORAGES = {**settings.STORAGES, "default": {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {"bucket_name": BUCKET, "endpoint_url": endpoint, "access_key": "test", "secret_key": "test",
                    "region_name": "us-east-1", "default_acl": None, "querystring_auth": True,
                    "file_overwrite": False}}}
    yield env
    server.terminate()
    server.wait(timeout=30)


def worker(tmp_path, name: str, s3_env: dict, **env):
    """A worker with its own scratch and media folders: no disk shared with the others."""
    return start_worker(tmp_path, name, AUDIT_WORK_DIR=tmp_path / f"{name}-scratch",
                        MEDIA_ROOT=tmp_path / f"{name}-media", AUDIT_SHARD_SIZE=SHARD, **s3_env, **env)


def submit(project, users, registered, options=FAST_AUDIT) -> Audit:
    return create_audit(project=project, user=users["member"], clip_model=registered["model"],
                        probe=registered["probe"], dataset=registered["dataset"], options=options)


def finished(pk: int, logs, timeout: float = 240) -> Audit:
    audit = wait(lambda: Audit.objects.filter(pk=pk, status__in=[Status.SUCCEEDED, Status.FAILED,
                                                                    Status.CANCELLED]).first(), timeout,
                 f"audit {pk} to finish", logs)
    return audit


def bucket_keys(prefix: str) -> list[str]:
    out = []

    def walk(p):
        folders, files = default_storage.listdir(p)
        out.extend(f"{p}/{f}" for f in files)
        for d in folders:
            walk(f"{p}/{d}")
    walk(prefix)
    return out


def test_an_audit_over_three_workers_gives_the_answer_of_one_worker_and_of_one_task(
        s3, project, users, registered, tmp_path):
    purge_queues()
    # the reference: one task in this process, no shards
    reference = submit(project, users, registered)
    tasks.run_audit.apply(args=[reference.pk])
    expected = answer(reference)
    assert reference.shards == 0 and expected["flags"]

    logs = [tmp_path / f"w{i}.log" for i in (1, 2, 3)]
    workers = [worker(tmp_path, "w1", s3)]
    try:
        one = finished(submit(project, users, registered).pk, logs)  # one worker, five shards
        assert one.status == Status.SUCCEEDED, one.error
        workers += [worker(tmp_path, "w2", s3), worker(tmp_path, "w3", s3)]
        wait(lambda: all("ready" in p.read_text() for p in logs), 60, "three workers to start", logs)
        audit = submit(project, users, registered)
        seen = []
        while not Audit.objects.filter(pk=audit.pk, status__in=[Status.SUCCEEDED, Status.FAILED]).exists():
            audit.refresh_from_db()
            seen.append(audit.percent)
            time.sleep(0.05)
        audit = finished(audit.pk, logs)
        # the last step removes the intermediate files right after storing the result
        prefix = f"projects/{audit.project_id}/audits/{audit.pk}"
        wait(lambda: not any(k.startswith(f"{prefix}/work/") for k in bucket_keys(prefix)), 60,
             "the intermediate files to be removed", logs)
        by_group = {w.pid: f"w{i}" for i, w in enumerate(workers, 1)}
        keys = [key for key, _ in audit.dataset.labels()]
        wanted = {name: set() for name in by_group.values()}  # images each worker needed
        for r in AuditShard.objects.filter(audit=audit, stage__in=["extract", "label"]):
            name = by_group[os.getpgid(int(r.worker_host.rpartition(":")[2]))]
            if r.stage == "extract":
                wanted[name] |= set(keys[r.start:r.start + r.count])
            else:  # the label step maps the flags' shown images (their heatmaps)
                wanted[name] |= set(flag_image_keys(audit.result["flags"]))
    finally:
        for w in workers:
            stop(w)
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.shards == one.shards == 5
    assert seen == sorted(seen)  # the bar only moves forward
    for a in (one, audit):
        assert set(steps(a).values()) == {("done", 1)}  # every shard and step ran once
    hosts = set(AuditShard.objects.filter(audit=audit).values_list("worker_host", flat=True))
    assert len(hosts) >= 2, f"the shards should have spread over the workers: {hosts}"
    assert_same_answer(expected, answer(one))
    assert_same_answer(expected, answer(audit))
    # the artifacts are in the bucket, the intermediate files are gone from it
    keys = bucket_keys(f"projects/{audit.project_id}/audits/{audit.pk}")
    # (the audit's SAE and the two dictionaries that voted on its flags)
    voters = [f"sae/dictionaries/{k}/{name}" for k in (1, 2) for name in ("metrics.json", "sae.json", "sae.safetensors")]
    assert sorted(k.rsplit(f"/audits/{audit.pk}/", 1)[1] for k in keys) == [
        "relevance.npz", *voters, "sae/metrics.json", "sae/sae.json", "sae/sae.safetensors"]
    # a worker downloads the images of the shards it extracts and, for the label step, those the flags' heatmaps
    # need; not the dataset (w1 also ran the first audit)
    for name in ("w2", "w3"):
        folder = tmp_path / f"{name}-scratch" / "cache"
        cached = {p.relative_to(next(folder.glob("dataset-*")) / "images").as_posix()
                  for p in folder.glob("dataset-*/images/**/*") if p.is_file()}
        assert cached == wanted[name], (name, len(cached), {k: len(v) for k, v in wanted.items()})
    # nothing was written to a media folder: the workers share no disk
    assert not any((tmp_path / f"w{i}-media").exists() and any((tmp_path / f"w{i}-media").iterdir())
                   for i in (1, 2, 3))


# Deletion curves over every image with many steps make an attribution shard last a second or more on the
# tiny model, so the kill lands inside one.
SLOW_SHARDS = {**FAST_AUDIT, "faithfulness_max_images": 1000, "faithfulness_steps": 48, "batch_size": 4}


def test_a_worker_killed_mid_shard_costs_that_shard_only_and_the_audit_finishes_with_the_same_answer(
        s3, project, users, registered, tmp_path):
    purge_queues()
    reference = submit(project, users, registered, SLOW_SHARDS)
    tasks.run_audit.apply(args=[reference.pk])
    expected = answer(reference)

    logs = [tmp_path / f"{n}.log" for n in ("beat", "victim1", "victim2")]
    # the first worker also runs beat (the reaper, every 2 s); the shards spread over all three
    keeper = worker(tmp_path, "beat", s3, beat=True, AUDIT_REAP_EVERY_SECONDS=2)
    victims = [worker(tmp_path, "victim1", s3), worker(tmp_path, "victim2", s3)]
    groups = {v.pid: v for v in victims}
    try:
        wait(lambda: all("ready" in p.read_text() for p in logs if p.exists()) and len(
            [p for p in logs if p.exists()]) == 3, 60, "three workers to start", logs)
        audit = submit(project, users, registered, SLOW_SHARDS)

        def a_victims_shard():
            for row in AuditShard.objects.filter(audit=audit, stage="attribute", status="running"):
                pid = int(row.worker_host.rpartition(":")[2])
                try:
                    if os.getpgid(pid) in groups:
                        return row
                except ProcessLookupError:
                    continue
            return None

        row = wait(a_victims_shard, 180, "an attribution shard running on a worker that may be killed", logs)
        victim = groups[os.getpgid(int(row.worker_host.rpartition(":")[2]))]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = time.monotonic()
        audit = finished(audit.pk, logs, timeout=300)
    finally:
        for w in [keeper, *victims]:
            stop(w)
    assert audit.status == Status.SUCCEEDED, audit.error
    assert audit.attempts == 2  # the reaper started a second attempt after the kill
    rows = steps(audit)
    assert rows[("attribute", row.index)] == ("done", 2)  # the killed shard ran again...
    redone = {k for k, v in rows.items() if v != ("done", 1)}
    assert redone == {("attribute", row.index)}, redone  # ...and nothing else did
    assert time.monotonic() - killed_at < 300
    result = answer(audit)
    assert result["dataset"]["n_images"] == 32  # each image counted once
    assert_same_answer(expected, result)
    # the reaper runs on whichever worker takes it from the default queue
    assert any(f"audit {audit.pk}: worker" in p.read_text() and "requeued" in p.read_text() for p in logs)
