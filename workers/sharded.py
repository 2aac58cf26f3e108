"""One audit over many workers: per-shard tasks on the gpu queue, joined by Celery chords.

An audit of more than AUDIT_SHARD_SIZE images runs as six steps::

    chord(extract shard 0..n-1)   -> train_sae   (SAE trained once on the pooled activations)
    chord(attribute shard 0..n-1) -> label       (partials merged exactly; labels, flags, relevance tables)
    chord(confirm shard 0..n-1)   -> finish      (ablation/insertion counts summed; result stored)

Each reduce step sends the next stage's chord. Every step has an :class:`AuditShard` row: a worker claims it
with a conditional update, a heartbeat thread keeps it alive, and ``done`` is set once, so a redelivered or
duplicated message never redoes or double-counts a finished shard. The chords count Celery messages; the rows
count the work: a reduce step waits (by retrying itself) until every row of its stage is done.

Intermediate files (activation shards, the SAE, attribution partials, the unconfirmed result) live under
``projects/<p>/audits/<a>/work/`` in the media store: one folder when storage is a local path (shared by the
workers of one host, or one mounted volume), an S3 bucket otherwise (each worker keeps a local copy of what it
read under AUDIT_WORK_DIR; no shared disk is needed).

A worker that dies mid-step leaves its row running; the reaper (``workers.tasks.reap_stale_audits``) sees the
dead process or the stale heartbeat, requeues the audit, and ``run_audit`` starts a new attempt that resumes at
the first unfinished step, sending only the unfinished shards. Reduce steps of an older attempt drop out.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

from celery import chord, group, shared_task
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import OperationalError, transaction
from django.db.models import F
from django.utils import timezone

log = logging.getLogger(__name__)

SHARD_STAGES = ("extract", "attribute", "confirm")
REDUCE_AFTER = {"extract": "train_sae", "attribute": "label", "confirm": "finish"}
STEPS = ("extract", "train_sae", "attribute", "label", "confirm", "finish")
# the progress bar's stage (workers.tasks.STAGE_WEIGHTS) that each step fills
PROGRESS_STAGE = {"extract": "extract", "train_sae": "train_sae", "attribute": "attribute", "label": "flag",
                  "confirm": "confirm", "finish": "confirm"}
WAIT_SECONDS = 2  # how often a reduce step looks again for its stage's unfinished shards
SAE_FILES = ("sae/sae.safetensors", "sae/sae.json", "sae/metrics.json")


# --------------------------------------------------------------------------- shared files
class SharedWork:
    """An audit's intermediate files: in the media store, shared by every worker, read through a local folder.

    With local storage the folder *is* the store (nothing is copied); with S3, ``push`` uploads a file the
    engine wrote locally and ``pull`` downloads one another worker wrote.
    """

    def __init__(self, audit):
        self.audit_id = audit.pk
        self.prefix = f"projects/{audit.project_id}/audits/{audit.pk}/work"
        try:
            self.root = Path(default_storage.path(self.prefix))
            self.shared_disk = True
        except NotImplementedError:
            self.root = settings.AUDIT_WORK_DIR / f"audit-{audit.pk}" / "work"
            self.shared_disk = False

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def push(self, rel: str) -> None:
        if self.shared_disk:
            return
        from workers.tasks import replace_stored

        key = self.key(rel)
        saved = replace_stored(key, self.path(rel))
        if saved != key:
            raise RuntimeError(f"the media store saved {key} as {saved}")

    def pull(self, rel: str) -> Path:
        target = self.path(rel)
        if self.shared_disk or target.exists():
            return target
        from workers.inputs import download

        with default_storage.open(self.key(rel), "rb") as src:
            download(src, target)
        return target

    def write_json(self, rel: str, data) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)
        self.push(rel)

    def read_json(self, rel: str):
        return json.loads(self.pull(rel).read_text())

    def delete(self) -> None:
        """Remove every intermediate file: from the store, and this worker's local copy."""
        if self.shared_disk:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            _delete_tree(self.prefix)
        shutil.rmtree(settings.AUDIT_WORK_DIR / f"audit-{self.audit_id}", ignore_errors=True)


