"""Explaining one image with a finished audit: submitting the short job that does it."""
from __future__ import annotations

import tempfile
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.db import transaction

from audit_service.registry.archives import IMAGE_SUFFIXES, image_problem
from audit_service.registry.services import RegistrationError, check_upload_size, spool_upload

from .corrections import require_sae
from .jobs import JobKind, check_room, register
from .models import Audit, Explanation

EXPLANATION = register(JobKind("explanation", Explanation, "workers.explanations.run_explanation",
                               fields=("audit", "item", "image", "result")))


def create_explanation(*, audit: Audit, user, image=None, item: str = "") -> Explanation:
    """Check the request and enqueue the explanation of ``image`` (an uploaded file) or of ``item`` (an image
    of the audited dataset, by its path in labels.csv). The upload is checked as a dataset's images are; a
    refused one leaves no file."""
    require_sae(audit, "images are explained with a succeeded audit", "explain images with the new one")
    if bool(image) == bool(item):
        raise RegistrationError("give either an image file (image) or the path of an image of the audited dataset "
                                "as in its labels.csv (item), not both", field="item" if image else "image")
    if item:
        keys = [key for key, _ in audit.dataset.labels()]
        if item not in set(keys):
            raise RegistrationError(f"dataset '{audit.dataset.name}' has no image '{item}'; give its path as in "
                                    f"labels.csv, e.g. '{keys[0]}'", field="item")
    else:
        _check_image(image)
    with transaction.atomic():
        check_room(audit.project)
        explanation = Explanation(project=audit.project, audit=audit, item=item, created_by=user)
        if image:
            explanation.image.save(Path(image.name).name, File(image), save=False)
        try:
            explanation.save()
        except Exception:
            if explanation.image:
                explanation.image.delete(save=False)
            raise
        EXPLANATION.enqueue_on_commit(explanation.pk)
    return explanation


def _check_image(upload) -> None:
    name = Path(upload.name or "image").name
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise RegistrationError(f"'{name}' is not an image file; upload one of {', '.join(IMAGE_SUFFIXES)}",
                                field="image")
    check_upload_size(upload, "image", field="image")
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = spool_upload(upload, Path(name).suffix.lower(), Path(tmp))
        problem = image_problem(path, name, settings.MAX_IMAGE_PIXELS)
    if problem:
        raise RegistrationError(problem, field="image")
