"""Submitting audits."""
from __future__ import annotations

from collections.abc import Mapping

from django.conf import settings
from django.db import transaction

from audit_service.registry.models import DatasetPurpose
from audit_service.registry.services import RegistrationError
from workers.engine.config import AuditConfig, Bound, check_bounds, json_schema
from workers.engine.errors import EngineError

from .jobs import JobKind, check_room, register
from .models import Audit

AUDIT = register(JobKind("audit", Audit, "workers.tasks.run_audit", related=("project",)))

# The audit options whose upper bound this server sets, and the setting that holds it.
OPTION_BOUNDS = {
    "batch_size": "AUDIT_MAX_BATCH_SIZE",
    "sae.n_latents": "AUDIT_MAX_SAE_LATENTS", "sae.k": "AUDIT_MAX_SAE_LATENTS", "sae.aux_k": "AUDIT_MAX_SAE_LATENTS",
    "sae.batch_size": "AUDIT_MAX_SAE_BATCH_SIZE",
    "sae.steps": "AUDIT_MAX_SAE_STEPS", "sae.dead_after_steps": "AUDIT_MAX_SAE_STEPS",
    "n_references": "AUDIT_MAX_REFERENCES",
    "faithfulness_steps": "AUDIT_MAX_FAITHFULNESS_STEPS",
}


def server_bounds() -> dict[str, Bound]:
    return {option: Bound(getattr(settings, name), f"on this server ({name})")
            for option, name in OPTION_BOUNDS.items()}


def options_schema() -> dict:
    """The audit options as the API takes them (an OpenAPI schema object), with this server's bounds."""
    schema = json_schema(server_bounds())
    for fixed in ("layer", "token"):
        schema["properties"][fixed].update(readOnly=True, description="the registered model's; not an option")
    schema["description"] = ("Audit options (docs/options.md: 'Audit options and their defaults'); each option is checked "
                             "against its type and range, and some against the audited dataset and model.")
    return schema


def create_audit(*, project, user, clip_model, probe, dataset, options: dict | None = None,
                 context: dict | None = None, sae_dataset=None, sae=None) -> Audit:
    """Validate the combination and the options, create the audit and enqueue it once the row is committed.

    ``sae_dataset``: a dataset of the project (labelled or not) whose images train the SAE instead of
    ``dataset``'s. ``sae``: an SAE registered for ``clip_model``, used instead of training one.
    """
    for obj, field in ((clip_model, "clip_model"), (probe, "probe"), (dataset, "dataset"),
                       (sae_dataset, "sae_dataset"), (sae, "sae")):
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
    if sae is not None:
        if sae.clip_model_id != clip_model.id:
            raise RegistrationError(f"SAE '{sae.name}' was registered for model '{sae.clip_model.name}', not for "
                                    f"'{clip_model.name}'", field="sae")
        if sae_dataset is not None:
            raise RegistrationError("an audit with a registered SAE trains none, so it takes no sae_dataset",
                                    field="sae_dataset")
        if isinstance(options, Mapping) and "sae" in options:
            raise RegistrationError("the 'sae' options size and train an SAE; an audit with a registered SAE "
                                    "trains none, so leave them out", field="config")
    if context is not None and not isinstance(context, dict):
        raise RegistrationError("context must be a JSON object", field="context")
    try:
        config = audit_config({} if options is None else options, clip_model=clip_model, dataset=dataset,
                              sae_dataset=sae_dataset)
    except EngineError as exc:
        raise RegistrationError(exc.message, field="config") from exc
    with transaction.atomic():
        check_room(project)
        audit = Audit.objects.create(project=project, clip_model=clip_model, probe=probe, dataset=dataset,
                                     sae_dataset=sae_dataset, sae=sae, config=config.to_dict(), context=context or {},
                                     created_by=user)
        AUDIT.enqueue_on_commit(audit.pk)
    return audit


