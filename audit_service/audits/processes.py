"""Starting the web server and a worker as child processes (one-machine runs: `serve`, `demo`), and stopping them.

Each child leads its own process group, so stopping it stops what it started too (Celery's pool and beat); on
Linux each also dies with its parent, even when the parent was killed with SIGKILL and could not stop it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

REPO = Path(settings.BASE_DIR)
# what systemd and `docker stop` send, Ctrl-C, and a closed terminal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# from SIGTERM to SIGKILL: a worker in a warm shutdown finishes a short task, not an audit
STOP_GRACE_SECONDS = 10
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stopped(Exception):
    """A stop signal arrived."""


def start_worker(log_path: Path, concurrency: int = 1) -> subprocess.Popen:
    """One worker with an embedded beat (the periodic reaper): right for one machine, not for many."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "gpu,default",
                             "-c", str(concurrency), "--loglevel=INFO", "--without-gossip", "--without-mingle",
                             "-B", "-s", str(settings.CELERY_BEAT_SCHEDULE_FILENAME)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                            **_child_options(signal.SIGQUIT))  # Celery's cold shutdown: it stops its pool at once


def start_web(addr: str, port: int, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "manage.py", "runserver", "--noreload", f"{addr}:{port}"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                            **_child_options(signal.SIGTERM))


def _child_options(death_signal: signal.Signals) -> dict:
    """Popen options for a child: its own process group, no terminal input, and `death_signal` when we die."""
    # its own group: a stop reaches its children as well, and Ctrl-C reaches only us, who stop it in order
    return {"process_group": 0, "stdin": subprocess.DEVNULL, "preexec_fn": _dies_with_parent(death_signal)}


def _dies_with_parent(death_signal: signal.Signals):
    """A preexec_fn asking Linux to send the child `death_signal` when this process dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(death_signal))
        if os.getppid() != parent:  # we died before prctl took effect: no signal will come
            os._exit(1)

    return preexec


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


def stop(*processes: subprocess.Popen | None, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to each child, `grace` seconds for them all to exit, then SIGKILL to each child's whole process
    group: whatever a child started and left behind (or did not stop in time) goes with it."""
    children = [p for p in processes if p]
    for p in children:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # to the leader only: Celery stops its own pool and beat in order
    deadline = time.monotonic() + grace
    for p in children:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in children:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: the child and all it started have exited
        p.wait()


@contextmanager
def stop_signals_raise():
    """Within it a stop signal raises `Stopped`, once: later ones are ignored, so they cannot cut short the
    clean-up the first one started. The previous handlers come back on leaving it."""
    def raise_stopped(signum, frame):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
