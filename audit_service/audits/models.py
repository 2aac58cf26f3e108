"""Audits and what they found: latents, flags and reviews of flags."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models, transaction
from django.db.models.signals import post_delete
from django.dispatch import Signal, receiver
from django.utils import timezone

from audit_service.projects.models import Project
from audit_service.registry.models import ClipModel, Dataset, Probe, SparseAutoencoder
from workers.engine.stages import STAGE_NAMES, STAGES, correction_percent, overall_percent

from .fields import FLAG_FIELDS, LATENT_FIELDS, Confirmation, Head, model_values
from .liveness import worker_gone


# sent with ``audit=`` once an audit reached a final state (within the transaction that moved it, if any)
audit_finished = Signal()


class IllegalTransition(Exception):
    """An audit was asked to move to a state it cannot reach from where it is."""


class Status(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
ALLOWED = {
    Status.QUEUED: {Status.RUNNING, Status.FAILED, Status.CANCELLED},
    Status.RUNNING: {Status.RUNNING, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.QUEUED},
    Status.SUCCEEDED: set(),
    Status.FAILED: set(),
    Status.CANCELLED: set(),
}


class Job(models.Model):
    """A job a worker runs (an audit, a correction): its state machine, progress, attempts and heartbeat.

    Every transition is a conditional update (the row moves only from the state this object read), so two
    workers, the reaper and a user's cancel never overwrite each other.
    """

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    stage = models.CharField(max_length=30, blank=True)
    percent = models.FloatField(default=0.0)  # overall, 0..100
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    worker_host = models.CharField(max_length=200, blank=True)
    device = models.CharField(max_length=100, blank=True)
    timings = models.JSONField(default=dict)  # stage -> seconds
    result = models.JSONField(null=True, blank=True)  # what the job found, once succeeded
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)  # when its task message was last sent

    noun = "job"

    class Meta:
        abstract = True
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.noun} {self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def _rows(self, **conditions):
        """This job's row, while ``conditions`` hold (one filter call: the row and the conditions together)."""
        return type(self)._default_manager.filter(pk=self.pk, **conditions)

    # ------------------------------------------------------------------ transitions
    def _move(self, to: str, **fields) -> None:
        """Move to ``to`` only if the row is still where this object thinks it is (conditional update)."""
        if to not in ALLOWED[self.status]:
            raise IllegalTransition(f"{self.noun} {self.pk} is {self.status}; it cannot become {to}")
        updated = self._rows(status=self.status).update(status=to, **fields)
        if not updated:
            current = self._rows().values_list("status", flat=True).first()
            raise IllegalTransition(f"{self.noun} {self.pk} changed to {current} meanwhile; it cannot become {to}")
        self.status = to
        for key, value in fields.items():
            setattr(self, key, value)
        if to in FINISHED:
            self.finished()

    def finished(self) -> None:
        """Called once the job reached a final state (in the transaction that moved it, if any)."""

    def mark_running(self, stage: str, percent: float, *, worker_host: str = "", device: str = "") -> None:
        fields = {"stage": stage, "percent": percent, "heartbeat_at": timezone.now()}
        if self.status == Status.QUEUED:
            fields["started_at"] = timezone.now()
        if worker_host:
            fields["worker_host"] = worker_host
        if device:
            fields["device"] = device
        self._move(Status.RUNNING, **fields)

    def succeed(self, result: dict, timings: dict) -> None:
        self._move(Status.SUCCEEDED, result=result, timings=timings, stage="done", percent=100.0,
                   finished_at=timezone.now(), error="")

    def fail(self, reason: str) -> None:
        self._move(Status.FAILED, error=reason[:10000], finished_at=timezone.now())

    def cancel(self) -> None:
        """A queued job is cancelled at once; a running one is asked to stop between batches."""
        if self.status == Status.QUEUED:
            self._move(Status.CANCELLED, finished_at=timezone.now(), stage="cancelled")
        elif self.status == Status.RUNNING:
            self._rows().update(cancel_requested=True)
            self.cancel_requested = True
        else:
            raise IllegalTransition(f"{self.noun} {self.pk} is {self.status}; only queued or running "
                                    f"{self.noun}s can be cancelled")

    def confirm_cancelled(self) -> None:
        self._move(Status.CANCELLED, finished_at=timezone.now(), stage="cancelled")

    def requeue(self) -> None:
        """Put a running job whose worker is gone back in the queue; the next delivery starts a new attempt."""
        self._move(Status.QUEUED, heartbeat_at=None, stage="requeued")

    @property
    def out_of_attempts(self) -> bool:
        return self.attempts >= settings.AUDIT_MAX_ATTEMPTS

    def give_up(self) -> None:
        self.fail(f"the {self.noun} was started {self.attempts} times and never finished (its workers crashed, "
                  "were killed or lost the database); it was given up after AUDIT_MAX_ATTEMPTS attempts. Check the "
                  "workers' logs and memory, then submit it again")

    # ------------------------------------------------------------------ the worker that runs it
    def claim(self, worker: str) -> bool:
        """Start the next attempt on ``worker``. Of several deliveries that read this row, one wins: the update
        holds only while status and attempts are what this object read."""
        now = timezone.now()
        claimed = self._rows(status=self.status, attempts=self.attempts).update(
            attempts=models.F("attempts") + 1, worker_host=worker, heartbeat_at=now)
        if claimed:
            self.attempts, self.worker_host, self.heartbeat_at = self.attempts + 1, worker, now
        return bool(claimed)

    def beat(self) -> None:
        """The heartbeat of the worker that claimed it (a worker that lost it to another writes nothing)."""
        if self.worker_host:
            self._rows(status=Status.RUNNING, worker_host=self.worker_host).update(
                heartbeat_at=timezone.now())

    def release(self) -> None:
        """Let a retried delivery claim it again at once: without a heartbeat it counts as abandoned."""
        self._rows().update(heartbeat_at=None)
        self.heartbeat_at = None

    def is_abandoned(self, now=None) -> bool:
        """A running job whose worker is gone: its process on this host died, or its heartbeat stopped."""
        return self.status == Status.RUNNING and worker_gone(self.worker_host, self.heartbeat_at, now or timezone.now())

    def cancel_was_requested(self) -> bool:
        return self._rows(cancel_requested=True).exists()

    # ------------------------------------------------------------------ what its progress bar shows
    @property
    def overall_percent(self) -> float:
        """The percent a reader sees (a kind whose work goes on in another job counts that job's in)."""
        return self.percent

    def shown_stage(self, **known) -> tuple[str, str]:
        """The stage and the worker(s) as a reader should see them (``known``: what the caller already read,
        that a kind would otherwise read again)."""
        return self.stage, self.worker_host

    def progress_view(self, now=None, **known) -> dict:
        """Status, stage, percent, elapsed and estimated remaining seconds, attempts and worker: what a progress
        bar shows, for a job of any kind."""
        now = now or timezone.now()
        elapsed = remaining = None
        percent = self.overall_percent
        if self.started_at:
            elapsed = ((self.finished_at or now) - self.started_at).total_seconds()
            if self.status == Status.RUNNING and percent > 1:
                remaining = elapsed * (100.0 - percent) / percent
        stage, worker = self.shown_stage(**known)
        return {"id": self.pk, "kind": self.noun, "status": self.status, "stage": stage, "percent": round(percent, 1),
                "elapsed_s": elapsed, "remaining_s": remaining, "finished": self.is_finished,
                "cancel_requested": self.cancel_requested, "error": self.error, "attempts": self.attempts,
                "worker_host": worker, "device": self.device, "shards": None}


