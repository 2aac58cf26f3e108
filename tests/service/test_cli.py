"""The command-line client against a live test server: every exit code, content-hash reuse, the report."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from audit_service.accounts.models import ApiToken
from audit_service.audits.models import Audit, Status
from audit_service.registry.models import ClipModel, Dataset, Probe

from .test_integration import purge_queues, require_real_services, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
REPO = Path(__file__).resolve().parents[2]
OPTIONS = {"sae": {"steps": 150}, "general_vocabulary": False, "faithfulness_max_images": 8,
           "faithfulness_steps": 4, "batch_size": 16, "flag_max_alignment": 1.0, "flag_min_share": 0.0}


def cli(url, key, assets, *extra, wait=True, probe=None, out=None):
    command = [sys.executable, "-m", "audit_service.cli", "--url", url, "--token", key, "audit",
               "--project", str(extra[0]), "--model-config", str(assets["config"]),
               "--checkpoint", str(assets["checkpoint"]), "--probe", str(probe or assets["probe"]),
               "--dataset", str(assets["dataset"]), "--poll", "0.5", *map(str, extra[1:])]
    if out:
        command += ["--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def test_usage_input_unreachable_timeout_and_failed_audit_exit_codes(live_server, project, users, assets, tmp_path):
    require_real_services()
    purge_queues()  # no worker runs in this test: audits stay queued
    key = ApiToken.issue(users["member"], "ci")[1]
    url = live_server.url
    options = ["--options", json.dumps(OPTIONS)]

    code, output = subprocess.run([sys.executable, "-m", "audit_service.cli", "audit"], cwd=REPO,
                                  capture_output=True, text=True).returncode, ""
    assert code == 2  # argparse: required arguments missing
    code, output = cli(url, key, assets, project.pk, "--options", "{oops")
    assert code == 2 and "--options is not valid JSON" in output
    code, output = cli(url, key, {**assets, "dataset": tmp_path / "missing.zip"}, project.pk)
    assert code == 2 and "no such file" in output
    wide = tmp_path / "wide.npz"
    np.savez(wide, weight=np.ones((1, 64), np.float32), bias=np.zeros(1), classes=np.array(["melanoma", "nevus"]))
    code, output = cli(url, key, assets, project.pk, probe=wide)
    assert code == 2 and "64-dimensional" in output and not Probe.objects.exists()
    code, output = cli(url, "cat_wrong", assets, project.pk)
    assert code == 2 and "check --token" in output

    code, output = cli("http://127.0.0.1:9", key, assets, project.pk)
    assert code == 4 and "cannot reach" in output
    code, output = cli(url, key, assets, project.pk, *options, "--timeout", "2")
    assert code == 4 and "did not finish within 2 s" in output

    waiting = cli(url, key, assets, project.pk, *options, wait=False)
    deadline = time.monotonic() + 60
    while Audit.objects.filter(status=Status.QUEUED).count() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    Audit.objects.order_by("-pk").first().cancel()
    output, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 3 and "cancelled" in output
    # every run reused the first registration: identical files are never uploaded twice
    assert (ClipModel.objects.count(), Probe.objects.count(), Dataset.objects.count()) == (1, 1, 1)


def test_a_passing_and_a_failing_gate(live_server, project, users, assets, tmp_path):
    require_real_services()
    purge_queues()
    key = ApiToken.issue(users["member"], "ci")[1]
    worker = start_worker(tmp_path, "cli")
    try:
        code, output = cli(live_server.url, key, assets, project.pk, "--options", json.dumps(OPTIONS),
                           "--max-flag-share", "1.0", out=tmp_path / "first")
        assert code == 0, output
        assert "gate passed" in output and "share on flags" in output
        reports = list((tmp_path / "first").glob("audit-*-report.html"))
        assert reports and b"Shortcut audit" in reports[0].read_bytes()
        code, output = cli(live_server.url, key, assets, project.pk, "--options", json.dumps(OPTIONS),
                           "--max-flag-share", "0.0", "--max-unreviewed-flags", "0", out=tmp_path / "second")
        assert code == 1, output
        assert "GATE FAILED" in output and "unreviewed flags under the probe (limit 0)" in output
        assert "reusing" in output
        assert (ClipModel.objects.count(), Probe.objects.count(), Dataset.objects.count()) == (1, 1, 1)
        # the same gates against the first audit as a baseline: nothing is new, so the build passes
        first = Audit.objects.order_by("pk").first()
        code, output = cli(live_server.url, key, assets, project.pk, "--options", json.dumps(OPTIONS),
                           "--max-flag-share", "0.0", "--max-unreviewed-flags", "0", "--baseline", first.pk,
                           out=tmp_path / "third")
        assert code == 0, output
        assert f"against audit #{first.pk}: 0 new, 0 gone" in output and "gate passed" in output
    finally:
        worker.terminate()
        worker.wait(timeout=30)
