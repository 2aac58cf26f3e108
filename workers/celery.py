"""The Celery app. Workers: ``celery -A workers worker -Q gpu,default``."""
import logging
import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready
from django.conf import settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_service.settings")

app = Celery("clip_audit")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])
app.autodiscover_tasks(["workers"], related_name="sharded")
app.autodiscover_tasks(["workers"], related_name="corrections")
app.autodiscover_tasks(["workers"], related_name="explanations")
app.autodiscover_tasks(["workers"], related_name="checklists")


@app.on_configure.connect
def _make_filesystem_broker_folders(sender, **kwargs):
    """kombu's filesystem transport (the one-machine default) needs its folders to exist."""
    # read Django's settings, not sender.conf: touching the app's config while it is being configured recurses
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", None) or {}
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)
    backend = getattr(settings, "CELERY_RESULT_BACKEND", None) or ""
    if backend.startswith("file://"):  # the file result backend wants its folder too
        Path(backend[len("file://"):]).mkdir(parents=True, exist_ok=True)


@worker_ready.connect
def _reap_when_a_worker_starts(sender, **kwargs):
    """A worker restarted after a crash picks up the audits its predecessor left running at once."""
    try:
        app.tasks["workers.tasks.reap_stale_audits"]()
    except Exception:  # the database may be down: the periodic reaper tries again
        logging.getLogger("workers").exception("reaping stale audits at worker start failed")
