"""The linter CI runs, with the settings in pyproject.toml: a contributor's `ruff check .` is the same check."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing_with_the_projects_settings():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, f"ruff check . (settings: pyproject.toml) found:\n{run.stdout}{run.stderr}"
