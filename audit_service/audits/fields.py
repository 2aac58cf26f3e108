"""The fields of a result row, a flag or a latent, declared once.

A field has one name: the model field, the key in the API and in the JSON
report, and the column of the CSV download (a field spread over several
columns names them). It says where its value comes from in the engine's
result dict, how the CSV writes it and, for a plain number the report pages
show, its title there. ``store_result``, the serializers, the JSON report,
the CSV downloads and the pages all read ``FLAG_FIELDS`` and
``LATENT_FIELDS``, so a new number of a flag is one line here, a model field
and its migration.

The lists are in the CSVs' column order: new fields go at the end, so scripts
that read the CSVs by position keep working.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from django.db import models


class Head(models.TextChoices):
    PROBE = "probe", "Linear probe"
    ZERO_SHOT = "zero_shot", "Zero-shot"


class Confirmation(models.TextChoices):
    """The engine's verdict on a flag: causal check plus measured harm. The labels are what a reviewer reads."""

    CONFIRMED = "confirmed", "confirmed shortcut: measured harm"
    RELIED_ON_NO_HARM = "relied_on_no_harm", "relied on, no measured harm"
    NOT_CONFIRMED = "not_confirmed", "not confirmed"
    NOT_RUN = "not_run", "not run"


@dataclass(frozen=True)
class Field:
    name: str
    # the model fields' values from the engine's dict for the row; None: the engine does not give it
    store: Callable[[dict], dict] | None
    # the value in the API and the JSON report, read from a row
    value: Callable[[Any], Any]
    # the row's CSV cells and their columns; None: not in the CSV
    csv: Callable[[Any], list] | None = None
    columns: tuple[str, ...] = ()
    title: str = ""  # a number the pages show: its title there (may name the row's fields, "{row.class_name}")
    digits: int = 3  # ... and its decimals
    api: bool = True  # False: kept for the service's own use, in neither the API nor the JSON report
    aliases: tuple[str, ...] = ()  # names the API served it under before; served read-only for one release
    help: str = ""  # the API schema's description

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return self.columns or ((self.name,) if self.csv else ())


_REQUIRED = object()


def _reader(key: str | tuple[str, ...], default) -> Callable[[dict], Any]:
    """Read the engine's ``key`` (a tuple: the engine's key, then the names results stored earlier used for it).
    Without a default the key must be there; with one, a key newer engines added (absent or None in results
    stored before it) reads as the default."""
    keys = key if isinstance(key, tuple) else (key,)

    def read(row: dict):
        found = next((k for k in keys if k in row), None)
        if default is _REQUIRED:
            if found is None:
                raise KeyError(keys[0])
            return row[found]
        return default if found is None or row[found] is None else row[found]

    return read


def number(name: str, key: str | tuple[str, ...] | None = None, *, default=_REQUIRED, csv: bool = True, **options) -> Field:
    """A number (or None), read from ``key`` of the engine's dict (default: ``name``)."""
    read = _reader(key or name, default)
    return Field(name, lambda row: {name: read(row)}, lambda row: getattr(row, name),
                 (lambda row: [_num(getattr(row, name))]) if csv else None, **options)


def integer(name: str, key: str | None = None, **options) -> Field:
    """A count or an index: the CSV writes all its digits."""
    read = _reader(key or name, _REQUIRED)
    return Field(name, lambda row: {name: read(row)}, lambda row: getattr(row, name),
                 lambda row: [str(getattr(row, name))], **options)


def text(name: str, key: str | None = None, *, default=_REQUIRED, csv: bool = True, **options) -> Field:
    read = _reader(key or name, default)
    return Field(name, lambda row: {name: read(row)}, lambda row: getattr(row, name),
                 (lambda row: [_text(getattr(row, name))]) if csv else None, **options)


def blob(name: str, key: str | None = None, *, default=_REQUIRED, **options) -> Field:
    """A JSON value (list or dict): in the API and the JSON report, not in the CSV unless ``csv`` says how."""
    read = _reader(key or name, default)
    return Field(name, lambda row: {name: read(row)}, lambda row: getattr(row, name), **options)


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"


def _text(value) -> str:
    return "" if value is None else str(value)


