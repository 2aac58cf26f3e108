"""Celery workers. ``workers.engine`` is the pure-PyTorch engine and imports nothing from here."""
