"""Audit and SAE options: one typed, bounded schema; a config validates itself and fits in a JSONField.

The configs are pydantic dataclasses with strict types: an option of the wrong type is refused, never coerced
("no" is not true, 1.5 is not an integer, 5 is not a set of SAE options), and every number has a range. The
ranges declared here are what the engine can run at all; the tighter upper bounds a server sets (from its
settings, its workers' memory and the audited data) are :class:`Bound` s, checked by :func:`check_bounds`.
Every refusal is an :class:`EngineError` whose message names the option, e.g.
``sae.batch_size: must be an integer, got 'abc'``.
"""
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator)
from pydantic.dataclasses import dataclass

from .errors import EngineError

TOKEN_TYPES = ("cls", "spatial")
SPATIAL_POOLS = ("max", "mean")
# how a CLS latent's heatmap is made (workers.engine.heatmaps.METHODS holds the same names), and cells per patch side
HEATMAP_METHODS = ("attnlrp", "conservative", "block", "attnlrp-pixels", "encoder", "occlusion")
HEATMAP_CELLS_MAX = 16
DTYPES = ("fp32", "bf16", "fp16")
CACHE_DTYPES = ("float32", "float16")

DEFAULT_PROMPT_TEMPLATES = (
    "a photo of {}.",
    "an image of {}.",
    "a close-up photo of {}.",
    "a picture showing {}.",
)

SEED_MAX = 2 ** 32 - 1  # what numpy accepts as a seed
COUNT_MAX = 2 ** 31 - 1  # no count of the engine's goes near this; a server bounds them far lower (Bound)
LAYER_MAX = 4096  # blocks a vision transformer could have; registration checks the model's own
TOKENS_MAX = 4096  # patch tokens of the largest open_clip ViT (896 px / 14)
TEXT_MAX = 300  # characters of a prompt or a concept (CLIP's text tower reads 77 tokens)
PROMPTS_MAX = 64  # prompt templates, or prompts of one class
CONCEPTS_MAX = 256  # expected concepts of one class
CLASSES_MAX = 10_000
VOCABULARY_MAX = 10_000  # artifact concepts (the general vocabulary has 1 000)
SHOWN_MAX = 10_000  # latents per class in the result's tables, or ranked for flags
TOP_IMAGES_MAX = 256  # images shown per flag
DICTIONARIES_MAX = 16  # SAEs one audit trains to vote on its flags

_RULES = ConfigDict(extra="forbid")


ROUNDS_MAX = 5  # a correction's rounds at most (each one is a re-audit)


def _count(ge: int = 1, le: int = COUNT_MAX):
    return Annotated[int, Strict(), Field(ge=ge, le=le)]


def _real(**range_):
    return Annotated[float, Strict(), Field(allow_inf_nan=False, **range_)]


def _printable(text: str) -> str:
    if "\x00" in text:  # PostgreSQL cannot store it in the audit's JSON
        raise ValueError("must not contain a NUL character")
    return text


_Bool = Annotated[bool, Strict()]
_Text = Annotated[str, Strict(), Field(min_length=1, max_length=TEXT_MAX), AfterValidator(_printable)]
_Texts = Annotated[list[_Text], Field(max_length=CONCEPTS_MAX)]
_ClassName = Annotated[str, Strict(), AfterValidator(_printable)]
_PerClass = Annotated[dict[_ClassName, _Texts], Field(max_length=CLASSES_MAX)]
_Fraction = _real(ge=0.0, le=1.0)
_Cosine = _real(ge=-1.0, le=1.0)


def _engine_errors(cls):
    """Direct construction (``AuditConfig(batch_size=...)``) refuses bad options with an :class:`EngineError`,
    as :meth:`from_dict` does, so callers catch one error type."""
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(__dataclass_self__, *args, **kwargs):  # pydantic's name: an option called "self" stays an option
        try:
            validate(__dataclass_self__, *args, **kwargs)
        except ValidationError as exc:
            raise EngineError(describe(exc, cls)) from None

    cls.__init__ = __init__
    return cls