class Audit(Job):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="audits")
    clip_model = models.ForeignKey(ClipModel, on_delete=models.PROTECT, related_name="audits")
    probe = models.ForeignKey(Probe, on_delete=models.PROTECT, related_name="audits")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="audits")
    # a (larger, maybe unlabelled) dataset of the project the SAE is trained on instead of ``dataset``
    sae_dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.PROTECT,
                                    related_name="sae_audits")
    # an earlier audit whose SAE this one reuses instead of training one (a corrected probe's re-audit: its
    # latents are the earlier audit's, so flags compare latent by latent)
    sae_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="sae_reused_by")
    # an SAE trained elsewhere and registered for the model: used instead of training one
    sae = models.ForeignKey(SparseAutoencoder, null=True, blank=True, on_delete=models.PROTECT, related_name="audits")
    config = models.JSONField(default=dict)  # workers.engine.AuditConfig.to_dict()
    context = models.JSONField(default=dict, blank=True)  # what the submitter attached, e.g. case-study metrics
    # dataset shards the audit is spread over (AUDIT_SHARD_SIZE images each); 0: it runs as one task
    shards = models.PositiveIntegerField(default=0)

    noun = "audit"

    class Meta(Job.Meta):
        pass

    def finished(self) -> None:
        # e.g. a correction waiting for this audit (its re-audit of the corrected probe) finishes with it
        audit_finished.send(sender=Audit, audit=self)

    def is_abandoned(self, now=None) -> bool:
        """A running audit whose worker is gone: its process on this host died, or its heartbeat stopped. A
        sharded audit is abandoned when a step's worker is gone, or when nothing has run for
        AUDIT_REQUEUE_QUEUED_AFTER_SECONDS (its messages were lost, e.g. with a broker that kept nothing)."""
        if self.status != Status.RUNNING:
            return False
        now = now or timezone.now()
        if not self.shards:
            return worker_gone(self.worker_host, self.heartbeat_at, now)
        running = list(self.shard_steps.filter(status=ShardStatus.RUNNING))
        if running:
            return any(row.is_abandoned(now) for row in running)
        last = self.heartbeat_at or self.started_at
        return last is None or (now - last).total_seconds() > settings.AUDIT_REQUEUE_QUEUED_AFTER_SECONDS

    def shown_stage(self, progress: dict | None = None, **known) -> tuple[str, str]:
        """Spread over workers: which step, how many of its shards are done, who runs them (``progress``: the
        shard progress when the caller has read it)."""
        stage, worker = self.stage, self.worker_host
        if self.shards:
            shards = self.progress() if progress is None else progress
            if self.status == Status.RUNNING and stage in shards:
                stage = f"{stage} ({shards[stage]['done']}/{shards[stage]['total']} shards)"
                worker = ", ".join(self.running_workers())
            elif self.is_finished:
                worker = f"{self.shards} shards"
        return stage, worker

    def progress_view(self, now=None, **known) -> dict:
        shards = self.progress()  # read once: the stage shown counts its shards too
        return {**super().progress_view(now, progress=shards), "shards": shards}

    # ------------------------------------------------------------------ an audit spread over shards
    def run_as_shards(self, plan: list[tuple[int, int]]) -> str:
        """Spread the audit over the shards of images in ``plan`` ((start, count) each): one step row per
        shard of each per-shard stage and one per reduce step, made on the first attempt (later attempts keep
        them and their progress). Returns the first unfinished step, at which the audit is shown running; from
        here on its steps' rows name their workers."""
        with transaction.atomic():
            if not self.shard_steps.exists():
                rows = []
                for s in STAGES:
                    spans = plan if s.per_shard else [(0, self.dataset.n_images)]
                    rows += [AuditShard(audit=self, stage=s.name, index=i, start=start, count=count)
                             for i, (start, count) in enumerate(spans)]
                AuditShard.objects.bulk_create(rows, ignore_conflicts=True)
                Audit.objects.filter(pk=self.pk).update(shards=len(plan))
                self.shards = len(plan)
        unfinished = set(self.shard_steps.exclude(status=ShardStatus.DONE).values_list("stage", flat=True))
        step = next((name for name in STAGE_NAMES if name in unfinished), STAGE_NAMES[-1])
        self.mark_running(step, self.percent)
        Audit.objects.filter(pk=self.pk).update(worker_host="")
        self.worker_host = ""
        return step

    def progress(self) -> dict[str, dict[str, int]] | None:
        """{step: {"done": n, "total": n}} of a sharded audit, in step order; None for an audit run as one task."""
        if not self.shards:
            return None
        out = {name: {"done": 0, "total": 0} for name in STAGE_NAMES}
        for stage, status in self.shard_steps.values_list("stage", "status"):
            out[stage]["total"] += 1
            out[stage]["done"] += status == ShardStatus.DONE
        return out

    def running_workers(self) -> list[str]:
        """host:pid of the workers running a step of the audit now."""
        return sorted(set(self.shard_steps.filter(status=ShardStatus.RUNNING).values_list("worker_host", flat=True)))

    def record_progress(self, step: str) -> None:
        """Show a running sharded audit at ``step``, with the percent its finished rows make."""
        rows = self.progress()[step]
        Audit.objects.filter(pk=self.pk, status=Status.RUNNING).update(
            stage=step, percent=overall_percent(step, rows["done"], rows["total"]), heartbeat_at=timezone.now())

    def skip(self, step: str) -> None:
        """Mark every row of ``step`` done without running it (e.g. no flag to confirm)."""
        self.shard_steps.filter(stage=step).update(status=ShardStatus.DONE, finished_at=timezone.now())


class ShardStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"


class AuditShard(models.Model):
    """One step of a sharded audit: a shard of a per-shard stage (extract, attribute, confirm; images
    [start, start + count)) or a reduce step (train_sae, label, finish; index 0). Its row is the record that
    the work was done, once: the steps' chords count Celery messages, the rows count the work."""

    audit = models.ForeignKey(Audit, on_delete=models.CASCADE, related_name="shard_steps")
    stage = models.CharField(max_length=20)
    index = models.PositiveIntegerField()
    start = models.PositiveIntegerField()
    count = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=ShardStatus.choices, default=ShardStatus.PENDING)
    worker_host = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # times a worker started it
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    seconds = models.FloatField(default=0.0)  # wall time of the run that finished it

    class Meta:
        ordering = ["audit", "id"]
        constraints = [models.UniqueConstraint(fields=["audit", "stage", "index"], name="one_row_per_audit_step")]

    def __str__(self) -> str:
        return f"audit {self.audit_id} {self.stage} {self.index} ({self.status})"

    def _running_here(self):
        """This row, while it is still run by the worker this object saw claim it."""
        return AuditShard.objects.filter(pk=self.pk, status=ShardStatus.RUNNING, worker_host=self.worker_host,
                                         attempts=self.attempts)

    def claim(self, worker: str) -> bool:
        """Start running this step on ``worker``; a redelivered or duplicated message that read the same row
        loses (the update holds only while status and attempts are what this object read)."""
        now = timezone.now()
        claimed = AuditShard.objects.filter(pk=self.pk, status=self.status, attempts=self.attempts).update(
            status=ShardStatus.RUNNING, worker_host=worker, heartbeat_at=now, started_at=now,
            attempts=models.F("attempts") + 1)
        if claimed:
            self.status, self.worker_host, self.heartbeat_at, self.started_at = ShardStatus.RUNNING, worker, now, now
            self.attempts += 1
        return bool(claimed)

    def beat(self) -> None:
        """The heartbeat of this step, and of its audit as a sign of life."""
        now = timezone.now()
        if self._running_here().update(heartbeat_at=now):
            Audit.objects.filter(pk=self.audit_id, status=Status.RUNNING).update(heartbeat_at=now)

    def release(self) -> None:
        """Put the step back (its worker gave it up or is gone): the next message for it runs it again."""
        self._running_here().update(status=ShardStatus.PENDING, worker_host="", heartbeat_at=None)

    def mark_done(self) -> None:
        """Record the step done, once: only by the worker that runs it."""
        now = timezone.now()
        seconds = (now - self.started_at).total_seconds() if self.started_at else 0.0
        self._running_here().update(status=ShardStatus.DONE, finished_at=now, seconds=seconds)

    def is_abandoned(self, now=None) -> bool:
        """A running step whose worker is gone: its process on this host died, or its heartbeat stopped."""
        return self.status == ShardStatus.RUNNING and worker_gone(self.worker_host, self.heartbeat_at, now)


