"""The command-line client's ``checklist``: its arguments, the request it sends, and its gate and exit codes on a
checklist's answers (a fake server: no network, no worker)."""
import json

import pytest

from audit_service import cli as client


def parse(*extra):
    return client.parser().parse_args(["--url", "http://server", "--token", "t", "checklist", "--audit", "4",
                                       "--poll", "0", *extra])


def answer(name, verdict, class_name="melanoma", share=0.2, zero_shot=0.05):
    classes = {} if class_name is None else {class_name: {"probe_share": share, "zero_shot_share": zero_shot,
                                                          "relied_on": verdict.startswith("relied on")}}
    return {"name": name, "kind": "text", "text": name, "verdict": verdict, "verdict_class": class_name,
            "classes": classes, "evidence": f"latents 3: alignment with {name!r} 0.210"}


ANSWERS = [answer("ruler", "relied on, harmful"), answer("ink", "relied on, no measured harm", "nevus"),
           answer("hair", "represented, not relied on"),
           answer("gel", "not found by the dictionary", None)]


def state(answers=ANSWERS, status="succeeded", error=""):
    return {"id": 11, "status": status, "stage": "done", "percent": 100.0, "error": error,
            "suspects": [{"name": a["name"], "text": a["name"]} for a in answers],
            "result": {"suspects": answers} if status == "succeeded" else None}


@pytest.mark.parametrize("value, suspect", [
    ("ruler=text:a ruler", {"name": "ruler", "text": "a ruler"}),
    ("ink = column: ink marked", {"name": "ink", "column": "ink marked"}),
    ("time=text:10:30 stamp", {"name": "time", "text": "10:30 stamp"}),  # only the first colon splits
    ("ruler=TEXT:a ruler", {"name": "ruler", "text": "a ruler"}),
])
def test_a_suspect_is_written_name_kind_and_what(value, suspect):
    assert client.parse_suspect(value) == suspect


@pytest.mark.parametrize("value", ["ruler", "ruler=a ruler", "=text:a ruler", "ruler=text:", "ruler=examples:a.png",
                                   "ruler:text=a ruler"])
def test_a_badly_written_suspect_is_a_usage_error_saying_how_to_write_it(value):
    with pytest.raises(client.Stop) as stop:
        client.parse_suspect(value)
    assert stop.value.code == client.EXIT_USAGE and "NAME=text:TEXT" in stop.value.message


def test_the_request_carries_the_suspects_or_the_shipped_list():
    args = parse("--suspect", "ruler=text:a ruler", "--suspect", "ink=column:ink", "--fail-on", "ruler")
    assert args.audit == 4 and args.fail_on == ["ruler"] and args.out == "clip-audit-checklist"
    assert client.checklist_request(args) == {"suspects": [{"name": "ruler", "text": "a ruler"},
                                                           {"name": "ink", "column": "ink"}]}
    assert client.checklist_request(parse("--checklist", "dermoscopy", "--fail-on", "ruler")) == {
        "checklist": "dermoscopy"}  # a shipped list's names are checked once its answer is back


@pytest.mark.parametrize("extra, words", [
    ((), "give your suspects with --suspect"),
    (("--checklist", "dermoscopy", "--suspect", "ruler=text:a ruler"), "not both"),
    (("--suspect", "ruler=text:a ruler", "--suspect", "ruler=column:ruler"), "repeated: ruler"),
    (("--suspect", "ruler=text:a ruler", "--fail-on", "ink"), "--fail-on ink: not among the checklist's suspects "
                                                               "(ruler)"),
])
def test_bad_arguments_stop_with_exit_2_before_anything_is_sent(extra, words, monkeypatch):
    monkeypatch.setattr(client, "Api", lambda *a, **k: pytest.fail("nothing may be sent"))
    with pytest.raises(client.Stop) as stop:
        client.checklist(parse(*extra), lambda line: None)
    assert stop.value.code == client.EXIT_USAGE and words in stop.value.message


