"""One audit over many workers: per-shard tasks on the gpu queue, joined by Celery chords.

An audit of more than AUDIT_SHARD_SIZE images runs as the steps of ``workers.engine.stages``: each per-shard
stage is a chord of one task per shard, joined by the reduce step declared after it::

    chord(extract shard 0..n-1)   -> train_sae   (SAE trained once on the pooled activations)
    chord(attribute shard 0..n-1) -> label       (partials merged exactly; labels, flags, relevance tables)
    chord(confirm shard 0..n-1)   -> finish      (ablation/insertion counts summed; result stored)

Each reduce step sends the next stage's chord. Every step has an :class:`AuditShard` row that a worker claims,
keeps alive with a heartbeat and marks done once, so a redelivered or duplicated message never redoes or
double-counts a finished shard. The chords count Celery messages; the rows count the work: a reduce step waits
(by retrying itself) until every row of its stage is done.

Intermediate files (activation shards, the SAE, attribution partials, the unconfirmed result) live under
``projects/<p>/audits/<a>/work/`` in the media store (``workers.storage.SharedWork``).

A worker that dies mid-step leaves its row running; the reaper (``workers.tasks.reap_stale_audits``) sees the
dead process or the stale heartbeat, requeues the audit, and ``run_audit`` starts a new attempt that resumes at
the first unfinished step, sending only the unfinished shards. Reduce steps of an older attempt drop out.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial

from celery import chord, group, shared_task
from django.conf import settings
from django.db import OperationalError, transaction

from audit_service.audits.jobs import job_kind
from audit_service.audits.liveness import worker_identity
from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status, store_result
from workers.engine import pipeline
from workers.engine.activations import ActivationStore, assemble_store, extract_shard, plan_shards, shard_files
from workers.engine.config import AuditConfig
from workers.engine.hooks import check_token_reaches_output
from workers.engine.data import ImageSet
from workers.engine.heads import LinearProbe
from workers.engine.loading import ClipBundle, resolve_device
from workers.engine.sae import TopKSAE
from workers.engine.stages import ATTRIBUTE, CONFIRM, EXTRACT, FINISH, LABEL, STAGE_NAMES, STAGES, TRAIN_SAE
from workers.inputs import (dataset_folder, load_inputs, load_registered_sae, load_sae_images, registered_sae_facts,
                            sae_dataset_facts)
from workers.steps import run_step, stop
from workers.storage import (ARTIFACTS, SAE_ARTIFACTS, SharedWork, dictionary_artifacts, fetch_sae, remove_finished_work_folders,
                             store_with_artifacts)

log = logging.getLogger(__name__)

SHARD_STAGES = tuple(s.name for s in STAGES if s.per_shard)
# each per-shard stage is joined by the reduce step declared right after it
REDUCE_AFTER = {name: STAGE_NAMES[STAGE_NAMES.index(name) + 1] for name in SHARD_STAGES}
WAIT_SECONDS = 2  # how often a reduce step looks again for its stage's unfinished shards
SAE_FILES = SAE_ARTIFACTS


# --------------------------------------------------------------------------- inputs, cached per worker process
@dataclass
class Inputs:
    """What every step of one audit reads: model, probe, config, device and the prepared images; its SAE's
    attribution context once the SAE exists (``ctx``, set by ``_context``)."""

    audit_id: int
    bundle: ClipBundle
    probe: LinearProbe
    config: AuditConfig
    device: object
    images: ImageSet
    ctx: pipeline.AuditContext | None = None


_CACHE: dict[str, Inputs] = {}


def _inputs(audit) -> Inputs:
    """The audit's inputs, loaded once per worker process (the last audit's are kept)."""
    cached = _CACHE.get("inputs")
    if cached is None or cached.audit_id != audit.pk:
        _CACHE.clear()
        bundle, probe, dataset = load_inputs(audit, fetch_images=False)  # images: per shard, in _extract
        config = AuditConfig.from_dict(audit.config)
        # a model registered before such layer/token pairs were refused: fail before any shard's work
        check_token_reaches_output(bundle.model.visual, config.layer, config.token)
        device = resolve_device(config.device)
        bundle.model.to(device)
        _CACHE["inputs"] = Inputs(audit.pk, bundle, probe, config, device,
                                  pipeline.prepare_images(bundle, probe, dataset))
    return _CACHE["inputs"]


def _context(audit, work: SharedWork) -> pipeline.AuditContext:
    """The attribution context (SAE, heads, methods) once the SAE exists."""
    c = _inputs(audit)
    if c.ctx is None:
        for rel in SAE_FILES:
            work.pull(rel)
        sae = TopKSAE.load(work.path("sae"), c.device).eval().requires_grad_(False)
        c.ctx = pipeline.AuditContext.build(c.config, c.bundle, c.probe, sae, c.device)
    return c.ctx


def _store(audit, work: SharedWork, files: tuple = (), indices=()) -> ActivationStore:
    """The activation cache as this worker sees it: every shard's metadata and labels, and the ``files``
    ("acts", "emb", "patches" where a shard kept training patch tokens) of the shards in ``indices``."""
    folder = work.path("activations")
    if not (folder / "store.json").is_file():
        metas = [work.read_json(f"activations/{shard_files(i)['done']}") for i in range(audit.shards)]
        for meta in metas:
            work.pull(f"activations/{meta['labels']}")
        assemble_store(folder, metas)
    store = ActivationStore(folder)
    for i in indices:
        for name in files:
            if name != "patches" or store.shards[i].patches:
                work.pull(f"activations/{shard_files(i)[name]}")
    return store


# --------------------------------------------------------------------------- starting and sending
def start(audit) -> None:
    """Plan the shards (first attempt), put back the steps of dead workers, and send the first unfinished step.

    Called by ``run_audit`` after it claimed the audit (``audit.attempts`` is this attempt).
    """
    step = audit.run_as_shards(plan_shards(audit.dataset.n_images, settings.AUDIT_SHARD_SIZE))
    for row in audit.shard_steps.filter(status=ShardStatus.RUNNING):
        if row.is_abandoned():
            log.warning("audit %s: %s shard %s was left running by %s; it is redone", audit.pk, row.stage,
                        row.index, row.worker_host)
            row.release()
    send(audit.pk, audit.attempts, step)


def send(audit_id: int, attempt: int, step: str) -> None:
    """Send ``step``: a reduce step alone, or a chord of a stage's unfinished shards joined by its reduce step."""
    stage = next((s for s, r in REDUCE_AFTER.items() if step in (s, r)), step)
    reduce_task = REDUCE_TASKS[REDUCE_AFTER[stage]].si(audit_id, attempt)
    pending = list(AuditShard.objects.filter(audit_id=audit_id, stage=stage).exclude(status=ShardStatus.DONE)
                   .order_by("index").values_list("index", flat=True))
    if pending:
        chord(group(SHARD_TASKS[stage].si(audit_id, i) for i in pending), reduce_task).apply_async()
    else:
        reduce_task.apply_async()