class Latent(models.Model):
    """One latent of the audit's SAE. Its fields, and what the API, the report and the CSV call them:
    ``fields.LATENT_FIELDS``."""

    audit = models.ForeignKey(Audit, on_delete=models.CASCADE, related_name="latents")
    latent = models.PositiveIntegerField()  # its number in the SAE
    label = models.CharField(max_length=300, blank=True, null=True)
    label_source = models.CharField(max_length=100, blank=True, null=True)
    label_category = models.CharField(max_length=30, blank=True, null=True)
    label_alignment = models.FloatField(null=True)  # with its own label; None: never active, so no label
    clarity = models.FloatField()
    frequency = models.FloatField()
    max_activation = models.FloatField()
    references = models.JSONField(default=list)  # image keys, strongest first
    expected_alignment = models.JSONField(default=dict)  # class -> alignment with its expected concepts
    label_confidence = models.FloatField(null=True, blank=True)  # None: an older engine did not say
    closest_concept = models.CharField(max_length=300, blank=True, null=True)  # the best fit, also when "unlabelled"
    # why the label is (or is not) given: runner_up, margin, agreeing, resampled; None: an older engine did not say
    label_evidence = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["audit", "latent"]
        constraints = [models.UniqueConstraint(fields=["audit", "latent"], name="one_row_per_latent")]

    @classmethod
    def from_result(cls, audit: Audit, latent: dict) -> "Latent":
        """The row of one entry of the engine's ``result["latents"]``."""
        return cls(audit=audit, **model_values(LATENT_FIELDS, latent))


