"""Command-line client for CI pipelines: audit a model + probe on a dataset and gate the build on the result.

    clip-audit --url https://audits.example.org --token "$CLIP_AUDIT_TOKEN" audit \\
        --project 3 --model-config model.json --checkpoint model.safetensors \\
        --probe probe.npz --dataset lesions.zip --max-flag-share 0.10 --out audit-report/

It registers the model, the probe and the dataset, or reuses the ones the
project already has with the same content (by SHA-256, so nothing identical is
uploaded twice; a dataset given by --dataset-s3 PREFIX or --dataset-folder DIR
is read where it is, not uploaded, and reused by location), submits the audit,
shows its progress, waits, downloads the HTML report and the JSON result,
prints a one-screen summary and exits with:

    0  the audit passed every gate
    1  a gate failed (too many unreviewed flags, or too large a share on flags, or, by default, an unreviewed
       flag with measured harm; with --baseline AUDIT_ID only flags that are new against that audit count)
    2  usage or input error (bad arguments, missing files, input the server refused)
    3  the audit failed or was cancelled
    4  the server could not be reached, or the audit did not finish within --timeout

Without --max-unreviewed-flags and --max-flag-share a default gate applies: the build fails while a probe
flag whose harm the audit measured (the class's images without the latent are missed, or other classes' images
with it are called the class, clearly more than under zero-shot) has no review. Review such flags (a benign
verdict clears them), or pass --no-default-gate to switch it off. Giving either gate option replaces it.

The ``correct`` command makes a corrected probe from an audit's flags and gates on its proof::

    clip-audit ... correct --audit 12 --flags melanoma:7 --max-clean-drop 0.02 --out fix/

It waits for the correction and its re-audit, saves the new probe (same format as the old) and the result, prints
the old-vs-new accuracy table and exits 0 when the chosen flags are gone, clean accuracy held and nothing new is
flagged; 1 when not; 2, 3, 4 as above (3: the correction failed or was cancelled).

The ``explain`` command explains one image with a finished audit (``--image photo.png`` or ``--item
melanoma/0001.png``) and prints both heads' predictions and the latents for and against each class.

The ``checklist`` command asks a finished audit whether its probe relies on the confounders you suspect::

    clip-audit ... checklist --audit 12 --suspect "ruler=text:a ruler" --suspect "ink=column:ink" \\
        --fail-on ruler --out checklist/

(or ``--checklist dermoscopy``, a shipped list). A suspect may also be named by example images in two local
folders, those that show it and those that do not (at least 3 each; every image file in them is uploaded with the
request, so file names must differ across both)::

    clip-audit ... checklist --audit 12 --suspect "ruler=examples:with-ruler/,without-ruler/"

It prints one line per suspect (verdict, class, probe and
zero-shot share, evidence), saves the answer as JSON and exits 1 when a ``--fail-on`` suspect is relied on
("relied on, harmful" or "relied on, no measured harm"), 2 when a ``--fail-on`` name is not one of the suspects,
3 when the checklist failed, 0 otherwise.

Only ``requests`` is needed: the client does not import Django or torch. Install it with ``pip install .`` in a
clone (or ``pip install "clip-audit @ git+URL"``): that gives the ``clip-audit`` command and the Python
:class:`clip_audit_client.Client`, which makes the same calls.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import requests

EXIT_PASS, EXIT_GATE, EXIT_USAGE, EXIT_AUDIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class Stop(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Api:
    def __init__(self, url: str, token: str, timeout: float = 60):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self.timeout = timeout

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, f"{self.url}{path}", **{"timeout": self.timeout, **kwargs})
        except requests.RequestException as exc:
            raise Stop(EXIT_UNREACHABLE, f"cannot reach {self.url}: {exc}") from exc
        if response.status_code in (401, 403):
            raise Stop(EXIT_USAGE, f"{method} {path}: {response.status_code} {_detail(response)} (check --token)")
        if response.status_code == 404:
            raise Stop(EXIT_USAGE, f"{method} {path}: not found (check --project and the IDs you passed)")
        if response.status_code == 400:
            raise Stop(EXIT_USAGE, f"{method} {path}: the server refused the input: {_detail(response)}")
        if response.status_code >= 500 or response.status_code == 429:
            raise Stop(EXIT_UNREACHABLE, f"{method} {path}: {response.status_code} {_detail(response)}")
        return response

    def items(self, path: str, **params):
        page = 1
        while True:
            body = self.call("GET", path, params={**params, "page": page}).json()
            yield from body["results"]
            if not body.get("next"):
                return
            page += 1


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return json.dumps(body)[:600]


def _reuse_or_register(api: Api, kind: str, project: int, sha_field: str, sha: str, data: dict, files: dict,
                       log) -> dict:
    for item in api.items(f"/api/v1/{kind}/", project=project):
        if item.get(sha_field) == sha:
            log(f"{kind[:-1]}: reusing #{item['id']} '{item['name']}' (same content)")
            return item
    handles = {k: open(v, "rb") for k, v in files.items()}
    try:
        item = api.call("POST", f"/api/v1/{kind}/", data=data, files=handles).json()
    finally:
        for fh in handles.values():
            fh.close()
    log(f"{kind[:-1]}: registered #{item['id']} '{item['name']}'")
    return item


def _reference(api: Api, args, log) -> dict:
    """The project's dataset registered from the same S3 prefix or server folder, or a new registration (the
    server reads the images there once; workers check them against what it read, so changed data fails the
    audit with a message to register it again)."""
    source, location = ("s3", args.dataset_s3) if args.dataset_s3 else ("folder", args.dataset_folder)
    stored = location.strip().rstrip("/")  # as the server stores it: a prefix without s3://BUCKET/
    if source == "s3":
        stored = stored.removeprefix("s3://").partition("/")[2] if stored.startswith("s3://") else stored.strip("/")
    for item in api.items("/api/v1/datasets/", project=args.project):
        if (item.get("source"), item.get("location")) == (source, stored) and \
                args.dataset_layout in ("auto", item.get("layout")):
            log(f"dataset: reusing #{item['id']} '{item['name']}' ({source} {location})")
            return item
    log(f"dataset: registering {source} {location}; the server reads and checks every image once")
    item = api.call("POST", "/api/v1/datasets/", json={
        "project": args.project, "name": args.dataset_name, "source": source, "location": location,
        "layout": args.dataset_layout}, timeout=args.timeout).json()  # it reads every image: allow the time
    log(f"dataset: registered #{item['id']} '{item['name']}': {item['n_images']} images ({item['layout']})")
    return item


def audit(args, log=print) -> int:
    for name in ("probe", "dataset", "checkpoint", "model_config"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise Stop(EXIT_USAGE, f"--{name.replace('_', '-')} {path}: no such file")
    if args.checkpoint is None and not args.pretrained_tag:
        raise Stop(EXIT_USAGE, "give --checkpoint (with --model-config or --architecture) or --pretrained-tag")
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as exc:
        raise Stop(EXIT_USAGE, f"--options is not valid JSON: {exc}") from exc
    api = Api(args.url, args.token)

    model_data = {"project": args.project, "name": args.model_name, "layer": args.layer}
    model_files = {}
    if args.architecture:
        model_data["architecture"] = args.architecture
    if args.pretrained_tag:
        model_data["pretrained_tag"] = args.pretrained_tag
    if args.model_config:
        model_files["model_config"] = args.model_config
    if args.checkpoint:
        model_files["checkpoint"] = args.checkpoint
    model = _reuse_or_register(api, "models", args.project, "checkpoint_sha256",
                               sha256(Path(args.checkpoint)) if args.checkpoint else None, model_data,
                               model_files, log) if args.checkpoint else \
        api.call("POST", "/api/v1/models/", data=model_data).json()
    probe = _reuse_or_register(api, "probes", args.project, "sha256", sha256(Path(args.probe)),
                               {"project": args.project, "clip_model": model["id"], "name": args.probe_name},
                               {"file": args.probe}, log)
    if args.dataset:
        dataset = _reuse_or_register(api, "datasets", args.project, "sha256", sha256(Path(args.dataset)),
                                     {"project": args.project, "name": args.dataset_name},
                                     {"archive": args.dataset}, log)
    else:
        dataset = _reference(api, args, log)
    submitted = api.call("POST", "/api/v1/audits/", json={
        "project": args.project, "clip_model": model["id"], "probe": probe["id"], "dataset": dataset["id"],
        "config": options, "context": {"submitted_by": "clip-audit cli"}}).json()
    audit_id = submitted["id"]
    log(f"audit #{audit_id} submitted: {args.url.rstrip('/')}/audits/{audit_id}/")

    wait(api, "audits", submitted, args, log)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fmt, name in (("html", f"audit-{audit_id}-report.html"), ("json", f"audit-{audit_id}.json")):
        (out / name).write_bytes(api.call("GET", f"/api/v1/audits/{audit_id}/download/{fmt}/").content)
    summary = api.call("GET", f"/api/v1/audits/{audit_id}/summary/").json()
    flags = list(api.items(f"/api/v1/audits/{audit_id}/flags/", head="probe"))
    diff = None
    if args.baseline is not None:
        diff = api.call("GET", f"/api/v1/audits/{audit_id}/diff/", params={"baseline": args.baseline}).json()
        (out / f"audit-{audit_id}-diff.json").write_text(json.dumps(diff, indent=1))
    args.outcome = {"id": audit_id, "summary": summary, "flags": flags, "diff": diff, "out": out}
    return gate(summary, flags, args, audit_id, out, log, diff)


def save_state(folder, noun: str, state: dict) -> Path:
    """Write a finished job's state as ``<noun>-<id>.json`` into ``folder`` (made if missing); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{noun}-{state['id']}.json").write_text(json.dumps(state, indent=1))
    return out


