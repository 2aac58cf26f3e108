"""Dataset archives at and over the limits: refused from the member list before any member is read, in time linear in
the archive, and refused with messages that say what is wrong and what to do (issue 17, points 3 and 10)."""
import io
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from audit_service.registry import archives
from audit_service.registry.archives import DatasetRejected, Limits, validate
from audit_service.registry.models import Dataset

pytestmark = pytest.mark.django_db


def png(colour=(200, 100, 50)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def zipped(members: dict, folders=()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for folder in folders:
            zf.writestr(zipfile.ZipInfo(folder.rstrip("/") + "/"), b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def two_classes(prefix: str = "") -> dict:
    return {f"{prefix}{label}/{i}.png": png((40 * i, 90, 120 if label == "nevus" else 20))
            for label in ("nevus", "melanoma") for i in range(2)}


def post(client, project, data: bytes, name: str = "d.zip"):
    return client.post("/api/v1/datasets/", {"project": project.id, "name": "d",
                                             "archive": SimpleUploadedFile(name, data)}, format="multipart")


def files_under(root: Path) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def count_calls(monkeypatch, owner, name: str) -> list:
    """One entry per call of the method ``owner.name`` from now on (the method still runs)."""
    calls = []
    original = getattr(owner, name)

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.fixture
def member_lists(monkeypatch) -> list:
    """Each time zipfile builds the list of every member (memory in proportion to their number)."""
    return count_calls(monkeypatch, zipfile.ZipFile, "_RealGetContents")


@pytest.fixture
def members_read(monkeypatch) -> list:
    """The zip members whose content was opened; a refusal from the member list leaves this empty."""
    opened = []
    original = zipfile.ZipFile.open

    def counting_open(self, name, mode="r", *args, **kwargs):
        if mode == "r":  # writing the test's own archive does not count
            opened.append(getattr(name, "filename", name))
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    return opened


# --------------------------------------------------------------------------- member count and linear checks

def test_an_archive_of_fifty_thousand_empty_members_is_refused_before_any_member_is_read(
        client_for, project, media, members_read):
    data = zipped({f"nevus/{i}.png": b"" for i in range(50_000)})

    response = post(client_for("member"), project, data)

    assert response.status_code == 400
    message = response.json()["archive"][0]
    assert message.startswith("50000 images are empty (0 bytes): nevus/0.png, nevus/1.png")
    assert "an image file cannot be empty" in message
    assert members_read == []  # refused from the member list: nothing was inflated or written
    assert Dataset.objects.count() == 0 and files_under(media) == []


@pytest.mark.parametrize("understated", [False, True])
def test_the_member_limit_counts_folders_and_is_checked_before_any_member_is_read(
        client_for, project, media, settings, members_read, member_lists, understated):
    settings.MAX_ARCHIVE_MEMBERS = 1000
    data = bytearray(zipped(two_classes(), folders=[f"empty-{i}" for i in range(1500)]))  # 4 images, 1500 folders
    if understated:  # the end record claims 4 entries; the central directory holds 1504
        data[-22 + 8:-22 + 12] = (4).to_bytes(2, "little") * 2

    response = post(client_for("member"), project, bytes(data))

    assert response.status_code == 400
    assert response.json()["archive"] == [
        "the archive holds more than 1000 members (files and folders together); at most 1000 are accepted "
        "(MAX_ARCHIVE_MEMBERS)"]
    assert members_read == [] and member_lists == []  # counted from the directory's headers alone
    assert Dataset.objects.count() == 0 and files_under(media) == []


def test_a_tar_over_the_member_limit_is_refused_without_reading_the_members_after_the_limit(
        client_for, project, settings, monkeypatch):
    settings.MAX_ARCHIVE_MEMBERS = 100
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for i in range(1000):
            info = tarfile.TarInfo(f"nevus/{i}.png")
            info.size = 0
            tf.addfile(info, io.BytesIO(b""))
    headers = count_calls(monkeypatch, tarfile.TarFile, "next")

    response = post(client_for("member"), project, out.getvalue(), "d.tar.gz")

    assert response.status_code == 400
    assert "at most 100 are accepted (MAX_ARCHIVE_MEMBERS)" in response.json()["archive"][0]
    assert len(headers) <= 101 + 2  # is_tarfile and tarfile.open each read the first header too


class CountedName(str):
    """A file name that counts how often it is compared for equality: a list membership test compares against
    every element, a set lookup against (almost) none."""

    comparisons = 0

    def __eq__(self, other):
        CountedName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


class ListedFile:
    """What ``Path.rglob`` yields, for a file that exists only as a name."""

    def __init__(self, name: CountedName):
        self.name = name

    def is_file(self) -> bool:
        return True

    def relative_to(self, _root):
        return self

    def as_posix(self) -> CountedName:
        return self.name


def test_checking_the_files_of_an_archive_takes_comparisons_linear_in_their_number(tmp_path, monkeypatch):
    n = 3000
    names = [CountedName(f"{('nevus', 'melanoma')[i % 2]}/{i:05d}.png") for i in range(n)]
    monkeypatch.setattr(archives.Path, "rglob",
                        lambda self, pattern: [ListedFile(f) for f in names] if pattern == "*" else [])
    CountedName.comparisons = 0

    with pytest.raises(DatasetRejected, match="is not a readable image"):  # the files exist only as names
        validate(tmp_path, Limits(max_files=10 * n, max_total_bytes=10**9, max_image_pixels=10**6))

    # a membership test in a list (the old check) compares about n * n / 2 times, 4.5 million here
    assert CountedName.comparisons <= 10 * n


# --------------------------------------------------------------------------- messages (point 10)

def test_paths_of_labels_csv_are_explained_as_relative_to_its_folder(client_for, project):
    images = {f"data/images/{i}.png": png((10 * i, 80, 90)) for i in range(16)}
    rows = "".join(f"data/images/{i}.png,{('nevus', 'melanoma')[i % 2]}\n" for i in range(16))
    data = zipped({"data/labels.csv": "image,label\n" + rows, **images})

    response = post(client_for("member"), project, data)

    assert response.status_code == 400
    message = response.json()["archive"][0]
    assert message.startswith("labels.csv lists 16 images that are not in the archive: data/data/images/0.png, "
                              "data/data/images/1.png, data/data/images/10.png, data/data/images/11.png, "
                              "data/data/images/12.png and 11 more. Paths in labels.csv are read relative to the "
                              "folder that holds it ('data/'); these paths are relative to the archive's top folder "
                              "instead: move labels.csv there, or write them relative to 'data/'")
    assert "16 images without a label: data/images/0.png" in message


def test_a_listed_image_found_elsewhere_in_the_archive_is_pointed_at(client_for, project):
    data = zipped({"labels.csv": "image,label\n0.png,nevus\n1.png,melanoma\n",
                   "pics/0.png": png(), "pics/1.png": png((1, 2, 3))})

    response = post(client_for("member"), project, data)

    assert response.status_code == 400
    message = response.json()["archive"][0]
    assert "labels.csv lists 2 images that are not in the archive: 0.png, 1.png" in message
    assert "e.g. '0.png' is in the archive as 'pics/0.png'; correct the paths or add the missing images" in message


def test_a_folder_less_archive_is_told_that_each_class_needs_its_own_folder(client_for, project):
    data = zipped({f"images/{i}.png": png((10 * i, 80, 90)) for i in range(4)})

    response = post(client_for("member"), project, data)

    assert response.status_code == 400
    assert response.json()["archive"] == [
        "the dataset has a single class (images): without a labels.csv an image's class is the name of the folder "
        "it sits in, and all 4 images sit in 'images/'. An audit compares classes: give each class its own folder "
        "(e.g. images/nevus/a.png, images/melanoma/b.png), or add a labels.csv with columns image,label (a single "
        "class or unlabelled images can be registered for SAE training only)"]


@pytest.mark.parametrize("delimiter,named", [(";", "';'"), ("\t", "a tab")])
def test_a_csv_separated_by_another_delimiter_names_it(client_for, project, delimiter, named):
    rows = "".join(f"{label}/{i}.png{delimiter}{label}\n" for label, i in (("nevus", 0), ("melanoma", 1)))
    data = zipped({"labels.csv": f"image{delimiter}label\n" + rows, "nevus/0.png": png(),
                   "melanoma/1.png": png((1, 2, 3))})

    response = post(client_for("member"), project, data)

    assert response.status_code == 400
    assert response.json()["archive"][0].startswith(f"labels.csv is separated by {named}; use commas")


def test_an_unreadable_image_is_named_by_its_path_in_the_archive_not_the_servers(client_for, project):
    data = zipped({**two_classes(), "melanoma/cut.png": b"not an image at all"})

    response = post(client_for("member"), project, data)

    assert response.status_code == 400
    message = response.json()["archive"][0]
    assert "melanoma/cut.png is not a readable image (not a PNG, JPEG, WebP or BMP image)" in message
    assert tempfile.gettempdir() not in message and "/files/" not in message


def test_a_zip_member_with_a_bad_checksum_is_a_refusal_not_a_server_error(client_for, project, media):
    data = bytearray(zipped({**two_classes(), "melanoma/x.png": png((9, 9, 9))}))
    offset = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("melanoma/x.png").header_offset
    data[offset + 30 + len("melanoma/x.png") + 5] ^= 0xFF  # a byte of the member's data, past its local header

    response = post(client_for("member"), project, bytes(data))

    assert response.status_code == 400
    assert response.json()["archive"][0].startswith("archive member 'melanoma/x.png' cannot be extracted")
    assert Dataset.objects.count() == 0 and files_under(media) == []
