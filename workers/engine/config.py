"""Dataclass configs for the engine; each validates itself and fits in a JSONField."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import EngineError

TOKEN_TYPES = ("cls", "spatial")
SPATIAL_POOLS = ("max", "mean")
DTYPES = ("fp32", "bf16", "fp16")
CACHE_DTYPES = ("float32", "float16")

DEFAULT_PROMPT_TEMPLATES = (
    "a photo of {}.",
    "an image of {}.",
    "a close-up photo of {}.",
    "a picture showing {}.",
)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EngineError(message)


class _DictMixin:
    """`to_dict`/`from_dict` for a dataclass, nested configs included."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _DictMixin):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        data = dict(data or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        _check(not unknown, f"unknown {cls.__name__} option(s): {', '.join(unknown)}; "
                            f"known options are: {', '.join(sorted(names))}")
        nested = {"sae": SAEConfig}
        for name, sub in nested.items():
            if name in data and name in names and isinstance(data[name], dict):
                data[name] = sub.from_dict(data[name])
        return cls(**data)


@dataclass
class SAEConfig(_DictMixin):
    """TopK sparse autoencoder training options.

    ``n_latents`` and ``k`` left at None are sized to the data by
    :func:`workers.engine.sae.size_sae` (about 4 x d_model latents, fewer for
    small datasets; k ~ n_latents / 32, at most 64 as in the paper).
    """

    n_latents: int | None = None
    k: int | None = None
    lr: float = 1e-3
    batch_size: int = 256
    # Steps are what training costs; None: enough passes for ~ 3000 steps, at least 5 epochs.
    steps: int | None = None
    aux_k: int | None = None  # None: 2 * k, the AuxK loss of Gao et al. for dead latents
    aux_coef: float = 1.0 / 32.0
    dead_after_steps: int = 100  # a latent silent for this many steps counts as dead
    tokens_per_image: int = 16  # spatial SAEs sample this many patch tokens per image for training
    seed: int = 0

    def __post_init__(self):
        _check(self.n_latents is None or self.n_latents >= 2, "sae.n_latents must be at least 2")
        _check(self.k is None or self.k >= 1, "sae.k must be at least 1")
        if self.n_latents is not None and self.k is not None:
            _check(self.k <= self.n_latents, f"sae.k ({self.k}) cannot exceed sae.n_latents ({self.n_latents})")
        _check(self.lr > 0, "sae.lr must be positive")
        _check(self.batch_size >= 1, "sae.batch_size must be at least 1")
        _check(self.steps is None or self.steps >= 1, "sae.steps must be at least 1")
        _check(self.aux_coef >= 0, "sae.aux_coef must be >= 0")
        _check(self.dead_after_steps >= 1, "sae.dead_after_steps must be at least 1")
        _check(self.tokens_per_image >= 1, "sae.tokens_per_image must be at least 1")


