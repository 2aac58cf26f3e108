"""A job kind added the way a newcomer adds one: this one module holds its model, its declaration, its
``create_`` function and its worker task. Nothing else in the service names it; ``test_job_kinds`` checks that
the API, the pages, the room check, the task routes, the reaper and the scratch sweep serve it anyway.

In the service the model would sit in ``audits/models.py`` with a migration, its module would be listed in
``audits.apps.JOB_MODULES`` and its task would live in ``workers/``. Here the model is defined when a test
declares the kind (``declare``) and forgotten afterwards (``forget``), and the test makes its table itself, so
that no other test meets a model without a table (deleting a project would look for its rows).
"""
from __future__ import annotations

from celery import shared_task
from django.apps import apps
from django.db import models, transaction

from audit_service.audits import jobs
from audit_service.audits.jobs import JobKind, check_room
from audit_service.audits.models import Job
from audit_service.projects.models import Project
from workers.steps import claim_delivery, run_step

NAME = "inspection"
TASK = "tests.inspections.run_inspection"


def declare() -> JobKind:
    """The kind's model (a short job on a project that counts its audits) and its declaration, registered."""

    class Inspection(Job):
        project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
        noun = NAME

        class Meta(Job.Meta):
            app_label = "audits"
            db_table = "test_inspection"

    return jobs.register(JobKind(NAME, Inspection, TASK, fields=("result",)))


def forget() -> None:
    """Undo ``declare``: the kind and its model are gone from the registries."""
    jobs._KINDS.pop(NAME, None)
    apps.all_models["audits"].pop(NAME, None)
    apps.clear_cache()


def create_inspection(*, project, user):
    kind = jobs.job_kind(NAME)
    with transaction.atomic():
        check_room(project)
        inspection = kind.model.objects.create(project=project, created_by=user)
        kind.enqueue_on_commit(inspection.pk)
    return inspection


@shared_task(bind=True, name=TASK)
def run_inspection(self, inspection_id: int) -> None:
    inspection = jobs.job_kind(NAME).model.objects.filter(pk=inspection_id).first()
    if not claim_delivery(inspection, NAME, inspection_id):
        return

    def body(progress) -> None:
        inspection.mark_running("counting", 50.0)
        progress.check(force_poll=True)
        inspection.succeed({"audits": inspection.project.audits.count()}, {"counting": 0.0})

    run_step(self, inspection, body)
