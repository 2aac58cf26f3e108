"""Hostile and broken dataset archives are refused by name, before anything is stored."""
import io
import tarfile
import zipfile

import pytest

from audit_service.registry.archives import DatasetRejected, Limits, extract, validate

LIMITS = Limits(max_files=100, max_total_bytes=10_000_000, max_image_pixels=1_000_000)


def _png(size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path, members: dict):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_zip_member_that_climbs_out_of_the_folder_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"../../evil.png": _png()})
    with pytest.raises(DatasetRejected, match="path traversal"):
        extract(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path.parent / "evil.png").exists()


def test_an_absolute_path_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"/etc/evil.png": _png()})
    with pytest.raises(DatasetRejected, match="absolute path"):
        extract(archive, tmp_path / "out", LIMITS)


def test_a_symlink_in_a_tar_is_refused(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        link = tarfile.TarInfo("nevus/link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(DatasetRejected, match="is a link"):
        extract(path, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out" / "nevus" / "link.png").exists()


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"nevus/a.png": b"\0" * 50_000_000})
    with pytest.raises(DatasetRejected, match="decompression bomb|over the limit"):
        extract(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out" / "nevus" / "a.png").exists()


def test_a_pixel_bomb_and_a_truncated_png_are_named(tmp_path):
    root = tmp_path / "files"
    (root / "nevus").mkdir(parents=True)
    (root / "melanoma").mkdir()
    (root / "nevus" / "ok.png").write_bytes(_png())
    (root / "melanoma" / "huge.png").write_bytes(_png((2000, 1000)))
    (root / "melanoma" / "cut.png").write_bytes(_png()[:40])
    with pytest.raises(DatasetRejected) as exc:
        validate(root, LIMITS)
    message = str(exc.value)
    assert "melanoma/huge.png has 2000x1000 pixels" in message
    assert "melanoma/cut.png is not a readable image" in message


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(b"hello")
    with pytest.raises(DatasetRejected, match="neither a zip nor a tar"):
        extract(path, tmp_path / "out", LIMITS)


def test_labels_naming_unknown_files_are_listed(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"labels.csv": "image,label\na.png,nevus\nb.png,melanoma\nc.png,nevus\n",
                                        "a.png": _png(), "b.png": _png()})
    extract(archive, tmp_path / "out", LIMITS)
    with pytest.raises(DatasetRejected, match="lists 1 image that is not in the archive: c.png"):
        validate(tmp_path / "out", LIMITS)