# --------------------------------------------------------------------------- running one step
def _run_step(task, audit_id: int, stage: str, index: int, body) -> str:
    """Claim the step's row, run ``body(audit, row, progress)`` (``workers.steps.run_step``), mark the row done
    once. Returns what happened."""
    audit = Audit.objects.filter(pk=audit_id).select_related("clip_model", "probe", "dataset", "sae_dataset").first()
    if audit is None or audit.status != Status.RUNNING:
        return "audit not running"
    work = SharedWork(audit)
    if audit.cancel_requested:
        stop(audit, work.delete, cancelled=True)
        return "cancelled"
    row = AuditShard.objects.filter(audit=audit, stage=stage, index=index).first()
    if row is None:
        return "no such step"
    if row.status == ShardStatus.DONE:
        return "done before"
    if row.status == ShardStatus.RUNNING and not row.is_abandoned():
        return "running elsewhere"
    if not row.claim(worker_identity()):
        return "claimed elsewhere"
    log.info("audit %s: %s shard %s (images %s..%s) on %s", audit_id, stage, index, row.start,
             row.start + row.count, row.worker_host)
    outcome = run_step(task, audit, lambda progress: body(audit, row, partial(progress, stage)), work.delete, row)
    if outcome != "done":
        return outcome
    row.mark_done()
    audit.record_progress(stage)
    audit.refresh_from_db(fields=["status"])
    if audit.status in (Status.FAILED, Status.CANCELLED):
        work.delete()  # it failed elsewhere meanwhile: no files of this step are left behind
    _sweep_scratch()
    return "done"


_SWEPT = {"at": 0.0}


def _sweep_scratch() -> None:
    """Delete this worker's local copies of finished audits (at most once a minute): a worker that read
    shards from S3 keeps them under AUDIT_WORK_DIR only while their audit runs."""
    if time.monotonic() - _SWEPT["at"] < 60:
        return
    _SWEPT["at"] = time.monotonic()
    try:
        remove_finished_work_folders()
    except OSError:
        log.exception("removing finished audits' scratch folders failed")


