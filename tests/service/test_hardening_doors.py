"""The doors the last round opened, tried as an attacker would (issue 28): datasets by reference and what pages
show of them, metadata and labels, JSON with numbers no reader can hold, hub names, image decoders, and what a
refusal tells about the server. Each test fails on the code before that issue, at the mechanism."""
import io
import json
import os
import tarfile
import tempfile
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from audit_service.audits import report
from audit_service.registry import references
from audit_service.registry.archives import MAX_LABEL_CHARS, MAX_METADATA_COLUMNS, image_problem
from audit_service.registry.models import ClipModel, Dataset
from audit_service.registry.services import register_dataset
from workers.engine import jsonsafe
from workers.engine.data import ImageFiles
from workers.engine.tiny import tiny_config

from .conftest import upload
from .test_dataset_references import by_reference, png, refusal, shard_with, unpack, write_shards

pytestmark = pytest.mark.django_db

HUGE = "9" * 5000  # over Python's int-string limit (4300 digits): int() of it raises ValueError


def image_bytes(fmt: str, colour=(200, 40, 40), size=(32, 32), **kwargs) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt, **kwargs)
    return out.getvalue()


# --------------------------------------------------------------------------- point 3: what pages show

def test_a_thumbnail_of_a_folder_dataset_is_the_registered_image_or_a_gap(project, users, assets, roots):
    folder = unpack(assets["dataset"], roots / "lesions")
    dataset = by_reference(project, users, folder)
    key = "images/melanoma-0003.png"
    assert report._load_image(report.image_where(dataset, key)) is not None
    (folder / key).write_bytes(image_bytes("PNG", colour=(0, 255, 0)))  # a different, valid image

    with pytest.raises(references.SourceError, match="is not the file registered"):
        references.read_image(dataset, key)
    assert report._load_image(report.image_where(dataset, key)) is None  # the page shows a gap, not the new image


def test_a_thumbnail_of_a_webdataset_member_is_checked_against_the_manifest(project, users, assets, roots):
    folder = write_shards(assets["dataset"], roots / "shards")
    dataset = by_reference(project, users, folder, layout="webdataset")
    image_id = next(iter(references.read_manifest(dataset)["members"]))
    assert report._load_image(report.image_where(dataset, image_id)) is not None
    shard, offset, size, digest = references.read_manifest(dataset)["members"][image_id]
    # the member's bytes replaced in place by another image of the same length: offsets and sizes still match
    other = png(assets, "images/nevus-0002.png")
    with open(folder / shard, "r+b") as fh:
        fh.seek(offset)
        original = fh.read(size)
        replacement = (other + b"\0" * size)[:size] if other[:size] != original else other[::-1][:size]
        fh.seek(offset)
        fh.write(replacement)

    with pytest.raises(references.SourceError, match="is not the file registered"):
        references.read_image(dataset, image_id)
    assert report._load_image(report.image_where(dataset, image_id)) is None


def test_a_manifest_from_before_member_digests_checks_the_whole_shard(project, users, assets, roots, monkeypatch):
    folder = write_shards(assets["dataset"], roots / "shards")
    dataset = by_reference(project, users, folder, layout="webdataset")
    manifest = references.read_manifest(dataset)
    old = {**manifest, "members": {k: v[:3] for k, v in manifest["members"].items()}}
    monkeypatch.setattr(references, "read_manifest", lambda _: old)
    image_id = next(iter(old["members"]))
    assert references.read_image(dataset, image_id)  # unchanged: read
    shard = old["members"][image_id][0]
    with open(folder / shard, "ab") as fh:
        fh.write(b"\0" * 512)  # the shard changed, the member's bytes did not
    with pytest.raises(references.SourceError, match="is not the file registered"):
        references.read_image(dataset, image_id)


# --------------------------------------------------------------------------- point 4: bounded metadata and labels

def test_webdataset_json_keys_beyond_the_metadata_bound_are_refused(project, users, assets, roots):
    ok = {"a.png": png(assets), "a.cls": b"nevus", "b.png": png(assets, "images/melanoma-0001.png"),
          "b.cls": b"melanoma"}
    many = json.dumps({f"k{i}": i % 2 for i in range(2000)}).encode()
    folder = shard_with(roots / "many", {**ok, "a.json": many})

    message = refusal(lambda: by_reference(project, users, folder, layout="webdataset"))

    assert "2000 keys in the samples' .json files besides label" in message
    assert f"at most {MAX_METADATA_COLUMNS}" in message
    folder = shard_with(roots / "fine", {**ok, "a.json": json.dumps({f"k{i}": i % 2 for i in range(5)}).encode()})
    assert sorted(by_reference(project, users, folder, layout="webdataset").metadata_columns) == [
        f"k{i}" for i in range(5)]


