"""Celery tasks: thin wrappers that read inputs, call the engine and write results and progress."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

from celery import shared_task
from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

log = logging.getLogger(__name__)

# Share of the overall progress bar each engine stage takes.
STAGE_WEIGHTS = {"extract": 30, "train_sae": 30, "attribute": 25, "label": 5, "flag": 2, "confirm": 8}


def overall_percent(stage: str, done: int, total: int) -> float:
    before = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return round(before + weight * (done / total if total else 1.0), 2)
        before += weight
    return before


class _Progress:
    """The engine's progress callback: writes stage and percent, honours cancellation and the stage time limit.

    ``write_percent=False`` (one shard of a sharded audit: the shards' rows carry the percent) only checks.
    """

    def __init__(self, audit, write_percent: bool = True):
        self.audit = audit
        self.write_percent = write_percent
        self.last = 0.0
        self.stage = None
        self.stage_started = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        from audit_service.audits.models import Audit
        from workers.engine.errors import AuditCancelled, EngineError

        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.stage_started = stage, now
        limit = settings.AUDIT_STAGE_TIME_LIMIT
        if now - self.stage_started > limit:
            raise EngineError(f"stage '{stage}' ran longer than its time limit of {limit} s (AUDIT_STAGE_TIME_LIMIT) "
                              f"at {done}/{total}; use a smaller dataset, AUDIT_SHARD_SIZE or SAE, a faster worker, "
                              "or raise the limit")
        if now - self.last < settings.AUDIT_PROGRESS_EVERY_SECONDS and done not in (0, total):
            return
        self.last = now
        if self.write_percent:
            self.audit.mark_running(stage, overall_percent(stage, done, total))
        if Audit.objects.filter(pk=self.audit.pk, cancel_requested=True).exists():
            raise AuditCancelled()


class _Heartbeat(threading.Thread):
    """Writes the running audit's heartbeat every AUDIT_HEARTBEAT_SECONDS, however long a batch takes.

    With ``shard_id``, the heartbeat of that step of a sharded audit (and the audit's, as a sign of life).
    """

    def __init__(self, audit_id: int, owner: str, shard_id: int | None = None):
        super().__init__(name=f"heartbeat-{audit_id}", daemon=True)
        self.audit_id, self.owner, self.shard_id = audit_id, owner, shard_id
        self.stopped = threading.Event()

    def run(self) -> None:
        from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status

        try:
            while not self.stopped.wait(settings.AUDIT_HEARTBEAT_SECONDS):
                try:
                    now = timezone.now()
                    if self.shard_id is None:
                        Audit.objects.filter(pk=self.audit_id, status=Status.RUNNING, worker_host=self.owner).update(
                            heartbeat_at=now)
                    elif AuditShard.objects.filter(pk=self.shard_id, status=ShardStatus.RUNNING,
                                                   worker_host=self.owner).update(heartbeat_at=now):
                        Audit.objects.filter(pk=self.audit_id, status=Status.RUNNING).update(heartbeat_at=now)
                except OperationalError:
                    log.warning("audit %s: heartbeat not written (database unreachable); retrying", self.audit_id)
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


def worker_identity() -> str:
    """host:pid of this process: who runs an audit, and whether that process still exists."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(worker_host: str) -> bool | None:
    """Whether the process named by ``worker_host`` is alive: known on its own host, None elsewhere."""
    host, _, pid = (worker_host or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        return False  # this process is not running it: whoever wrote that row with our pid is gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process whose parent died too can linger as a zombie until init reaps it: it is dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def is_abandoned(audit, now=None) -> bool:
    """A running audit whose worker is gone: its process on this host has died, or its heartbeat stopped."""
    from audit_service.audits.models import Status

    if audit.status != Status.RUNNING:
        return False
    if audit.shards:
        from workers.sharded import sharded_audit_abandoned

        return sharded_audit_abandoned(audit, now)
    return worker_gone(audit.worker_host, audit.heartbeat_at, now)


def worker_gone(worker_host: str, heartbeat_at, now=None) -> bool:
    """Whether the worker that wrote ``worker_host`` and ``heartbeat_at`` is gone: its process on this host has
    died, or its heartbeat is older than AUDIT_STALE_AFTER_SECONDS."""
    if owner_alive(worker_host) is False:
        return True  # its process on this host is gone; a live pid may be a reused one, so check the heartbeat too
    now = now or timezone.now()
    return heartbeat_at is None or now - heartbeat_at > timedelta(seconds=settings.AUDIT_STALE_AFTER_SECONDS)


def given_up_message(audit) -> str:
    return (f"the audit was started {audit.attempts} times and never finished (its workers crashed, were killed or "
            "lost the database); it was given up after AUDIT_MAX_ATTEMPTS attempts. Check the workers' logs and "
            "memory, then submit it again")


ARTIFACTS = ("sae/sae.safetensors", "sae/sae.json", "sae/metrics.json", "relevance.npz")


def replace_stored(key: str, path) -> str:
    """Store the file at ``path`` under ``key`` in the media store, replacing what was there (a re-run never
    piles up copies); returns the key it got."""
    if default_storage.exists(key):
        default_storage.delete(key)
    with open(path, "rb") as fh:
        return default_storage.save(key, File(fh))


def save_artifacts(audit, workdir) -> dict:
    """Copy the SAE and the full relevance tables into the media store; returns their storage keys.

    The activation cache stays on the worker's scratch disk and is deleted with it. If one copy fails, the
    ones already made are removed.
    """
    prefix = f"projects/{audit.project_id}/audits/{audit.pk}"
    keys = {}
    try:
        for rel in ARTIFACTS:
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


@shared_task(bind=True, name="workers.tasks.run_audit", acks_late=True, reject_on_worker_lost=True,
             max_retries=5, autoretry_for=(OperationalError,), retry_backoff=True)
def run_audit(self, audit_id: int) -> None:
    from audit_service.audits.models import Audit, Status, store_result
    from workers.engine import run_audit as engine_run_audit
    from workers.engine.config import AuditConfig
    from workers.engine.errors import AuditCancelled, EngineError
    from workers.inputs import load_inputs, load_sae_images, sae_dataset_facts

    audit = Audit.objects.filter(pk=audit_id).select_related("clip_model", "probe", "dataset", "sae_dataset").first()
    if audit is None:
        log.warning("audit %s no longer exists; dropping the task", audit_id)
        return
    if audit.is_finished:
        log.info("audit %s is already %s; ignoring a duplicate delivery", audit_id, audit.status)
        return
    if audit.status == Status.RUNNING and not is_abandoned(audit):
        log.info("audit %s is being run by %s; ignoring a duplicate delivery", audit_id, audit.worker_host)
        return
    if audit.attempts >= settings.AUDIT_MAX_ATTEMPTS:
        audit.fail(given_up_message(audit))
        return
    # Claim it: only one of several deliveries read this attempt count, so only one update succeeds.
    me = worker_identity()
    claimed = Audit.objects.filter(pk=audit.pk, status=audit.status, attempts=audit.attempts).update(
        attempts=F("attempts") + 1, worker_host=me, heartbeat_at=timezone.now())
    if not claimed:
        log.info("audit %s was claimed by another worker meanwhile; ignoring this delivery", audit_id)
        return
    audit.attempts += 1
    audit.worker_host = me
    if audit.shards or audit.dataset.n_images > settings.AUDIT_SHARD_SIZE:
        from workers import sharded

        try:
            sharded.start(audit)  # one task per shard and step, over every worker (Celery chords)
        except OperationalError:
            raise  # transient: autoretry with backoff
        except Exception as exc:
            log.exception("audit %s: starting its shards failed", audit_id)
            audit.refresh_from_db()
            if not audit.is_finished:
                audit.fail(f"internal error: {type(exc).__name__}: {exc}")
        return
    workdir = settings.AUDIT_WORK_DIR / f"audit-{audit.pk}"
    heartbeat = _Heartbeat(audit.pk, me)
    heartbeat.start()
    try:
        audit.mark_running("loading", 0.0, worker_host=me)
        bundle, probe, images = load_inputs(audit)
        config = AuditConfig.from_dict(audit.config)
        result = engine_run_audit(config, bundle, probe, images, _Progress(audit), workdir=workdir,
                                  sae_images=load_sae_images(audit))
        Audit.objects.filter(pk=audit.pk).update(device=result.environment["device"])
        result_dict = result.to_dict()
        result_dict["sae_dataset"] = sae_dataset_facts(audit)  # which images trained the SAE (None: the dataset)
        store_with_artifacts(audit, result_dict, workdir, lambda data: store_result(audit, data, result.timings))
    except AuditCancelled:
        audit.refresh_from_db()
        audit.confirm_cancelled()
    except EngineError as exc:
        if exc.permanent:
            audit.refresh_from_db()
            audit.fail(exc.message)
        else:
            Audit.objects.filter(pk=audit.pk).update(heartbeat_at=None)
            raise self.retry(exc=exc, countdown=30)
    except OperationalError:
        Audit.objects.filter(pk=audit.pk).update(heartbeat_at=None)
        raise  # transient: autoretry with backoff
    except Exception as exc:  # a bug or an unexpected input: fail loudly rather than hang
        log.exception("audit %s failed", audit_id)
        audit.refresh_from_db()
        if not audit.is_finished:
            audit.fail(f"internal error: {type(exc).__name__}: {exc}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    finally:
        heartbeat.stop()
    if Audit.objects.filter(pk=audit.pk, status__in=[Status.FAILED, Status.CANCELLED]).exists():
        shutil.rmtree(workdir, ignore_errors=True)


@shared_task(name="workers.tasks.reap_stale_audits")
def reap_stale_audits() -> dict:
    """Requeue (or give up) running audits whose worker is gone; re-send queued audits' lost messages.

    Runs every AUDIT_REAP_EVERY_SECONDS (Celery beat) and when a worker starts.
    """
    from audit_service.audits.models import Audit, IllegalTransition, Status
    from audit_service.audits.services import enqueue

    now = timezone.now()
    done = {"requeued": [], "failed": [], "resent": []}
    for audit in Audit.objects.filter(status=Status.RUNNING):
        if not is_abandoned(audit, now):
            continue
        try:
            with transaction.atomic():
                if audit.attempts >= settings.AUDIT_MAX_ATTEMPTS:
                    audit.fail(given_up_message(audit))
                    done["failed"].append(audit.pk)
                else:
                    log.warning("audit %s: worker %s stopped during %s; requeued (attempt %s of %s used)",
                                audit.pk, audit.worker_host or "of a shard", audit.stage, audit.attempts,
                                settings.AUDIT_MAX_ATTEMPTS)
                    audit._move(Status.QUEUED, heartbeat_at=None, stage="requeued")
                    transaction.on_commit(lambda pk=audit.pk: enqueue(pk))
                    done["requeued"].append(audit.pk)
        except IllegalTransition:
            continue  # it moved on meanwhile: finished, or claimed by a worker
    stale_message = now - timedelta(seconds=settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS)
    for audit in Audit.objects.filter(status=Status.QUEUED, enqueued_at__lt=stale_message):
        enqueue(audit.pk)
        done["resent"].append(audit.pk)
    from workers.sharded import remove_leftover_work

    done["cleaned"] = remove_leftover_work()
    if any(done.values()):
        log.warning("reaper: %s", done)
    remove_finished_work_folders()
    return done


def remove_finished_work_folders() -> list[int]:
    """Delete this host's scratch folders (AUDIT_WORK_DIR/audit-<id>) of audits that are finished or gone.

    Workers of a sharded audit keep local copies of what they read from S3; the audit's last step removes
    only its own worker's copy.
    """
    from audit_service.audits.models import FINISHED, Audit

    folders = {}
    for path in Path(settings.AUDIT_WORK_DIR).glob("audit-*"):
        pk = path.name.removeprefix("audit-")
        if pk.isdigit():
            folders[int(pk)] = path
    alive = set(Audit.objects.filter(pk__in=folders).exclude(status__in=FINISHED).values_list("pk", flat=True))
    removed = sorted(pk for pk in folders if pk not in alive)
    for pk in removed:
        shutil.rmtree(folders[pk], ignore_errors=True)
    return removed
