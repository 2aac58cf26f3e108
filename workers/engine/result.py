"""What an audit found, as plain data: :class:`AuditResult`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass
class AuditResult:
    """Everything an audit found, as plain data (``to_dict`` is JSON-ready)."""

    schema_version: int
    config: dict
    model: dict
    classes: list
    dataset: dict
    sae: dict
    accuracy: dict
    latents: list  # one entry per latent: label, alignment, clarity, frequency, references
    relevance: dict  # head -> class -> top latents by share
    flags: list
    comparison: dict  # class -> probe vs zero-shot share on flagged latents
    faithfulness: dict  # head -> class -> method -> {curve, auc}
    timings: dict
    environment: dict
    artifacts: dict = field(default_factory=dict)
    slices: dict = field(default_factory=dict)  # metadata column -> value -> accuracy of both heads
    sae_dataset: dict | None = None  # the dataset the SAE was trained on, when not the audited one
    # the vote of the audit's dictionaries on its flags (workers.engine.stability): dictionaries, seeds, the rule,
    # flags dropped and concepts the other dictionaries flag that the audit's SAE does not; None before it existed
    stability: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "AuditResult":
        return cls(**data)
