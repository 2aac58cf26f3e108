"""The Celery app. Workers: ``celery -A workers worker -Q gpu,default``."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "audit_service.settings")

app = Celery("clip_audit")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])
