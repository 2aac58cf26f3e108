"""The command-line client against a live test server: every exit code, content-hash reuse, the report; its
gates on what the API answers about an audit's flags (the default gate: unreviewed flags with measured harm)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from audit_service import cli as client
from clip_audit_client import Client
from audit_service.accounts.models import ApiToken
from audit_service.audits.models import Audit, Status, store_result
from audit_service.registry.models import ClipModel, Dataset, Probe

from .results import RULER_SUMMARY, build_result, stored_audit, without_new_keys
from .test_integration import purge_queues, require_real_services, start_worker

# the tests that run the client as a process need a live server, PostgreSQL, Redis (and a worker)
live = pytest.mark.integration
live_db = pytest.mark.django_db(transaction=True)
REPO = Path(__file__).resolve().parents[2]
OPTIONS = {"sae": {"steps": 150}, "general_vocabulary": False, "faithfulness_max_images": 8,
           "faithfulness_steps": 4, "batch_size": 16, "flag_max_alignment": 1.0, "flag_min_share": 0.0,
           "flag_without_harm": True}


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


@live
@live_db
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


@live
@live_db
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
        # the same call from Python
        python = Client(live_server.url, key)
        outcome = python.audit(project=project.pk, model_config=str(assets["config"]),
                               checkpoint=str(assets["checkpoint"]), probe=str(assets["probe"]),
                               dataset=str(assets["dataset"]), options=OPTIONS, max_flag_share=1.0, poll=0.5,
                               out=str(tmp_path / "fourth"))
        assert outcome.passed and outcome.code == 0
        assert Audit.objects.get(pk=outcome.id).status == Status.SUCCEEDED
        assert outcome.summary["audit"] == outcome.id and (tmp_path / "fourth" / f"audit-{outcome.id}.json").is_file()
        assert (ClipModel.objects.count(), Probe.objects.count(), Dataset.objects.count()) == (1, 1, 1)
        with pytest.raises(TypeError, match="unknown options colour"):
            python.audit(project=project.pk, probe="p.npz", dataset="d.zip", colour="red")
        with pytest.raises(TypeError, match="needs exactly one of dataset, dataset_s3, dataset_folder"):
            python.audit(project=project.pk, probe="p.npz")
    finally:
        worker.terminate()
        worker.wait(timeout=30)


# --------------------------------------------------------------------------- the default gate: measured harm

def gate(api, audit, *options) -> tuple[int, str]:
    """The client's gate decision for ``audit`` from what the API answers, as ``cli.audit`` fetches it."""
    args = client.parser().parse_args(["--url", "http://testserver", "--token", "-", "audit", "--project", "0",
                                       "--probe", "p.npz", "--dataset", "d.zip", *map(str, options)])
    summary = api.get(f"/api/v1/audits/{audit.pk}/summary/").json()
    page = api.get(f"/api/v1/audits/{audit.pk}/flags/", {"head": "probe"}).json()
    assert page["next"] is None
    diff = None
    if args.baseline is not None:
        diff = api.get(f"/api/v1/audits/{audit.pk}/diff/", {"baseline": args.baseline}).json()
    lines = []
    code = client.gate(summary, page["results"], args, audit.pk, Path("out"), lines.append, diff)
    return code, "\n".join(lines)


@pytest.mark.django_db
def test_by_default_an_unreviewed_flag_with_measured_harm_fails_the_build(client_for, project, users, registered):
    audit = stored_audit(project, users["member"], registered)
    api = client_for("member")
    code, output = gate(api, audit)
    assert code == client.EXIT_GATE, output
    assert "1 unreviewed probe flags with measured harm (melanoma latent 0)" in output
    assert "--no-default-gate" in output
    # the summary names each flag's confirmation and harm
    assert "unreviewed, confirmed" in output and f"harm: {RULER_SUMMARY}" in output
    assert "unreviewed, relied_on_no_harm" in output and "with measured harm 1" in output

    code, output = gate(api, audit, "--no-default-gate")
    assert code == client.EXIT_PASS and "gate passed" in output
    code, output = gate(api, audit, "--max-flag-share", "1.0")  # an explicit gate replaces the default one
    assert code == client.EXIT_PASS, output

    ruler = audit.flags.get(head="probe", class_name="melanoma")
    reviewed = api.post(f"/api/v1/audits/{audit.pk}/flags/{ruler.pk}/reviews/", {"verdict": "benign",
                                                                                  "note": "rulers are fine here"})
    assert reviewed.status_code == 201
    code, output = gate(api, audit)
    assert code == client.EXIT_PASS and "gate passed" in output and "benign, confirmed" in output


@pytest.mark.django_db
def test_against_a_baseline_only_new_flags_with_measured_harm_fail_the_default_gate(client_for, project, users,
                                                                                    registered):
    api = client_for("member")
    same = stored_audit(project, users["member"], registered)
    current = stored_audit(project, users["member"], registered)
    code, output = gate(api, current, "--baseline", same.pk)
    assert code == client.EXIT_PASS and "0 new" in output, output

    without_ruler = build_result()
    without_ruler["flags"] = [f for f in without_ruler["flags"] if f["label"] != "a ruler"]
    earlier = stored_audit(project, users["member"], registered, without_ruler)
    code, output = gate(api, current, "--baseline", earlier.pk)
    assert code == client.EXIT_GATE and "1 unreviewed new probe flags with measured harm" in output, output


@pytest.mark.django_db
def test_the_default_gate_passes_an_audit_from_before_harm_was_measured(client_for, project, users, registered):
    audit = stored_audit(project, users["member"], registered, without_new_keys(build_result()))
    code, output = gate(client_for("member"), audit)
    assert code == client.EXIT_PASS and "confirmation unknown" in output, output


@live
@live_db
def test_the_client_exits_1_on_measured_harm_unless_the_default_gate_is_off(live_server, project, users, assets,
                                                                             tmp_path):
    require_real_services()
    purge_queues()  # no worker: the test stores each submitted audit's result itself
    key = ApiToken.issue(users["member"], "ci")[1]

    def run(*extra):
        process = cli(live_server.url, key, assets, project.pk, *extra, wait=False, out=tmp_path / "out")
        deadline = time.monotonic() + 120
        while not (queued := Audit.objects.filter(status=Status.QUEUED).first()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queued, process.communicate(timeout=30)[0]
        queued.mark_running("extract", 1.0)
        store_result(queued, build_result(), {"extract": 1.0})
        output, _ = process.communicate(timeout=120)
        return process.returncode, output

    code, output = run()
    assert code == 1, output
    assert "GATE FAILED" in output and "probe flags with measured harm (melanoma latent 0)" in output
    assert RULER_SUMMARY in output
    code, output = run("--no-default-gate")
    assert code == 0 and "gate passed" in output, output
