"""Datasets registered by reference: a server folder an admin allowed, as image files or WebDataset shards.

The images stay where they are: registration reads them once (checked as an upload is, with the same messages)
and stores only labels.csv and a manifest; workers copy what they need and check it against the manifest. The
same by S3 prefix, with workers on their own disks, is in test_dataset_references_s3.py.
"""
import io
import os
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.urls import reverse

from audit_service.audits import report
from audit_service.audits.models import Audit, Status
from audit_service.audits.services import create_audit
from audit_service.registry import references
from audit_service.registry.models import Dataset
from audit_service.registry.services import RegistrationError, register_dataset, register_dataset_by_reference
from tests.engine.conftest import assert_same_answer
from workers import tasks
from workers.engine.errors import EngineError
from workers.inputs import dataset_folder

from .conftest import FAST_AUDIT, upload
from .test_sharding import answer

pytestmark = pytest.mark.django_db

PER_SHARD = 10  # 32 images: shards of 10, 10, 10 and 2


def unpack(dataset_zip: Path, folder: Path) -> Path:
    """The upload's files (images/ and labels.csv) as a folder."""
    with zipfile.ZipFile(dataset_zip) as zf:
        zf.extractall(folder)
    return folder


def write_shards(dataset_zip: Path, folder: Path, per_shard: int = PER_SHARD) -> Path:
    """The upload's images as WebDataset shards: sample ``images/NAME`` with NAME.png, NAME.cls (the label) and
    NAME.json (a 'site' column); ids sort as the upload's do, so an audit sees the images in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dataset_zip) as zf:
        rows = [line.split(",") for line in zf.read("labels.csv").decode().split()[1:]]
        rows.sort()
        for s in range(0, len(rows), per_shard):
            with tarfile.open(folder / f"shard-{s // per_shard:04d}.tar", "w") as tf:
                for i, (image, label) in enumerate(rows[s:s + per_shard]):
                    key = image.rsplit(".", 1)[0]
                    fields = {"png": zf.read(image), "cls": label.encode(),
                              "json": json.dumps({"site": "north" if i % 2 else "south"}).encode()}
                    for ext, data in fields.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
    return folder


def as_upload_keys(result) -> dict:
    """An answer about the shards with its image ids written as the upload's (``shard-0001.tar/images/x.png`` ->
    ``images/x.png``), and without what the shards' 'site' column adds (the upload has no such column)."""
    def without_site(value):
        if isinstance(value, dict):
            return {k: without_site(v) for k, v in value.items() if not k.startswith("site")}
        return [without_site(v) for v in value] if isinstance(value, list) else value

    return without_site(json.loads(re.sub(r"shard-\d{4}\.tar/", "", json.dumps(result))))


def stored_under(prefix: str) -> list[str]:
    root = Path(default_storage.path(prefix))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def by_reference(project, users, location, **kwargs):
    return register_dataset_by_reference(project=project, user=users["member"], name="lesions by reference",
                                         source="folder", location=str(location), **kwargs)


def audit_of(project, users, registered, dataset) -> tuple[int, dict]:
    audit = create_audit(project=project, user=users["member"], clip_model=registered["model"],
                         probe=registered["probe"], dataset=dataset, options=FAST_AUDIT)
    tasks.run_audit.apply(args=[audit.pk])
    audit = Audit.objects.get(pk=audit.pk)
    assert audit.status == Status.SUCCEEDED, audit.error
    return audit.pk, answer(audit)


