"""Whether the worker that runs an audit (or one step of it) is still there: its host:pid and its heartbeat."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone


def worker_identity() -> str:
    """host:pid of this process: who runs an audit, and whether that process still exists."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(worker_host: str) -> bool | None:
    """Whether the process named by ``worker_host`` is alive: known on its own host, None elsewhere."""
    host, _, pid = (worker_host or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if int(pid) == os.getpid():
        return False  # this process is not running it: whoever wrote that row with our pid is gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process whose parent died too can linger as a zombie until init reaps it: it is dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def worker_gone(worker_host: str, heartbeat_at, now=None) -> bool:
    """Whether the worker that wrote ``worker_host`` and ``heartbeat_at`` is gone: its process on this host has
    died, or its heartbeat is older than AUDIT_STALE_AFTER_SECONDS."""
    if owner_alive(worker_host) is False:
        return True  # its process on this host is gone; a live pid may be a reused one, so check the heartbeat too
    now = now or timezone.now()
    return heartbeat_at is None or now - heartbeat_at > timedelta(seconds=settings.AUDIT_STALE_AFTER_SECONDS)
