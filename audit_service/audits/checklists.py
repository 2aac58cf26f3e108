"""Confounder checklists: asking a finished audit whether its probe relies on the suspects a user names (by text,
by example images or by a labels.csv column), and asking it by itself once an audit with the option ``suspects``
succeeds. The answers are the engine's (``workers.engine.suspects``), computed by a short job on a worker."""
from __future__ import annotations

import logging

from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone

from audit_service.registry.services import RegistrationError
from workers.engine.checklist import SHIPPED, Suspect, parse_suspects, stored
from workers.engine.errors import EngineError

from .corrections import require_sae
from .jobs import JobKind, check_room, register
from .models import Audit, Checklist, Status, audit_finished

log = logging.getLogger(__name__)

CHECKLIST = register(JobKind("checklist", Checklist, "workers.checklists.run_checklist",
                             fields=("audit", "suspects", "shipped", "result")))

LISTED = 5  # names a refusal lists of what exists (columns, images)
# the values a 0/1 labels.csv column may hold to name a suspect (as the engine reads it: workers.engine.suspects)
COLUMN_VALUES = ("0", "1", "true", "false", "yes", "no", "")


def create_checklist(*, audit: Audit, user, suspects=None, checklist: str = "") -> Checklist:
    """Check the request and enqueue the checklist: ``suspects``, a list of suspect dicts (``{"name", "text"}``,
    ``{"name", "column"}`` or ``{"name", "with", "without"}``), or ``checklist``, the name of a shipped one
    (``workers.engine.checklist.SHIPPED``). A refused request raises RegistrationError naming the field and
    leaves no row."""
    require_sae(audit, "a checklist is asked of a succeeded audit", "ask the checklist of the new one")
    checked = checked_suspects(audit, suspects, checklist)
    with transaction.atomic():
        check_room(audit.project)
        row = Checklist.objects.create(project=audit.project, audit=audit, suspects=checked, shipped=checklist or "",
                                       created_by=user)
        CHECKLIST.enqueue_on_commit(row.pk)
    return row


def shipped_checklists() -> list[dict]:
    """The shipped checklists, as the API and the report's form list them: name and suspects."""
    return [{"name": name, "suspects": [dict(s) for s in suspects]} for name, suspects in SHIPPED.items()]


PROJECT_LIST = "project"  # the checklist name that asks the project's own saved list (Project.checklist)


def checked_suspects(audit: Audit, suspects, checklist: str = "") -> list[dict]:
    """The suspects asked for, each checked (``parse_suspects``) and against the audited dataset, as stored:
    the dicts a Suspect reads back (without its derived ``kind``)."""
    try:
        parsed = parse_suspects(_asked(audit, suspects, checklist))
    except EngineError as exc:
        raise RegistrationError(exc.message, field="suspects") from exc
    _check_against_dataset(audit, parsed)
    return stored(parsed)


def _asked(audit: Audit, suspects, checklist) -> list:
    """The list of suspect dicts the request names: its own, a shipped checklist's, or the project's saved one."""
    known = ", ".join(repr(name) for name in SHIPPED)
    if checklist:
        if suspects:
            raise RegistrationError("give either suspects (your own list) or checklist (the name of a shipped one, "
                                    f"or {PROJECT_LIST!r} for the project's saved list), not both", field="checklist")
        if checklist == PROJECT_LIST:
            if not audit.project.checklist:
                raise RegistrationError(f"project '{audit.project.name}' has no saved checklist; save one with PATCH "
                                        f"/api/v1/projects/{audit.project_id}/ {{\"checklist\": [suspects]}}",
                                        field="checklist")
            return audit.project.checklist
        if not isinstance(checklist, str) or checklist not in SHIPPED:
            raise RegistrationError(f"no shipped checklist {checklist!r}; the shipped ones are {known}, and "
                                    f"{PROJECT_LIST!r} asks the project's saved list", field="checklist")
        return SHIPPED[checklist]
    if not isinstance(suspects, list) or not suspects:
        raise RegistrationError("give at least one suspect: suspects, a list such as [{\"name\": \"ruler\", \"text\": "
                                "\"a ruler\"}] (or column, or with + without example images), or checklist, the "
                                f"name of a shipped one ({known}) or {PROJECT_LIST!r}", field="suspects")
    return suspects