def report_images(audit_id: int) -> list[str]:
    """The images the offline report embeds (thumbnails and heatmaps)."""
    html = report.download_response(Audit.objects.get(pk=audit_id), "html").content.decode()
    return re.findall(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", html)


def test_a_folder_of_files_is_registered_without_a_copy_and_audits_as_its_upload(
        project, users, registered, assets, roots):
    folder = unpack(assets["dataset"], roots / "lesions")
    dataset = by_reference(project, users, folder)
    uploaded = registered["dataset"]
    assert (dataset.source, dataset.layout, dataset.location) == ("folder", "files", str(folder))
    for field in ("n_images", "class_names", "class_counts", "total_bytes"):
        assert getattr(dataset, field) == getattr(uploaded, field), field
    # only the canonical labels.csv and the manifest are stored: the images stay in the folder
    assert stored_under(dataset.storage_prefix) == ["labels.csv", "manifest.json"]
    manifest = references.read_manifest(dataset)
    assert len(manifest["objects"]) == dataset.n_images + 1  # every image and labels.csv, hashed
    assert_same_answer(audit_of(project, users, registered, uploaded)[1],
                       audit_of(project, users, registered, dataset)[1])


def test_webdataset_shards_in_a_folder_are_registered_and_audit_as_their_upload(
        project, users, registered, assets, roots):
    shards = write_shards(assets["dataset"], roots / "lesions-wds")
    dataset = by_reference(project, users, shards)  # layout "auto": every file is a .tar
    assert (dataset.layout, dataset.n_images, dataset.class_counts) == (
        "webdataset", 32, registered["dataset"].class_counts)
    assert dataset.metadata_columns == ["site"]  # from the samples' .json
    assert stored_under(dataset.storage_prefix) == ["labels.csv", "manifest.json"]
    manifest = references.read_manifest(dataset)
    assert sorted(manifest["objects"]) == [f"shard-000{i}.tar" for i in range(4)]
    # a thumbnail reads one member from its shard by range, not the shard
    image_id = "shard-0002.tar/images/nevus-0005.png"
    with zipfile.ZipFile(assets["dataset"]) as zf:
        assert references.read_image(dataset, image_id) == zf.read("images/nevus-0005.png")
    upload_audit, expected = audit_of(project, users, registered, registered["dataset"])
    shards_audit, found = audit_of(project, users, registered, dataset)
    assert_same_answer(expected, as_upload_keys(found))
    # the report shows the same pictures, each read from its shard by range
    assert report_images(shards_audit) == report_images(upload_audit) != []


def test_a_worker_copies_only_the_shards_holding_the_images_it_needs(project, users, assets, roots, settings):
    dataset = by_reference(project, users, write_shards(assets["dataset"], roots / "wds"))
    wanted = ["shard-0001.tar/images/melanoma-0012.png", "shard-0003.tar/images/nevus-0015.png"]
    folder = dataset_folder(dataset, only=wanted)
    cached = sorted(p.relative_to(folder / "images").as_posix() for p in (folder / "images").rglob("*")
                    if p.is_file())
    assert cached == wanted
    assert sorted(p.name for p in (folder / "shards").iterdir()) == ["shard-0001.tar", "shard-0003.tar"]


def test_data_changed_after_registration_stops_the_worker_with_what_changed(project, users, assets, roots, settings):
    folder = unpack(assets["dataset"], roots / "lesions")
    dataset = by_reference(project, users, folder)
    image = sorted((folder / "images").iterdir())[3]
    image.write_bytes(sorted((folder / "images").iterdir())[4].read_bytes())
    with pytest.raises(EngineError, match=rf"'images/{image.name}' in the folder .* is not the file registered with "
                                          r"dataset 'lesions by reference' .* register the dataset again"):
        dataset_folder(dataset)
    # the worker's cache keeps no copy of the changed file, whole or partial
    cache = next((Path(settings.AUDIT_WORK_DIR) / "cache").glob("dataset-*"))
    assert not (cache / "images" / "images" / image.name).exists()
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name.startswith(".")]


