"""Running one claimed piece of a job (a whole audit or correction in one task, or one step of a sharded audit): its
heartbeat, its progress, cancellation, time limit and memory ceiling, and the one error policy of every task."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import shutil
import sys
import threading
import time

from django.conf import settings
from django.db import OperationalError, connection

from audit_service.audits.liveness import worker_identity
from audit_service.audits.models import AuditShard, IllegalTransition, Job, Status
from workers.engine.errors import AuditCancelled, EngineError, is_gpu_out_of_memory, is_out_of_memory, watched_by
from workers.engine.stages import LOADING, STAGE_BY_NAME, memory_advice, overall_percent

log = logging.getLogger(__name__)
RETRY_SECONDS = 30  # after a transient engine error
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# what sizes each stage's memory: the message of a task that ran out of it says what to lower


class OutOfMemory(EngineError):
    """A task over its memory ceiling, or whose allocation failed: permanent (the same options need the same
    memory), and its process gives the memory back before the next task."""


def resident_bytes() -> int | None:
    """This process's resident memory (None where /proc is missing: no ceiling is checked there).

    /proc/self/statm: one read, about 15 microseconds, no dependency; resident memory is what the machine runs
    out of, unlike the address space CUDA and the allocators reserve without using.
    """
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class Progress:
    """The engine's progress callback and its watch (``workers.engine.errors.Watch``): writes stage and percent,
    honours cancellation, the stage time limit and the task's memory ceiling.

    Memory: the worker process's resident memory (RSS) is read at every checkpoint, the places inside the
    engine's long loops where it may stop, and the task fails once it is over WORKER_TASK_MEMORY_MB; one
    allocation that an option sizes is refused before it is made (``reserve``), so that it cannot take the
    machine between two checkpoints; an allocation that fails anyway (torch, numpy, CUDA) is reported the same
    way by ``run_step``. Not RLIMIT_AS or RLIMIT_DATA: CUDA and the allocators reserve far more address space
    than they use, so such a limit breaks GPU workers and counts what costs nothing. A Celery prefork child runs
    one task at a time, so its RSS is the task's (with the model and libraries it keeps between tasks).

    ``write_percent=False`` (one shard of a sharded audit: the shards' rows carry the percent) only checks.
    """

    def __init__(self, job: Job, write_percent: bool = True, stage: str = LOADING, percent=overall_percent):
        self.job = job  # the job: an job, or a correction (``percent``: its stages' weights)
        self.percent = percent
        self.write_percent = write_percent
        self.last = 0.0  # when the percent was written
        self.polled = 0.0  # when cancellation was looked up
        self.stage = stage  # until the engine reports one: what the task does before it
        self.position = ""
        self.stage_started = time.monotonic()
        self.memory_limit = settings.WORKER_TASK_MEMORY_MB * 2 ** 20

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.stage_started = stage, now
        self.position = f" at {done}/{total}"
        # a stage's first and last report always look cancellation up (a cancel is seen before the next stage)
        self.check(force_poll=done in (0, total))
        if now - self.last < settings.AUDIT_PROGRESS_EVERY_SECONDS and done not in (0, total):
            return
        self.last = now
        if self.write_percent:
            self.job.mark_running(stage, self.percent(stage, done, total))

    def checkpoint(self) -> None:
        """The engine's long loops call this between their iterations (``workers.engine.errors.checkpoint``)."""
        self.check()

    def check(self, force_poll: bool = False) -> None:
        used = resident_bytes()
        if used is not None and used > self.memory_limit:
            raise self.out_of_memory(f"used more than {settings.WORKER_TASK_MEMORY_MB} MB of memory "
                                     f"({used // 2 ** 20} MB)")
        now = time.monotonic()
        limit = settings.AUDIT_STAGE_TIME_LIMIT
        if now - self.stage_started > limit:
            raise EngineError(f"stage '{self.stage}' ran longer than its time limit of {limit} s "
                              f"(AUDIT_STAGE_TIME_LIMIT){self.position}; use a smaller dataset, AUDIT_SHARD_SIZE or "
                              "SAE, a faster worker, or raise the limit")
        if force_poll or now - self.polled >= settings.AUDIT_PROGRESS_EVERY_SECONDS:
            self.polled = now
            if self.job.cancel_was_requested():
                raise AuditCancelled()

    def reserve(self, nbytes: int, what: str) -> None:
        """Refuse ``nbytes`` more for ``what`` if they would take the process over its memory ceiling."""
        used = resident_bytes() or 0
        if used + nbytes > self.memory_limit:
            raise self.out_of_memory(f"would need {_mb(nbytes)} MB more for {what}, with {used // 2 ** 20} MB "
                                     f"in use, over the {settings.WORKER_TASK_MEMORY_MB} MB a task may use")

    def out_of_memory(self, what: str, remedy: str = " or raise WORKER_TASK_MEMORY_MB") -> OutOfMemory:
        """The error of a task that ran out of memory: what happened, where, and which option to lower."""
        advice = memory_advice(self.stage)
        return OutOfMemory(f"the {self.job.noun} {what} at stage '{self.stage}'; {advice}{remedy}")

    def allocation_failed(self, exc: BaseException) -> OutOfMemory:
        """An allocation torch, numpy or Python refused (the machine's or the GPU's memory, not the ceiling)."""
        asked = _asked(str(exc))
        if is_gpu_out_of_memory(exc):
            return self.out_of_memory(f"ran out of GPU memory{f' (it asked for {asked} more)' if asked else ''}",
                                      ", or run it on a GPU with more memory")
        return self.out_of_memory(f"could not allocate {f'{asked} of memory' if asked else 'the memory it needed'} "
                                  "(the machine had no more to give)", "")


def _asked(text: str) -> str | None:
    """How much a failed allocation asked for, as its error says it."""
    if found := re.search(r"allocate (\d+) bytes", text):  # torch's CPU allocator
        return f"{_mb(int(found.group(1)))} MB"
    if found := re.search(r"allocate ([\d.]+ ?[KMGTP]i?B)", text):  # CUDA's ("Tried to ..."), numpy's ("Unable to ...")
        return found.group(1)
    return None


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:,.0f}"


