"""Datasets by S3 prefix, as image files and as WebDataset shards, audited by workers on their own disks.

The web process reads each object once as a stream (never the whole dataset at once, never a copy into the
service's store); each worker copies only the images, or for shards only the shards, that its part of the audit
needs. A moto server stands in for the bucket, as in test_scale_out.py; outside CI without PostgreSQL and Redis
these tests skip, in CI they fail instead.
"""
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import boto3
import pytest

from audit_service.accounts.models import ApiToken
from audit_service.audits.models import Audit, AuditShard, Status
from audit_service.audits.services import create_audit
from audit_service.registry import references
from audit_service.registry.models import Dataset
from audit_service.registry.services import RegistrationError, register_dataset_by_reference
from tests.engine.conftest import assert_same_answer
from workers import tasks
from workers.engine.explain import flag_image_keys

from .conftest import FAST_AUDIT
from .test_dataset_references import as_upload_keys, unpack, write_shards
from .test_faults import stop
from .test_integration import purge_queues
from .test_scale_out import BUCKET, bucket_keys, finished, s3, worker  # noqa: F401 (s3 is a fixture)
from .test_sharding import answer

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[2]


def put_folder(env: dict, folder: Path, prefix: str) -> dict[str, int]:
    """Every file under ``folder`` into the bucket under ``prefix``; name -> size."""
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = path.relative_to(folder).as_posix()
            client.upload_file(str(path), BUCKET, f"{prefix}/{name}")
            sizes[name] = path.stat().st_size
    return sizes


class ReadSpy:
    """Every object the web process opens in the bucket, and the most bytes of objects open at one time."""

    def __init__(self, monkeypatch, sizes: dict[str, int]):
        self.opened, self.now, self.peak, self.lock = Counter(), 0, 0, threading.Lock()
        original, spy = references.S3Source.open, self

        class Tracked:
            def __init__(self, body, size):
                self.body, self.size, self.closed = body, size, False

            def read(self, n=-1):
                return self.body.read(n)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def close(self):
                if not self.closed:
                    self.closed = True
                    with spy.lock:
                        spy.now -= self.size
                    self.body.close()

        def tracked_open(source, name):
            body, key = original(source, name), f"{source.location}/{name}"
            size = sizes[key]
            with spy.lock:
                spy.opened[key] += 1
                spy.now += size
                spy.peak = max(spy.peak, spy.now)
            return Tracked(body, size)

        monkeypatch.setattr(references.S3Source, "open", tracked_open)