def remove_leftover_work(since_hours: float = 24) -> list[int]:
    """Delete the intermediate files of sharded audits that finished in the last ``since_hours`` and still have
    some: the last step deletes them after storing the result, and a worker stopped right then leaves them."""
    from audit_service.audits.models import FINISHED, Audit

    since = timezone.now() - timedelta(hours=since_hours)
    removed = []
    for audit in Audit.objects.filter(shards__gt=0, status__in=FINISHED, finished_at__gte=since):
        work = SharedWork(audit)
        if work.shared_disk and not work.path().exists():
            continue
        if not work.shared_disk and not any(default_storage.listdir(work.prefix)):
            continue
        work.delete()
        removed.append(audit.pk)
    return removed


def _delete_tree(prefix: str) -> None:
    try:
        folders, files = default_storage.listdir(prefix)
    except FileNotFoundError:
        return
    for name in files:
        default_storage.delete(f"{prefix}/{name}")
    for name in folders:
        _delete_tree(f"{prefix}/{name}")


# --------------------------------------------------------------------------- inputs, cached per worker process
_CACHE: dict = {}


def _inputs(audit) -> dict:
    """Model, probe, prepared images, config and device of an audit, loaded once per worker process."""
    from workers.engine.config import AuditConfig
    from workers.engine.loading import resolve_device
    from workers.engine.pipeline import prepare_images
    from workers.inputs import load_inputs

    if _CACHE.get("audit") != audit.pk:
        _CACHE.clear()
        bundle, probe, dataset = load_inputs(audit, fetch_images=False)  # images: per shard, in _extract
        config = AuditConfig.from_dict(audit.config)
        device = resolve_device(config.device)
        bundle.model.to(device)
        _CACHE.update(audit=audit.pk, bundle=bundle, probe=probe, images=prepare_images(bundle, probe, dataset),
                      config=config, device=device)
    return _CACHE


def _context(audit, work: SharedWork):
    """The attribution context (SAE, heads, methods) once the SAE exists."""
    from workers.engine.pipeline import AuditContext
    from workers.engine.sae import TopKSAE

    c = _inputs(audit)
    if "ctx" not in c:
        for rel in SAE_FILES:
            work.pull(rel)
        sae = TopKSAE.load(work.path("sae"), c["device"]).eval().requires_grad_(False)
        c["ctx"] = AuditContext.build(c["config"], c["bundle"], c["probe"], sae, c["device"])
    return c["ctx"]


def _store(audit, work: SharedWork, files: tuple = (), indices=()):
    """The activation cache as this worker sees it: every shard's metadata and labels, and the ``files``
    ("acts", "emb") of the shards in ``indices``."""
    from workers.engine.activations import ActivationStore, assemble_store, shard_files

    folder = work.path("activations")
    if not (folder / "store.json").is_file():
        metas = [work.read_json(f"activations/{shard_files(i)['done']}") for i in range(audit.shards)]
        for meta in metas:
            work.pull(f"activations/{meta['labels']}")
        assemble_store(folder, metas)
    for i in indices:
        for name in files:
            work.pull(f"activations/{shard_files(i)[name]}")
    return ActivationStore(folder)


# --------------------------------------------------------------------------- rows
def row_abandoned(row, now=None) -> bool:
    """A running step whose worker is gone: its process on this host died, or its heartbeat stopped."""
    from workers.tasks import worker_gone

    return row.status == "running" and worker_gone(row.worker_host, row.heartbeat_at, now)


def sharded_audit_abandoned(audit, now=None) -> bool:
    """A sharded audit needs a new attempt when a step's worker is gone, or when nothing has run for
    AUDIT_REQUEUE_QUEUED_AFTER_SECONDS (its messages were lost, e.g. with a broker that kept nothing)."""
    from audit_service.audits.models import AuditShard, ShardStatus

    now = now or timezone.now()
    running = list(AuditShard.objects.filter(audit=audit, status=ShardStatus.RUNNING))
    if any(row_abandoned(row, now) for row in running):
        return True
    if running:
        return False
    last = audit.heartbeat_at or audit.started_at
    return last is None or (now - last).total_seconds() > settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS


