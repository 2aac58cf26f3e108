"""The command-line client's ``checklist``: its arguments, the request it sends (JSON, or a multipart form with the
example images of its folders), and its gate and exit codes on a checklist's answers (a fake server: no network, no
worker; one test sends the upload, as encoded on the wire, to the real API)."""
import json

import pytest

from audit_service import cli as client
from audit_service.audits.models import Checklist

from .test_checklists import audited, marked  # noqa: F401 (fixtures)


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


# --------------------------------------------------------------------------- suspects by example images in folders

def image_folder(folder, names, colour=(200, 200, 200)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (24, 24), colour).save(folder / name)
    return folder


@pytest.fixture
def folders(tmp_path):
    """``with/`` (3 images, a note and a hidden file, which are not uploaded) and ``without/`` (4 images)."""
    with_ = image_folder(tmp_path / "with", ["r2.png", "r1.jpg", "r3.PNG"], (250, 250, 250))
    (with_ / "notes.txt").write_text("not an image")
    (with_ / ".hidden.png").write_bytes(b"x")
    without = image_folder(tmp_path / "without", ["n1.png", "n3.webp", "n2.bmp", "n4.jpeg"])
    return with_, without


def test_a_suspect_by_examples_names_every_image_of_its_two_folders_as_an_upload(folders):
    with_, without = folders
    images = {}
    suspect = client.parse_suspect(f"ruler = examples: {with_} , {without}", images)
    assert suspect == {"name": "ruler", "with": ["upload:r1.jpg", "upload:r2.png", "upload:r3.PNG"],
                       "without": ["upload:n1.png", "upload:n2.bmp", "upload:n3.webp", "upload:n4.jpeg"]}
    assert images == {p.name: p for p in [*with_.iterdir(), *without.iterdir()]
                      if not p.name.startswith(".") and p.suffix != ".txt"}
    # a second suspect may share a folder (its files are uploaded once); the request names them all
    args = parse("--suspect", f"ruler=examples:{with_},{without}", "--suspect", f"dark=examples:{without},{with_}",
                 "--suspect", "ink=text:ink")
    images = {}
    body = client.checklist_request(args, images)
    assert [s["name"] for s in body["suspects"]] == ["ruler", "dark", "ink"] and len(images) == 7
    assert body["suspects"][1]["with"] == suspect["without"]


def test_examples_folders_that_cannot_be_uploaded_stop_with_exit_2(folders, tmp_path):
    with_, without = folders
    few = image_folder(tmp_path / "few", ["a.png", "b.png"])
    clash = image_folder(tmp_path / "clash", ["r1.jpg", "x.png", "y.png"])
    other = image_folder(tmp_path / "other", ["r1.jpg", "o2.png", "o3.png"], (10, 10, 10))
    for value, words in (
            (f"ruler=examples:{with_}", "give two folders after examples:, the images with it and those without"),
            (f"ruler=examples:{with_},", "give two folders after examples:"),
            (f"ruler=examples:{tmp_path / 'nope'},{without}", f"{tmp_path / 'nope'} (the images with it): no such "
                                                               "folder"),
            (f"ruler=examples:{with_},{few}", f"{few} (the images without it) holds 2 image file(s)"),
            (f"ruler=examples:{with_},{clash}", "the two folders hold files of the same name (r1.jpg)")):
        with pytest.raises(client.Stop) as stop:
            client.parse_suspect(value, {})
        assert stop.value.code == client.EXIT_USAGE and words in stop.value.message, (value, stop.value.message)
    # two suspects whose folders hold different files of one name: each upload is named by its file name
    with pytest.raises(client.Stop) as stop:
        client.checklist_request(parse("--suspect", f"ruler=examples:{with_},{without}",
                                       "--suspect", f"dark=examples:{other},{without}"), {})
    assert stop.value.code == client.EXIT_USAGE and "has the name of" in stop.value.message
    many = image_folder(tmp_path / "many", [f"m{i}.png" for i in range(client.MAX_UPLOADED_IMAGES)])
    with pytest.raises(client.Stop) as stop:
        client.checklist_request(parse("--suspect", f"ruler=examples:{many},{without}"), {})
    assert stop.value.code == client.EXIT_USAGE and "104 example images in all; the server takes at most 100" in \
        stop.value.message


