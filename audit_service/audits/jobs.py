"""Job kinds: each kind of job a worker runs (an audit, a correction, an explanation), declared once.

A ``JobKind`` names the kind's model (a subclass of ``models.Job``: state machine, attempts, heartbeat, cancel),
the Celery task that runs it and the fields the API shows of it. Everything that handles jobs in general reads
the declarations instead of naming the kinds:

- enqueueing (``JobKind.enqueue``) and the task routes (``route``: every kind's task goes to the gpu queue);
- the room check (``check_room``: queued and running jobs of every kind count against a project's limit);
- the reaper (``workers.tasks``: requeues every kind's abandoned jobs and re-sends their lost messages);
- the scratch folders (``workers.storage``: ``<kind>-<id>``, removed once the job is finished);
- the API (``/api/v1/<kind>s/``: list, read, cancel) and the pages (``/<kind>s/<id>/``, its progress and cancel).

Adding a kind: one module that defines its ``create_<kind>`` function and registers its ``JobKind`` (listed in
``apps.JOB_MODULES``), its model in ``models.py`` with a migration, and the worker's task under the declared name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit_service.projects.models import Project
from audit_service.registry.services import RegistrationError

from .models import Job, Status

GPU_QUEUE = "gpu"
SHARD_TASKS = "workers.sharded."  # the steps of an audit spread over shards run on the gpu queue too

# the fields of every job, as the API shows them (a kind adds its own: ``JobKind.fields``)
JOB_FIELDS = ("id", "project", "status", "stage", "percent", "cancel_requested", "error", "attempts", "worker_host",
              "device", "timings", "created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class JobKind:
    """One kind of job.

    ``name``: the noun in messages, URLs (``<name>s/<id>/``) and scratch folders (``<name>-<id>``).
    ``task``: the Celery task that runs one job, sent by name (the web process loads no worker code).
    ``fields``: the kind's own fields the API shows besides ``JOB_FIELDS``.
    ``related``: what its pages and API read with it (``select_related``).
    ``reap``: what the reaper does for this kind besides requeueing (returns {"what": [ids]}).
    """

    name: str
    model: type[Job]
    task: str
    fields: tuple[str, ...] = ()
    related: tuple[str, ...] = ("project",)
    reap: Callable[[], dict[str, list[int]]] | None = field(default=None, compare=False)

    @property
    def plural(self) -> str:
        return f"{self.name}s"

    @property
    def work_prefix(self) -> str:
        """A worker's scratch folder for a job of this kind is AUDIT_WORK_DIR/<work_prefix><id>."""
        return f"{self.name}-"

    def workdir(self, pk: int) -> Path:
        """A worker's scratch folder for job ``pk`` of this kind (removed once the job is finished)."""
        return Path(settings.AUDIT_WORK_DIR) / f"{self.work_prefix}{pk}"

    def enqueue(self, pk: int) -> None:
        """Send the job's task message and remember when (the reaper re-sends messages a broker lost)."""
        self.model.objects.filter(pk=pk).update(enqueued_at=timezone.now())
        current_app.send_task(self.task, args=[pk])

    def enqueue_on_commit(self, pk: int) -> None:
        """Enqueue once the transaction that created the job has committed (a worker then finds its row)."""
        transaction.on_commit(lambda: self.enqueue(pk))

    def for_user(self, user):
        """The jobs of this kind in the projects ``user`` can see."""
        return self.model.objects.filter(project__in=Project.objects.for_user(user)).select_related(*self.related)


_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    """Declare a kind (once per name; importing its module again declares the same kind)."""
    known = _KINDS.setdefault(kind.name, kind)
    if known.model is not kind.model or known.task != kind.task:
        raise ValueError(f"job kind '{kind.name}' is declared twice, differently")
    return known


def kinds() -> tuple[JobKind, ...]:
    """Every declared kind, in the order they were declared (audits first)."""
    return tuple(_KINDS.values())


def job_kind(name: str) -> JobKind:
    return _KINDS[name]


def kind_of(job: Job) -> JobKind:
    return next(k for k in _KINDS.values() if isinstance(job, k.model))


def check_room(project) -> None:
    """Refuse a new job while the project's jobs of every kind that are queued or running fill its
    ``max_concurrent_audits``.

    Called inside the transaction that creates the job: it locks the project's row first, so requests for the
    same project count and create one after the other (on PostgreSQL a row lock; SQLite's transactions take
    the write lock when they begin, ``transaction_mode`` IMMEDIATE in settings) and simultaneous requests
    cannot all see the same free room."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("check_room must run inside the transaction that creates the job")
    project = type(project).objects.select_for_update().get(pk=project.pk)
    live = [Status.QUEUED, Status.RUNNING]
    running = sum(k.model.objects.filter(project=project, status__in=live).count() for k in kinds())
    if running >= project.max_concurrent_audits:
        raise RegistrationError(f"project '{project.name}' already has {running} jobs queued or running "
                                f"(limit {project.max_concurrent_audits}); wait for one to finish or cancel one",
                                field="project")


def route(name, args, kwargs, options, task=None, **kw):
    """Celery's task router (CELERY_TASK_ROUTES): the jobs' tasks and the shards' steps run on the gpu queue."""
    if name.startswith(SHARD_TASKS) or any(name == k.task for k in kinds()):
        return {"queue": GPU_QUEUE}  # a new dict each time: Celery adds the message's options to it
    return None