def next_step(audit) -> str | None:
    """The first step with an unfinished row."""
    from audit_service.audits.models import AuditShard, ShardStatus

    unfinished = set(AuditShard.objects.filter(audit=audit).exclude(status=ShardStatus.DONE)
                     .values_list("stage", flat=True))
    return next((step for step in STEPS if step in unfinished), None)


def shard_progress(audit) -> dict:
    """{step: {"done": n, "total": n}} of a sharded audit, in step order."""
    from audit_service.audits.models import AuditShard, ShardStatus

    out = {step: {"done": 0, "total": 0} for step in STEPS}
    for stage, status in AuditShard.objects.filter(audit=audit).values_list("stage", "status"):
        out[stage]["total"] += 1
        out[stage]["done"] += status == ShardStatus.DONE
    return out


def running_workers(audit) -> list[str]:
    """host:pid of the workers running a step of the audit now."""
    from audit_service.audits.models import AuditShard, ShardStatus

    return sorted(set(AuditShard.objects.filter(audit=audit, status=ShardStatus.RUNNING)
                      .values_list("worker_host", flat=True)))


def _record_progress(audit_id: int, stage: str) -> None:
    from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status
    from workers.tasks import overall_percent

    rows = AuditShard.objects.filter(audit_id=audit_id, stage=stage)
    done, total = rows.filter(status=ShardStatus.DONE).count(), rows.count()
    Audit.objects.filter(pk=audit_id, status=Status.RUNNING).update(
        stage=stage, percent=overall_percent(PROGRESS_STAGE[stage], done, total), heartbeat_at=timezone.now())


# --------------------------------------------------------------------------- starting and sending
def start(audit) -> None:
    """Plan the shards (first attempt), reset the steps of dead workers, and send the first unfinished step.

    Called by ``run_audit`` after it claimed the audit (``audit.attempts`` is this attempt).
    """
    from audit_service.audits.models import Audit, AuditShard, ShardStatus
    from workers.engine.activations import plan_shards

    with transaction.atomic():
        if not AuditShard.objects.filter(audit=audit).exists():
            n = audit.dataset.n_images
            plan = plan_shards(n, settings.AUDIT_SHARD_SIZE)
            rows = [AuditShard(audit=audit, stage=stage, index=i, start=s, count=c)
                    for stage in SHARD_STAGES for i, (s, c) in enumerate(plan)]
            rows += [AuditShard(audit=audit, stage=stage, index=0, start=0, count=n)
                     for stage in REDUCE_AFTER.values()]
            AuditShard.objects.bulk_create(rows, ignore_conflicts=True)
            Audit.objects.filter(pk=audit.pk).update(shards=len(plan))
            audit.shards = len(plan)
        now = timezone.now()
        for row in AuditShard.objects.filter(audit=audit, status=ShardStatus.RUNNING):
            if row_abandoned(row, now):
                log.warning("audit %s: %s shard %s was left running by %s; it is redone", audit.pk, row.stage,
                            row.index, row.worker_host)
                AuditShard.objects.filter(pk=row.pk, status=ShardStatus.RUNNING, attempts=row.attempts).update(
                    status=ShardStatus.PENDING, worker_host="")
    step = next_step(audit) or "finish"
    audit.mark_running(step, audit.percent)
    Audit.objects.filter(pk=audit.pk).update(worker_host="")
    send(audit.pk, audit.attempts, step)