class Flag(models.Model):
    """A latent flagged for a class under a head. Its fields, and what the API, the report and the CSV call
    them: ``fields.FLAG_FIELDS``."""

    audit = models.ForeignKey(Audit, on_delete=models.CASCADE, related_name="flags")
    head = models.CharField(max_length=10, choices=Head.choices)
    class_name = models.CharField(max_length=200)
    latent = models.PositiveIntegerField()
    rank = models.PositiveIntegerField()
    share = models.FloatField()
    mean_relevance = models.FloatField()
    label = models.CharField(max_length=300)
    label_source = models.CharField(max_length=100)
    category = models.CharField(max_length=30)
    label_alignment = models.FloatField()
    expected_alignment = models.FloatField()  # with the flag's class's concepts (a Latent's holds every class's)
    clarity = models.FloatField()
    probe_share = models.FloatField()
    zero_shot_share = models.FloatField()
    confirmed = models.BooleanField(null=True)  # confirmation_status == "confirmed"; None when not run
    causal = models.JSONField(null=True, blank=True)
    references = models.JSONField(default=list)
    top_images = models.JSONField(default=list)
    semantic = models.JSONField(null=True, blank=True)  # unit semantic embedding of the latent (audit diffs)
    # per head: the class's accuracy and other classes' calls with and without the latent; "measured", "summary".
    # None for results of engines before harm was measured (so are the blank / empty fields below)
    harm = models.JSONField(null=True, blank=True)
    confirmation_status = models.CharField(max_length=20, choices=Confirmation.choices, blank=True)
    confirmation_text = models.TextField(blank=True)
    label_confidence = models.FloatField(null=True, blank=True)
    closest_concept = models.CharField(max_length=300, blank=True)  # the best concept, also when "unlabelled"
    metadata_auroc = models.JSONField(default=dict, blank=True)  # labels.csv column (or "column=value") -> AUROC
    concept_latents = models.JSONField(default=list, blank=True)  # all latents one concept is spread over
    heatmaps = models.JSONField(default=dict, blank=True)  # image id -> [rows][cols] 0..255: where it is active
    # how many of the audit's dictionaries flag the same concept (found_by, of, and each finding dictionary);
    # None for audits run before dictionaries voted
    stability = models.JSONField(null=True, blank=True)
    # why the label is (or is not) given: runner_up, margin, agreeing, resampled; None: an older engine did not say
    label_evidence = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["audit", "head", "class_name", "rank"]
        constraints = [models.UniqueConstraint(fields=["audit", "head", "class_name", "latent"],
                                               name="one_flag_per_latent_class_head")]

    @classmethod
    def from_result(cls, audit: Audit, flag: dict) -> "Flag":
        """The row of one entry of the engine's ``result["flags"]``; keys newer engines added are optional, so
        results stored before them still store."""
        return cls(audit=audit, **model_values(FLAG_FIELDS, flag))

    @property
    def harm_measured(self) -> bool:
        return bool((self.harm or {}).get("measured"))

    @property
    def latest_review(self):
        # Review's default ordering is newest first, so this reads prefetched reviews without another query
        return next(iter(self.reviews.all()), None)