class FormApi(FakeApi):
    """FakeApi that keeps a multipart request's form fields and files (name, bytes) too."""

    forms: list

    def call(self, method, path, **kwargs):
        files = [(field, (name, fh.read())) for field, (name, fh) in kwargs.get("files") or []]
        self.forms = [*getattr(self, "forms", []), (kwargs.get("data"), files)]
        return super().call(method, path, **kwargs)


def test_the_command_uploads_the_examples_as_a_multipart_request(folders, monkeypatch, tmp_path):
    with_, without = folders
    api = FormApi(state())
    monkeypatch.setattr(client, "Api", api)
    args = parse("--suspect", f"ruler=examples:{with_},{without}", "--suspect", "hair=text:hair",
                 "--out", str(tmp_path / "out"))
    lines = []
    assert client.checklist(args, lines.append) == client.EXIT_PASS
    method, path, body = api.sent[0]
    assert (method, path, body) == ("POST", "/api/v1/audits/4/checklists/", None)  # not JSON: a form
    data, files = api.forms[0]
    assert json.loads(data["suspects"]) == client.checklist_request(args, {})["suspects"]
    assert [(field, name) for field, (name, _) in files] == [
        ("images", n) for n in ("r1.jpg", "r2.png", "r3.PNG", "n1.png", "n2.bmp", "n3.webp", "n4.jpeg")]
    assert dict(f for _, f in files)["r2.png"] == (with_ / "r2.png").read_bytes()
    assert "uploading 7 example images" in lines
    # text and column suspects alone are still a JSON body
    api = FormApi(state())
    monkeypatch.setattr(client, "Api", api)
    client.checklist(parse("--suspect", "ruler=text:a ruler", "--out", str(tmp_path / "out")), lines.append)
    assert api.sent[0][2] == {"suspects": [{"name": "ruler", "text": "a ruler"}]} and api.forms[0] == (None, [])


@pytest.mark.django_db
def test_the_server_takes_the_commands_upload_as_sent(audited, client_for, queue, folders, media,  # noqa: F811
                                                     monkeypatch, tmp_path):
    """The request the command sends, encoded by ``requests`` as on the wire, is taken by the real API."""
    import requests

    with_, without = folders
    api_client = client_for("member")

    class WireApi:
        def __init__(self, url, token, timeout=60):
            self.timeout = timeout

        def call(self, method, path, **kwargs):
            if method == "POST":
                sent = requests.Request(method, f"http://server{path}", data=kwargs.get("data"),
                                        files=kwargs.get("files"), json=kwargs.get("json")).prepare()
                response = api_client.generic(method, path, sent.body, content_type=sent.headers["Content-Type"])
                assert response.status_code == 201, response.content
                return response
            body = api_client.get(path).json()  # no worker here: its answer is made up from the suspects asked
            body.update(status="succeeded", result={"suspects": [answer(s["name"], "represented, not relied on")
                                                                 for s in body["suspects"]]})
            return type("Response", (), {"json": lambda _self: body})()

    monkeypatch.setattr(client, "Api", WireApi)
    args = client.parser().parse_args(["--url", "http://server", "--token", "t", "checklist", "--audit",
                                       str(audited.pk), "--poll", "0", "--suspect",
                                       f"white corner=examples:{with_},{without}", "--fail-on", "white corner",
                                       "--out", str(tmp_path / "out")])
    assert client.checklist(args, lambda line: None) == client.EXIT_PASS
    checklist = Checklist.objects.get()
    assert checklist.suspects == [{"name": "white corner",
                                   "with": ["upload:r1.jpg", "upload:r2.png", "upload:r3.PNG"],
                                   "without": ["upload:n1.png", "upload:n2.bmp", "upload:n3.webp", "upload:n4.jpeg"]}]
    stored = {image.name: (media / image.file.name).read_bytes() for image in checklist.images.all()}
    assert stored == {p.name: p.read_bytes() for p in [*with_.iterdir(), *without.iterdir()]
                      if not p.name.startswith(".") and p.suffix != ".txt"}
    assert checklist.status == "queued" and checklist.audit_id == audited.pk