def _check_against_dataset(audit: Audit, suspects: list[Suspect]) -> None:
    """Columns must be extra 0/1 columns of the audited dataset's labels.csv, example images its images."""
    if not any(s.column or s.with_images or s.without_images for s in suspects):
        return  # text suspects only: nothing to read
    dataset = audit.dataset
    rows, metadata = dataset.table()
    keys = [key for key, _ in rows]
    present = set(keys)
    for s in suspects:
        if s.column:
            _check_column(dataset.name, s, metadata)
        missing = [i for i in (*s.with_images, *s.without_images) if i not in present]
        if missing:
            raise RegistrationError(
                f"suspect {s.name!r}: {len(missing)} example image(s) are not images of dataset '{dataset.name}': "
                f"{_some(missing)}; name them as its labels.csv does, e.g. {_some(keys)}", field="suspects")


def _check_column(dataset_name: str, suspect: Suspect, metadata: dict) -> None:
    column = suspect.column
    if column not in metadata:
        columns = (f"its extra columns are {_some(sorted(metadata))}" if metadata else
                   "it has no columns besides image and label; name the suspect by text or by example images")
        raise RegistrationError(f"suspect {suspect.name!r}: dataset '{dataset_name}' has no labels.csv column "
                                f"{column!r}; {columns}", field="suspects")
    bad = sorted({v.strip() for v in metadata[column] if v.strip().lower() not in COLUMN_VALUES})
    if bad:
        raise RegistrationError(f"suspect {suspect.name!r}: column {column!r} must hold 0/1 (or true/false, yes/no) "
                                f"to name a suspect; it holds {_some(bad)}", field="suspects")


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


# --------------------------------------------------------------------------- the audit option ``suspects``

@receiver(audit_finished)
def _ask_the_audits_suspects(sender, audit, **kwargs) -> None:
    """An audit that succeeded with the option ``suspects`` gets its checklist once its success is committed (a
    correction's re-audit, whose options are the corrected audit's, does not ask again)."""
    if audit.status != Status.SUCCEEDED or not (audit.config or {}).get("suspects"):
        return
    if "correction" in (audit.context or {}):
        return
    transaction.on_commit(lambda pk=audit.pk: checklist_for_audit(pk))


def checklist_for_audit(audit_id: int) -> Checklist | None:
    """The checklist the audit's option ``suspects`` asks for. A refusal (a column or an image the dataset does
    not have, a project with no room) is kept as a failed checklist saying why, so the audit's checklists show it."""
    audit = Audit.objects.filter(pk=audit_id).select_related("project", "dataset", "created_by").first()
    if audit is None:
        return None
    suspects = list((audit.config or {}).get("suspects") or [])
    try:
        return create_checklist(audit=audit, user=audit.created_by, suspects=suspects)
    except RegistrationError as exc:
        log.warning("audit %s: the checklist of its option suspects was refused: %s", audit.pk, exc.message)
        return Checklist.objects.create(
            project=audit.project, audit=audit, suspects=suspects, created_by=audit.created_by, status=Status.FAILED,
            stage="refused", finished_at=timezone.now(),
            error=f"the checklist the audit's option suspects asks for was not run: {exc.message}. Ask it again "
                  f"with POST /api/v1/audits/{audit.pk}/checklists/ or the report's form")


def suspects_from_lines(text: str) -> list[dict]:
    """Text suspects as the report's form takes them, one per line written ``name: text`` ("ruler: a ruler"); a
    line without a colon is its own name and text. Blank lines are skipped."""
    suspects = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        name, colon, said = line.partition(":")
        name, said = (name.strip(), said.strip()) if colon else (line, line)
        suspects.append({"name": name or said, "text": said} if said else {"name": name})
    return suspects