class Verdict(models.TextChoices):
    CONFIRMED_SHORTCUT = "confirmed_shortcut", "Confirmed shortcut"
    BENIGN = "benign", "Benign"
    NEEDS_WORK = "needs_work", "Needs work"


class Review(models.Model):
    flag = models.ForeignKey(Flag, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    verdict = models.CharField(max_length=20, choices=Verdict.choices)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]


REAUDIT_STAGE = "reaudit"  # a correction's last stage: waiting for the new probe's audit
BEFORE_REAUDIT = correction_percent(REAUDIT_STAGE, 0, 1)  # its percent once that audit is submitted


class Correction(Job):
    """A corrected probe made from an audit's flags: the job that makes it, its proof table and its re-audit.

    The worker measures the chosen flags' latents, writes the new probe (a version of the audited one, registered
    in the project) and the old-vs-new table, then submits the new probe's audit (``reaudit``, reusing the SAE),
    and the correction stays running, at stage "reaudit", until that audit finishes: its diff against the
    original audit is the last part of the result (``corrections.finish_after_reaudit``, on ``audit_finished``).
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="corrections")
    audit = models.ForeignKey(Audit, on_delete=models.CASCADE, related_name="corrections")
    flags = models.ManyToManyField(Flag, related_name="corrections")
    method = models.CharField(max_length=20, blank=True)  # as asked ("" : the engine chooses); result says which ran
    options = models.JSONField(default=dict, blank=True)  # anchor, C, max_clean_drop
    training_dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.PROTECT,
                                         related_name="corrections")
    new_probe = models.OneToOneField(Probe, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="made_by")
    reaudit = models.OneToOneField(Audit, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="reaudit_of")

    noun = "correction"

    class Meta(Job.Meta):
        pass

    @property
    def overall_percent(self) -> float:
        """Its percent; while the re-audit runs, the re-audit's progress fills the correction's last stage."""
        if self.waiting_for_reaudit and self.reaudit is not None:
            return round(BEFORE_REAUDIT + (100.0 - BEFORE_REAUDIT) * self.reaudit.percent / 100.0, 2)
        return self.percent

    def wait_for_reaudit(self, probe, reaudit, result: dict, timings: dict) -> None:
        """Its own work done: keep the corrected ``probe``, the result so far, and wait (stage "reaudit", no
        worker holds it) for ``reaudit``, the new probe's audit."""
        self.refresh_from_db(fields=["status"])
        self.mark_running(REAUDIT_STAGE, BEFORE_REAUDIT)
        fields = dict(new_probe=probe, reaudit=reaudit, result=result, timings=timings, worker_host="",
                      heartbeat_at=None)
        self._rows(status=Status.RUNNING).update(**fields)
        for key, value in fields.items():
            setattr(self, key, value)

    def next_round(self, result: dict, timings: dict) -> None:
        """Its re-audit still flags latents that track the corrected concept: back in the queue (stage "round
        N") for another round, with the rounds so far in ``result``; a new round is a new job's delivery, so its
        attempts start again."""
        stage = f"round {len(result.get('rounds') or []) + 1}"
        self._move(Status.QUEUED, stage=stage, result=result, timings=timings, attempts=0, heartbeat_at=None,
                   worker_host="")

    @property
    def round(self) -> int:
        """The round it is in (or ended with): 1 + the rounds whose re-audit asked for another."""
        rounds = (self.result or {}).get("rounds") or []
        return len(rounds) + (0 if self.status == Status.SUCCEEDED else 1)

    def shown_stage(self, **known) -> tuple[str, str]:
        if self.waiting_for_reaudit and self.reaudit is not None:
            shown = f"round {self.round}, re-audit #{self.reaudit_id}: {self.reaudit.stage or self.reaudit.status}"
            return shown, self.worker_host
        return super().shown_stage(**known)

    @property
    def waiting_for_reaudit(self) -> bool:
        return self.status == Status.RUNNING and self.stage == REAUDIT_STAGE

    def is_abandoned(self, now=None) -> bool:
        # while its re-audit runs, no worker holds the correction: the re-audit has its own heartbeat and reaper
        return not self.waiting_for_reaudit and super().is_abandoned(now)

    def cancel(self) -> None:
        """Cancelling a correction that waits for its re-audit cancels that audit (and the correction with it)."""
        if self.waiting_for_reaudit and self.reaudit is not None and not self.reaudit.is_finished:
            self.reaudit.cancel()
            self._rows().update(cancel_requested=True)
            self.cancel_requested = True
            return
        super().cancel()