def _bool(value) -> str:
    return "" if value is None else str(value).lower()


# --------------------------------------------------------------------------- the flag's odd fields

def _confirmed(flag: dict) -> bool | None:
    status = (flag.get("confirmation") or {}).get("status", "")
    if status:
        return None if status == Confirmation.NOT_RUN else status == Confirmation.CONFIRMED
    return (flag.get("causal") or {}).get("confirmed")  # older results: "ablation or insertion flipped a prediction"


CAUSAL_COLUMNS = ("ablation_flips", "ablation_images", "insertion_flips_to_class", "insertion_images")

# a flag's measured harm, per head, in the order the card's table and the flags CSV show it:
# (group of images in flag["harm"][head], the value read from it, the CSV column's suffix)
HARM_CELLS = (("class_with", "accuracy", "accuracy_with"), ("class_without", "accuracy", "accuracy_without"),
              ("others_with", "called_class", "others_called_with"),
              ("others_without", "called_class", "others_called_without"))


def harm_cells(harm: dict | None, head: str) -> list[tuple[float | None, int]]:
    """One head's harm values in ``HARM_CELLS`` order, each with its number of images (all None when the audit
    did not measure harm)."""
    block = (harm or {}).get(head) or {}
    return [((block.get(group) or {}).get(key), (block.get(group) or {}).get("n", 0)) for group, key, _ in HARM_CELLS]


def _harm_csv(flag) -> list:
    measured = "" if flag.harm is None else _bool(bool(flag.harm.get("measured")))
    return [measured, *(_num(value) for head in Head.values for value, _ in harm_cells(flag.harm, head))]


def review_dict(review) -> dict | None:
    if review is None:
        return None
    return {"verdict": review.verdict, "note": review.note,
            "reviewer": review.reviewer.username if review.reviewer else None,
            "created_at": review.created_at.isoformat()}


def _evidence_csv(row) -> list:
    ev = row.label_evidence or {}
    return [_text(ev.get("runner_up")), _num(ev.get("margin")), "; ".join(ev.get("agreeing") or []),
            _num(ev.get("resampled"))]


def _stability_csv(flag) -> list:
    found = flag.stability or {}
    return [str(found.get("found_by", "")), str(found.get("of", ""))]


def _latest_review_csv(flag) -> list:
    latest = flag.latest_review
    if latest is None:
        return ["", "", ""]
    return [latest.verdict, latest.note, latest.reviewer.username if latest.reviewer else ""]


# a flag's and a latent's: why it is (or is not) named
LABEL_EVIDENCE = Field(
    "label_evidence", lambda row: {"label_evidence": row.get("label_evidence")}, lambda row: row.label_evidence,
    _evidence_csv, columns=("label_runner_up", "label_margin", "label_agreeing", "label_resampled"),
    help=("why the latent is (or is not) named: runner_up, the best concept of another meaning; margin, the closest "
          "concept's score above it in standard deviations of the latent's scores over the vocabulary; agreeing, "
          "other phrasings of the same meaning among its top concepts; resampled, the share of resamples of its "
          "reference images that give the same meaning. null for audits run before labels carried evidence"))