def send(audit_id: int, attempt: int, step: str) -> None:
    """Send ``step``: a reduce step alone, or a chord of a stage's unfinished shards joined by its reduce step."""
    from audit_service.audits.models import AuditShard, ShardStatus

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
    """Claim the step's row, run ``body(audit, row, progress)``, mark the row done once. Returns what happened."""
    from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status
    from workers.engine.errors import AuditCancelled, EngineError
    from workers.tasks import _Heartbeat, _Progress, worker_identity

    audit = Audit.objects.filter(pk=audit_id).select_related("clip_model", "probe", "dataset", "sae_dataset").first()
    if audit is None or audit.status != Status.RUNNING:
        return "audit not running"
    if audit.cancel_requested:
        _stop(audit, cancelled=True)
        return "cancelled"
    row = AuditShard.objects.filter(audit=audit, stage=stage, index=index).first()
    if row is None:
        return "no such step"
    if row.status == ShardStatus.DONE:
        return "done before"
    if row.status == ShardStatus.RUNNING and not row_abandoned(row):
        return "running elsewhere"
    me = worker_identity()
    now = timezone.now()
    claimed = AuditShard.objects.filter(pk=row.pk, status=row.status, attempts=row.attempts).update(
        status=ShardStatus.RUNNING, worker_host=me, heartbeat_at=now, started_at=now, attempts=F("attempts") + 1)
    if not claimed:
        return "claimed elsewhere"
    row.status, row.worker_host, row.started_at = ShardStatus.RUNNING, me, now
    log.info("audit %s: %s shard %s (images %s..%s) on %s", audit_id, stage, index, row.start,
             row.start + row.count, me)
    heartbeat = _Heartbeat(audit.pk, me, shard_id=row.pk)
    heartbeat.start()
    began = time.perf_counter()
    # the time limit and cancellation for every step; the percent only from SAE training (rows carry the rest)
    reporter = _Progress(audit, write_percent=stage == "train_sae")
    try:
        body(audit, row, lambda done, total: reporter(stage, done, total))
    except AuditCancelled:
        _stop(audit, cancelled=True)
        return "cancelled"
    except EngineError as exc:
        if exc.permanent:
            _stop(audit, reason=exc.message)
            return "failed"
        if task.request.retries >= task.max_retries:
            _stop(audit, reason=f"{exc.message} ({stage} shard {index} failed {task.max_retries + 1} times)")
            return "failed"
        _release(row.pk, me)
        raise task.retry(exc=exc, countdown=30)
    except OperationalError:
        _release(row.pk, me)
        raise  # transient: autoretry with backoff
    except Exception as exc:  # a bug or an unexpected input: fail loudly rather than hang
        log.exception("audit %s: %s shard %s failed", audit_id, stage, index)
        _stop(audit, reason=f"internal error in {stage} shard {index}: {type(exc).__name__}: {exc}")
        return "failed"
    finally:
        heartbeat.stop()
    AuditShard.objects.filter(pk=row.pk, status=ShardStatus.RUNNING, worker_host=me).update(
        status=ShardStatus.DONE, finished_at=timezone.now(), seconds=time.perf_counter() - began)
    _record_progress(audit_id, stage)
    if Audit.objects.filter(pk=audit_id, status__in=[Status.FAILED, Status.CANCELLED]).exists():
        SharedWork(audit).delete()  # it failed elsewhere meanwhile: no files of this step are left behind
    _sweep_scratch()
    return "done"


_SWEPT = {"at": 0.0}


def _sweep_scratch() -> None:
    """Delete this worker's local copies of finished audits (at most once a minute): a worker that read
    shards from S3 keeps them under AUDIT_WORK_DIR only while their audit runs."""
    from workers.tasks import remove_finished_work_folders

    if time.monotonic() - _SWEPT["at"] < 60:
        return
    _SWEPT["at"] = time.monotonic()
    try:
        remove_finished_work_folders()
    except OSError:
        log.exception("removing finished audits' scratch folders failed")


def _release(row_id: int, me: str) -> None:
    from audit_service.audits.models import AuditShard, ShardStatus

    AuditShard.objects.filter(pk=row_id, status=ShardStatus.RUNNING, worker_host=me).update(
        status=ShardStatus.PENDING, worker_host="", heartbeat_at=None)


def _stop(audit, *, cancelled: bool = False, reason: str = "") -> None:
    """Fail or cancel the audit (whichever step gets there first) and remove its intermediate files."""
    from audit_service.audits.models import IllegalTransition

    audit.refresh_from_db()
    try:
        if not audit.is_finished:
            audit.confirm_cancelled() if cancelled else audit.fail(reason)
    except IllegalTransition:
        pass
    SharedWork(audit).delete()


