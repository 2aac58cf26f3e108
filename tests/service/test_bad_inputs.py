"""Hostile and broken uploads through the HTTP API: each is refused with a status and a message that says what is
wrong, and leaves no row and no stored file behind. One named case per row of CASES."""
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile

from audit_service.registry.models import ClipModel, Dataset, Probe

from .conftest import upload

pytestmark = pytest.mark.django_db
MARKER = Path("/tmp/clip-audit-pickle-payload-ran")


class Payload:
    """Unpickling this runs a shell command that creates MARKER: the attack a weights_only load must stop."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def png(size=(8, 8), colour=(200, 100, 50)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def zipped(members: dict, compression=zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def labelled(rows: dict, labels: dict | None = None) -> dict:
    """images/<name> -> bytes plus a labels.csv (labels default: alternate melanoma / nevus)."""
    names = list(rows)
    labels = labels or {n: ("melanoma", "nevus")[i % 2] for i, n in enumerate(names)}
    csv = "image,label\n" + "".join(f"images/{n},{labels[n]}\n" for n in labels)
    return {"labels.csv": csv, **{f"images/{n}": data for n, data in rows.items()}}


def good_images(n=4) -> dict:
    return {f"{i}.png": png(colour=(10 * i, 80, 90)) for i in range(n)}


def tar_with_symlink() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, data in labelled(good_images()).items():
            info = tarfile.TarInfo(name)
            info.size = len(data if isinstance(data, bytes) else data.encode())
            tf.addfile(info, io.BytesIO(data if isinstance(data, bytes) else data.encode()))
        link = tarfile.TarInfo("images/passwd.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return out.getvalue()


def pickle_checkpoint(tmp_path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": Payload()}, path)
    return path


def npz(tmp_path, name="probe.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


PROBE_CLASSES = np.array(["melanoma", "nevus"])

# name: (kind, build(tmp_path, assets) -> form fields, expected status, field, message fragment)
CASES = {
    "pickle checkpoint with a code payload": (
        "model", lambda t, a: {"checkpoint": upload(pickle_checkpoint(t))}, 400, "checkpoint",
        "evil.pt is a pickle that needs code to load, so it was refused and not run"),
    "checkpoint of another architecture": (
        "model", lambda t, a: {"model_config": json.dumps({**json.loads(a["config"].read_text()), "embed_dim": 48}),
                               "checkpoint": upload(a["checkpoint"])}, 400, "checkpoint", "shape mismatch"),
    "corrupt safetensors checkpoint": (
        "model", lambda t, a: {"checkpoint": SimpleUploadedFile("w.safetensors", b"\x00garbage" * 10)},
        400, "checkpoint", "safetensors"),
    "checkpoint of an unsupported type": (
        "model", lambda t, a: {"checkpoint": upload(a["probe"])}, 400, "checkpoint", "unsupported type '.npz'"),
    "model config that is not JSON": (
        "model", lambda t, a: {"model_config": "{not json"}, 400, "model_config", "not valid JSON"),
    "layer the model does not have": (
        "model", lambda t, a: {"layer": 7}, 400, "layer", "layer 7 does not exist"),
    "probe of the wrong width": (
        "probe", lambda t, a: {"file": upload(npz(t, weight=np.ones((1, 64), np.float32), bias=np.zeros(1),
                                                 classes=PROBE_CLASSES))}, 400, "file", "64-dimensional"),
    "probe with NaN weights": (
        "probe", lambda t, a: {"file": upload(npz(t, weight=np.full((1, 32), np.nan, np.float32), bias=np.zeros(1),
                                                 classes=PROBE_CLASSES))}, 400, "file", "NaN"),
    "probe with a pickled object array": (
        "probe", lambda t, a: {"file": upload(npz(t, weight=np.array([{"x": 1}], dtype=object), bias=np.zeros(1),
                                                 classes=PROBE_CLASSES))}, 400, "file", "pickle"),
    "probe as a pickle file": (
        "probe", lambda t, a: {"file": SimpleUploadedFile("probe.pkl", b"\x80\x04K\x01.")}, 400, "file",
        "must be .npz or .safetensors"),
    "probe without weights": (
        "probe", lambda t, a: {"file": upload(npz(t, bias=np.zeros(1), classes=PROBE_CLASSES))}, 400, "file",
        "weight"),
    "zip slip": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped({
            **labelled(good_images()), "../../evil.png": png()}))}, 400, "archive", "path traversal"),
    "absolute path in an archive": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped({
            **labelled(good_images()), "/tmp/evil.png": png()}))}, 400, "archive", "absolute path"),
    "symlink in a tar": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.tar.gz", tar_with_symlink())}, 400, "archive",
        "link"),
    "zip bomb": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped({
            **labelled(good_images()), "images/bomb.png": b"\x00" * 30_000_000}))}, 400, "archive", "inflates"),
    "pixel bomb": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped(labelled({
            **good_images(), "huge.png": png(size=(5000, 5000), colour=(0, 0, 0))})))}, 400, "archive",
        "huge.png"),
    "truncated PNG": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped(labelled({
            **good_images(), "cut.png": png()[:40]})))}, 400, "archive", "cut.png"),
    "file that is not an image": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped({
            **labelled(good_images()), "images/notes.txt": b"hello"}))}, 400, "archive", "notes.txt"),
    "CSV naming a file that is not there": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped({
            **labelled(good_images()), "labels.csv": "image,label\nimages/0.png,melanoma\nimages/1.png,nevus\n"
                                                     "images/2.png,nevus\nimages/3.png,melanoma\n"
                                                     "images/ghost.png,nevus\n"}))}, 400, "archive", "ghost.png"),
    "CSV with an empty label": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped(labelled(
            good_images(), {"0.png": "melanoma", "1.png": "", "2.png": "nevus", "3.png": "nevus"})))},
        400, "archive", "line 3: empty image or label"),
    "empty dataset": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped({"labels.csv": "image,label\n"}))},
        400, "archive", "no images"),
    "single-class dataset": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped(labelled(
            good_images(), {f"{i}.png": "nevus" for i in range(4)})))}, 400, "archive", "single class"),
    "upload that is no archive": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", b"PK but not really")}, 400, "archive",
        "neither a zip nor a tar"),
    "upload over the size limit": (
        "dataset", lambda t, a: {"archive": SimpleUploadedFile("d.zip", zipped(labelled(good_images(40)),
                                                                               zipfile.ZIP_STORED))},
        400, "file", "over the upload limit"),
}


def files_under(root: Path) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_upload_is_refused_clearly_and_leaves_nothing(case, client_for, project, assets, tmp_path, media,
                                                            settings):
    kind, build, status, field, fragment = CASES[case]
    settings.MAX_DATASET_BYTES = 20_000_000
    settings.MAX_IMAGE_PIXELS = 4_000_000
    settings.MAX_UPLOAD_BYTES = 10_000_000 if case != "upload over the size limit" else 5_000
    client = client_for("member")
    model_id = None
    if kind == "probe":
        model = client.post("/api/v1/models/", {"project": project.id, "name": "tiny",
                                                "model_config": upload(assets["config"]),
                                                "checkpoint": upload(assets["checkpoint"])}, format="multipart")
        model_id = model.json()["id"]
    before = files_under(media)
    counts = (ClipModel.objects.count(), Probe.objects.count(), Dataset.objects.count())
    MARKER.unlink(missing_ok=True)

    fields = build(tmp_path, assets)
    if kind == "model":
        data = {"project": project.id, "name": "m", "model_config": upload(assets["config"]),
                "checkpoint": upload(assets["checkpoint"]), **fields}
        response = client.post("/api/v1/models/", data, format="multipart")
    elif kind == "probe":
        response = client.post("/api/v1/probes/", {"project": project.id, "clip_model": model_id, "name": "p",
                                                   **fields}, format="multipart")
    else:
        response = client.post("/api/v1/datasets/", {"project": project.id, "name": "d", **fields},
                               format="multipart")

    assert response.status_code == status, response.content
    messages = response.json()[field]
    assert any(fragment in m for m in messages), messages
    assert (ClipModel.objects.count(), Probe.objects.count(), Dataset.objects.count()) == counts
    assert files_under(media) == before  # nothing of the refused upload is kept
    assert not MARKER.exists()  # no pickle payload ran


def test_the_suite_covers_at_least_fifteen_named_cases():
    assert len(CASES) >= 15


def test_a_project_dataset_limit_stricter_than_the_service_is_enforced_and_named(client_for, project, assets, media):
    project.max_dataset_images = 10
    project.save()
    response = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                                               "archive": upload(assets["dataset"])},
                                         format="multipart")
    assert response.status_code == 400
    assert "at most 10" in response.json()["archive"][0]
    assert "the dataset limit of project 'Dermatology'" in response.json()["archive"][0]
    assert Dataset.objects.count() == 0 and files_under(media) == []
    project.max_dataset_images = None
    project.save()
    ok = client_for("member").post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                                         "archive": upload(assets["dataset"])}, format="multipart")
    assert ok.status_code == 201


def test_a_project_cannot_run_more_audits_at_once_than_its_limit(client_for, project, registered, sent):
    project.max_concurrent_audits = 1
    project.save()
    body = {"project": project.id, "clip_model": registered["model"].id, "probe": registered["probe"].id,
            "dataset": registered["dataset"].id}
    client = client_for("member")
    assert client.post("/api/v1/audits/", body, format="json").status_code == 201
    refused = client.post("/api/v1/audits/", body, format="json")
    assert refused.status_code == 400
    assert "already has 1 jobs queued or running (limit 1)" in refused.json()["project"][0]


def test_owners_cannot_raise_their_projects_limits_through_the_api(client_for, project):
    response = client_for("owner").patch(f"/api/v1/projects/{project.id}/", {"max_concurrent_audits": 99,
                                                                             "max_dataset_images": 10**9},
                                         format="json")
    assert response.status_code == 200
    project.refresh_from_db()
    assert project.max_concurrent_audits == 2 and project.max_dataset_images is None


def test_a_member_name_with_a_nul_character_is_refused_not_a_server_error(client_for, project):
    """Found by the schema fuzzer on PostgreSQL, which cannot even look up text with a NUL byte."""
    response = client_for("owner").post(f"/api/v1/projects/{project.id}/members/",
                                        {"username": "x\x00y", "role": "viewer"}, format="json")
    assert response.status_code == 400
    assert "NUL character" in str(response.json()["username"])


@pytest.mark.parametrize("url", ["/api/v1/audits/", "/api/v1/projects/", "/api/v1/tokens/"])
def test_a_json_body_nested_too_deeply_is_a_400_not_a_server_error(client_for, project, url):
    """json.loads raises RecursionError, not ValueError, on ``[[[[...`` a few thousand levels deep."""
    body = "[" * 100_000 + "]" * 100_000
    response = client_for("owner").post(url, body, content_type="application/json")
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]
