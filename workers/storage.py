"""Files of an audit in the media store: its artifacts, a sharded audit's intermediate files, scratch folders."""
from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.utils import timezone

from audit_service.audits.jobs import job_kind, kinds
from audit_service.audits.models import FINISHED, Audit
from audit_service.registry.references import write_atomically
from workers.engine.errors import EngineError

ARTIFACTS = ("sae/sae.safetensors", "sae/sae.json", "sae/metrics.json", "relevance.npz")


def replace_stored(key: str, path) -> str:
    """Store the file at ``path`` under ``key`` in the media store, replacing what was there (a re-run never
    piles up copies); returns the key it got."""
    if default_storage.exists(key):
        default_storage.delete(key)
    with open(path, "rb") as fh:
        return default_storage.save(key, File(fh))


SAE_ARTIFACTS = ARTIFACTS[:3]  # what reloads an audit's SAE (``TopKSAE.load`` and the metrics it was trained to)
DICTIONARIES = "sae/dictionaries/"  # the other dictionaries that voted on the flags, kept when the audit trained them


def dictionary_artifacts(workdir) -> list[str]:
    """The other dictionaries' files in ``workdir`` (none for an audit with one dictionary or a given SAE)."""
    folder = Path(workdir) / DICTIONARIES
    return sorted(p.relative_to(workdir).as_posix() for p in folder.glob("*/*") if p.is_file())


def fetch_sae(audit, folder) -> Path:
    """Copy the SAE a succeeded audit stored into ``folder`` (sae.safetensors, sae.json, metrics.json), where the
    engine finds a trained SAE and reuses it; returns ``folder``."""
    folder = Path(folder)
    artifacts = (audit.result or {}).get("artifacts") or {}
    missing = [rel for rel in SAE_ARTIFACTS if rel not in artifacts]
    if missing:
        raise EngineError(f"audit {audit.pk} kept no SAE ({', '.join(missing)} missing); run it again")
    # the voting dictionaries too, so an audit that reuses this SAE votes with the same ones instead of training them
    for rel in [*SAE_ARTIFACTS, *sorted(r for r in artifacts if r.startswith(DICTIONARIES))]:
        target = folder / rel.removeprefix("sae/")
        if not target.exists():
            with default_storage.open(artifacts[rel], "rb") as src:
                write_atomically(target, src)
    return folder


def save_artifacts(audit, workdir) -> dict:
    """Copy the SAE and the full relevance tables into the media store; returns their storage keys.

    The activation cache stays on the worker's scratch disk and is deleted with it. If one copy fails, the
    ones already made are removed.
    """
    prefix = f"projects/{audit.project_id}/audits/{audit.pk}"
    keys = {}
    try:
        for rel in [*ARTIFACTS, *dictionary_artifacts(workdir)]:
            keys[rel] = replace_stored(f"{prefix}/{rel}", Path(workdir) / rel)
    except Exception:
        for key in keys.values():
            default_storage.delete(key)
        raise
    return keys


def store_with_artifacts(audit, result: dict, workdir, store) -> None:
    """Copy the artifacts from ``workdir`` into the media store, then ``store(result)`` (its rows and the
    finished state); no artifact file stays behind for an audit that is not shown as finished."""
    result["artifacts"] = save_artifacts(audit, workdir)
    try:
        store(result)
    except Exception:
        for key in result["artifacts"].values():
            default_storage.delete(key)
        raise


def remove_finished_work_folders() -> list[int]:
    """Delete this host's scratch folders (AUDIT_WORK_DIR/audit-<id>, correction-<id>, explanation-<id>) of jobs
    that are finished or gone; returns the audits' ids.

    Workers of a sharded audit keep local copies of what they read from S3; the audit's last step removes
    only its own worker's copy.
    """
    removed = {}
    for kind in kinds():  # AUDIT_WORK_DIR/<kind>-<id>
        folders = {}
        for path in Path(settings.AUDIT_WORK_DIR).glob(f"{kind.work_prefix}*"):
            pk = path.name.removeprefix(kind.work_prefix)
            if pk.isdigit():
                folders[int(pk)] = path
        alive = set(kind.model.objects.filter(pk__in=folders).exclude(status__in=FINISHED)
                    .values_list("pk", flat=True))
        removed[kind.model] = sorted(pk for pk in folders if pk not in alive)
        for pk in removed[kind.model]:
            shutil.rmtree(folders[pk], ignore_errors=True)
    return removed[Audit]


class SharedWork:
    """A sharded audit's intermediate files: in the media store, shared by every worker, read through a local
    folder. With local storage the folder *is* the store (nothing is copied); with S3, ``push`` uploads a file
    the engine wrote locally and ``pull`` downloads one another worker wrote.
    """

    def __init__(self, audit):
        self.audit_id = audit.pk
        self.prefix = f"projects/{audit.project_id}/audits/{audit.pk}/work"
        try:
            self.root = Path(default_storage.path(self.prefix))
            self.shared_disk = True
        except NotImplementedError:
            self.root = job_kind("audit").workdir(audit.pk) / "work"
            self.shared_disk = False

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def push(self, rel: str) -> None:
        if self.shared_disk:
            return
        key = self.key(rel)
        saved = replace_stored(key, self.path(rel))
        if saved != key:
            raise RuntimeError(f"the media store saved {key} as {saved}")

    def pull(self, rel: str) -> Path:
        target = self.path(rel)
        if not (self.shared_disk or target.exists()):
            with default_storage.open(self.key(rel), "rb") as src:
                write_atomically(target, src)
        return target

    def write_json(self, rel: str, data) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)
        self.push(rel)

    def read_json(self, rel: str):
        return json.loads(self.pull(rel).read_text())

    def has_files(self) -> bool:
        if self.shared_disk:
            return self.root.exists()
        return any(default_storage.listdir(self.prefix))

    def delete(self) -> None:
        """Remove every intermediate file: from the store, and this worker's local copy."""
        if self.shared_disk:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            _delete_tree(self.prefix)
        shutil.rmtree(job_kind("audit").workdir(self.audit_id), ignore_errors=True)


def _delete_tree(prefix: str) -> None:
    try:
        folders, files = default_storage.listdir(prefix)
    except FileNotFoundError:
        return
    for name in files:
        default_storage.delete(f"{prefix}/{name}")
    for name in folders:
        _delete_tree(f"{prefix}/{name}")


def remove_leftover_work(since_hours: float = 24) -> list[int]:
    """Delete the intermediate files of sharded audits that finished in the last ``since_hours`` and still have
    some: the last step deletes them after storing the result, and a worker stopped right then leaves them."""
    since = timezone.now() - timedelta(hours=since_hours)
    removed = []
    for audit in Audit.objects.filter(shards__gt=0, status__in=FINISHED, finished_at__gte=since):
        work = SharedWork(audit)
        if work.has_files():
            work.delete()
            removed.append(audit.pk)
    return removed