@dataclass
class AuditConfig(_DictMixin):
    """Everything that decides an audit's numbers. Defaults are documented in README.md."""

    layer: int = -1  # block whose output is decomposed; negative counts from the end
    token: str = "cls"  # "cls" or "spatial" (every patch token)
    spatial_pool: str = "max"  # one number per image for spatial latents: "max" or "mean"
    device: str = "auto"  # "auto" picks CUDA when present
    dtype: str = "fp32"  # autocast dtype on CUDA for extraction: fp32, bf16, fp16
    cache_dtype: str = "float32"  # dtype of cached activations on disk
    batch_size: int = 64  # images per forward pass; activation memory grows linearly with it
    sae: SAEConfig = field(default_factory=SAEConfig)
    n_references: int = 16  # top-m reference images per latent
    prompt_templates: tuple = DEFAULT_PROMPT_TEMPLATES
    class_prompts: dict = field(default_factory=dict)  # class -> prompts for zero-shot; default: its name
    expected_concepts: dict = field(default_factory=dict)  # class -> concepts that class should mean
    artifact_vocabulary: tuple | None = None  # None: the built-in artifact list
    general_vocabulary: bool = True  # add the ImageNet class names shipped with open_clip
    label_min_confidence: float = 0.3  # below this label probability a latent is reported "unlabelled"
    flag_top_n: int = 10  # a flag must be among the class's top-n latents by relevance share ...
    flag_min_share: float = 0.05  # ... and hold at least this share of the class's positive relevance ...
    flag_max_alignment: float = 0.05  # ... while aligning with the expected concepts below this,
    flag_relative_alignment: float = 0.5  # ... or below this fraction of its alignment with its own label,
    flag_class_margin: float = 0.02  # ... or exceeding other classes' expected alignment by less than this
    flag_without_harm: bool = False  # also flag latents relied on with no measured harm ("relied on, no harm")
    flag_group_similarity: float = 0.6  # flagged latents this alike (centred semantic cosine) are one concept
    harm_min_gap: float = 0.20  # harm: a with/without accuracy gap of at least this ...
    harm_min_z: float = 3.0  # ... significant at this two-proportion z, and exceeding the other head's by gap / 2
    amplification_ratio: float = 1.5  # probe share >= ratio x zero-shot share counts as amplified
    faithfulness_steps: int = 20  # deletion curve length n = 1..N
    faithfulness_max_images: int = 256  # images per class used for deletion curves
    top_images_per_flag: int = 8
    report_top_n: int = 50  # latents per class kept in the result's relevance tables
    causal: bool = True
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.sae, dict):
            self.sae = SAEConfig.from_dict(self.sae)
        self.prompt_templates = tuple(self.prompt_templates)
        if self.artifact_vocabulary is not None:
            self.artifact_vocabulary = tuple(self.artifact_vocabulary)
        _check(self.token in TOKEN_TYPES, f"token must be one of {TOKEN_TYPES}, got {self.token!r}")
        _check(self.spatial_pool in SPATIAL_POOLS, f"spatial_pool must be one of {SPATIAL_POOLS}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.cache_dtype in CACHE_DTYPES, f"cache_dtype must be one of {CACHE_DTYPES}")
        _check(self.batch_size >= 1, "batch_size must be at least 1")
        _check(self.n_references >= 2, "n_references must be at least 2 (clarity needs pairs)")
        _check(len(self.prompt_templates) > 0 and all("{}" in t for t in self.prompt_templates),
               "every prompt template must contain '{}' where the concept goes")
        _check(0.0 <= self.label_min_confidence <= 1.0, "label_min_confidence must be within [0, 1]")
        _check(1 <= self.flag_top_n, "flag_top_n must be at least 1")
        _check(0.0 <= self.flag_min_share <= 1.0, "flag_min_share must be within [0, 1]")
        _check(0.0 <= self.flag_relative_alignment <= 1.0, "flag_relative_alignment must be within [0, 1]")
        _check(self.flag_class_margin >= 0.0, "flag_class_margin must be >= 0")
        _check(-1.0 <= self.flag_group_similarity <= 1.0, "flag_group_similarity must be within [-1, 1]")
        _check(0.0 < self.harm_min_gap <= 1.0, "harm_min_gap must be within (0, 1]")
        _check(self.harm_min_z >= 0.0, "harm_min_z must be >= 0")
        _check(self.amplification_ratio >= 1.0, "amplification_ratio must be >= 1")
        _check(self.faithfulness_steps >= 1, "faithfulness_steps must be at least 1")
        _check(self.faithfulness_max_images >= 1, "faithfulness_max_images must be at least 1")
        _check(self.top_images_per_flag >= 1, "top_images_per_flag must be at least 1")
        _check(self.report_top_n >= 1, "report_top_n must be at least 1")
        for name in ("class_prompts", "expected_concepts"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
                setattr(self, name, value)
            _check(isinstance(value, dict) and all(isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)
                                                   for v in value.values()),
                   f"{name} must map a class name to a list of strings")