FLAG_FIELDS: tuple[Field, ...] = (
    text("head"),
    text("class_name"),
    integer("rank"),
    integer("latent", aliases=("latent_index",)),
    text("label"),
    text("label_source", csv=False),
    text("category"),
    number("share"),
    number("mean_relevance", csv=False),
    number("probe_share", title="share (probe)"),
    number("zero_shot_share", title="share (zero-shot)"),
    number("label_alignment", title="alignment with label"),
    number("expected_alignment", title="with “{row.class_name}” concepts",
           help="alignment of the latent with the flag's class's expected concepts (a latent's "
                "`expected_alignment` holds it for every class)"),
    number("clarity", title="clarity"),
    Field("confirmed", lambda flag: {"confirmed": _confirmed(flag)}, lambda row: row.confirmed,
          lambda row: [_bool(row.confirmed)],
          help="the engine confirmed a shortcut (confirmation.status is confirmed); null when it did not check"),
    Field("causal", lambda flag: {"causal": flag.get("causal")}, lambda row: row.causal,
          lambda row: [(row.causal or {}).get(key, "") for key in CAUSAL_COLUMNS], columns=CAUSAL_COLUMNS),
    Field("latest_review", None, lambda row: review_dict(row.latest_review), _latest_review_csv,
          columns=("latest_verdict", "latest_note", "latest_reviewer")),
    Field("confirmation",
          lambda flag: {"confirmation_status": (flag.get("confirmation") or {}).get("status", ""),
                        "confirmation_text": (flag.get("confirmation") or {}).get("text", "")},
          lambda row: {"status": row.confirmation_status, "text": row.confirmation_text},
          lambda row: [row.confirmation_status], columns=("confirmation_status",)),
    Field("harm", lambda flag: {"harm": flag.get("harm")}, lambda row: row.harm, _harm_csv,
          columns=("harm_measured", *(f"{head}_{suffix}" for head in Head.values for _, _, suffix in HARM_CELLS)),
          help="per head (probe, zero_shot): class_with / class_without (n, accuracy, mean_logit), others_with / "
               "others_without (n, called_class), accuracy_gap, called_gap; measured (bool), summary (a sentence). "
               "null for audits run before harm was measured"),
    number("label_confidence", default=None),
    text("closest_concept", default=""),
    blob("references"),
    blob("top_images"),
    blob("semantic", default=None, api=False),  # the latent's unit semantic embedding, for audit diffs
    blob("metadata_auroc", default={}),
    blob("concept_latents", default=[]),
    blob("heatmaps", default={}, help=(
        "image id -> where the latent is active on that image (a grid over the patches, 0..255 scaled to its "
        "maximum; workers/engine/heatmaps.py says how a CLS latent's map is made), for the flag's reference images "
        "and most affected images; empty for audits run before heatmaps or with heatmaps off")),
    Field("stability", lambda flag: {"stability": flag.get("stability")}, lambda row: row.stability, _stability_csv,
          columns=("found_by", "dictionaries"), help=(
              "how many of the audit's dictionaries (SAEs trained with seeds sae.seed, sae.seed + 1, ...) flag the "
              "same concept for this head and class: found_by, of, and per finding dictionary its index, seed, the "
              "correlation of its concept's activation with this flag's and its latents; null for audits run "
              "before dictionaries voted")),
    LABEL_EVIDENCE,
)

LATENT_FIELDS: tuple[Field, ...] = (
    integer("latent", aliases=("index",)),
    text("label"),
    text("label_source"),
    text("label_category"),
    number("label_alignment", ("label_alignment", "alignment"), title="alignment with label", aliases=("alignment",)),
    number("clarity", title="clarity"),
    number("frequency", title="frequency", digits=4),
    number("max_activation"),
    blob("references", csv=lambda row: [len(row.references), " ".join(row.references)],
         columns=("n_references", "references")),
    blob("expected_alignment", help="per class: alignment of the latent with the class's expected concepts"),
    number("label_confidence", default=None),
    text("closest_concept", default=None),
    LABEL_EVIDENCE,
)


# --------------------------------------------------------------------------- what the readers call

def model_values(fields: tuple[Field, ...], row: dict) -> dict:
    """The model fields' values of one entry of the engine's ``result["flags"]`` or ``result["latents"]``."""
    values = {}
    for field in fields:
        if field.store is not None:
            values.update(field.store(row))
    return values


def api_names(fields: tuple[Field, ...]) -> list[str]:
    return [f.name for f in fields if f.api]


def as_json(fields: tuple[Field, ...], row) -> dict:
    return {f.name: f.value(row) for f in fields if f.api}


def csv_header(fields: tuple[Field, ...]) -> list[str]:
    return [column for f in fields for column in f.csv_columns]


def csv_row(fields: tuple[Field, ...], row) -> list:
    return [cell for f in fields if f.csv is not None for cell in f.csv(row)]


def page_columns(fields: tuple[Field, ...]) -> list[Field]:
    return [f for f in fields if f.title]


def page_numbers(fields: tuple[Field, ...], row) -> list[dict]:
    """The numbers the pages show of a row: title, value and decimals."""
    return [{"name": f.name, "title": f.title.format(row=row), "value": f.value(row), "digits": f.digits}
            for f in page_columns(fields)]
