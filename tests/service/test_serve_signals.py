"""`manage.py serve` as systemd and `docker stop` stop it: a SIGTERM (or a SIGKILL) to serve leaves none of the
processes it started behind, neither its web server and worker nor the worker's pool and beat processes.

Each test runs the real command with SQLite and the filesystem broker in a temporary var dir; Linux only (/proc).
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit_service.audits import processes

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="reads the process tree from /proc")]

REPO = Path(__file__).resolve().parents[2]
# the embedded defaults, not the CI services: serve must find its database and broker in the temporary var dir
SERVICE_VARIABLES = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CACHE_URL", "MEDIA_ROOT",
                     "AUDIT_WORK_DIR", "STORAGE_BACKEND")
GONE_WITHIN = 20  # seconds, after serve has exited


def stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name before it may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid`, each with its start time (a pid reused later is not the same process)."""
    table = {int(p): stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, info in table.items():
            if info and info[1] == parent and child not in found:
                found[child] = info[2]
                frontier.append(child)
    return found


def alive(pid: int, started: int) -> bool:
    info = stat(pid)
    return info is not None and info[2] == started and info[0] != "Z"  # a zombie has stopped already


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except (FileNotFoundError, ProcessLookupError):
        return "(gone)"


def survivors(tree: dict[int, int]) -> list[str]:
    return [f"{pid} {command_line(pid)}" for pid, started in tree.items() if alive(pid, started)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{log.read_text()[-3000:]}")


@pytest.fixture
def served(tmp_path):
    """`manage.py serve` on a free port, once its web server answers and its worker is ready: (process, tree)."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env.update(CLIP_AUDIT_VAR_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    port = free_port()
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)], cwd=REPO, env=env,
                             stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    tree = {}
    try:
        processes.wait_until_up(f"http://127.0.0.1:{port}/api/v1/", serve, timeout=120)
        worker_log = tmp_path / "logs" / "worker.log"
        wait_for(lambda: worker_log.exists() and " ready." in worker_log.read_text(), 180, "the worker", worker_log)
        tree.update(descendants(serve.pid))
        yield serve, tree
    finally:  # a failing test leaves no process running
        for pid, started in tree.items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        if serve.poll() is None:
            serve.kill()
        serve.wait(timeout=30)


def assert_all_gone(tree: dict[int, int]):
    # the web server, the worker, its pool process and its beat: the tree is more than serve's own children
    assert len(tree) >= 3, survivors(tree)
    deadline = time.monotonic() + GONE_WITHIN
    while survivors(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert survivors(tree) == [], f"still running {GONE_WITHIN}s after serve exited"


def test_serve_stops_its_web_server_and_worker_on_sigterm(served):
    serve, tree = served
    serve.send_signal(signal.SIGTERM)
    exit_code = serve.wait(timeout=60)
    assert_all_gone(tree)
    assert exit_code == 0


def test_serve_stops_them_on_sigint_and_sighup_too(served):
    serve, tree = served
    serve.send_signal(signal.SIGHUP)
    serve.send_signal(signal.SIGINT)  # a second signal while it stops does not cut the clean-up short
    exit_code = serve.wait(timeout=60)
    assert_all_gone(tree)
    assert exit_code == 0


def test_nothing_serve_started_outlives_a_sigkill_of_serve(served):
    serve, tree = served
    serve.send_signal(signal.SIGKILL)
    serve.wait(timeout=30)
    assert_all_gone(tree)