def _reduce(task, audit_id: int, attempt: int, step: str, body) -> str:
    """A reduce step of attempt ``attempt``: wait for its stage's shards, run once, send the next step."""
    from audit_service.audits.models import Audit, AuditShard, ShardStatus, Status

    audit = Audit.objects.filter(pk=audit_id).only("status", "attempts").first()
    if audit is None or audit.status != Status.RUNNING:
        return "audit not running"
    if audit.attempts != attempt:
        return "an older attempt"  # a newer attempt sent its own steps
    stage = next(s for s, r in REDUCE_AFTER.items() if r == step)
    if AuditShard.objects.filter(audit_id=audit_id, stage=stage).exclude(status=ShardStatus.DONE).exists():
        raise task.retry(countdown=WAIT_SECONDS, max_retries=None)  # a duplicate message ended the chord early
    outcome = _run_step(task, audit_id, step, 0, body)
    if outcome == "running elsewhere":
        raise task.retry(countdown=WAIT_SECONDS, max_retries=None)
    if outcome in ("done", "done before") and step != "finish":
        following = STEPS[STEPS.index(step) + 1]
        if Audit.objects.filter(pk=audit_id, status=Status.RUNNING, attempts=attempt).exists():
            send(audit_id, attempt, following)
    return outcome


# --------------------------------------------------------------------------- the step bodies
def _extract(audit, row, progress) -> None:
    from workers.engine.activations import extract_shard
    from workers.engine.pipeline import extract_kwargs

    from workers.inputs import dataset_folder

    c, work = _inputs(audit), SharedWork(audit)
    dataset_folder(audit.dataset, only=c["images"].ids[row.start:row.start + row.count])  # S3: this shard's images
    meta = extract_shard(c["bundle"], c["images"], work.path("activations"), row.index, row.start, row.count,
                         progress=progress, **extract_kwargs(c["config"], c["device"]))
    for name in ("acts", "emb", "labels", "done"):  # the done marker last
        work.push(f"activations/{meta[name]}")


def _train_sae(audit, row, progress) -> None:
    from workers.engine.pipeline import extract_sae_images, fit_sae
    from workers.inputs import load_sae_images

    c, work = _inputs(audit), SharedWork(audit)
    sae_images = load_sae_images(audit)
    if sae_images is None:
        store = _store(audit, work, files=("acts", "emb"), indices=range(audit.shards))
        train_progress = progress
    else:
        # the SAE's own dataset is extracted here, by this one worker (only this step reads its activations),
        # into its scratch folder (a new attempt on the same host resumes from the finished extraction shards)
        folder = settings.AUDIT_WORK_DIR / f"audit-{audit.pk}" / "sae_activations"
        store, train_progress = extract_sae_images(c["bundle"], sae_images, folder, c["config"], c["device"],
                                                   progress)
    fit_sae(store, c["config"], work.path("sae"), c["device"], train_progress)
    for rel in SAE_FILES:
        work.push(rel)
    if sae_images is not None:
        shutil.rmtree(store.folder, ignore_errors=True)


def _attribute(audit, row, progress) -> None:
    from workers.engine.pipeline import attribute_shard, save_partial

    work = SharedWork(audit)
    store = _store(audit, work, files=("acts", "emb"), indices=[row.index])
    partial = attribute_shard(_context(audit, work), store, row.start, row.count, progress)
    rel = f"attribution/partial-{row.index:05d}.npz"
    work.path(rel).parent.mkdir(parents=True, exist_ok=True)
    save_partial(partial, work.path(rel))
    work.push(rel)


def _label(audit, row, progress) -> None:
    from audit_service.audits.models import AuditShard, ShardStatus
    from workers.engine.pipeline import label_latents, load_partial, merge_partials, summarize

    c, work = _inputs(audit), SharedWork(audit)
    store = _store(audit, work, files=("emb",), indices=range(audit.shards))
    ctx = _context(audit, work)
    merged = merge_partials([load_partial(work.pull(f"attribution/partial-{i:05d}.npz"))
                             for i in range(audit.shards)])
    labelled = label_latents(ctx, store, c["images"], merged)
    result, amounts = summarize(ctx, store, c["images"], merged, labelled, work.read_json("sae/metrics.json"),
                                work.path())
    work.push("relevance.npz")
    work.write_json("draft.json", {"result": result.to_dict(), "amounts": amounts})
    if not (c["config"].causal and result.flags):  # nothing to confirm: the confirm shards have no work
        AuditShard.objects.filter(audit=audit, stage="confirm").update(status=ShardStatus.DONE,
                                                                      finished_at=timezone.now())