def _reduce(task, audit_id: int, attempt: int, step: str, body) -> str:
    """A reduce step of attempt ``attempt``: wait for its stage's shards, run once, send the next step."""
    audit = Audit.objects.filter(pk=audit_id).first()
    if audit is None or audit.status != Status.RUNNING:
        return "audit not running"
    if audit.attempts != attempt:
        return "an older attempt"  # a newer attempt sent its own steps
    stage = next(s for s, r in REDUCE_AFTER.items() if r == step)
    shards = audit.progress()[stage]
    if shards["done"] < shards["total"]:
        raise task.retry(countdown=WAIT_SECONDS, max_retries=None)  # a duplicate message ended the chord early
    outcome = _run_step(task, audit_id, step, 0, body)
    if outcome == "running elsewhere":
        raise task.retry(countdown=WAIT_SECONDS, max_retries=None)
    if outcome in ("done", "done before") and step != STAGE_NAMES[-1]:
        audit.refresh_from_db(fields=["status", "attempts"])
        if audit.status == Status.RUNNING and audit.attempts == attempt:
            send(audit_id, attempt, STAGE_NAMES[STAGE_NAMES.index(step) + 1])
    return outcome


# --------------------------------------------------------------------------- the step bodies
# Each runs one step of a stage with the engine's body of that stage (workers.engine.pipeline), reading and writing
# the hand-offs between stages in the shared work folder.
def _extract(audit, row, progress) -> None:
    c, work = _inputs(audit), SharedWork(audit)
    dataset_folder(audit.dataset, only=c.images.ids[row.start:row.start + row.count])  # S3: this shard's images
    meta = extract_shard(c.bundle, c.images, work.path("activations"), row.index, row.start, row.count,
                         progress=progress, **pipeline.extract_kwargs(c.config, c.device))
    for name in ("acts", "emb", "labels", "patches", "done"):  # the done marker last
        if meta.get(name):  # patches: only a CLS-only cache keeps them for training
            work.push(f"activations/{meta[name]}")


def _train_sae(audit, row, progress) -> None:
    c, work = _inputs(audit), SharedWork(audit)
    # a reused or registered SAE needs no training images
    sae_images = None if audit.sae_from_id or audit.sae_id else load_sae_images(audit)
    # the SAE's own dataset is extracted by this one worker (only this step reads its activations) into its
    # scratch folder (a new attempt on the same host resumes from the finished extraction shards)
    scratch = job_kind("audit").workdir(audit.pk) / "sae_activations"
    store = None if sae_images is not None else _store(audit, work, files=("acts", "emb", "patches"),
                                                       indices=range(audit.shards))
    if audit.sae_from_id:  # train_stage finds the earlier audit's SAE in the folder and reuses it
        fetch_sae(audit.sae_from, work.path("sae"))
    registered = load_registered_sae(audit.sae, c.device) if audit.sae_id else None  # measured, not trained
    pipeline.train_stage(c.bundle, store, c.config, work.path("sae"), c.device, progress, sae=registered,
                         sae_images=sae_images, scratch=scratch)
    for rel in [*SAE_FILES, *dictionary_artifacts(work.path())]:
        work.push(rel)
    work.write_json("dictionaries.json", dictionary_artifacts(work.path()))
    if sae_images is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _attribute(audit, row, progress) -> None:
    work = SharedWork(audit)
    store = _store(audit, work, files=("acts", "emb"), indices=[row.index])
    partial = pipeline.attribute_shard(_context(audit, work), store, row.start, row.count, progress)
    rel = f"attribution/partial-{row.index:05d}.npz"
    work.path(rel).parent.mkdir(parents=True, exist_ok=True)
    pipeline.save_partial(partial, work.path(rel))
    work.push(rel)


def _label(audit, row, progress) -> None:
    c, work = _inputs(audit), SharedWork(audit)
    # the activations too: the other dictionaries read them to vote on the flags
    store = _store(audit, work, files=("acts", "emb"), indices=range(audit.shards))
    partials = [pipeline.load_partial(work.pull(f"attribution/partial-{i:05d}.npz")) for i in range(audit.shards)]
    for rel in work.read_json("dictionaries.json"):
        work.pull(rel)
    voters = pipeline.load_others(work.path("sae"), c.config, c.device)
    # the images the flags' cards show: downloaded alone with remote storage
    draft = pipeline.label_stage(_context(audit, work), store, c.images, partials, work.read_json("sae/metrics.json"),
                                 work.path(), voters=voters,
                                 fetch_images=lambda keys: dataset_folder(audit.dataset, only=keys))
    work.push("relevance.npz")
    work.write_json("draft.json", draft.to_dict())
    if not draft.needs_confirmation(c.config):  # the confirm shards have no work
        audit.skip(CONFIRM)


