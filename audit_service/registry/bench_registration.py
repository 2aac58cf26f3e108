"""How long registering a dataset takes: an uploaded zip against the same images by reference (a server folder
of image files, and WebDataset shards), side by side in one run, on generated JPEGs.

    python -m audit_service.registry.bench_registration --images 2000 --size 448

It runs in a throwaway SQLite database and media folder (nothing of the service's own data is touched) and
prints images/s of each and the ratio to the upload, plus the most bytes the web process read at once.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path


def write_images(folder: Path, n: int, size: int) -> list[tuple[str, str]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    (folder / "images").mkdir(parents=True)
    for i in range(n):
        label = ("nevus", "melanoma")[i % 2]
        # smooth noise compresses like a photograph, not like white noise
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        name = f"images/{i:06d}.jpg"
        image.save(folder / name, quality=90)
        rows.append((name, label))
    (folder / "labels.csv").write_text("image,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows))
    return rows


def write_shards(folder: Path, source: Path, rows, per_shard: int) -> None:
    folder.mkdir(parents=True)
    for s in range(0, len(rows), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:05d}.tar", "w") as tf:
            for name, label in rows[s:s + per_shard]:
                key = Path(name).stem
                tf.add(source / name, f"{key}.jpg")
                data = label.encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=448, help="pixels per side of each JPEG")
    parser.add_argument("--per-shard", type=int, default=500)
    return parser.parse_args(argv)


def _setup_django(work: Path) -> None:
    """Point the service at a throwaway database, media and dataset folder under ``work``, and start Django."""
    os.environ.update(DATABASE_URL=f"sqlite:///{work / 'db.sqlite3'}", CLIP_AUDIT_VAR_DIR=str(work / "var"),
                      DATASET_ROOTS=str(work / "data"), DJANGO_SETTINGS_MODULE="audit_service.settings",
                      STORAGE_BACKEND="local", MEDIA_ROOT=str(work / "media"), LOG_LEVEL="ERROR")
    import django

    django.setup()


def _write_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, int]:
    """The same generated images as a folder of files, WebDataset shards and a zip to upload; returns the zip and
    the images' total bytes."""
    files = work / "data" / "files"
    rows = write_images(files, args.images, args.size)
    write_shards(work / "data" / "shards", files, rows, args.per_shard)
    archive = work / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(files.rglob("*")):
            zf.write(p, p.relative_to(files).as_posix())
    total = sum(p.stat().st_size for p in (files / "images").iterdir())
    return archive, total


def _count_open_bytes(references) -> dict[str, int]:
    """Wrap the folder source's ``open`` to track the bytes of files open at once in the web process; returns the
    counter ({"now": ..., "max": ...}) it updates."""
    peak = {"now": 0, "max": 0}
    original = references.FolderSource.open

    def counting_open(source, name):  # bytes of files open at once in the web process
        fh = original(source, name)
        size = os.fstat(fh.fileno()).st_size
        peak["now"] += size
        peak["max"] = max(peak["max"], peak["now"])
        close = fh.close

        def closing():
            if not fh.closed:
                peak["now"] -= size
            close()
        fh.close = closing
        return fh

    references.FolderSource.open = counting_open
    return peak


def _time_registrations(project, work: Path, archive: Path, peak: dict[str, int]
                        ) -> tuple[dict[str, float], dict[str, int]]:
    """Register the upload, the image files and the shards in turn: seconds and most bytes open at once of each."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from audit_service.registry.services import register_dataset, register_dataset_by_reference

    timings, peaks = {}, {}
    for how in ("upload", "files", "webdataset"):
        peak.update(now=0, max=0)
        start = time.perf_counter()
        if how == "upload":
            register_dataset(project=project, user=None, name=how,
                             archive=SimpleUploadedFile("upload.zip", archive.read_bytes()))
        else:
            register_dataset_by_reference(project=project, user=None, name=how, source="folder",
                                          location=str(work / "data" / ("files" if how == "files" else "shards")),
                                          layout=how)
        timings[how] = time.perf_counter() - start
        peaks[how] = peak["max"]
    return timings, peaks


def _print_results(args: argparse.Namespace, total: int, timings: dict[str, float], peaks: dict[str, int]) -> None:
    print(f"dataset registration, {args.images} JPEGs of {args.size}x{args.size} ({total / 1e6:.1f} MB), "
          f"{args.per_shard} per shard; {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'':<34}{'seconds':>9}{'images/s':>10}{'vs upload':>11}{'most bytes open at once':>25}")
    for how, label in (("upload", "uploaded zip (copied into store)"), ("files", "by reference, image files"),
                       ("webdataset", "by reference, WebDataset shards")):
        held = "-" if how == "upload" else f"{peaks[how] / 1e6:.2f} MB"
        print(f"{label:<34}{timings[how]:>9.1f}{args.images / timings[how]:>10.0f}"
              f"{timings['upload'] / timings[how]:>10.2f}x{held:>25}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-registration-"))
    _setup_django(work)
    from django.core.management import call_command

    from audit_service.projects.models import Project
    from audit_service.registry import references

    call_command("migrate", verbosity=0)
    project = Project.objects.create(name="bench")
    archive, total = _write_inputs(work, args)
    peak = _count_open_bytes(references)
    timings, peaks = _time_registrations(project, work, archive, peak)
    _print_results(args, total, timings, peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
