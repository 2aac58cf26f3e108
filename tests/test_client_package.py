"""The client a CI job or a notebook installs: `pip install` of the repository in a fresh virtual environment gives
the `clip-audit` command and `clip_audit_client.Client`, with `requests` and without torch or Django."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)


def test_the_client_installs_without_torch_and_answers_help(tmp_path):
    # what `pip install .` in a clone reads (a copy, so the build leaves nothing in the working tree)
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "clip_audit_client", source / "clip_audit_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    assert run(base, "-m", "venv", venv).returncode == 0
    installed = run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", source)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    helped = run(venv / "bin" / "clip-audit", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: clip-audit") and all(c in helped.stdout for c in ("audit", "correct",
                                                                                              "explain"))
    assert run(venv / "bin" / "clip-audit", "audit", "--help").returncode == 0
    imported = run(venv / "bin" / "python", "-c", "from clip_audit_client import Client; import requests; "
                   "print(Client('http://127.0.0.1:9', 't').audit.__doc__)")
    assert imported.returncode == 0 and "run an audit" in imported.stdout, imported.stderr
    for heavy in ("torch", "django", "audit_service", "workers"):
        missing = run(venv / "bin" / "python", "-c", f"import {heavy}", cwd=tmp_path)
        assert missing.returncode != 0, f"{heavy} is importable in the client's environment"
    unreachable = run(venv / "bin" / "clip-audit", "--url", "http://127.0.0.1:9", "--token", "t", "explain",
                      "--audit", "1", "--item", "x.png", cwd=tmp_path)
    assert unreachable.returncode == 4 and "cannot reach" in unreachable.stderr