def release_memory() -> None:
    """Give back what a task that ran out of memory left, so that this process can take the next task."""
    gc.collect()
    torch = sys.modules.get("torch")  # imported by the engine, if the task got that far
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:  # glibc keeps freed small blocks in its heap; this returns them to the machine
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class Heartbeat(threading.Thread):
    """Calls ``claimed.beat()`` (a job or an AuditShard) every AUDIT_HEARTBEAT_SECONDS, however long a batch
    takes."""

    def __init__(self, claimed: Job | AuditShard):
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


def claim_delivery(job: Job | None, noun: str, pk: int) -> bool:
    """Whether this delivery of a job's task message should run it: the job exists, is not finished, is not run
    by a live worker, has attempts left (else it is given up), and this worker won the claim."""
    if job is None:
        log.warning("%s %s no longer exists; dropping the task", noun, pk)
        return False
    if job.is_finished:
        log.info("%s is already %s; ignoring a duplicate delivery", job, job.status)
        return False
    if job.status == Status.RUNNING and not job.is_abandoned():
        log.info("%s is being run by %s; ignoring a duplicate delivery", job, job.worker_host or "its steps")
        return False
    if job.out_of_attempts:
        job.give_up()
        return False
    if not job.claim(worker_identity()):
        log.info("%s was claimed by another worker meanwhile; ignoring this delivery", job)
        return False
    return True


def stop(job: Job, clean, *, cancelled: bool = False, reason: str = "") -> None:
    """Fail or cancel the job (whichever worker gets there first); ``clean()`` removes its files once it is
    failed or cancelled (not when it moved on meanwhile, e.g. requeued for another attempt)."""
    job.refresh_from_db()
    try:
        if not job.is_finished:
            job.confirm_cancelled() if cancelled else job.fail(reason)
    except IllegalTransition:
        job.refresh_from_db()
    if job.status in (Status.FAILED, Status.CANCELLED):
        clean()


def run_in_scratch(task, job: Job, body, percent=overall_percent) -> str:
    """:func:`run_step` for a short job (a correction, an explanation, a checklist): ``body(workdir, progress)``
    in the job's scratch folder (its kind's ``workdir``), which is removed afterwards whatever the outcome."""
    from audit_service.audits.jobs import job_kind

    workdir = job_kind(job.noun).workdir(job.pk)
    outcome = run_step(task, job, lambda progress: body(workdir, progress),
                       clean=lambda: shutil.rmtree(workdir, ignore_errors=True), percent=percent)
    shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def run_step(task, job: Job, body, clean=lambda: None, row: AuditShard | None = None,
             percent=overall_percent) -> str:
    """Run ``body(progress)`` for a claimed job (``row`` None) or a claimed step ``row`` of it, with a heartbeat.

    The engine's checkpoints inside ``body`` answer to ``progress`` (cancellation, time limit, memory ceiling).
    Cancelled: the job is cancelled. A permanent EngineError fails it with the engine's message; a transient
    one retries the task (the job or row released for the retry), and fails it once the task's retries are
    used up. A database error releases it and is raised again (the tasks autoretry it). An allocation that
    failed (CPU or GPU) fails it saying which option to lower, and the memory is given back so that this
    process takes its next task. Anything else is a bug: the job fails with "internal error". Returns
    "done", "cancelled" or "failed".
    """
    claimed = row or job
    where = f"{row.stage} shard {row.index}" if row else f"the {job.noun}"
    heartbeat = Heartbeat(claimed)
    heartbeat.start()
    # the time limit and cancellation for every step; the percent only where no rows carry it
    progress = Progress(job, write_percent=row is None or not STAGE_BY_NAME[row.stage].per_shard,
                        stage=row.stage if row else LOADING, percent=percent)
    ran_out = False
    try:
        with watched_by(progress):
            body(progress)
    except AuditCancelled:
        stop(job, clean, cancelled=True)
        return "cancelled"
    except EngineError as exc:
        ran_out = isinstance(exc, OutOfMemory)
        if exc.permanent:
            stop(job, clean, reason=exc.message)
        elif task.request.retries >= task.max_retries:
            stop(job, clean, reason=f"{exc.message} ({where} failed {task.max_retries + 1} times)")
        else:
            claimed.release()
            raise task.retry(exc=exc, countdown=RETRY_SECONDS)
        return "failed"
    except OperationalError:
        claimed.release()
        raise
    except Exception as exc:  # a bug or an unexpected input: fail loudly rather than hang
        if is_out_of_memory(exc):
            ran_out = True
            log.warning("%s: %s ran out of memory: %s", job, where, exc)
            stop(job, clean, reason=progress.allocation_failed(exc).message)
            return "failed"
        log.exception("%s: %s failed", job, where)
        stop(job, clean, reason=f"internal error{'' if row is None else f' in {where}'}: {type(exc).__name__}: "
                                  f"{exc}")
        return "failed"
    finally:
        heartbeat.stop()
        if ran_out:
            release_memory()
    return "done"

