"""A job kind added the way a newcomer adds one: this one module holds its model, its declaration, its
``create_`` function and its worker task. Nothing else in the service names it; ``test_job_kinds`` checks that
the API, the pages, the room check, the task routes, the reaper and the scratch sweep serve it anyway.

In the service the model would sit in ``audits/models.py`` with a migration and the task in ``workers/``; here
the test makes the table itself (``schema_editor``) so that the real schema has no test table.
"""
from __future__ import annotations

from celery import shared_task
from django.db import models, transaction

from audit_service.audits.jobs import JobKind, check_room
from audit_service.audits.models import Job
from audit_service.projects.models import Project
from workers.steps import claim_delivery, run_step


class Inspection(Job):
    """A short job on a project: counts its audits (the work stands for any engine call)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    noun = "inspection"

    class Meta(Job.Meta):
        app_label = "audits"
        db_table = "test_inspection"


INSPECTION = JobKind("inspection", Inspection, "tests.inspections.run_inspection", fields=("result",))


def create_inspection(*, project, user) -> Inspection:
    with transaction.atomic():
        check_room(project)
        inspection = Inspection.objects.create(project=project, created_by=user)
        INSPECTION.enqueue_on_commit(inspection.pk)
    return inspection


@shared_task(bind=True, name="tests.inspections.run_inspection")
def run_inspection(self, inspection_id: int) -> None:
    inspection = Inspection.objects.filter(pk=inspection_id).first()
    if not claim_delivery(inspection, "inspection", inspection_id):
        return

    def body(progress) -> None:
        inspection.mark_running("counting", 50.0)
        progress.check(force_poll=True)
        inspection.succeed({"audits": inspection.project.audits.count()}, {"counting": 0.0})

    run_step(self, inspection, body)