def test_datasets_by_s3_prefix_are_read_once_and_workers_read_only_the_shards_they_need(
        s3, live_server, project, users, registered, assets, tmp_path, monkeypatch, settings):  # noqa: F811
    settings.DATASET_S3_PREFIXES = ["shared"]
    with pytest.raises(RegistrationError, match=r"'other/' is not under a prefix an admin allowed for datasets "
                                                r"\(DATASET_S3_PREFIXES: shared/\)"):
        register_dataset_by_reference(project=project, user=users["member"], name="x", source="s3",
                                      location="other")
    with pytest.raises(RegistrationError, match="'projects/1/' is where this service keeps its own files"):
        register_dataset_by_reference(project=project, user=users["member"], name="x", source="s3",
                                      location="shared/../projects/1")
    files = put_folder(s3, unpack(assets["dataset"], tmp_path / "files"), "shared/lesions")
    shards = put_folder(s3, write_shards(assets["dataset"], tmp_path / "wds", per_shard=8), "shared/lesions-wds")
    assert len(shards) == 4

    # by S3 prefix, image files: every object read once, a few at a time; nothing copied into the service's store
    spy = ReadSpy(monkeypatch, {**{f"shared/lesions/{n}": size for n, size in files.items()},
                                **{f"shared/lesions-wds/{n}": size for n, size in shards.items()}})
    by_files = register_dataset_by_reference(project=project, user=users["member"], name="lesions in the bucket",
                                             source="s3", location=f"s3://{BUCKET}/shared/lesions/")
    assert (by_files.location, by_files.layout, by_files.n_images) == ("shared/lesions", "files", 32)
    assert spy.opened == Counter({f"shared/lesions/{name}": 1 for name in files})
    assert spy.peak <= references.READERS * max(files.values()) < sum(files.values()) / 3
    assert sorted(bucket_keys(by_files.storage_prefix)) == [f"{by_files.storage_prefix}/{name}"
                                                            for name in ("labels.csv", "manifest.json")]

    # WebDataset shards, registered and audited through the command-line client, audited by two workers
    purge_queues()
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [worker(tmp_path, name, s3, DATASET_S3_PREFIXES="shared") for name in ("w1", "w2")]
    spy.opened.clear()
    try:
        key = ApiToken.issue(users["member"], "ci")[1]
        run = subprocess.run(
            [sys.executable, "-m", "audit_service.cli", "--url", live_server.url, "--token", key, "audit",
             "--project", str(project.pk), "--model-config", str(assets["config"]),
             "--checkpoint", str(assets["checkpoint"]), "--probe", str(assets["probe"]),
             "--dataset-s3", "shared/lesions-wds", "--dataset-name", "lesions as shards", "--no-default-gate",
             "--options", json.dumps(FAST_AUDIT), "--poll", "0.5", "--out", str(tmp_path / "report")],
            cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "dataset: registered" in run.stdout and "32 images (webdataset)" in run.stdout
        audit = finished(Audit.objects.latest("pk").pk, logs)
        by_group = {w.pid: f"w{i}" for i, w in enumerate(workers, 1)}  # a worker's processes share its group
        rows = [(by_group[os.getpgid(int(r.worker_host.rpartition(":")[2]))], r)
                for r in AuditShard.objects.filter(audit=audit, stage__in=["extract", "label"])]
    finally:
        for w in workers:
            stop(w)
    by_shards = Dataset.objects.get(name="lesions as shards")
    assert audit.status == Status.SUCCEEDED and audit.dataset == by_shards and audit.shards == 5
    # the web process read each shard once, one at a time
    assert spy.opened == Counter({f"shared/lesions-wds/{name}": 1 for name in shards})
    assert spy.peak == max(shards.values()) < sum(shards.values()) / 3
    assert sorted(bucket_keys(by_shards.storage_prefix)) == [f"{by_shards.storage_prefix}/{name}"
                                                             for name in ("labels.csv", "manifest.json")]
    # each worker copied the images its steps needed, out of the shards holding them, and no other shard
    ids = [image_id for image_id, _ in by_shards.labels()]
    wanted = {name: set() for name in by_group.values()}
    for name, r in rows:
        wanted[name] |= set(ids[r.start:r.start + r.count]) if r.stage == "extract" else \
            set(flag_image_keys(audit.result["flags"]))
    for name, images in wanted.items():
        cache = next((tmp_path / f"{name}-scratch" / "cache").glob("dataset-*"), None)
        if not images:
            assert cache is None
            continue
        cached = {p.relative_to(cache / "images").as_posix() for p in (cache / "images").rglob("*") if p.is_file()}
        read = {p.relative_to(cache / "shards").as_posix() for p in (cache / "shards").rglob("*") if p.is_file()}
        assert cached == images, name
        assert read == {image_id.split("/")[0] for image_id in images}, name

    # the same images by files and by shards give the same audit
    reference = create_audit(project=project, user=users["member"], clip_model=audit.clip_model,
                             probe=audit.probe, dataset=by_files, options=FAST_AUDIT)
    tasks.run_audit.apply(args=[reference.pk])
    reference.refresh_from_db()
    assert reference.status == Status.SUCCEEDED, reference.error
    assert_same_answer(answer(reference), as_upload_keys(answer(audit)))