def test_a_class_name_of_a_megabyte_is_refused(project, users, assets, roots):
    ok = {"a.png": png(assets), "a.cls": b"nevus", "b.png": png(assets, "images/melanoma-0001.png")}
    folder = shard_with(roots / "long", {**ok, "b.cls": b"m" * 1_000_000})

    message = refusal(lambda: by_reference(project, users, folder, layout="webdataset"))

    assert "a label of 1000000 characters; a class name may have at most" in message
    folder = shard_with(roots / "json", {**ok, "b.json": json.dumps({"label": "m" * 5000}).encode()})
    assert f"at most {MAX_LABEL_CHARS}" in refusal(lambda: by_reference(project, users, folder,
                                                                         layout="webdataset"))
    assert not Dataset.objects.exists()


def test_labels_csv_columns_and_labels_are_bounded_like_webdataset_fields(project, users, assets, tmp_path):
    with zipfile.ZipFile(assets["dataset"]) as zf:
        rows = [line.split(",") for line in zf.read("labels.csv").decode().split()[1:]]
        images = {name: zf.read(name) for name, _ in rows}

    def archive(header: list[str], row) -> SimpleUploadedFile:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("labels.csv", "\n".join([",".join(header)] + [",".join(row(i, n, lab))
                                                                       for i, (n, lab) in enumerate(rows)]))
            for name, data in images.items():
                zf.writestr(name, data)
        return SimpleUploadedFile("d.zip", out.getvalue())

    def register(header, row):
        return refusal(lambda: register_dataset(project=project, user=users["member"], name="x",
                                                archive=archive(header, row)))

    wide = register(["image", "label"] + [f"c{j}" for j in range(40)], lambda i, n, lab: [n, lab] + ["0"] * 40)
    assert "40 columns in labels.csv besides the image and label" in wide and f"at most {MAX_METADATA_COLUMNS}" in wide
    long_label = register(["image", "label"], lambda i, n, lab: [n, lab if i else "x" * 300])
    assert "line 2: a label of 300 characters" in long_label
    long_value = register(["image", "label", "site"], lambda i, n, lab: [n, lab, "north" if i else "y" * 300])
    assert "a value of 300 characters in metadata column 'site'" in long_value
    assert not Dataset.objects.exists()


# --------------------------------------------------------------------------- point 5: one bounded JSON reader

