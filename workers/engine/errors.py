"""The exceptions the engine raises for problems a caller must report, and the checkpoints of its long loops.

Every loop of the engine that can run long (over batches, training steps, chunks of a buffer, flags) calls
:func:`checkpoint`, and every allocation whose size one audit option decides calls :func:`reserve` first. Both
do nothing unless a caller installed a :class:`Watch` with :func:`watched_by`; the worker installs one per task
that honours cancellation, the stage time limit and the task's memory ceiling (``workers.steps.Progress``).

A context variable rather than a callback argument: the loops that must stop sit deep (inside the SAE's
training-batch generator, the deletion curves, the summary), most below any function that takes a progress
callback, and the callback's (stage, done, total) shape does not fit "may I go on?" nor "may I take N bytes?".
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Protocol


class EngineError(Exception):
    """An audit cannot go on.

    ``permanent`` says whether retrying can help: a bad checkpoint or a probe of
    the wrong width is permanent (fail the audit with this message), a lost
    connection or a full disk is transient (the worker may retry).
    """

    def __init__(self, message: str, *, permanent: bool = True):
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class AuditCancelled(Exception):
    """Raised from a progress callback or a checkpoint to stop an audit between batches."""


class Watch(Protocol):
    """What a caller lets the engine ask while it works."""

    def checkpoint(self) -> None:
        """Raise AuditCancelled or an EngineError (a time or memory limit) if the work must stop now."""

    def reserve(self, nbytes: int, what: str) -> None:
        """Raise an EngineError if ``nbytes`` more memory for ``what`` (naming the option that sizes it) would
        take the task over its memory ceiling."""


_WATCH: ContextVar[Watch | None] = ContextVar("clip_audit_engine_watch", default=None)


@contextmanager
def watched_by(watch: Watch) -> Iterator[Watch]:
    """Run the engine calls inside the block under ``watch`` (one per task; nested blocks restore the outer)."""
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def checkpoint() -> None:
    """Let the caller stop the work here: call it once per iteration of every loop that can run long."""
    watch = _WATCH.get()
    if watch is not None:
        watch.checkpoint()


def reserve(nbytes: int | float, what: str) -> None:
    """Ask before allocating ``nbytes`` whose size an option decides; ``what`` names the buffer and the option.

    One huge allocation is refused here before it is made: made, it could take the machine's memory at once,
    before any checkpoint sees the process grow.
    """
    watch = _WATCH.get()
    if watch is not None:
        watch.reserve(int(nbytes), what)


def is_out_of_memory(exc: BaseException) -> bool:
    """Is ``exc`` an allocation that failed (CPU or GPU), not a bug?

    torch reports both as RuntimeError (CUDA's as its subclass torch.OutOfMemoryError); Python and numpy as
    MemoryError.
    """
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return any(s in text for s in ("can't allocate memory", "not enough memory", "out of memory"))


def is_gpu_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return is_out_of_memory(exc) and ("CUDA" in text or "MPS" in text or "GPU" in text or "HIP" in text)
