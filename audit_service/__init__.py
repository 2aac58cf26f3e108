# The Celery app is loaded with Django so that tasks enqueued by the web process use its settings.
from workers.celery import app as celery_app

__all__ = ["celery_app"]
