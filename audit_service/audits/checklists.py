"""Confounder checklists: asking a finished audit whether its probe relies on the suspects a user names (by text,
by example images or by a labels.csv column), and asking it by itself once an audit with the option ``suspects``
succeeds. The answers are the engine's (``workers.engine.suspects``), computed by a short job on a worker."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone

from audit_service.registry.archives import IMAGE_SUFFIXES, image_problem
from audit_service.registry.services import RegistrationError, check_upload_size, spool_upload
from workers.engine.checklist import SHIPPED, UPLOAD, Suspect, parse_suspects, stored
from workers.engine.columns import FALSE_VALUES, TRUE_VALUES
from workers.engine.errors import EngineError

from .corrections import require_sae
from .jobs import JobKind, check_room, register
from .models import Audit, Checklist, ChecklistImage, Status, audit_finished

log = logging.getLogger(__name__)

CHECKLIST = register(JobKind("checklist", Checklist, "workers.checklists.run_checklist",
                             fields=("audit", "suspects", "shipped", "result")))

LISTED = 5  # names a refusal lists of what exists (columns, images)
# the values a 0/1 labels.csv column may hold to name a suspect (as the engine reads it: workers.engine.suspects)
COLUMN_VALUES = TRUE_VALUES + FALSE_VALUES


def create_checklist(*, audit: Audit, user, suspects=None, checklist: str = "", images=()) -> Checklist:
    """Check the request and enqueue the checklist: ``suspects``, a list of suspect dicts (``{"name", "text"}``,
    ``{"name", "column"}`` or ``{"name", "with", "without"}``), or ``checklist``, the name of a shipped one
    (``workers.engine.checklist.SHIPPED``). ``images``: uploaded example images (with your own suspects only), each
    named in a suspect's with or without as ``"upload:" + its base name`` and stored as a
    :class:`ChecklistImage` of the checklist. A refused request raises RegistrationError naming the field and
    leaves no row and no file."""
    require_sae(audit, "a checklist is asked of a succeeded audit", "ask the checklist of the new one")
    images = list(images or ())
    if images and checklist:
        raise RegistrationError("example images are uploaded with your own suspects (suspects, naming each image "
                                "upload:NAME in a with or without list), not with a shipped checklist or the "
                                "project's list; ask that one without images", field="images")
    checked = checked_suspects(audit, suspects, checklist)
    uploads = checked_uploads(checked, images)
    saved: list = []  # the files stored so far, removed if anything fails
    try:
        with transaction.atomic():
            check_room(audit.project)
            row = Checklist.objects.create(project=audit.project, audit=audit, suspects=checked,
                                           shipped=checklist or "", created_by=user)
            for name, upload in uploads.items():
                image = ChecklistImage(checklist=row, name=name)
                image.file.save(name, File(upload), save=False)
                saved.append(image.file)
                image.save()
            CHECKLIST.enqueue_on_commit(row.pk)
    except BaseException:
        for stored_file in saved:
            stored_file.storage.delete(stored_file.name)
        raise
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
    """Columns must be extra 0/1 columns of the audited dataset's labels.csv, example images its images (an
    ``upload:NAME`` entry names an uploaded image instead: :func:`checked_uploads`)."""
    if not any(s.column or _dataset_images(s) for s in suspects):
        return  # text suspects and uploaded examples only: nothing to read
    dataset = audit.dataset
    rows, metadata = dataset.table()
    keys = [key for key, _ in rows]
    present = set(keys)
    for s in suspects:
        if s.column:
            _check_column(dataset.name, s, metadata)
        missing = [i for i in _dataset_images(s) if i not in present]
        if missing:
            raise RegistrationError(
                f"suspect {s.name!r}: {len(missing)} example image(s) are not images of dataset '{dataset.name}': "
                f"{_some(missing)}; name them as its labels.csv does, e.g. {_some(keys)} (or upload the images "
                f"and name each {UPLOAD}FILENAME)", field="suspects")


def _dataset_images(suspect: Suspect) -> list[str]:
    """A suspect's example images that are the audited dataset's (not ``upload:`` ones)."""
    return [i for i in (*suspect.with_images, *suspect.without_images) if not i.startswith(UPLOAD)]


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


# --------------------------------------------------------------------------- uploaded example images

IMAGES_MAX = 100  # uploaded example images in one checklist at most (Django's DATA_UPLOAD_MAX_NUMBER_FILES too)
NAME_MAX = ChecklistImage._meta.get_field("name").max_length  # characters of an uploaded image's file name


def upload_name(upload) -> str:
    """The base name an uploaded file is named by in ``upload:NAME``: its file name without any folder."""
    return Path((upload.name or "").replace("\\", "/")).name


def checked_uploads(suspects: list[dict], images: list) -> dict:
    """The uploaded example images by base name, checked: at most :data:`IMAGES_MAX`, names distinct, each named
    by some suspect's ``upload:NAME`` and every such name uploaded, each a readable image within the limits. Raises
    RegistrationError saying what is wrong and what to do."""
    if len(images) > IMAGES_MAX:
        raise RegistrationError(f"at most {IMAGES_MAX} example images in one checklist, got {len(images)}; give "
                                "fewer per suspect (10 and 10 tell them apart reliably) or split the suspects",
                                field="images")
    names = [upload_name(upload) for upload in images]
    if not all(names):
        raise RegistrationError("an uploaded example image has no file name; send each with its file name, which "
                                f"suspects name as {UPLOAD}NAME", field="images")
    too_long = [n for n in names if len(n) > NAME_MAX]
    if too_long:
        raise RegistrationError(f"uploaded file names must be at most {NAME_MAX} characters: {_some(too_long)}; "
                                "rename the files", field="images")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RegistrationError(f"uploaded example images must have distinct file names; repeated: "
                                f"{_some(repeated)}. Rename them (the name is how a suspect names the image: "
                                f"{UPLOAD}NAME)", field="images")
    uploaded = set(names)
    named: set[str] = set()
    for s in suspects:
        wanted = Suspect.from_dict(s).uploads
        missing = [w for w in wanted if w not in uploaded]
        if missing:
            have = f"uploaded: {_some(sorted(uploaded))}" if uploaded else "no image was uploaded"
            raise RegistrationError(
                f"suspect {s['name']!r}: {', '.join(UPLOAD + m for m in missing[:LISTED])}"
                f"{f' and {len(missing) - LISTED} more' if len(missing) > LISTED else ''} "
                f"name{'s' if len(missing) == 1 else ''} no uploaded file; {have}. Upload each such file (multipart "
                f"field images) or name an image of the audited dataset as its labels.csv does", field="suspects")
        named.update(wanted)
    unnamed = [n for n in names if n not in named]
    if unnamed:
        raise RegistrationError(f"uploaded image(s) no suspect names: {_some(unnamed)}; name each in a suspect's "
                                f"with or without list as {UPLOAD}NAME (e.g. {UPLOAD}{unnamed[0]}), "
                                "or leave it out", field="images")
    for name, upload in zip(names, images):
        _check_image(upload, name)
    return dict(zip(names, images))


def _check_image(upload, name: str) -> None:
    """An uploaded example image is checked as a dataset's images are (suffix, size, readable, pixels)."""
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise RegistrationError(f"'{name}' is not an image file; upload example images as one of "
                                f"{', '.join(IMAGE_SUFFIXES)}", field="images")
    check_upload_size(upload, f"example image '{name}'", field="images")
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = spool_upload(upload, Path(name).suffix.lower(), Path(tmp))
        problem = image_problem(path, name, settings.MAX_IMAGE_PIXELS)
    if problem:
        raise RegistrationError(f"example image {problem}", field="images")


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