class _DictMixin:
    """`to_dict`/`from_dict` for a config: JSON types only, so one fits in a JSONField."""

    def to_dict(self) -> dict[str, Any]:
        return _adapter(type(self)).dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, bounds: Mapping[str, "Bound"] | None = None):
        """The config of a JSON object (None: the defaults), checked against ``bounds`` when given."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise EngineError(f"config must be a JSON object of options, got {_shown(data)}")
        try:
            config = _adapter(cls).validate_python(dict(data))
        except ValidationError as exc:
            raise EngineError(describe(exc, cls, bounds)) from None
        if bounds:
            check_bounds(config, bounds)
        return config


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


@_engine_errors
@dataclass(config=_RULES)
class SAEConfig(_DictMixin):
    """TopK sparse autoencoder training options.

    ``n_latents``, ``k`` and ``steps`` left at None are sized to the data by
    :func:`workers.engine.sae.size_sae`: about one latent per 32 training vectors (a power of two, at least 16,
    at most 4 x d_model), k = n_latents / 4 within [4, 64], and 30 passes over the data within 600..20 000 steps.
    """

    n_latents: _count(ge=2) | None = None
    k: _count() | None = None
    lr: _real(gt=0.0, le=1.0) = 1e-3
    batch_size: _count() = 256
    # Steps are what training costs; None: 30 passes over the training vectors, at least 600, at most 20 000.
    steps: _count() | None = None
    aux_k: _count() | None = None  # None: 2 * k, the AuxK loss of Gao et al. for dead latents
    aux_coef: _real(ge=0.0, le=100.0) = 1.0 / 32.0
    dead_after_steps: _count() = 100  # a latent silent for this many steps counts as dead
    tokens_per_image: _count(le=TOKENS_MAX) = 16  # spatial SAEs sample this many patch tokens per image for training
    # a CLS-token SAE also trains on this many of each image's patch tokens (drawn per image; 0: the CLS tokens
    # alone); docs/perf.md ("Cleaner dictionaries") measures 16 with 256 latents and k 8
    patch_tokens: _count(ge=0, le=TOKENS_MAX) = 0
    # "matryoshka": the loss also asks the first n/8, n/4 and n/2 latents to reconstruct on their own (Bussmann et
    # al. 2025; Nabeshima 2024), so broad concepts settle in the first latents instead of being absorbed
    variant: Literal["topk", "matryoshka"] = "topk"
    seed: _count(ge=0, le=SEED_MAX) = 0

    @field_validator("k")
    @classmethod
    def _k_within_the_latents(cls, k, info: ValidationInfo):
        n_latents = info.data.get("n_latents")
        if k is not None and n_latents is not None and k > n_latents:
            raise ValueError(f"cannot exceed sae.n_latents ({n_latents}), got {k}")
        return k

    def training_bytes(self, d_model: int) -> int:
        """:func:`sae_training_bytes` of this SAE on ``d_model``-wide activations; latents left to the sizing
        count as 4 x d_model, the most :func:`workers.engine.sae.size_sae` picks."""
        return sae_training_bytes(d_model, self.n_latents or 4 * d_model, self.batch_size)


def sae_training_bytes(d_model: int, n_latents: int, batch_size: int) -> int:
    """About the memory training an SAE takes: the weights with their gradients and Adam's two moments, and one
    batch through the forward and backward pass, all float32."""
    weights = 2 * n_latents * d_model + n_latents + d_model  # W_enc, W_dec, b_enc, b_pre
    # pre-activations, codes, the AuxK pair and their gradients: ~8 x [batch, n_latents]; inputs, errors and
    # reconstructions: ~4 x [batch, d_model]
    batch = batch_size * (8 * n_latents + 4 * d_model)
    return 4 * (4 * weights + batch)


@_engine_errors
@dataclass(config=_RULES)
class AuditConfig(_DictMixin):
    """Everything that decides an audit's numbers. Defaults are documented in docs/options.md."""

    layer: _count(ge=-LAYER_MAX, le=LAYER_MAX) = -1  # block whose output is decomposed; negative counts from the end
    token: Literal[TOKEN_TYPES] = "cls"  # "cls" or "spatial" (every patch token)
    spatial_pool: Literal[SPATIAL_POOLS] = "max"  # one number per image for spatial latents: "max" or "mean"
    device: Annotated[str, Strict(), Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$")] = "auto"  # "auto": CUDA
    dtype: Literal[DTYPES] = "fp32"  # autocast dtype on CUDA for extraction: fp32, bf16, fp16
    cache_dtype: Literal[CACHE_DTYPES] = "float32"  # dtype of cached activations on disk
    batch_size: _count() = 64  # images per forward pass; activation memory grows linearly with it
    sae: SAEConfig = field(default_factory=SAEConfig)
    n_references: _count(ge=2) = 16  # top-m reference images per latent (at least 2: clarity needs pairs)
    prompt_templates: Annotated[tuple[_Text, ...], Field(min_length=1, max_length=PROMPTS_MAX)] = \
        DEFAULT_PROMPT_TEMPLATES
    class_prompts: _PerClass = field(default_factory=dict)  # class -> prompts for zero-shot; default: its name
    expected_concepts: _PerClass = field(default_factory=dict)  # class -> concepts that class should mean
    # None: the built-in artifact list
    artifact_vocabulary: Annotated[tuple[_Text, ...], Field(max_length=VOCABULARY_MAX)] | None = None
    general_vocabulary: _Bool = True  # add the ImageNet class names shipped with open_clip
    # below this label confidence (semantics.label_evidence: the share of resamples of the latent's references that
    # give the same meaning, at most 0.5 when no second phrasing confirms it) a latent is reported "unlabelled"
    label_min_confidence: _Fraction = 0.6
    flag_top_n: _count(le=SHOWN_MAX) = 10  # a flag must be among the class's top-n latents by relevance share ...
    flag_min_share: _Fraction = 0.05  # ... and hold at least this share of the class's positive relevance ...
    flag_max_alignment: _Cosine = 0.05  # ... while aligning with the expected concepts below this,
    flag_relative_alignment: _Fraction = 0.5  # ... or below this fraction of its alignment with its own label,
    flag_class_margin: _real(ge=0.0, le=2.0) = 0.02  # ... or exceeding other classes' expected alignment by less
    flag_without_harm: _Bool = False  # also flag latents relied on with no measured harm ("relied on, no harm")
    flag_group_similarity: _Cosine = 0.6  # flagged latents this alike (centred semantic cosine) are one concept
    # a verdict over several SAEs: this many dictionaries, trained with seeds sae.seed, sae.seed + 1, ...; the first
    # is the audit's SAE (latents, heatmaps, corrections), the others only vote on its flags
    dictionaries: _count(le=DICTIONARIES_MAX) = 3
    # another dictionary finds a flag's concept when a set of its flags for the same head and class has a summed
    # activation correlating with the concept's at least this much over the audited images ...
    match_min_correlation: _Fraction = 0.6
    # ... and a flag is kept when more than this share of the dictionaries find it (0.5: a majority; 0: every flag)
    flag_min_stability: _real(ge=0.0, lt=1.0) = 0.5
    harm_min_gap: _real(gt=0.0, le=1.0) = 0.20  # harm: a with/without accuracy gap of at least this ...
    harm_min_z: _real(ge=0.0, le=1000.0) = 3.0  # ... significant at this two-proportion z, exceeding the other head's
    amplification_ratio: _real(ge=1.0, le=1000.0) = 1.5  # probe share >= ratio x zero-shot share: amplified
    faithfulness_steps: _count() = 20  # deletion curve length n = 1..N
    faithfulness_max_images: _count() = 256  # images per class used for deletion curves
    top_images_per_flag: _count(le=TOP_IMAGES_MAX) = 8
    heatmaps: _Bool = True  # each flag's map of where its latent is active on the images its card shows
    heatmap_method: Literal[HEATMAP_METHODS] = "attnlrp"  # how a CLS latent's map is made (docs/heatmaps.md)
    heatmap_cells: _count(le=HEATMAP_CELLS_MAX) = 2  # cells per patch side of a map traced to the pixels
    heatmap_blocks: _count(le=LAYER_MAX) = 3  # blocks "attnlrp" and "conservative" trace a CLS latent back through
    report_top_n: _count(le=SHOWN_MAX) = 50  # latents per class kept in the result's relevance tables
    causal: _Bool = True
    seed: _count(ge=0, le=SEED_MAX) = 0
    # confounders to ask about once the audit is done (workers.engine.checklist.Suspect's dicts): a checklist
    suspects: list[dict] = field(default_factory=list)

    @field_validator("suspects")
    @classmethod
    def _suspects_are_named_one_way_each(cls, suspects):
        from .checklist import SUSPECTS_MAX, Suspect, refuse_uploads

        if len(suspects) > SUSPECTS_MAX:
            raise ValueError(f"at most {SUSPECTS_MAX} suspects, got {len(suspects)}")
        try:
            parsed = [Suspect.from_dict(s) for s in suspects]
            refuse_uploads(parsed, "the audit option suspects")
            checked = [s.to_dict() for s in parsed]
        except EngineError as exc:
            raise ValueError(exc.message) from exc
        names = [s["name"] for s in checked]
        if len(set(names)) < len(names):
            raise ValueError(f"suspect names must differ: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        return [{k: v for k, v in s.items() if k != "kind"} for s in checked]

    @field_validator("prompt_templates")
    @classmethod
    def _templates_have_a_placeholder(cls, templates):
        missing = [t for t in templates if "{}" not in t]
        if missing:
            raise ValueError(f"every template must contain '{{}}' where the concept goes; {missing[0]!r} does not")
        return templates


CORRECTION_METHODS = ("project", "refit", "reweight")  # workers.engine.correction.REGISTRY's names
ANCHORS = ("mean", "midpoint", "clean")  # where "project" holds the shortcut's coordinate (workers.engine.correction)
ESTIMATES = ("regression", "removal", "widened")  # how a shortcut's direction is measured (workers.engine.directions)


@_engine_errors
@dataclass(config=_RULES)
class CorrectionOptions(_DictMixin):
    """A correction's options (``workers.engine.correction``)."""

    anchor: Literal[ANCHORS] = "mean"  # "project": the point every image's shortcut coordinate is moved to
    # one direction per concept from how features move with it within a class, one per latent by removing it, or
    # one for the concepts together from their images widened to the side of the features those images lie on
    directions: Literal[ESTIMATES] = "regression"
    # "refit", "reweight": the new fit's inverse regularization; None: chosen by cross-validation
    C: _real(gt=0.0, le=1e6) | None = None
    # the accuracy the correction may cost on images without any chosen latent before its verdict fails
    max_clean_drop: _Fraction = 0.02
    # correct, re-audit, add the flagged latents that track the chosen concepts, correct again: at most this many
    # rounds (1: one correction and its re-audit)
    rounds: _count(le=ROUNDS_MAX) = 3
    # a labels.csv column (0/1) of the audited dataset marking the images that show the chosen flags' concept: the
    # direction removed is the column's (the within-class difference of the probe's mean features with and without
    # it) instead of the SAE's, in one round; a training split with the column says which of its images show it
    column: _Text | None = None


# --------------------------------------------------------------------------- server bounds

@dataclasses.dataclass(frozen=True)
class Bound:
    """An upper bound a server sets on an option, and why it holds (said when the option exceeds it)."""

    limit: int
    reason: str = "on this server"


def option_value(config: AuditConfig, option: str):
    """The value of an option named as the API names it (``sae.batch_size``)."""
    value = config
    for part in option.split("."):
        if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
            raise KeyError(f"no audit option {option!r}")
        value = getattr(value, part)
    return value


def check_bounds(config: AuditConfig, bounds: Mapping[str, Bound]) -> None:
    """Refuse every option above its bound, in one message that names each."""
    problems = []
    for option, bound in bounds.items():
        value = option_value(config, option)
        if value is not None and value > bound.limit:
            problems.append(f"{option}: must be at most {bound.limit} {bound.reason}, got {_shown(value)}")
    if problems:
        raise EngineError("; ".join(problems))


def json_schema(bounds: Mapping[str, Bound] | None = None) -> dict:
    """The options as an OpenAPI 3.0 schema object (nested options inlined), with the server's bounds as maxima."""
    schema = _adapter(AuditConfig).json_schema()
    definitions = schema.pop("$defs", {})
    schema = _openapi(schema, definitions)
    for option, bound in (bounds or {}).items():
        node = schema
        for part in option.split("."):
            node = node["properties"][part]
        if "maximum" not in node or node["maximum"] > bound.limit:
            node["maximum"] = bound.limit
    return schema


def _openapi(node, definitions: dict):
    """JSON Schema as pydantic writes it -> OpenAPI 3.0: references inlined, ``anyOf [x, null]`` as a nullable x,
    numeric exclusive minima as booleans; titles and key constraints dropped."""
    if isinstance(node, list):
        return [_openapi(n, definitions) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _openapi(definitions[node["$ref"].rsplit("/", 1)[1]], definitions)
    out = {}
    for key, value in node.items():
        if key == "properties":  # option names, not schema keywords
            out[key] = {name: _openapi(option, definitions) for name, option in value.items()}
        elif key not in ("title", "propertyNames"):
            out[key] = _openapi(value, definitions)
    options = out.get("anyOf")
    if options and {"type": "null"} in options and len(options) == 2:
        out.pop("anyOf")
        out.update(next(o for o in options if o != {"type": "null"}), nullable=True)
    for key, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(key), (int, float)) and not isinstance(out[key], bool):
            out[plain], out[key] = out[key], True
    return out


# --------------------------------------------------------------------------- messages

_PROBLEMS = {
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "float_type": "must be a number", "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "string_type": "must be a string", "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be a JSON object", "dataclass_type": "must be a JSON object of options",
    "greater_than_equal": "must be at least {ge}", "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}", "less_than": "must be less than {lt}",
    "string_too_short": "must not be empty", "string_too_long": "must be at most {max_length} characters",
    "too_short": "must have at least {min_length} item(s)", "too_long": "must have at most {max_length} item(s)",
    "string_pattern_mismatch": "must be auto, cpu, mps, cuda or cuda:<index>",  # the device, the one pattern
}


def describe(exc: ValidationError, cls, bounds: Mapping[str, Bound] | None = None) -> str:
    """One line per refused option, each naming it as the API does (``sae.k``), joined with '; '.

    A number above what the engine runs at all is told the server's tighter bound, when there is one: that is the
    most the user may ask for.
    """
    prefix = "sae." if cls is SAEConfig else ""
    bounds = bounds or {}
    unknown: dict[tuple, list[str]] = {}
    problems = []
    errors = exc.errors()
    for error in errors:
        loc = error["loc"]
        if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if error["type"] == "too_short" and any(e["loc"][:len(loc)] == loc and e["loc"] != loc for e in errors):
            continue  # a list whose refused items pydantic then counts as missing: the items' errors say it
        path = prefix + _path(loc)
        bound = bounds.get(path)
        if error["type"] == "less_than_equal" and bound is not None and bound.limit < error["ctx"]["le"]:
            problems.append(f"{path}: must be at most {bound.limit} {bound.reason}, got {_shown(error['input'])}")
            continue
        problems.append(f"{path or 'config'}: {_problem(error)}")
    for parent, names in unknown.items():
        owner = SAEConfig if parent == ("sae",) or cls is SAEConfig else AuditConfig
        known = ", ".join(sorted(f.name for f in dataclasses.fields(owner)))
        where = "sae " if owner is SAEConfig else ""
        problems.insert(0, f"unknown {where}option(s): {', '.join(sorted(names))}; known {where}options are: {known}")
    return "; ".join(problems)


def _path(loc: tuple) -> str:
    """``sae.k``, ``prompt_templates[0]``, ``expected_concepts['melanoma'][1]``: option names dotted, list items
    and class names in brackets."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part == "[key]":
            parts.append(" (the class name)")
        elif parts and parts[-1] in (".class_prompts", ".expected_concepts"):
            parts.append(f"[{part!r}]")
        else:
            parts.append(f".{part}")
    return "".join(parts).lstrip(".")


def _problem(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", error["msg"])).removeprefix("Value error, ")
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {_shown(error['input'])}"
    template = _PROBLEMS.get(kind)
    if template is None:
        return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {_shown(error['input'])}"
    limits = {k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items()}
    if kind in ("too_short", "too_long"):
        return f"{template.format(**limits)}, got {ctx['actual_length']} item(s)"
    return f"{template.format(**limits)}, got {_shown(error['input'])}"


def _shown(value) -> str:
    """A value as a user wrote it in JSON, short."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, Mapping):
        return "a JSON object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    text = repr(value)
    return text if len(text) <= 40 else f"a number of {len(text)} digits"