def test_only_folders_an_admin_allowed_are_read(project, users, assets, tmp_path, settings):
    folder = unpack(assets["dataset"], tmp_path / "elsewhere")
    settings.DATASET_ROOTS = []
    with pytest.raises(RegistrationError, match="an admin lists the allowed folders in DATASET_ROOTS"):
        by_reference(project, users, folder)
    settings.DATASET_ROOTS = [str(tmp_path / "allowed")]
    (tmp_path / "allowed").mkdir()
    for location in (folder, tmp_path / "allowed" / ".." / "elsewhere"):
        with pytest.raises(RegistrationError, match="is not inside a folder an admin allowed"):
            by_reference(project, users, location)
    with pytest.raises(RegistrationError, match="is not an absolute path"):
        by_reference(project, users, "allowed/lesions")
    for missing in (tmp_path / "allowed" / "nothing", f"{tmp_path}/allowed/\x00"):
        with pytest.raises(RegistrationError, match="there is no folder"):
            by_reference(project, users, missing)
    # a link inside an allowed folder would read what lies outside it
    (tmp_path / "allowed" / "lesions").mkdir()
    (tmp_path / "allowed" / "lesions" / "labels.csv").symlink_to(folder / "labels.csv")
    with pytest.raises(RegistrationError, match="'labels.csv' in the folder .* is a symbolic link"):
        by_reference(project, users, tmp_path / "allowed" / "lesions")
    assert not Dataset.objects.exists()


def test_s3_prefixes_need_the_media_store_on_s3(project, users):
    with pytest.raises(RegistrationError, match="STORAGE_BACKEND=local"):
        register_dataset_by_reference(project=project, user=users["member"], name="x", source="s3",
                                      location="datasets/lesions")


def refusal(fn) -> str:
    with pytest.raises(RegistrationError) as caught:
        fn()
    return caught.value.message


@pytest.mark.parametrize("damage, expected", [
    ("broken image", r"some images cannot be used: images/melanoma-0003.png is not a readable image"),
    ("missing image", r"labels.csv lists 1 image that is not in .*: images/melanoma-0003.png"),
    ("not an image", r"holds files that are not images: notes.txt"),
    ("one class", r"the dataset has a single class \(nevus\)"),
])
def test_a_folder_is_refused_with_the_message_its_upload_gets(project, users, assets, roots, tmp_path, damage,
                                                              expected):
    folder = unpack(assets["dataset"], roots / "lesions")
    image = folder / "images" / "melanoma-0003.png"
    if damage == "broken image":
        image.write_bytes(image.read_bytes()[:60])
    elif damage == "missing image":
        image.unlink()
    elif damage == "not an image":
        (folder / "notes.txt").write_text("hello")
    else:
        labels = folder / "labels.csv"
        labels.write_text(labels.read_text().replace(",melanoma", ",nevus"))
    archive = tmp_path / "same.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    uploaded = refusal(lambda: register_dataset(project=project, user=users["member"], name="x",
                                                archive=upload(archive)))
    referenced = refusal(lambda: by_reference(project, users, folder))
    assert re.search(expected, uploaded) and re.search(expected, referenced), (uploaded, referenced)
    # the same words, but for where the files are
    assert referenced.replace(f"the folder '{folder}'", "the archive") == uploaded.replace(
        "the archive's top folder", "the archive")
    assert not Dataset.objects.exists() and not Path(default_storage.path("projects")).exists()


def shard_with(folder: Path, members: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-0000.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data or b""))
    return folder


def png(assets, name="images/nevus-0001.png") -> bytes:
    with zipfile.ZipFile(assets["dataset"]) as zf:
        return zf.read(name)