def _confirm(audit, row, progress) -> None:
    work = SharedWork(audit)
    draft = pipeline.Draft.from_dict(work.read_json("draft.json"))
    store = _store(audit, work, files=("acts", "emb"), indices=[row.index])
    stats = pipeline.confirm_shard(_context(audit, work), store, draft.result.flags, draft.amounts,
                                   row.start, row.count, progress)
    work.write_json(f"confirm/stats-{row.index:05d}.json", stats)


def _finish(audit, row, progress) -> None:
    c, work = _inputs(audit), SharedWork(audit)
    draft = pipeline.Draft.from_dict(work.read_json("draft.json"))
    stats = None
    if draft.needs_confirmation(c.config):
        stats = [work.read_json(f"confirm/stats-{i:05d}.json") for i in range(audit.shards)]
    result = pipeline.confirm_stage(draft, stats, c.config).to_dict()
    rows = list(audit.shard_steps.exclude(stage=FINISH))
    timings = {}
    for r in rows:  # worker-seconds per engine stage, summed over shards
        timings[r.stage] = timings.get(r.stage, 0.0) + r.seconds
    hosts = sorted({r.worker_host.rpartition(":")[0] for r in rows if r.worker_host})
    result.update(timings=timings, sae_dataset=sae_dataset_facts(audit), registered_sae=registered_sae_facts(audit))
    result["environment"].update(host=", ".join(hosts), shards=audit.shards,
                                 workers=len({r.worker_host for r in rows if r.worker_host}))
    # the voting dictionaries too: whichever host finishes stores them (dictionaries.json lists what was trained)
    for rel in [*ARTIFACTS, *work.read_json("dictionaries.json")]:
        work.pull(rel)

    def store(data: dict) -> None:
        audit.device = data["environment"]["device"]
        audit.save(update_fields=["device"])
        with transaction.atomic():  # the audit is never shown finished while its last step is not
            row.mark_done()
            store_result(audit, data, timings)

    store_with_artifacts(audit, result, work.path(), store)
    try:
        work.delete()
    except Exception:  # the audit is stored; leftovers are only disk space
        log.exception("audit %s: removing its intermediate files failed", audit.pk)


# --------------------------------------------------------------------------- the tasks
_SHARD_OPTIONS = dict(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=False, max_retries=5,
                      autoretry_for=(OperationalError,), retry_backoff=True)
_REDUCE_OPTIONS = dict(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None,
                       autoretry_for=(OperationalError,), retry_backoff=True)


@shared_task(name="workers.sharded.extract_shard", **_SHARD_OPTIONS)
def extract_shard_task(self, audit_id: int, index: int) -> str:
    """Extract the activations of one shard of images and write them to the media store."""
    return _run_step(self, audit_id, EXTRACT, index, _extract)


@shared_task(name="workers.sharded.attribute_shard", **_SHARD_OPTIONS)
def attribute_shard_task(self, audit_id: int, index: int) -> str:
    """Attribution, reference tracking and deletion curves of one shard; a partial for the reduce step."""
    return _run_step(self, audit_id, ATTRIBUTE, index, _attribute)


@shared_task(name="workers.sharded.confirm_shard", **_SHARD_OPTIONS)
def confirm_shard_task(self, audit_id: int, index: int) -> str:
    """Ablation and insertion counts of every flag on one shard."""
    return _run_step(self, audit_id, CONFIRM, index, _confirm)


@shared_task(name="workers.sharded.train_sae", **_REDUCE_OPTIONS)
def train_sae_task(self, audit_id: int, attempt: int) -> str:
    """Join the activation shards and train the SAE once on the pooled activations."""
    return _reduce(self, audit_id, attempt, TRAIN_SAE, _train_sae)


@shared_task(name="workers.sharded.label", **_REDUCE_OPTIONS)
def label_task(self, audit_id: int, attempt: int) -> str:
    """Merge the attribution partials; label latents; find flags."""
    return _reduce(self, audit_id, attempt, LABEL, _label)


@shared_task(name="workers.sharded.finish", **_REDUCE_OPTIONS)
def finish_task(self, audit_id: int, attempt: int) -> str:
    """Sum the confirmation counts, store the result and the artifacts, remove the intermediate files."""
    return _reduce(self, audit_id, attempt, FINISH, _finish)


SHARD_TASKS = {EXTRACT: extract_shard_task, ATTRIBUTE: attribute_shard_task, CONFIRM: confirm_shard_task}
REDUCE_TASKS = {TRAIN_SAE: train_sae_task, LABEL: label_task, FINISH: finish_task}
