"""The worker's limits on one task (workers.steps): cancellation inside the engine's long loops, the memory
ceiling (WORKER_TASK_MEMORY_MB), and allocations that fail; the process takes its next task afterwards."""
import os

import numpy as np
import pytest
import torch

from audit_service.audits.models import Audit, Status
from tests.engine.test_limits import TRIPWIRE, write_store
from workers import steps
from workers.engine.config import AuditConfig, SAEConfig
from workers.engine.errors import checkpoint
from workers.engine.pipeline import fit_sae

from .conftest import FakeTask

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("one_thread")]
MB = 2 ** 20


@pytest.fixture(autouse=True)
def every_checkpoint_looks(settings):
    """Cancellation is looked up at every checkpoint, not once a second, so no test depends on time."""
    settings.AUDIT_PROGRESS_EVERY_SECONDS = 0


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A small activation cache whose reads can be watched: ``store.on_read(n)`` runs before the n-th chunk is
    read, and a loop still reading long after it should have stopped fails the test."""
    store = write_store(tmp_path / "activations")
    gather, reads = store.gather, {"n": 0}
    store.on_read = lambda n: None

    def watched(indices):
        reads["n"] += 1
        store.on_read(reads["n"])
        if reads["n"] > TRIPWIRE:
            pytest.fail(f"still reading the cache after {TRIPWIRE} chunks")
        return gather(indices)

    monkeypatch.setattr(store, "gather", watched)
    return store


def resident_mb() -> int:
    """This process's resident memory, as the kernel counts it."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // MB


def train(store, folder, **sae):
    """The body of an SAE training step (the stage the issue saw buffer forever at 30 %)."""
    config = AuditConfig(sae=SAEConfig(**sae), device="cpu")

    def body(progress):
        progress("train_sae", 0, 1)  # the engine reports each stage as it enters it
        fit_sae(store, config, folder, "cpu", lambda done, total: progress("train_sae", done, total))

    return body


def run(audit, body) -> str:
    outcome = steps.run_step(FakeTask(), audit, body)
    audit.refresh_from_db()
    return outcome


@pytest.mark.parametrize("sae", [{"batch_size": 10 ** 6}, {"batch_size": 8, "steps": 10 ** 9}],
                         ids=["a batch of 10^6 vectors", "10^9 steps"])
def test_a_cancel_during_sae_training_cancels_the_audit(running, store, tmp_path, sae):
    """The cancel comes while the worker buffers the batch (or trains); no progress report comes for a long time."""
    store.on_read = lambda n: n == 3 and Audit.objects.get(pk=running.pk).cancel()
    assert run(running, train(store, tmp_path / "sae", **sae)) == "cancelled"
    assert running.status == Status.CANCELLED


def test_an_sae_batch_too_large_for_the_ceiling_fails_at_once_saying_what_to_lower(running, store, tmp_path,
                                                                                    settings):
    settings.WORKER_TASK_MEMORY_MB = 4096
    assert run(running, train(store, tmp_path / "sae", batch_size=10 ** 9)) == "failed"
    assert running.status == Status.FAILED
    assert running.error.startswith("the audit would need ")
    assert "(sae.n_latents, sae.batch_size)" in running.error
    assert running.error.endswith("over the 4096 MB a task may use at stage 'train_sae'; lower sae.batch_size or "
                                  "sae.n_latents or raise WORKER_TASK_MEMORY_MB")


def test_a_task_over_the_memory_ceiling_fails_and_the_process_takes_the_next_task(new_audit, settings):
    settings.WORKER_TASK_MEMORY_MB = resident_mb() + 64

    def greedy(progress):
        progress("attribute", 0, 2)
        held = torch.ones(256 * MB // 4)  # 256 MB more than when the task started
        checkpoint()  # the next iteration of a long loop
        return held

    first, second = new_audit(), new_audit()
    for audit in (first, second):
        assert audit.claim("gpu-1:100")
    assert run(first, greedy) == "failed"
    assert first.status == Status.FAILED
    assert first.error.startswith(f"the audit used more than {settings.WORKER_TASK_MEMORY_MB} MB of memory (")
    assert first.error.endswith(" at stage 'attribute'; lower batch_size, faithfulness_steps or n_references or "
                                "raise WORKER_TASK_MEMORY_MB")

    def modest(progress):
        progress("attribute", 0, 2)
        checkpoint()
        progress("attribute", 2, 2)

    # the same process, the same ceiling: the memory of the first task was given back
    assert run(second, modest) == "done"
    assert second.status == Status.RUNNING and second.error == ""


@pytest.mark.parametrize("allocate, error", [
    (lambda: torch.empty(2 ** 62, dtype=torch.uint8),
     "the audit could not allocate 4,398,046,511,104 MB of memory (the machine had no more to give) at stage "
     "'confirm'; lower batch_size"),
    (lambda: np.empty(2 ** 50, dtype=np.uint8),
     "the audit could not allocate 1.00 PiB of memory (the machine had no more to give) at stage 'confirm'; "
     "lower batch_size"),
    (lambda: [0] * 2 ** 61,
     "the audit could not allocate the memory it needed (the machine had no more to give) at stage 'confirm'; "
     "lower batch_size"),
], ids=["torch", "numpy", "python"])
def test_an_allocation_the_machine_refuses_fails_the_audit_saying_what_to_lower(running, allocate, error):
    def body(progress):
        progress("confirm", 0, 4)
        allocate()

    assert run(running, body) == "failed"
    assert running.status == Status.FAILED and running.error == error


def test_a_gpu_out_of_memory_fails_the_audit_saying_what_to_lower(running):
    def body(progress):
        progress("train_sae", 0, 600)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.11 GiB of which 1.19 GiB is free.")

    assert run(running, body) == "failed"
    assert running.error == ("the audit ran out of GPU memory (it asked for 2.00 GiB more) at stage 'train_sae'; "
                             "lower sae.batch_size or sae.n_latents, or run it on a GPU with more memory")


def test_a_shard_step_names_its_own_stage_before_its_first_report(running, settings):
    running.run_as_shards([(0, 16), (16, 16)])
    row = running.shard_steps.get(stage="attribute", index=0)
    assert row.claim("gpu-2:200")
    settings.WORKER_TASK_MEMORY_MB = 1  # any process is over it: the first checkpoint fails the step
    assert steps.run_step(FakeTask(), running, lambda progress: checkpoint(), row=row) == "failed"
    running.refresh_from_db()
    assert "at stage 'attribute'; lower batch_size, faithfulness_steps or n_references" in running.error
