"""Starting the web server and a worker as child processes (one-machine runs: `serve`, `demo`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings

REPO = Path(settings.BASE_DIR)


def start_worker(log_path: Path, concurrency: int = 1) -> subprocess.Popen:
    """One worker with an embedded beat (the periodic reaper): right for one machine, not for many."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "gpu,default",
                             "-c", str(concurrency), "--loglevel=INFO", "--without-gossip", "--without-mingle",
                             "-B", "-s", str(settings.CELERY_BEAT_SCHEDULE_FILENAME)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})


def start_web(addr: str, port: int, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "manage.py", "runserver", "--noreload", f"{addr}:{port}"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web server exited with code {process.returncode}; see its log")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (403 for an anonymous API call is an answer)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"the web server did not answer at {url} within {timeout:.0f}s")


def stop(*processes: subprocess.Popen) -> None:
    for p in processes:
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        if p:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