def _confirm(audit, row, progress) -> None:
    from workers.engine.pipeline import confirm_shard

    work = SharedWork(audit)
    draft = work.read_json("draft.json")
    store = _store(audit, work, files=("acts", "emb"), indices=[row.index])
    stats = confirm_shard(_context(audit, work), store, draft["result"]["flags"], draft["amounts"], row.start,
                          row.count, progress)
    work.write_json(f"confirm/stats-{row.index:05d}.json", stats)


def _finish(audit, row, progress) -> None:
    from audit_service.audits.models import Audit, AuditShard, ShardStatus, store_result
    from workers.engine.pipeline import apply_confirmation, merge_confirmations
    from workers.inputs import sae_dataset_facts
    from workers.tasks import ARTIFACTS, store_with_artifacts

    c, work = _inputs(audit), SharedWork(audit)
    draft = work.read_json("draft.json")
    result = draft["result"]
    if c["config"].causal and result["flags"]:
        stats = [work.read_json(f"confirm/stats-{i:05d}.json") for i in range(audit.shards)]
        apply_confirmation(result["flags"], merge_confirmations(stats), draft["amounts"], c["config"])
    else:
        apply_confirmation(result["flags"], None, draft["amounts"], c["config"])
    rows = list(AuditShard.objects.filter(audit=audit).exclude(stage="finish"))
    timings = {}
    for r in rows:  # worker-seconds per engine stage, summed over shards
        timings[r.stage] = timings.get(r.stage, 0.0) + r.seconds
    hosts = sorted({r.worker_host.rpartition(":")[0] for r in rows if r.worker_host})
    result["timings"] = timings
    result["sae_dataset"] = sae_dataset_facts(audit)
    result["environment"].update(host=", ".join(hosts), shards=audit.shards,
                                 workers=len({r.worker_host for r in rows if r.worker_host}))
    for rel in ARTIFACTS:
        work.pull(rel)

    def store(data: dict) -> None:
        Audit.objects.filter(pk=audit.pk).update(device=data["environment"]["device"])
        with transaction.atomic():  # the audit is never shown finished while its last step is not
            AuditShard.objects.filter(pk=row.pk).update(
                status=ShardStatus.DONE, finished_at=timezone.now(),
                seconds=(timezone.now() - row.started_at).total_seconds() if row.started_at else 0.0)
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
    return _run_step(self, audit_id, "extract", index, _extract)


@shared_task(name="workers.sharded.attribute_shard", **_SHARD_OPTIONS)
def attribute_shard_task(self, audit_id: int, index: int) -> str:
    """Attribution, reference tracking and deletion curves of one shard; a partial for the reduce step."""
    return _run_step(self, audit_id, "attribute", index, _attribute)


@shared_task(name="workers.sharded.confirm_shard", **_SHARD_OPTIONS)
def confirm_shard_task(self, audit_id: int, index: int) -> str:
    """Ablation and insertion counts of every flag on one shard."""
    return _run_step(self, audit_id, "confirm", index, _confirm)


@shared_task(name="workers.sharded.train_sae", **_REDUCE_OPTIONS)
def train_sae_task(self, audit_id: int, attempt: int) -> str:
    """Join the activation shards and train the SAE once on the pooled activations."""
    return _reduce(self, audit_id, attempt, "train_sae", _train_sae)


@shared_task(name="workers.sharded.label", **_REDUCE_OPTIONS)
def label_task(self, audit_id: int, attempt: int) -> str:
    """Merge the attribution partials; label latents; find flags."""
    return _reduce(self, audit_id, attempt, "label", _label)


@shared_task(name="workers.sharded.finish", **_REDUCE_OPTIONS)
def finish_task(self, audit_id: int, attempt: int) -> str:
    """Sum the confirmation counts, store the result and the artifacts, remove the intermediate files."""
    return _reduce(self, audit_id, attempt, "finish", _finish)


SHARD_TASKS = {"extract": extract_shard_task, "attribute": attribute_shard_task, "confirm": confirm_shard_task}
REDUCE_TASKS = {"train_sae": train_sae_task, "label": label_task, "finish": finish_task}