def wait(api: Api, kind: str, state: dict, args, log) -> dict:
    """Poll /api/v1/{kind}/{id}/ until the job (an audit, a correction, ...) has succeeded; its last state. A job
    that failed or was cancelled stops the command (EXIT_AUDIT_FAILED, with its reason)."""
    noun, job_id = kind[:-1], state["id"]
    deadline = time.monotonic() + args.timeout
    while state["status"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise Stop(EXIT_UNREACHABLE, f"{noun} #{job_id} did not finish within {args.timeout:.0f} s "
                                         f"(last: {state['status']} {state['stage']} {state['percent']:.0f} %); "
                                         "it keeps running on the server")
        time.sleep(args.poll)
        state = api.call("GET", f"/api/v1/{kind}/{job_id}/").json()
        log(f"  {state['status']:<9} {state['stage'] or '':<12} {state['percent']:5.1f} %")
    if state["status"] != "succeeded":
        raise Stop(EXIT_AUDIT_FAILED, f"{noun} #{job_id} {state['status']}: {state['error'] or 'no reason given'}")
    return state


def _flag_ids(api: Api, audit_id: int, given: str | None) -> list[int] | None:
    """--flags as ids: each item a flag id, or CLASS:LATENT (a probe flag of that class on that latent)."""
    if not given:
        return None
    items = [item.strip() for item in given.split(",") if item.strip()]
    wanted = [item for item in items if not item.isdigit()]
    by_latent = {}
    if wanted:
        for flag in api.items(f"/api/v1/audits/{audit_id}/flags/", head="probe"):
            by_latent[f"{flag['class_name']}:{flag['latent']}"] = flag["id"]
    ids = []
    for item in items:
        if item.isdigit():
            ids.append(int(item))
        elif item in by_latent:
            ids.append(by_latent[item])
        else:
            known = ", ".join(sorted(by_latent)) or "none"
            raise Stop(EXIT_USAGE, f"--flags {item}: not a flag id and no probe flag of audit #{audit_id} is "
                                   f"CLASS:LATENT {item!r} (its probe flags: {known})")
    return ids


def correct(args, log=print) -> int:
    """Make a corrected probe from an audit's flags, wait for its proof and re-audit, download it, gate on it."""
    if getattr(args, "training_data", None) and not args.training_dataset:
        raise Stop(EXIT_USAGE, "--training-data lists the training images that have the concept: give the probe's "
                               "training split with --training-dataset")
    api = Api(args.url, args.token)
    options = {"max_clean_drop": args.max_clean_drop, "anchor": args.anchor, "directions": args.directions}
    if args.rounds is not None:
        options["rounds"] = args.rounds
    if args.C is not None:
        options["C"] = args.C
    if getattr(args, "column", None):
        options["column"] = args.column
    body = {"flags": _flag_ids(api, args.audit, args.flags), "method": args.method or "", "options": options,
            "training_dataset": args.training_dataset}
    submitted = api.call("POST", f"/api/v1/audits/{args.audit}/corrections/", json=body).json()
    correction_id = submitted["id"]
    log(f"correction #{correction_id} of audit #{args.audit} submitted (flags {submitted['flags']}): "
        f"{args.url.rstrip('/')}/corrections/{correction_id}/")
    state = wait(api, "corrections", submitted, args, log)
    out = save_state(args.out, "correction", state)
    probe = api.call("GET", f"/api/v1/probes/{state['new_probe']}/").json()
    download = api.call("GET", f"/api/v1/probes/{state['new_probe']}/download/")
    name = download.headers.get("Content-Disposition", "").rpartition("filename=")[2].strip('"') or "probe.npz"
    (out / name).write_bytes(download.content)
    if getattr(args, "training_data", None):
        listing = api.call("GET", f"/api/v1/corrections/{correction_id}/training-data/")
        Path(args.training_data).write_bytes(listing.content)
        lines = max(0, len(listing.content.splitlines()) - 1)
        log(f"training images with the concept: {args.training_data} ({lines} images)")
    args.outcome = {"id": correction_id, "state": state, "probe": probe, "out": out, "probe_file": out / name}
    return correction_gate(state, probe, out / name, args, log)


def explain(args, log=print) -> int:
    """Explain one image (uploaded, or an item of the audited dataset) with a finished audit; print the answer."""
    if bool(args.image) == bool(args.item):
        raise Stop(EXIT_USAGE, "give --image PATH (a file to upload) or --item KEY (an image of the audited dataset, "
                               "its path as in labels.csv)")
    if args.image and not Path(args.image).is_file():
        raise Stop(EXIT_USAGE, f"--image {args.image}: no such file")
    api = Api(args.url, args.token)
    path = f"/api/v1/audits/{args.audit}/explain/"
    if args.image:
        with open(args.image, "rb") as fh:
            submitted = api.call("POST", path, files={"image": (Path(args.image).name, fh)}).json()
    else:
        submitted = api.call("POST", path, json={"item": args.item}).json()
    log(f"explanation #{submitted['id']} of {args.image or args.item} with audit #{args.audit} submitted")
    state = wait(api, "explanations", submitted, args, log)
    if args.out:
        save_state(args.out, "explanation", state)
    print_explanation(state["result"], log)
    args.outcome = {"id": state["id"], "state": state, "result": state["result"]}
    return EXIT_PASS


def print_explanation(result: dict, log) -> None:
    image = result.get("image") or {}
    if image.get("label"):
        log(f"true class: {image['label']}")
    for head, answer in result["heads"].items():
        probs = ", ".join(f"{c} {p:.2f}" for c, p in answer["probabilities"].items())
        log(f"\n{head}: predicts {answer['prediction']} ({probs})")
        for class_name, side in answer["classes"].items():
            for direction in ("for", "against"):
                for row in side[direction]:
                    flag = f"  FLAGGED for {', '.join(row['flagged_for'])}" if row["flagged_for"] else ""
                    log(f"  {direction:>7} {class_name:<12} latent {row['latent']:<6} relevance "
                        f"{row['relevance']:+.4f}  {row['label'] or '(no label)'}{flag}")
        without = answer.get("without_flagged")
        if without:
            log(f"  without its flagged latents {without['removed_latents']}: predicts {without['prediction']}")


RELIED_ON = ("relied on, harmful", "relied on, no measured harm")  # the verdicts --fail-on fails the build on
SUSPECT_KINDS = ("text", "column", "examples")  # how --suspect names a suspect
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the example images a folder's files may be
MIN_EXAMPLES = 3  # example images in each folder at least (the server's minimum on each side)
MAX_UPLOADED_IMAGES = 100  # example images one checklist uploads at most (the server's limit)
UPLOAD_PREFIX = "upload:"  # how a suspect names an uploaded image: upload:FILENAME
SUSPECT_USAGE = ("write NAME=text:TEXT (e.g. \"ruler=text:a ruler\"), NAME=column:COLUMN (a 0/1 column of the "
                 "audited dataset's labels.csv) or NAME=examples:WITH_FOLDER,WITHOUT_FOLDER (two local folders of "
                 f"example images, at least {MIN_EXAMPLES} showing it and {MIN_EXAMPLES} not, uploaded with the "
                 "request)")


def parse_suspect(value: str, images: dict | None = None) -> dict:
    """One --suspect: ``NAME=text:TEXT``, ``NAME=column:COLUMN`` or ``NAME=examples:WITH_FOLDER,WITHOUT_FOLDER``,
    as the API takes it. An examples suspect names each image file of the two folders ``upload:FILENAME``; its
    files are added to ``images`` (file name -> local path), which the request uploads."""
    name, equals, rest = value.partition("=")
    kind, colon, what = rest.partition(":")
    name, kind, what = name.strip(), kind.strip().lower(), what.strip()
    if not equals or not colon or not name or not what or kind not in SUSPECT_KINDS:
        raise Stop(EXIT_USAGE, f"--suspect {value!r}: {SUSPECT_USAGE}")
    if kind != "examples":
        return {"name": name, kind: what}
    with_folder, comma, without_folder = what.partition(",")
    if not comma or not with_folder.strip() or not without_folder.strip():
        raise Stop(EXIT_USAGE, f"--suspect {value!r}: give two folders after examples:, the images with it and those "
                               f"without it, separated by a comma; {SUSPECT_USAGE}")
    with_files = _example_images(value, Path(with_folder.strip()), "with it")
    without_files = _example_images(value, Path(without_folder.strip()), "without it")
    both = sorted({p.name for p in with_files} & {p.name for p in without_files})
    if both:
        raise Stop(EXIT_USAGE, f"--suspect {value!r}: the two folders hold files of the same name ({', '.join(both[:5])}"
                               f"{' ...' if len(both) > 5 else ''}); each uploaded image is named by its file name, so "
                               "rename them")
    if images is not None:
        for path in (*with_files, *without_files):
            known = images.get(path.name)
            if known is not None and known.resolve() != path.resolve():
                raise Stop(EXIT_USAGE, f"--suspect {value!r}: {path} has the name of {known}, another suspect's "
                                       "example image; each uploaded image is named by its file name, so rename one")
            images[path.name] = path
    return {"name": name, "with": [UPLOAD_PREFIX + p.name for p in with_files],
            "without": [UPLOAD_PREFIX + p.name for p in without_files]}


def _example_images(value: str, folder: Path, side: str) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; at least MIN_EXAMPLES of them."""
    if not folder.is_dir():
        raise Stop(EXIT_USAGE, f"--suspect {value!r}: {folder} (the images {side}): no such folder")
    found = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) < MIN_EXAMPLES:
        raise Stop(EXIT_USAGE, f"--suspect {value!r}: {folder} (the images {side}) holds {len(found)} image "
                               f"file(s) ({', '.join(IMAGE_SUFFIXES)}); give at least {MIN_EXAMPLES} (10 and 10 "
                               "tell them apart reliably)")
    return found


def checklist_request(args, images: dict | None = None) -> dict:
    """The body of POST /audits/{id}/checklists/ from --suspect or --checklist; --fail-on names are checked
    against the suspects given (a shipped list's names are checked once its answer is back). The example images
    of ``examples`` suspects are added to ``images`` (file name -> local path)."""
    if bool(args.suspect) == bool(args.checklist):
        raise Stop(EXIT_USAGE, "give your suspects with --suspect NAME=text:TEXT (repeatable) or a shipped list with "
                               "--checklist NAME (e.g. dermoscopy), not both")
    if args.checklist:
        return {"checklist": args.checklist}
    images = {} if images is None else images
    suspects = [parse_suspect(value, images) for value in args.suspect]
    names = [s["name"] for s in suspects]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise Stop(EXIT_USAGE, f"--suspect: each suspect needs its own name; repeated: {', '.join(repeated)}")
    if len(images) > MAX_UPLOADED_IMAGES:
        raise Stop(EXIT_USAGE, f"--suspect: {len(images)} example images in all; the server takes at most "
                               f"{MAX_UPLOADED_IMAGES} in one checklist (10 and 10 per suspect tell them apart "
                               "reliably)")
    _check_fail_on(args.fail_on or [], names)
    return {"suspects": suspects}


def _check_fail_on(fail_on: list[str], names: list[str]) -> None:
    unknown = [n for n in fail_on if n not in names]
    if unknown:
        raise Stop(EXIT_USAGE, f"--fail-on {', '.join(unknown)}: not among the checklist's suspects "
                               f"({', '.join(names) or 'none'}); name a suspect as --suspect or the shipped list names it")


def checklist(args, log=print) -> int:
    """Ask a finished audit about suspects, wait for the answer, save it, print it and gate on --fail-on."""
    images: dict[str, Path] = {}
    body = checklist_request(args, images)
    api = Api(args.url, args.token)
    path = f"/api/v1/audits/{args.audit}/checklists/"
    if images:  # a multipart form: the suspects as JSON text, the example images as repeated files
        with contextlib.ExitStack() as stack:
            files = [("images", (name, stack.enter_context(open(local, "rb")))) for name, local in images.items()]
            log(f"uploading {len(files)} example images")
            submitted = api.call("POST", path, data={"suspects": json.dumps(body["suspects"])}, files=files).json()
    else:
        submitted = api.call("POST", path, json=body).json()
    checklist_id = submitted["id"]
    log(f"checklist #{checklist_id} of audit #{args.audit} submitted ({len(submitted['suspects'])} suspects): "
        f"{args.url.rstrip('/')}/checklists/{checklist_id}/")
    state = wait(api, "checklists", submitted, args, log)
    out = save_state(args.out, "checklist", state)
    args.outcome = {"id": checklist_id, "state": state, "out": out}
    return checklist_gate(state, args, log)


def checklist_gate(state: dict, args, log) -> int:
    """One line per suspect; exit 1 when a --fail-on suspect is relied on (saying which), 2 when a --fail-on name
    is not one of the suspects."""
    answers = state["result"]["suspects"]
    for a in answers:
        row = (a.get("classes") or {}).get(a.get("verdict_class")) or {}
        shares = (f"probe {row['probe_share']:.3f} zero-shot {row['zero_shot_share']:.3f}" if row
                  else "probe - zero-shot -")
        log(f"  {a['name']:<18} {a['verdict']:<28} {a.get('verdict_class') or '-':<12} {shares}  {a['evidence']}")
    fail_on = args.fail_on or []
    _check_fail_on(fail_on, [a["name"] for a in answers])
    relied = [a for a in answers if a["name"] in fail_on and a["verdict"] in RELIED_ON]
    for a in relied:
        log(f"FAIL: the probe relies on {a['name']!r}: {a['verdict']} (class {a.get('verdict_class') or '?'})")
    if relied:
        log(f"checklist #{state['id']}: GATE FAILED ({', '.join(a['name'] for a in relied)})")
        return EXIT_GATE
    log(f"checklist #{state['id']}: passed" + (f" (not relied on: {', '.join(fail_on)})" if fail_on else ""))
    return EXIT_PASS


def correction_gate(state: dict, probe: dict, path: Path, args, log) -> int:
    """Print the old-vs-new table and the re-audit's verdict; exit 1 when the chosen flags remain, clean accuracy
    fell by more than --max-clean-drop, or (without --allow-new-flags) the re-audit flags something new."""
    result = state["result"]
    table = result["correction"]["table"]
    log(f"\ncorrected probe #{probe['id']} '{probe['name']}' (version {probe['version']} of probe "
        f"#{probe['parent']}) saved to {path}")
    log(f"method: {result['method']} ({result['reason']})")
    log(f"{'':<44} {'old':>6} {'new':>6} {'n':>6}")
    rows = [("overall", table["overall"]), *((f"class {c}", r) for c, r in table["per_class"].items()),
            *table["slices"].items()]
    for name, row in rows:
        if row["n"]:
            log(f"{name[:44]:<44} {row['old']:6.3f} {row['new']:6.3f} {row['n']:6d}")
    _log_rounds(result.get("rounds") or [], log)
    verdict = result["verdict"]
    failed = [reason for reason in verdict["reasons"]
              if not (args.allow_new_flags and reason.startswith("the re-audit flags what the original did not"))]
    for reason in verdict["reasons"]:
        log(f"{'FAIL' if reason in failed else 'note'}: {reason}")
    for part in verdict.get("meets") or []:
        log(f"meets: {part}")
    for left in verdict.get("remains") or []:
        log(f"remains: {left}")
    if failed:
        log(f"correction #{state['id']}: GATE FAILED")
        return EXIT_GATE
    log(f"correction #{state['id']}: passed (re-audit #{result['reaudit']['audit']}: the chosen flags are gone)")
    return EXIT_PASS


def _log_rounds(rounds: list, log) -> None:
    """One line per round (when there was more than one): latents corrected, overall old -> new, hurt slices'
    gaps before -> after, its re-audit and what it still found tracking the concept."""
    if len(rounds) < 2:
        return
    for r in rounds:
        overall = r["table"]["overall"]
        gaps = "; ".join(f"{s['slice']} gap {_num(s['gap_before'])} -> {_num(s['gap_after'])}"
                         for s in r.get("slices") or [])
        added = [latent for group in r.get("added") or [] for latent in group]
        latents = dict.fromkeys(i for c in r["concepts"] for i in c)
        log(f"round {r['round']}: latents {', '.join(map(str, latents))}; overall "
            f"{overall['old']:.3f} -> {overall['new']:.3f}; {gaps}; re-audit #{r['audit']} "
            f"{'passed' if r['passed'] else 'not passed'}"
            + (f"; still tracking the concept: latents {', '.join(map(str, added))}" if added else "")
            + "".join(f"; still flagged, corrected on their own: latents {', '.join(map(str, g))}"
                      for g in r.get("split") or []))


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def found_by(flag: dict) -> int:
    """How many of the audit's dictionaries flag the flag's concept (1 for audits before dictionaries voted)."""
    return (flag.get("stability") or {}).get("found_by", 1)


def _log_diff(diff: dict, log) -> set:
    """Log the new and gone flags against the baseline audit; returns the ids of the new probe flags."""
    new_ids = {e["current"]["id"] for e in diff["new"] if e["head"] == "probe"}
    log(f"against audit #{diff['baseline']}: {diff['counts']['new']} new, {diff['counts']['gone']} gone, "
        f"{diff['counts']['changed']} changed, {diff['counts']['unchanged']} unchanged flags"
        + (f" ({diff['note']})" if diff["note"] else ""))
    for e in diff["new"]:
        log(f"  NEW   {e['class_name']:<14} latent {e['current']['latent']:<5} '{e['current']['label']}' "
            f"share {e['current']['share']:.3f}")
    for e in diff["gone"]:
        log(f"  GONE  {e['class_name']:<14} '{e['baseline']['label']}' (was share {e['baseline']['share']:.3f})")
    return new_ids


def _gated_flags(flags: list, args, log) -> list:
    """The flags the gate decides on: with --min-found-by, flags fewer dictionaries found are shown, not gated."""
    if args.min_found_by is None:
        return flags
    weak = [f for f in flags if found_by(f) < args.min_found_by]
    for f in weak:
        log(f"  not gated: {f['class_name']} latent {f['latent']} '{f['label']}' found by {found_by(f)} of "
            f"{(f.get('stability') or {}).get('of', 1)} dictionaries (--min-found-by {args.min_found_by})")
    return [f for f in flags if found_by(f) >= args.min_found_by]


def _class_failures(summary: dict, flags: list, args, new_ids: set | None, log) -> list[str]:
    """Log each class's line; the classes that put too large a share on (new) flags, as gate failures."""
    failures = []
    for name, c in summary["classes"].items():
        log(f"  {name:<14} probe acc {c['probe_accuracy']:.2f}  zero-shot acc {c['zero_shot_accuracy']:.2f}  "
            f"probe flags {c['flags']['probe']}  share on flags {c['probe_share']:.3f} "
            f"(zero-shot {c['zero_shot_share']:.3f})  with measured harm {c.get('flags_with_measured_harm', 0)}")
        share = c["probe_share"] if new_ids is None else sum(
            f["share"] for f in flags if f["id"] in new_ids and f["class_name"] == name)
        if args.max_flag_share is not None and share > args.max_flag_share + 1e-6:  # float32 sums
            failures.append(f"class '{name}': {share:.3f} of its relevance is on "
                            f"{'flagged' if new_ids is None else 'newly flagged'} latents (limit {args.max_flag_share})")
    return failures


def _log_flags(flags: list, log) -> None:
    """Log the first eight flags with their verdict, confirmation, stability and harm."""
    for f in flags[:8]:
        verdict = (f.get("latest_review") or {}).get("verdict", "unreviewed")
        confirmation = (f.get("confirmation") or {}).get("status") or "confirmation unknown"
        stability = f.get("stability") or {}
        log(f"  flag  {f['class_name']:<14} rank {f['rank']:<2} latent {f['latent']:<5} '{f['label']}' "
            f"({f['category']}) share {f['share']:.3f}  {verdict}, {confirmation}"
            + (f", found by {stability['found_by']} of {stability['of']}" if stability else ""))
        if (f.get("harm") or {}).get("summary"):
            log(f"        harm: {f['harm']['summary']}")
    if len(flags) > 8:
        log(f"  ... and {len(flags) - 8} more probe flags (see the report)")


def _review_failures(flags: list, args, new_ids: set | None) -> list[str]:
    """Gate failures for unreviewed (new) flags: over --max-unreviewed-flags, or, by default, with measured harm."""
    failures = []
    unreviewed = [f for f in flags if not f.get("latest_review") and (new_ids is None or f["id"] in new_ids)]
    new = "new " if new_ids is not None else ""
    if args.max_unreviewed_flags is not None and len(unreviewed) > args.max_unreviewed_flags:
        failures.append(f"{len(unreviewed)} unreviewed {new}flags under the probe (limit {args.max_unreviewed_flags})")
    if args.max_unreviewed_flags is None and args.max_flag_share is None and not args.no_default_gate:
        harmful = [f for f in unreviewed if (f.get("harm") or {}).get("measured")]
        if harmful:
            which = ", ".join(f"{f['class_name']} latent {f['latent']}" for f in harmful[:5])
            failures.append(f"{len(harmful)} unreviewed {new}probe flags with measured harm ({which}"
                            f"{', ...' if len(harmful) > 5 else ''}); review them, or pass --no-default-gate")
    return failures


def gate(summary: dict, flags: list, args, audit_id: int, out: Path, log, diff: dict | None = None) -> int:
    """Print the one-screen summary and decide the exit code.

    With a baseline diff only *new* probe flags count: flags that match one of the baseline's (by meaning)
    were there before, and a benign verdict there stays benign.
    """
    new_ids = _log_diff(diff, log) if diff is not None else None
    log(f"\naudit #{audit_id}: SAE {summary['sae'].get('n_latents')} latents, FVU {summary['sae'].get('fvu', 0):.3f}")
    flags = _gated_flags(flags, args, log)
    failures = _class_failures(summary, flags, args, new_ids, log)
    _log_flags(flags, log)
    failures += _review_failures(flags, args, new_ids)
    log(f"  report: {out / f'audit-{audit_id}-report.html'}")
    if failures:
        log("GATE FAILED: " + "; ".join(failures))
        return EXIT_GATE
    log("gate passed")
    return EXIT_PASS


def _add_audit_parser(sub) -> None:
    a = sub.add_parser("audit", help="register or reuse inputs, run an audit, gate on it")
    a.add_argument("--project", type=int, required=True)
    a.add_argument("--probe", required=True, help=".npz or .safetensors probe")
    where = a.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", help="zip or tar of images with labels.csv (uploaded)")
    where.add_argument("--dataset-s3", metavar="PREFIX", help="or: images already in the service's bucket under "
                       "PREFIX (read there, not uploaded)")
    where.add_argument("--dataset-folder", metavar="DIR", help="or: images in a server folder an admin allowed "
                       "(DATASET_ROOTS; read there, not uploaded)")
    a.add_argument("--dataset-layout", choices=["auto", "files", "webdataset"], default="auto",
                   help="with --dataset-s3/--dataset-folder: image files + labels.csv, WebDataset .tar shards, or "
                        "auto (shards when every file is a .tar)")
    a.add_argument("--checkpoint", help="model weights (.safetensors preferred)")
    a.add_argument("--model-config", help="open_clip model config (.json) for custom models")
    a.add_argument("--architecture", default="", help="OpenCLIP architecture, e.g. ViT-B-32")
    a.add_argument("--pretrained-tag", default="")
    a.add_argument("--layer", type=int, default=-1)
    a.add_argument("--model-name", default="model")
    a.add_argument("--probe-name", default="probe")
    a.add_argument("--dataset-name", default="dataset")
    a.add_argument("--options", help="audit options as JSON, e.g. '{\"sae\": {\"n_latents\": 4096}}'")
    a.add_argument("--max-unreviewed-flags", type=int, help="fail if more probe flags than this are unreviewed")
    a.add_argument("--max-flag-share", type=float,
                   help="fail if a class puts more than this share of its relevance on flagged latents")
    a.add_argument("--min-found-by", type=int, metavar="N",
                   help="gate only on flags that at least N of the audit's dictionaries found (the audit already "
                        "shows only flags a majority finds; see the option 'dictionaries')")
    a.add_argument("--no-default-gate", action="store_true",
                   help="without --max-unreviewed-flags and --max-flag-share, do not fail on unreviewed probe "
                        "flags with measured harm")
    a.add_argument("--baseline", type=int, metavar="AUDIT_ID",
                   help="compare with this earlier audit and gate only on new flags (matched by meaning)")
    a.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the audit (default 3600)")
    a.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    a.add_argument("--out", default="clip-audit-report", help="folder for the downloaded report and result")


def _add_correct_parser(sub) -> None:
    c = sub.add_parser("correct", help="make a corrected probe from an audit's flags; gate on its proof",
                       description="Make a corrected probe from an audit's flags, wait for its old-vs-new table and "
                                   "the new probe's re-audit, download the probe. Exit 1 when a chosen flag is still "
                                   "flagged, accuracy on images without the chosen latents fell by more than "
                                   "--max-clean-drop, or the re-audit flags something new (see --allow-new-flags).")
    c.add_argument("--audit", type=int, required=True, help="the succeeded audit whose flags to correct")
    c.add_argument("--flags", help="comma-separated flag ids or CLASS:LATENT (e.g. melanoma:12); default: the "
                                   "probe flags reviewed as confirmed shortcuts")
    c.add_argument("--method", choices=["project", "refit", "reweight"],
                   help="default: refit with --training-dataset, else project; reweight: refit on the training "
                        "split weighted so that the concept is as common in every class")
    c.add_argument("--training-dataset", type=int, metavar="DATASET_ID",
                   help="a registered dataset (labels.csv) holding the probe's training split, for refit and "
                        "reweight")
    c.add_argument("--training-data", type=Path, metavar="FILE",
                   help="save the training images on which the concept is active (image, class, activation) as "
                        "CSV (needs --training-dataset)")
    c.add_argument("--anchor", choices=["mean", "midpoint", "clean"], default="mean",
                   help="for project: where every image's shortcut coordinate is held (default: the audited images' mean)")
    c.add_argument("--directions", choices=["regression", "removal", "widened"], default="regression",
                   help="one direction per concept from how features move with it within a class (default), one "
                        "per latent by removing it, or one for the concepts together from the images they are "
                        "active on widened along the direction those images share in the probe's features")
    c.add_argument("--column", metavar="NAME",
                   help="a 0/1 column of the audited dataset's labels.csv marking the images that show the flags' "
                        "concept: remove its direction (images marked vs not, within each class) instead of the "
                        "SAE's; a training split with the column also says which of its images show it")
    c.add_argument("--C", type=float, help="the regularization of refit and reweight (default: chosen by "
                                           "cross-validation)")
    c.add_argument("--rounds", type=int, metavar="N",
                   help="correct, re-audit and correct again for the latents the re-audit still flags that track "
                        "the concept, at most N rounds (1 to 5; default: the server's, 3)")
    c.add_argument("--max-clean-drop", type=float, default=0.02,
                   help="accuracy the correction may cost on images without the chosen latents (default 0.02)")
    c.add_argument("--allow-new-flags", action="store_true",
                   help="do not fail when the re-audit flags latents the original audit did not")
    c.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    c.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    c.add_argument("--out", default="clip-audit-correction", help="folder for the new probe and the result")


def _add_explain_parser(sub) -> None:
    e = sub.add_parser("explain", help="explain one image with a finished audit",
                       description="Explain one image with a finished audit: both heads' predictions, the latents "
                                   "for and against each class, their labels and flags, and the prediction once the "
                                   "flagged latents are removed.")
    e.add_argument("--audit", type=int, required=True, help="a succeeded audit")
    e.add_argument("--image", help="an image file to upload")
    e.add_argument("--item", help="or: an image of the audited dataset, its path as in labels.csv")
    e.add_argument("--out", help="folder to save the answer as JSON")
    e.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
    e.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)


def _add_checklist_parser(sub) -> None:
    c = sub.add_parser("checklist", help="ask a finished audit whether its probe relies on suspected confounders",
                       description="Ask a finished audit, for each suspect, whether its probe relies on it (whether "
                                   "or not the audit flagged it). Exit 1 when a --fail-on suspect is relied on "
                                   "('relied on, harmful' or 'relied on, no measured harm').")
    c.add_argument("--audit", type=int, required=True, help="a succeeded audit")
    c.add_argument("--suspect", action="append", default=[], metavar="NAME=KIND:WHAT",
                   help="a suspect: NAME=text:TEXT (e.g. 'ruler=text:a ruler'), NAME=column:COLUMN (a 0/1 column of "
                        "the audited dataset's labels.csv) or NAME=examples:WITH_FOLDER,WITHOUT_FOLDER (two local "
                        f"folders of example images, at least {MIN_EXAMPLES} that show it and {MIN_EXAMPLES} that do "
                        "not; every image file in them is uploaded, file names distinct); repeatable")
    c.add_argument("--checklist", metavar="NAME", help="or: a shipped checklist, e.g. dermoscopy, or 'project' for "
                                                       "the project's saved list")
    c.add_argument("--fail-on", action="append", default=[], metavar="NAME",
                   help="fail (exit 1) when the probe relies on this suspect; repeatable")
    c.add_argument("--out", default="clip-audit-checklist", help="folder for the answer (checklist-ID.json)")
    c.add_argument("--timeout", type=float, default=1800, help="seconds to wait (default 1800)")
    c.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit codes: 0 pass, 1 gate failed, 2 usage/input error, 3 audit failed, "
                                       "4 server unreachable or timeout")
    p.add_argument("--url", default=os.environ.get("CLIP_AUDIT_URL"), help="service URL (CLIP_AUDIT_URL)")
    p.add_argument("--token", default=os.environ.get("CLIP_AUDIT_TOKEN"), help="API token (CLIP_AUDIT_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_audit_parser(sub)
    _add_correct_parser(sub)
    _add_explain_parser(sub)
    _add_checklist_parser(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)  # bad usage exits 2 (argparse)
    if not args.url or not args.token:
        print("error: give --url and --token (or CLIP_AUDIT_URL and CLIP_AUDIT_TOKEN)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return {"correct": correct, "explain": explain, "checklist": checklist}.get(args.command, audit)(args)
    except Stop as stop:
        print(f"error: {stop.message}", file=sys.stderr)
        return stop.code


if __name__ == "__main__":
    sys.exit(main())
