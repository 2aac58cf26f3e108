"""The command-line client's ``correct``: against a live server and worker, and its gate on a correction's verdict."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from audit_service import cli as client
from audit_service.accounts.models import ApiToken
from audit_service.audits.models import Audit, Correction, Status

from .test_cli import OPTIONS, REPO, cli, live, live_db
from .test_integration import purge_queues, require_real_services, start_worker


def correct(url, key, *extra):
    command = [sys.executable, "-m", "audit_service.cli", "--url", url, "--token", key, "correct", "--poll", "0.5",
               *map(str, extra)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


@live
@live_db
def test_the_client_corrects_a_flag_downloads_the_probe_and_exits_on_the_verdict(live_server, project, users, assets,
                                                                                tmp_path):
    require_real_services()
    purge_queues()
    key = ApiToken.issue(users["member"], "ci")[1]
    worker = start_worker(tmp_path, "correct")
    try:
        code, output = cli(live_server.url, key, assets, project.pk, "--options", json.dumps(OPTIONS),
                           "--no-default-gate", out=tmp_path / "audit")
        assert code == 0, output
        audit = Audit.objects.get()
        flag = audit.flags.filter(head="probe").order_by("-share").first()

        code, output = correct(live_server.url, key, "--audit", audit.pk)
        assert code == 2 and "none of this audit's probe flags is reviewed as a confirmed shortcut" in output
        code, output = correct(live_server.url, key, "--audit", audit.pk, "--flags", "melanoma:99999")
        assert code == 2 and "no probe flag of audit" in output and f"{flag.class_name}:{flag.latent}" in output

        out = tmp_path / "fix"
        code, output = correct(live_server.url, key, "--audit", audit.pk, "--flags",
                               f"{flag.class_name}:{flag.latent}", "--out", out)
        correction = Correction.objects.get()
        assert correction.status == Status.SUCCEEDED, (correction.error, output)
        assert list(correction.flags.all()) == [flag]
        verdict = correction.result["verdict"]
        assert code == (0 if verdict["passed"] else 1), output
        assert "overall" in output and f"latent {flag.latent} active" in output
        saved = out / Path(correction.new_probe.file.name).name
        assert saved.read_bytes() == correction.new_probe.file.open("rb").read()
        assert json.loads((out / f"correction-{correction.pk}.json").read_text())["id"] == correction.pk

        # reweighted on the probe's training split (here the audited dataset stands in for it), with its list
        code, output = correct(live_server.url, key, "--audit", audit.pk, "--flags", f"{flag.class_name}:{flag.latent}",
                               "--training-data", tmp_path / "list.csv")
        assert code == 2 and "give the probe's training split with --training-dataset" in output
        listing = tmp_path / "list.csv"
        code, output = correct(live_server.url, key, "--audit", audit.pk, "--flags", f"{flag.class_name}:{flag.latent}",
                               "--method", "reweight", "--training-dataset", audit.dataset_id, "--training-data",
                               listing, "--out", tmp_path / "fix2")
        reweighted = Correction.objects.latest("pk")
        assert reweighted.status == Status.SUCCEEDED and reweighted.result["method"] == "reweight", \
            (reweighted.error, output)
        rows = reweighted.result["correction"]["training_data"]["rows"]
        lines = listing.read_text().splitlines()
        assert lines[0] == "image,class,activation" and len(lines) == len(rows) + 1 > 1
        assert f"training images with the concept: {listing} ({len(rows)} images)" in output
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def state(reasons=(), checks=None) -> dict:
    row = {"n": 10, "old": 0.5, "new": 0.7}
    return {"id": 7, "result": {
        "method": "project", "reason": "project: no training split",
        "correction": {"table": {"overall": row, "per_class": {"melanoma": row}, "slices": {"clean": row}}},
        "reaudit": {"audit": 9}, "verdict": {"passed": not reasons, "reasons": list(reasons), "checks": checks or {}}}}


@pytest.mark.parametrize("reasons, allow_new, code", [
    ((), False, 0),
    (("the re-audit still flags latent 3 for melanoma",), False, 1),
    (("accuracy on images without any chosen latent fell by 0.100, more than the 0.020 allowed",), False, 1),
    (("the re-audit flags what the original did not: latent 5 (a watermark) for nevus",), False, 1),
    (("the re-audit flags what the original did not: latent 5 (a watermark) for nevus",), True, 0),
    (("the re-audit still flags latent 3 for melanoma",
      "the re-audit flags what the original did not: latent 5 (a watermark) for nevus"), True, 1),
])
def test_the_correction_gate_follows_the_verdict(reasons, allow_new, code):
    args = client.parser().parse_args(["--url", "u", "--token", "t", "correct", "--audit", "1",
                                       *(["--allow-new-flags"] if allow_new else [])])
    lines = []
    probe = {"id": 3, "name": "probe v2", "version": 2, "parent": 1}
    assert client.correction_gate(state(reasons), probe, Path("probe.npz"), args, lines.append) == code
    text = "\n".join(lines)
    assert ("GATE FAILED" in text) == (code == 1)
    for reason in reasons:
        assert reason in text


def test_the_gate_prints_what_the_correction_meets_and_what_remains_without_failing_on_it():
    args = client.parser().parse_args(["--url", "u", "--token", "t", "correct", "--audit", "1"])
    answer = state()
    answer["result"]["verdict"].update(meets=["the chosen flags are gone"], remains=[
        "still hurt: melanoma, latent 3 inactive at 0.700, 0.200 below melanoma, latent 3 active"])
    lines = []
    probe = {"id": 3, "name": "probe v2", "version": 2, "parent": 1}
    assert client.correction_gate(answer, probe, Path("probe.npz"), args, lines.append) == 0
    assert "meets: the chosen flags are gone" in lines
    assert "remains: still hurt: melanoma, latent 3 inactive at 0.700, 0.200 below melanoma, latent 3 active" in lines


def test_the_gate_prints_one_line_per_round_and_sends_the_rounds_asked_for():
    args = client.parser().parse_args(["--url", "u", "--token", "t", "correct", "--audit", "1", "--rounds", "2"])
    assert args.rounds == 2
    answer = state()
    row = {"old": 0.8, "new": 0.85, "n": 40}
    gap = {"slice": "melanoma, latent 3 inactive", "gap_before": 0.45, "gap_after": 0.2}
    answer["result"]["rounds"] = [
        {"round": 1, "concepts": [[3]], "table": {"overall": row}, "slices": [gap], "audit": 8, "passed": False,
         "added": [[11]]},
        {"round": 2, "concepts": [[3, 11]], "table": {"overall": row}, "slices": [{**gap, "gap_after": None}],
         "audit": 9, "passed": True, "added": [[]]}]
    lines = []
    probe = {"id": 3, "name": "probe v2", "version": 2, "parent": 1}
    assert client.correction_gate(answer, probe, Path("probe.npz"), args, lines.append) == 0
    assert ("round 1: latents 3; overall 0.800 -> 0.850; melanoma, latent 3 inactive gap 0.450 -> 0.200; "
            "re-audit #8 not passed; still tracking the concept: latents 11") in lines
    assert "round 2: latents 3, 11; overall 0.800 -> 0.850; melanoma, latent 3 inactive gap 0.450 -> -; " \
           "re-audit #9 passed" in lines
    # one round prints no round lines
    answer["result"]["rounds"] = answer["result"]["rounds"][:1]
    lines = []
    client.correction_gate(answer, probe, Path("probe.npz"), args, lines.append)
    assert not any(line.startswith("round ") for line in lines)
