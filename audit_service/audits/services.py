"""Submitting audits."""
from __future__ import annotations

from celery import current_app
from django.db import transaction
from django.utils import timezone

from audit_service.registry.models import DatasetPurpose
from audit_service.registry.services import RegistrationError

from .models import Audit, Status

RUN_AUDIT_TASK = "workers.tasks.run_audit"


def create_audit(*, project, user, clip_model, probe, dataset, options: dict | None = None,
                 context: dict | None = None, sae_dataset=None) -> Audit:
    """Validate the combination and the options, create the audit and enqueue it once the row is committed.

    ``sae_dataset``: a dataset of the project (labelled or not) whose images train the SAE instead of
    ``dataset``'s.
    """
    from workers.engine.config import AuditConfig
    from workers.engine.errors import EngineError

    for obj, field in ((clip_model, "clip_model"), (probe, "probe"), (dataset, "dataset"),
                       (sae_dataset, "sae_dataset")):
        if obj is not None and obj.project_id != project.id:
            raise RegistrationError(f"the {field.replace('_', ' ')} belongs to another project", field=field)
    if dataset.purpose == DatasetPurpose.SAE_TRAINING:
        raise RegistrationError(f"dataset '{dataset.name}' was registered for SAE training (its labels are not "
                                "checked), so it cannot be audited; audit a labelled dataset and give this one as "
                                "sae_dataset", field="dataset")
    if probe.clip_model_id != clip_model.id:
        raise RegistrationError(f"probe '{probe.name}' was trained on model '{probe.clip_model.name}', "
                                f"not on '{clip_model.name}'", field="probe")
    unknown = sorted(set(dataset.class_names) - set(probe.class_names))
    if unknown:
        raise RegistrationError(f"the dataset has classes the probe does not know: {', '.join(unknown)}; "
                                f"the probe's classes are {', '.join(probe.class_names)}", field="dataset")
    if context is not None and not isinstance(context, dict):
        raise RegistrationError("context must be a JSON object", field="context")
    options = dict(options or {})
    for fixed in ("layer", "token"):
        if fixed in options:
            raise RegistrationError(f"'{fixed}' is a property of the registered model, not an audit option",
                                    field="config")
    try:
        config = AuditConfig.from_dict({**options, "layer": clip_model.layer, "token": clip_model.token})
    except (EngineError, TypeError) as exc:
        raise RegistrationError(str(exc), field="config") from exc
    running = Audit.objects.filter(project=project, status__in=[Status.QUEUED, Status.RUNNING]).count()
    if running >= project.max_concurrent_audits:
        raise RegistrationError(f"project '{project.name}' already has {running} audits queued or running "
                                f"(limit {project.max_concurrent_audits}); wait for one to finish or cancel one",
                                field="project")
    with transaction.atomic():
        audit = Audit.objects.create(project=project, clip_model=clip_model, probe=probe, dataset=dataset,
                                     sae_dataset=sae_dataset, config=config.to_dict(), context=context or {},
                                     created_by=user)
        transaction.on_commit(lambda: enqueue(audit.pk))
    return audit


def enqueue(audit_id: int) -> None:
    """Send the audit's task message and remember when (the reaper re-sends messages a broker lost).

    The task is sent by name: the web process loads no worker code, and CELERY_TASK_ROUTES routes the name to
    the gpu queue.
    """
    Audit.objects.filter(pk=audit_id).update(enqueued_at=timezone.now())
    current_app.send_task(RUN_AUDIT_TASK, args=[audit_id])
