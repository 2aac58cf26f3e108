"""The engine's checkpoints: every loop that can run long lets its caller stop it (workers.engine.errors).

The caller's watch here cancels at its n-th checkpoint, so nothing depends on time. A loop that does not stop
would run on (an SAE batch of 10^9 vectors is buffered for hours): the tests give such a loop a tripwire that
fails them instead.
"""
import re

import numpy as np
import pytest

from workers.engine import AuditCancelled, run_audit
from workers.engine.activations import ActivationStore, assemble_store, shard_files
from workers.engine.config import AuditConfig, SAEConfig
from workers.engine.errors import EngineError, checkpoint, reserve, watched_by
from workers.engine.pipeline import fit_sae
from workers.engine.stages import ENGINE_STAGES

from .conftest import build_audit_config

pytestmark = pytest.mark.usefixtures("one_thread")
TRIPWIRE = 100  # chunks of the cache read after the cancel: far more than a loop that honours it reads


class CancelAt:
    """A watch whose cancel flag flips at its ``after``-th checkpoint (within ``stage``, if given: the engine's
    progress reports say which stage runs)."""

    def __init__(self, after: int = 3, stage: str | None = None):
        self.after, self.stage = after, stage
        self.current = None
        self.reports = []
        self.seen = 0
        self.stopped_in = None

    def progress(self, stage, done, total):
        self.current = stage
        self.reports.append((stage, done, total))

    def checkpoint(self):
        if self.stage is None or self.current == self.stage:
            self.seen += 1
            if self.seen >= self.after:
                self.stopped_in = self.current
                raise AuditCancelled()

    def reserve(self, nbytes, what):
        pass


def write_store(folder, n: int = 32, d: int = 16) -> ActivationStore:
    """A cache of ``n`` random CLS activations [n, d], written directly (no model)."""
    gen = np.random.default_rng(0)
    files = shard_files(0)
    folder.mkdir(parents=True)
    np.save(folder / files["acts"], gen.standard_normal((n, d)).astype(np.float32))
    np.save(folder / files["emb"], gen.standard_normal((n, 8)).astype(np.float32))
    np.save(folder / files["labels"], np.arange(n) % 2)
    meta = {"index": 0, "start": 0, "count": n, "item_shape": [d], "embed_dim": 8, "token": "cls", "layer": -1,
            **files}
    return assemble_store(folder, [meta])


@pytest.fixture
def store(tmp_path, monkeypatch) -> ActivationStore:
    """The cache, with a tripwire on its reads: the reads a loop makes after it should have stopped."""
    store = write_store(tmp_path / "activations")
    reads = {"n": 0}
    gather = store.gather

    def counted(indices):
        reads["n"] += 1
        if reads["n"] > TRIPWIRE:
            pytest.fail(f"still reading the cache after {TRIPWIRE} chunks: the cancel was not honoured")
        return gather(indices)

    monkeypatch.setattr(store, "gather", counted)
    store.reads = reads
    return store


@pytest.mark.parametrize("sae", [{"batch_size": 10 ** 9}, {"batch_size": 8, "steps": 10 ** 9}],
                         ids=["a batch of 10^9 vectors", "10^9 steps"])
def test_a_cancel_stops_sae_training_within_a_few_checkpoints(store, tmp_path, sae):
    watch = CancelAt(after=3)
    with watched_by(watch), pytest.raises(AuditCancelled):
        fit_sae(store, AuditConfig(sae=SAEConfig(**sae)), tmp_path / "sae", "cpu")
    assert watch.seen == 3 and store.reads["n"] <= 3
    assert not (tmp_path / "sae" / "metrics.json").exists()  # no SAE is left that a resumed audit would take


def test_without_a_watch_the_checkpoints_do_nothing():
    checkpoint()
    reserve(10 ** 18, "more than any machine has")


def test_a_watch_covers_its_block_only(store, tmp_path):
    with watched_by(CancelAt(after=1)), pytest.raises(AuditCancelled):
        checkpoint()
    checkpoint()  # outside the block nothing stops the work
    sae, metrics = fit_sae(store, AuditConfig(sae=SAEConfig(batch_size=8, steps=5)), tmp_path / "sae", "cpu")
    assert metrics["steps"] == 5


def permissive_config() -> AuditConfig:
    """Flags on a random tiny model, so that confirmation has work (without flags it has no loop to stop): every
    latent relied on may be flagged."""
    return build_audit_config(sae={"steps": 20}, batch_size=16, flag_without_harm=True, flag_min_share=0.0,
                              flag_max_alignment=1.0, flag_relative_alignment=1.0, flag_class_margin=1.0)


@pytest.mark.parametrize("stage", ENGINE_STAGES)
def test_a_cancel_is_honoured_inside_every_stage(tiny, probe, dataset, tmp_path, stage):
    watch = CancelAt(after=2, stage=stage)
    with watched_by(watch), pytest.raises(AuditCancelled):
        run_audit(permissive_config(), tiny, probe, dataset, watch.progress, workdir=tmp_path)
    assert watch.stopped_in == stage
    assert (stage, 1, 1) not in watch.reports  # the stage was stopped before its end


class Ceiling:
    """A watch that refuses any reservation above ``limit`` bytes and records what was asked."""

    def __init__(self, limit: int):
        self.limit, self.asked = limit, []

    def checkpoint(self):
        pass

    def reserve(self, nbytes, what):
        self.asked.append(what)
        if nbytes > self.limit:
            raise EngineError(f"{nbytes} bytes for {what}")


@pytest.mark.parametrize("options, named", [
    ({"sae": {"batch_size": 10 ** 9}}, "sae.batch_size"),
    ({"sae": {"n_latents": 10 ** 9}}, "sae.n_latents"),
    ({"faithfulness_steps": 10 ** 9}, "faithfulness_steps"),
    ({"n_references": 10 ** 9}, "n_references"),
])
def test_an_allocation_an_option_sizes_is_asked_for_before_it_is_made(tiny, probe, dataset, tmp_path, options,
                                                                       named):
    watch = Ceiling(2 ** 30)
    sae = options.pop("sae", {})
    config = build_audit_config(sae={"steps": 20, **sae}, **options)
    with watched_by(watch), pytest.raises(EngineError, match=re.escape(named)):
        run_audit(config, tiny, probe, dataset, workdir=tmp_path)
    assert named in watch.asked[-1]  # refused by the reservation, not by a failed allocation
