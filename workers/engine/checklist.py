"""A suspect, as a user names it: the checklist's input, light enough for the web process (no torch).

The matching and the verdicts are :mod:`workers.engine.suspects`; this module holds what the service checks a
request with (:meth:`Suspect.from_dict`) and the shipped checklists (:data:`SHIPPED`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .errors import EngineError

KINDS = ("text", "examples", "column")
VERDICTS = ("relied on, harmful", "relied on, no measured harm", "represented, not relied on",
            "not found by the dictionary")
MIN_EXAMPLES = 3  # examples on each side at least
SUSPECTS_MAX = 50  # suspects in one checklist at most
UPLOAD = "upload:"  # an example named "upload:NAME" is an image uploaded with the checklist, not one of the dataset

# checklists shipped per domain: the confounders auditors in that field bring (each asked about by its text)
SHIPPED: dict[str, list[dict]] = {
    "dermoscopy": [{"name": "ruler", "text": "a ruler"}, {"name": "ink marking", "text": "ink marking"},
                   {"name": "dark corners", "text": "dark corners"}, {"name": "gel bubbles", "text": "gel bubbles"},
                   {"name": "colour chart", "text": "a colour chart"}, {"name": "hair", "text": "hair"},
                   {"name": "band-aid", "text": "a band-aid"}],
    "chest x-ray": [{"name": "drain", "text": "a chest drain"}, {"name": "text marker", "text": "a text marker"},
                    {"name": "scanner tag", "text": "a scanner tag"}, {"name": "pacemaker", "text": "a pacemaker"}],
}


@dataclass(frozen=True)
class Suspect:
    """A confounder to ask about, named by ``text``, by example images (ids of audited images ``with_images``
    that show it and ``without_images`` that do not) or by a 0/1 ``labels.csv`` ``column``: one of the three."""

    name: str
    text: str | None = None
    column: str | None = None
    with_images: tuple[str, ...] = ()
    without_images: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "text" if self.text else "column" if self.column else "examples"

    @property
    def uploads(self) -> list[str]:
        """The NAMEs of the example images it names as ``upload:NAME`` (uploaded with the checklist)."""
        return [i[len(UPLOAD):] for i in (*self.with_images, *self.without_images) if i.startswith(UPLOAD)]

    @classmethod
    def from_dict(cls, d: Mapping) -> "Suspect":
        """A suspect as the API and the options give it: ``{"name": ..., "text": ...}``, ``{"name", "column"}`` or
        ``{"name", "with": [ids], "without": [ids]}``; raises EngineError saying what is wrong."""
        if not isinstance(d, Mapping):
            raise EngineError(f"a suspect must be an object with a name and one of text, column or with/without; "
                              f"got {d!r}")
        unknown = sorted(set(d) - {"name", "text", "column", "with", "without"})
        if unknown:
            raise EngineError(f"unknown suspect field(s) {', '.join(unknown)}; known: name, text, column, with, "
                              "without")
        name = d.get("name") or d.get("text") or d.get("column")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise EngineError("a suspect needs a name (text, at most 100 characters)")
        given = [k for k in ("text", "column") if d.get(k)] + (["examples"] if d.get("with") or d.get("without")
                                                                 else [])
        if len(given) != 1:
            raise EngineError(f"suspect {name!r}: give exactly one of text, column, or with + without example images"
                              f" (got {', '.join(given) or 'none'})")
        for key in ("text", "column"):
            if d.get(key) is not None and (not isinstance(d[key], str) or len(d[key]) > 200):
                raise EngineError(f"suspect {name!r}: {key} must be text of at most 200 characters")
        with_, without = d.get("with") or [], d.get("without") or []
        if given == ["examples"]:
            for side, ids in (("with", with_), ("without", without)):
                if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
                    raise EngineError(f"suspect {name!r}: {side} must be a list of image names of the dataset")
                if len(ids) < MIN_EXAMPLES:
                    raise EngineError(f"suspect {name!r}: give at least {MIN_EXAMPLES} images {side} it "
                                      f"(got {len(ids)}); 10 and 10 tell them apart reliably")
            if set(with_) & set(without):
                raise EngineError(f"suspect {name!r}: images both with and without it: "
                                  f"{', '.join(sorted(set(with_) & set(without))[:5])}")
        return cls(name.strip(), text=d.get("text") or None, column=d.get("column") or None,
                   with_images=tuple(with_), without_images=tuple(without))

    def to_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind}
        if self.text:
            out["text"] = self.text
        if self.column:
            out["column"] = self.column
        if self.with_images or self.without_images:
            out.update({"with": list(self.with_images), "without": list(self.without_images)})
        return out


def parse_suspects(suspects) -> list[Suspect]:
    """A list of suspect dicts as a request gives it, each read with :meth:`Suspect.from_dict`: at least one, at
    most :data:`SUSPECTS_MAX`, names distinct; raises EngineError naming the suspect that is wrong."""
    if not isinstance(suspects, list) or not suspects:
        raise EngineError('give at least one suspect: a list such as [{"name": "ruler", "text": "a ruler"}] (or '
                          "column, or with + without example images)")
    if len(suspects) > SUSPECTS_MAX:
        raise EngineError(f"at most {SUSPECTS_MAX} suspects in one checklist, got {len(suspects)}; split them")
    parsed = []
    for number, given in enumerate(suspects, 1):
        try:
            parsed.append(Suspect.from_dict(given))
        except EngineError as exc:
            raise EngineError(f"suspect {number}: {exc.message}") from exc
    names = [s.name for s in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EngineError(f"suspect names must differ; repeated: {', '.join(repeated)}. Give each its own name")
    return parsed


def refuse_uploads(suspects: list[Suspect], where: str) -> None:
    """A list kept for later (a project's saved list, the audit option ``suspects``) has no uploaded images to
    name: raise EngineError naming the first suspect that names one."""
    for s in suspects:
        if s.uploads:
            raise EngineError(f"suspect {s.name!r}: {where} cannot name uploaded images ({UPLOAD}{s.uploads[0]}); "
                              "name images of the audited dataset as its labels.csv does, or upload the images with "
                              "a checklist of a finished audit (POST /api/v1/audits/{id}/checklists/ as multipart)")


def stored(suspects: list[Suspect]) -> list[dict]:
    """Suspects as a row keeps them: the dicts :meth:`Suspect.from_dict` reads back."""
    return [{k: v for k, v in s.to_dict().items() if k != "kind"} for s in suspects]