@pytest.mark.parametrize("text, words", [
    (f'{{"a": {HUGE}}}', "a number of 5000 digits"),
    ('{"a": NaN}', "NaN is not a number JSON allows"),
    ('{"a": 1e999}', "too large to be a finite float"),
    ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ('{"a": ', "is not valid JSON"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_the_bounded_reader_refuses_what_json_loads_would_raise_or_accept(text, words):
    with pytest.raises(jsonsafe.JSONLimitError, match=words):
        jsonsafe.loads(text, what="the thing")
    assert jsonsafe.loads('{"n": 123456789012, "x": 1.5}', what="x") == {"n": 123456789012, "x": 1.5}


def test_a_huge_integer_in_a_model_config_is_a_400(client_for, project, assets):
    config = json.dumps(tiny_config()).replace('"layers": ', f'"layers": {HUGE}, "x": ', 1)
    response = client_for("member").post("/api/v1/models/", {
        "project": project.id, "name": "m", "model_config": SimpleUploadedFile("c.json", config.encode()),
        "checkpoint": upload(assets["checkpoint"])}, format="multipart")

    assert response.status_code == 400, response.content
    assert "a number of 5000 digits" in response.json()["model_config"][0]
    assert not ClipModel.objects.exists()


def test_a_huge_integer_in_a_json_request_body_is_a_400(client_for, registered):
    body = (f'{{"project": {registered["model"].project_id}, "clip_model": {registered["model"].pk}, '
            f'"probe": {registered["probe"].pk}, "dataset": {registered["dataset"].pk}, "config": {{"seed": {HUGE}}}}}')
    response = client_for("member").generic("POST", "/api/v1/audits/", body, content_type="application/json")

    assert response.status_code == 400, response.content
    assert "a number of 5000 digits" in response.json()["detail"]


def test_a_huge_integer_in_a_webdataset_json_is_named(project, users, assets, roots):
    folder = shard_with(roots / "huge", {"a.png": png(assets), "a.cls": b"nevus", "a.json": f'{{"site": {HUGE}}}'.encode(),
                                         "b.png": png(assets, "images/melanoma-0001.png"), "b.cls": b"melanoma"})
    message = refusal(lambda: by_reference(project, users, folder, layout="webdataset"))
    assert "'shard-0000.tar/a.json': a number of 5000 digits" in message


# --------------------------------------------------------------------------- point 6: hub names

@pytest.mark.parametrize("name", ["hf-hub:../etc", "hf-hub:org/..", "hf-hub:a/b/c", "hf-hub:org/na--me",
                                  "hf-hub:org/na me"])
def test_a_hub_name_that_is_no_repository_id_is_a_400(client_for, project, name):
    response = client_for("member").post("/api/v1/models/", {"project": project.id, "name": "m",
                                                              "architecture": name})

    assert response.status_code == 400, response.content
    assert "is not a Hugging Face model name" in json.dumps(response.json())
    assert not ClipModel.objects.exists()


# --------------------------------------------------------------------------- point 7: decoders by list

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n%%EOF\n"


def test_images_are_decoded_only_by_the_accepted_formats(tmp_path, monkeypatch):
    Image.init()
    tried = []
    factory, accept = Image.OPEN["EPS"]
    monkeypatch.setitem(Image.OPEN, "EPS", (factory, lambda prefix: tried.append("EPS") or accept(prefix)))
    pixels_before = Image.MAX_IMAGE_PIXELS
    (tmp_path / "x.png").write_bytes(EPS)
    (tmp_path / "t.png").write_bytes(image_bytes("TIFF"))
    (tmp_path / "ok.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "ok.jpg").write_bytes(image_bytes("JPEG"))

    assert "not a PNG, JPEG, WebP or BMP image" in image_problem(tmp_path / "x.png", "x.png", 10**6)
    assert "not a PNG, JPEG, WebP or BMP image" in image_problem(tmp_path / "t.png", "t.png", 10**6)
    assert image_problem(tmp_path / "ok.png", "ok.png", 10**6) is None
    assert image_problem(tmp_path / "ok.jpg", "ok.jpg", 10**6) is None
    assert tried == []  # the EPS plugin (Ghostscript) was never asked
    assert Image.MAX_IMAGE_PIXELS == pixels_before  # the process-wide limit is left alone
    # the workers' reader, which decodes the images an audit reads, takes the same list
    images = ImageFiles([tmp_path / "t.png", tmp_path / "ok.png"], [0, 1], ["a", "b"], lambda img: img)
    assert images[1][1] == 1
    with pytest.raises(ValueError, match="not a PNG, JPEG, WebP or BMP image"):
        images[0]


def test_a_tiff_named_png_in_an_upload_is_refused(project, users, assets, tmp_path):
    out = tmp_path / "d.zip"
    with zipfile.ZipFile(assets["dataset"]) as src, zipfile.ZipFile(out, "w") as zf:
        for name in src.namelist():
            data = src.read(name)
            zf.writestr(name, image_bytes("TIFF") if name == "images/melanoma-0003.png" else data)

    message = refusal(lambda: register_dataset(project=project, user=users["member"], name="x", archive=upload(out)))

    assert "images/melanoma-0003.png is not a readable image (not a PNG, JPEG, WebP or BMP image)" in message


# --------------------------------------------------------------------------- point 10: no oracle, no server paths

def test_a_folder_outside_the_roots_answers_the_same_whether_it_exists_or_not(project, users, roots, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    paths = ["/etc", "/etc-that-is-not-there", f"{roots}/../elsewhere", f"{roots}/../nowhere", "/var"]
    answers = [refusal(lambda: by_reference(project, users, p)).replace(p, "PATH") for p in paths]

    assert len(set(answers)) == 1, answers
    assert "is not inside a folder an admin allowed" in answers[0]
    assert str(roots) not in answers[0] and "shared-data" not in answers[0]


def test_refusals_never_show_a_server_folder(project, users, settings, tmp_path, monkeypatch):
    from audit_service.registry import services

    temp = tempfile.mkdtemp()
    message = services.RegistrationError(f"{temp}/images/x.png is not a readable image (cannot open "
                                         f"{settings.MEDIA_ROOT}/projects/1/y and {settings.BASE_DIR})").message
    assert "x.png is not a readable image" in message
    assert temp not in message and str(settings.MEDIA_ROOT) not in message and str(settings.BASE_DIR) not in message
    assert "a server folder" in message
    os.rmdir(temp)


# --------------------------------------------------------------------------- point 12: messages

def test_two_cls_files_for_one_sample_are_refused(project, users, assets, roots):
    folder = roots / "two"
    folder.mkdir()
    with tarfile.open(folder / "shard-0000.tar", "w") as tf:
        for name, data in [("a.png", png(assets)), ("a.cls", b"nevus"), ("a.cls", b"melanoma"),
                           ("b.png", png(assets, "images/melanoma-0001.png")), ("b.cls", b"melanoma")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

    message = refusal(lambda: by_reference(project, users, folder, layout="webdataset"))

    assert "'shard-0000.tar/a.cls': the sample has a second .cls file" in message


def test_a_folder_of_plain_and_compressed_shards_names_the_compressed_one(project, users, assets, roots):
    folder = write_shards(assets["dataset"], roots / "mixed")
    (folder / "shard-0009.tar.gz").write_bytes(b"x")

    message = refusal(lambda: by_reference(project, users, folder))

    assert "compressed shards are not read by reference (shard-0009.tar.gz)" in message
    assert "not images" not in message and not Dataset.objects.exists()