def test_webdataset_shards_are_refused_with_what_is_wrong(project, users, assets, roots):
    ok = {"a.png": png(assets), "a.cls": b"nevus", "a.seg.png": png(assets),  # a mask: not the sample's image
          "b.png": png(assets, "images/melanoma-0001.png"), "b.cls": b"melanoma"}
    cases = [
        ({**ok, "c.png": png(assets)}, r"1 image without a label: shard-0000.tar/c.png; give each sample a .cls"),
        ({**ok, "c.png": b"\x89PNG broken"}, r"shard-0000.tar/c.png is not a readable image"),
        ({**ok, "../c.png": png(assets)}, r"points outside the archive \(path traversal\)"),
        ({**ok, "c.png": None}, r"shard member 'shard-0000.tar/c.png' is a link"),
        ({**ok, "c.json": b"[1]"}, r"'shard-0000.tar/c.json' holds a JSON list, not an object"),
        ({"a.png": png(assets), "a.cls": b"nevus"}, r"the dataset has a single class \(nevus\)"),
    ]
    for i, (members, expected) in enumerate(cases):
        folder = shard_with(roots / f"case-{i}", members)
        assert re.search(expected, refusal(lambda: by_reference(project, users, folder, layout="webdataset"))), i
    (roots / "gz").mkdir()
    (roots / "gz" / "shard-0000.tar.gz").write_bytes(b"x")
    assert "store them as plain .tar" in refusal(lambda: by_reference(project, users, roots / "gz",
                                                                      layout="webdataset"))
    # unlabelled shards are fine for SAE training
    folder = shard_with(roots / "sae", {"a.png": png(assets), "b.png": png(assets)})
    dataset = by_reference(project, users, folder, purpose="sae_training")
    assert (dataset.n_images, dataset.class_names) == (2, [])
    assert Dataset.objects.count() == 1


def test_the_project_limit_applies_to_datasets_by_reference(project, users, assets, roots):
    project.max_dataset_images = 20
    project.save()
    folder = unpack(assets["dataset"], roots / "lesions")
    assert "holds 32 images; at most 20" in refusal(lambda: by_reference(project, users, folder))
    shards = write_shards(assets["dataset"], roots / "wds")
    assert "holds more than 20 images" in refusal(lambda: by_reference(project, users, shards))


def test_the_api_and_the_web_form_register_by_reference(project, users, assets, roots, client_for, web):
    folder = unpack(assets["dataset"], roots / "lesions")
    response = client_for("member").post("/api/v1/datasets/", {
        "project": project.pk, "name": "by api", "source": "folder", "location": str(folder)}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["source"], body["location"], body["layout"], body["n_images"]) == ("folder", str(folder),
                                                                                    "files", 32)
    refused = client_for("member").post("/api/v1/datasets/", {
        "project": project.pk, "name": "x", "source": "folder", "location": "/etc"}, format="json")
    assert refused.status_code == 400 and "not inside a folder an admin allowed" in refused.json()["location"][0]
    both = client_for("member").post("/api/v1/datasets/", {
        "project": project.pk, "name": "x", "archive": upload(assets["dataset"]), "source": "folder",
        "location": str(folder)})
    assert both.status_code == 400 and "not both" in json.dumps(both.json())
    neither = client_for("member").post("/api/v1/datasets/", {"project": project.pk, "name": "x"}, format="json")
    assert neither.status_code == 400 and "upload an archive" in neither.json()["archive"][0]
    empty = web("member").post(reverse("web:dataset_new", args=[project.pk]), {"name": "x", "source": "folder"})
    assert "give the location" in empty.content.decode()
    page = web("member").post(reverse("web:dataset_new", args=[project.pk]), {
        "name": "by form", "source": "folder", "location": str(write_shards(assets["dataset"], roots / "wds")),
        "layout": "auto", "purpose": "audit"}, follow=True)
    assert "Dataset &#x27;by form&#x27; registered" in page.content.decode()
    assert Dataset.objects.get(name="by form").layout == "webdataset"


def test_an_unreadable_folder_is_refused_rather_than_skipped(project, users, assets, roots, monkeypatch):
    folder = unpack(assets["dataset"], roots / "lesions")
    scandir = os.scandir

    def denied(path="."):  # what a folder the service's user may not list answers (tests run as root here)
        if Path(path) == folder / "images":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert "'images' in the folder" in refusal(lambda: by_reference(project, users, folder))
    assert "cannot be read (Permission denied)" in refusal(lambda: by_reference(project, users, folder))