def create_reaudit(audit: Audit, probe, *, context: dict, user) -> Audit:
    """An audit of ``probe`` (a new version of ``audit``'s) with ``audit``'s model, data, options and SAE (its
    latents are the earlier audit's, so flags compare latent by latent), enqueued once committed.

    No room check: it runs for a job that already holds the project's room (a correction waiting for it)."""
    reaudit = Audit.objects.create(project=audit.project, clip_model=audit.clip_model, probe=probe,
                                   dataset=audit.dataset, sae_dataset=audit.sae_dataset, sae_from=audit,
                                   config=audit.config, context=context, created_by=user)
    AUDIT.enqueue_on_commit(reaudit.pk)
    return reaudit


def audit_config(options, *, clip_model, dataset, sae_dataset=None) -> AuditConfig:
    """The config of an audit of ``dataset`` on ``clip_model`` with the options a user gave, so that a worker can
    run it: typed by the engine's schema, bounded by this server's settings and by the data, its SAE's training
    memory within a worker's; raises EngineError naming the option.

    Bounds that come from the data hold for the options the user gave: the defaults run on any dataset.
    ``n_references`` and ``faithfulness_max_images`` above the dataset's image count are stored as that count,
    which means the same (every image).
    """
    if not isinstance(options, Mapping):
        return AuditConfig.from_dict(options)  # refused, saying what a config must be
    for fixed in ("layer", "token"):
        if fixed in options:
            raise EngineError(f"'{fixed}' is a property of the registered model, not an audit option")
    bounds = server_bounds()
    config = AuditConfig.from_dict({**options, "layer": clip_model.layer, "token": clip_model.token}, bounds)
    for option, bound in _data_bounds(options, config, dataset, sae_dataset or dataset).items():
        if bound.limit < bounds[option].limit:
            bounds[option] = bound
    check_bounds(config, bounds)
    config.n_references = min(config.n_references, max(2, dataset.n_images))
    config.faithfulness_max_images = min(config.faithfulness_max_images, dataset.n_images)
    _check_sae_memory(config, clip_model.width)
    return config


def _given(options: Mapping, option: str) -> bool:
    for part in option.split("."):
        if not isinstance(options, Mapping) or part not in options:
            return False
        options = options[part]
    return True


def _data_bounds(options: Mapping, config: AuditConfig, dataset, sae_dataset) -> dict[str, Bound]:
    bounds = {}
    if _given(options, "sae.batch_size"):  # more than there are, and the trainer's buffer fills without end
        per_image = 1 if config.token == "cls" else config.sae.tokens_per_image
        tokens = "" if per_image == 1 else f" x {per_image} sae.tokens_per_image"
        bounds["sae.batch_size"] = Bound(sae_dataset.n_images * per_image, (
            f"(the SAE's training vectors: {sae_dataset.n_images} images of dataset '{sae_dataset.name}'{tokens})"))
    if _given(options, "faithfulness_steps") and config.sae.n_latents is not None:
        bounds["faithfulness_steps"] = Bound(config.sae.n_latents, "(sae.n_latents: a step deletes one latent)")
    return bounds


def _check_sae_memory(config: AuditConfig, d_model: int) -> None:
    need, budget = config.sae.training_bytes(d_model), settings.WORKER_TASK_MEMORY_MB * 2 ** 20
    if need <= budget:
        return
    latents = (f"{config.sae.n_latents}" if config.sae.n_latents is not None else
               f"up to {4 * d_model} (sized to the data)")
    raise EngineError(f"sae: training the SAE ({latents} latents on {d_model}-wide activations, batches of "
                      f"{config.sae.batch_size}) takes about {need // 2 ** 20} MiB with Adam's states, more "
                      f"than a worker's {settings.WORKER_TASK_MEMORY_MB} MiB per task (WORKER_TASK_MEMORY_MB); "
                      "lower sae.n_latents or sae.batch_size")