def test_main_prints_the_usage_error_and_exits_2(capsys):
    code = client.main(["--url", "http://server", "--token", "t", "checklist", "--audit", "4", "--suspect", "ruler"])
    assert code == client.EXIT_USAGE and "--suspect 'ruler': write NAME=text:TEXT" in capsys.readouterr().err


@pytest.mark.parametrize("fail_on, code, failed", [
    ((), 0, []),
    (("hair", "gel"), 0, []),  # represented or not found: not relied on
    (("ruler",), 1, ["ruler"]),  # relied on, harmful
    (("ink",), 1, ["ink"]),  # relied on, no measured harm
    (("hair", "ink", "ruler"), 1, ["ruler", "ink"]),
])
def test_the_gate_fails_on_a_fail_on_suspect_the_probe_relies_on(fail_on, code, failed):
    args = parse("--checklist", "dermoscopy", *[x for name in fail_on for x in ("--fail-on", name)])
    lines = []
    assert client.checklist_gate(state(), args, lines.append) == code
    text = "\n".join(lines)
    for a in ANSWERS:  # one line per suspect: name, verdict, class, shares, evidence
        line = next(line for line in lines if line.strip().startswith(a["name"]))
        assert a["verdict"] in line and a["evidence"] in line
        assert (a["verdict_class"] or "-") in line
    assert "probe 0.200 zero-shot 0.050" in text and "probe - zero-shot -" in text
    assert ("GATE FAILED" in text) == bool(failed)
    for name in failed:
        verdict = next(a["verdict"] for a in ANSWERS if a["name"] == name)
        assert f"FAIL: the probe relies on '{name}': {verdict}" in text
    assert not [line for line in lines if line.startswith("FAIL:") and not any(f"'{n}'" in line for n in failed)]


def test_a_fail_on_name_missing_from_a_shipped_lists_answer_exits_2():
    args = parse("--checklist", "dermoscopy", "--fail-on", "pacemaker")
    with pytest.raises(client.Stop) as stop:
        client.checklist_gate(state(), args, lambda line: None)
    assert stop.value.code == client.EXIT_USAGE
    assert "--fail-on pacemaker: not among the checklist's suspects (ruler, ink, hair, gel)" in stop.value.message


class FakeApi:
    """The server's side of one checklist: the POST answers queued, the polls answer ``final``."""

    def __init__(self, final):
        self.final, self.sent = final, []

    def __call__(self, url, token, timeout=60):
        return self

    def call(self, method, path, **kwargs):
        self.sent.append((method, path, kwargs.get("json")))
        body = {**self.final, "status": "queued", "result": None} if method == "POST" else self.final
        return type("Response", (), {"json": lambda _self: body})()


def test_the_command_submits_waits_saves_the_answer_and_gates(monkeypatch, tmp_path):
    api = FakeApi(state())
    monkeypatch.setattr(client, "Api", api)
    args = parse("--suspect", "ruler=text:ruler", "--suspect", "hair=text:hair", "--fail-on", "ruler",
                 "--out", str(tmp_path / "out"))
    lines = []
    assert client.checklist(args, lines.append) == client.EXIT_GATE
    assert api.sent[0] == ("POST", "/api/v1/audits/4/checklists/", {"suspects": [{"name": "ruler", "text": "ruler"},
                                                                                  {"name": "hair", "text": "hair"}]})
    assert api.sent[1][:2] == ("GET", "/api/v1/checklists/11/")
    saved = json.loads((tmp_path / "out" / "checklist-11.json").read_text())
    assert saved["result"]["suspects"] == ANSWERS
    assert "checklist #11 of audit #4 submitted (4 suspects): http://server/checklists/11/" in lines


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_failed_checklist_exits_3_with_its_reason(status, monkeypatch, tmp_path):
    monkeypatch.setattr(client, "Api", FakeApi(state(status=status, error="the worker ran out of memory")))
    args = parse("--checklist", "dermoscopy", "--out", str(tmp_path / "out"))
    with pytest.raises(client.Stop) as stop:
        client.checklist(args, lambda line: None)
    assert stop.value.code == client.EXIT_AUDIT_FAILED
    assert f"checklist #11 {status}: the worker ran out of memory" in stop.value.message
    assert not (tmp_path / "out").exists()
