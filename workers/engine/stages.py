"""The stages of an audit, declared once: the engine runs them in this order, the one-task worker and the sharded
workers report progress by them, the sharded path plans its steps from them, and the API and pages name them.

Pure Python (no torch, no Django), so the service can read it without loading the engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    weight: int  # its share (percent) of the progress bar
    per_shard: bool  # sharded audits run it as one task per shard of images (else once, over everything)
    title: str  # what it does, in a few words, for the API's help and the pages
    memory_advice: str = ""  # what to lower when it runs out of memory


STAGES: tuple[Stage, ...] = (
    Stage("extract", 30, True, "activations of the vision tower", "lower batch_size"),
    Stage("train_sae", 30, False, "the sparse autoencoder", "lower sae.batch_size or sae.n_latents"),
    Stage("attribute", 25, True, "each latent's relevance per image",
          "lower batch_size, faithfulness_steps or n_references"),
    Stage("label", 7, False, "labels, harm and flags", "lower faithfulness_steps or n_references"),
    Stage("confirm", 8, True, "ablation of each flag against a baseline", "lower batch_size"),
    Stage("finish", 0, False, "storing the result"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
EXTRACT, TRAIN_SAE, ATTRIBUTE, LABEL, CONFIRM, FINISH = STAGE_NAMES
# what a job shows before its first stage: the worker loads the model, the probe and the data
LOADING = "loading"
# the engine's own stages: "finish" (storing) is the worker's
ENGINE_STAGES: tuple[str, ...] = STAGE_NAMES[:-1]


# The stages of a correction (a corrected probe, its proof table, then the new probe's audit).
CORRECTION_STAGES: tuple[Stage, ...] = (
    Stage("extract", 35, False, "activations of the audited images"),
    Stage("directions", 20, False, "what each chosen latent adds to the embedding"),
    Stage("training", 15, False, "embeddings of the probe's training split (refit only)"),
    Stage("correct", 5, False, "the corrected probe"),
    Stage("compare", 5, False, "old and new probe on every slice"),
    Stage("reaudit", 20, False, "the new probe's audit"),
)
CORRECTION_STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in CORRECTION_STAGES)


def overall_percent(name: str, done: int, total: int, stages: tuple[Stage, ...] = STAGES) -> float:
    """Percent of the whole job (an audit, or a correction with ``stages=CORRECTION_STAGES``) when stage ``name``
    has done ``done`` of ``total``."""
    before = 0.0
    for s in stages:
        if s.name == name:
            return round(before + s.weight * (done / total if total else 1.0), 2)
        before += s.weight
    raise KeyError(f"no stage '{name}'; the stages are {', '.join(s.name for s in stages)}")


def correction_percent(name: str, done: int, total: int) -> float:
    return overall_percent(name, done, total, CORRECTION_STAGES)


def memory_advice(name: str) -> str:
    """What to lower when stage ``name`` (an audit's, or ``LOADING``) ran out of memory."""
    if name == LOADING:
        return "use a smaller model"
    advice = next((s.memory_advice for s in STAGES if s.name == name), "")
    return advice or "lower sae.batch_size / batch_size"
