"""Running one claimed piece of an audit (the whole audit in one task, or one step of a sharded audit): its
heartbeat, its progress, cancellation and time limit, and the one error policy of every task."""
from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import OperationalError, connection

from audit_service.audits.models import Audit, AuditShard, IllegalTransition, Status
from workers.engine.errors import AuditCancelled, EngineError
from workers.engine.stages import overall_percent

log = logging.getLogger(__name__)
RETRY_SECONDS = 30  # after a transient engine error


class Progress:
    """The engine's progress callback: writes stage and percent, honours cancellation and the stage time limit.

    ``write_percent=False`` (one shard of a sharded audit: the shards' rows carry the percent) only checks.
    """

    def __init__(self, audit: Audit, write_percent: bool = True):
        self.audit = audit
        self.write_percent = write_percent
        self.last = 0.0
        self.stage = None
        self.stage_started = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
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


class Heartbeat(threading.Thread):
    """Calls ``claimed.beat()`` (an Audit or an AuditShard) every AUDIT_HEARTBEAT_SECONDS, however long a batch
    takes."""

    def __init__(self, claimed: Audit | AuditShard):
        super().__init__(name=f"heartbeat-{claimed}", daemon=True)
        self.claimed = claimed
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(settings.AUDIT_HEARTBEAT_SECONDS):
                try:
                    self.claimed.beat()
                except OperationalError:
                    log.warning("%s: heartbeat not written (database unreachable); retrying", self.claimed)
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


def stop(audit: Audit, clean, *, cancelled: bool = False, reason: str = "") -> None:
    """Fail or cancel the audit (whichever worker gets there first); ``clean()`` removes its files once it is
    failed or cancelled (not when it moved on meanwhile, e.g. requeued for another attempt)."""
    audit.refresh_from_db()
    try:
        if not audit.is_finished:
            audit.confirm_cancelled() if cancelled else audit.fail(reason)
    except IllegalTransition:
        audit.refresh_from_db()
    if audit.status in (Status.FAILED, Status.CANCELLED):
        clean()


def run_step(task, audit: Audit, body, clean=lambda: None, row: AuditShard | None = None) -> str:
    """Run ``body(progress)`` for a claimed audit (``row`` None) or a claimed step ``row`` of it, with a heartbeat.

    Cancelled: the audit is cancelled. A permanent EngineError fails it with the engine's message; a transient
    one retries the task (the audit or row released for the retry), and fails it once the task's retries are
    used up. A database error releases it and is raised again (the tasks autoretry it). Anything else is a bug:
    the audit fails with "internal error". Returns "done", "cancelled" or "failed".
    """
    claimed = row or audit
    where = f"{row.stage} shard {row.index}" if row else "the audit"
    heartbeat = Heartbeat(claimed)
    heartbeat.start()
    # the time limit and cancellation for every step; the percent only where no rows carry it
    progress = Progress(audit, write_percent=row is None or row.stage == "train_sae")
    try:
        body(progress)
    except AuditCancelled:
        stop(audit, clean, cancelled=True)
        return "cancelled"
    except EngineError as exc:
        if exc.permanent:
            stop(audit, clean, reason=exc.message)
        elif task.request.retries >= task.max_retries:
            stop(audit, clean, reason=f"{exc.message} ({where} failed {task.max_retries + 1} times)")
        else:
            claimed.release()
            raise task.retry(exc=exc, countdown=RETRY_SECONDS)
        return "failed"
    except OperationalError:
        claimed.release()
        raise
    except Exception as exc:  # a bug or an unexpected input: fail loudly rather than hang
        log.exception("audit %s: %s failed", audit.pk, where)
        stop(audit, clean, reason=f"internal error{'' if row is None else f' in {where}'}: {type(exc).__name__}: "
                                  f"{exc}")
        return "failed"
    finally:
        heartbeat.stop()
    return "done"