def upload_explained_image(instance, filename: str) -> str:
    return f"projects/{instance.project_id}/explanations/{uuid.uuid4().hex}/{filename}"


class Explanation(Job):
    """One image explained with a finished audit's SAE: an image of the audited dataset (``item``, its path in
    labels.csv) or an uploaded one (``image``). A short job on a worker; ``result`` is the engine's
    ``explain_image`` answer."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="explanations")
    audit = models.ForeignKey(Audit, on_delete=models.CASCADE, related_name="explanations")
    image = models.FileField(upload_to=upload_explained_image, blank=True, max_length=500)
    item = models.CharField(max_length=500, blank=True)

    noun = "explanation"

    class Meta(Job.Meta):
        pass

    @property
    def source(self) -> str:
        return f"dataset image {self.item}" if self.item else f"uploaded image {self.image.name.rsplit('/', 1)[-1]}"


class Checklist(Job):
    """A confounder checklist asked of a finished audit: for each suspect the user names (by text, example images
    or a labels.csv column; ``workers.engine.checklist.Suspect``'s dicts, as asked) whether the probe relies on it.
    A short job on a worker; ``result`` is ``{"suspects": [one answer per suspect]}`` (``workers.engine.suspects``)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="checklists")
    audit = models.ForeignKey(Audit, on_delete=models.CASCADE, related_name="checklists")
    suspects = models.JSONField(default=list)  # the suspects asked about, checked (Suspect.from_dict), in order
    shipped = models.CharField(max_length=100, blank=True)  # the shipped checklist asked for by name, if any

    noun = "checklist"

    class Meta(Job.Meta):
        pass


def upload_checklist_image(instance, filename: str) -> str:
    return f"projects/{instance.checklist.project_id}/checklists/{instance.checklist_id}/{filename}"


class ChecklistImage(models.Model):
    """An example image uploaded with a checklist: a suspect's ``with`` or ``without`` list names it
    ``"upload:" + name``. ``name`` is the uploaded file's base name as sent (unique per checklist); ``file`` is where
    it is stored (its storage name may differ: the storage makes file names safe and unique). The file is removed
    with the row (``_remove_checklist_image_file``)."""

    checklist = models.ForeignKey(Checklist, on_delete=models.CASCADE, related_name="images")
    name = models.CharField(max_length=200)
    file = models.FileField(upload_to=upload_checklist_image, max_length=500)

    class Meta:
        ordering = ["pk"]
        constraints = [models.UniqueConstraint(fields=["checklist", "name"], name="checklist_image_name_unique")]

    def __str__(self) -> str:
        return f"upload:{self.name} (checklist {self.checklist_id})"


@receiver(post_delete, sender=ChecklistImage)
def _remove_checklist_image_file(sender, instance: ChecklistImage, **kwargs) -> None:
    """A deleted example image (its checklist, audit or project deleted) takes its file along, once the deletion is
    committed: a rolled-back deletion keeps the file its row still names."""
    if instance.file.name:
        storage, name = instance.file.storage, instance.file.name
        transaction.on_commit(lambda: storage.delete(name))


def store_result(audit: Audit, result: dict, timings: dict) -> None:
    """Write the result's rows and mark the audit succeeded, all in one transaction."""
    with transaction.atomic():
        Latent.objects.filter(audit=audit).delete()  # a re-delivered task replaces, never duplicates
        Flag.objects.filter(audit=audit).delete()
        Latent.objects.bulk_create([Latent.from_result(audit, l) for l in result["latents"]], batch_size=2000)
        Flag.objects.bulk_create([Flag.from_result(audit, f) for f in result["flags"]])
        # latents live in their rows; the blob keeps the rest of the result
        audit.succeed({k: v for k, v in result.items() if k != "latents"}, timings)
