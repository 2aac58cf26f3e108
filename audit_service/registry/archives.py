"""Turning an uploaded archive into a validated, labelled image folder, or a precise refusal.

Uploads are hostile until proven otherwise: paths that escape the folder,
links, decompression bombs, huge images, corrupt files and labels that do not
match the files are all refused with a message naming the problem, and
nothing of a refused upload is kept.
"""
from __future__ import annotations

import csv
import io
import posixpath
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PROBLEMS_LISTED = 5
MAX_COMPRESSION_RATIO = 200  # a zip member that inflates more than this is treated as a bomb
# A labels.csv column besides image and label is kept as metadata (e.g. "a ruler" 0/1, "site") when its non-empty
# values take at most this many distinct values; more (a caption, a patient id) is free text and is dropped.
MAX_METADATA_VALUES = 20
RESERVED_COLUMNS = ("image", "label")  # the canonical labels.csv's own columns


class DatasetRejected(Exception):
    """The upload cannot become a dataset; ``str(exc)`` says why and what to do."""


@dataclass
class Limits:
    max_files: int
    max_total_bytes: int
    max_image_pixels: int
    source: str = "MAX_DATASET_IMAGES / MAX_DATASET_BYTES"  # where the limits come from, named in refusals


@dataclass
class ValidatedDataset:
    root: Path
    images: list[tuple[str, str]]  # (relative path, label), sorted by path; label "" when unlabelled
    class_names: list[str]
    class_counts: dict = field(default_factory=dict)
    total_bytes: int = 0
    # metadata column -> one value per image, in the order of ``images`` ("" where the CSV left it empty)
    metadata: dict[str, list[str]] = field(default_factory=dict)


def _safe_name(name: str) -> str:
    """A member name as a safe relative POSIX path, or a refusal."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DatasetRejected(f"archive member '{name}' has an absolute path; archives must hold relative paths")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        raise DatasetRejected(f"archive member '{name}' points outside the archive (path traversal)")
    return norm


def _list(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_PROBLEMS_LISTED])
    more = len(problems) - MAX_PROBLEMS_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def extract(archive: Path, dest: Path, limits: Limits) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``dest`` after checking every member."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, limits)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, dest, limits)
    else:
        raise DatasetRejected("the upload is neither a zip nor a tar archive; upload a .zip or .tar.gz of images")


def _check_totals(n_files: int, total_bytes: int, limits: Limits) -> None:
    """Refuse an archive by its declared file count and size before anything is written."""
    if n_files > limits.max_files + 10:  # a few labels or readme files besides the images
        raise DatasetRejected(f"the archive holds {n_files} files; at most {limits.max_files} images "
                              f"are accepted per dataset ({limits.source})")
    if total_bytes > limits.max_total_bytes:
        raise DatasetRejected(f"the archive unpacks to {total_bytes} bytes, over the limit of "
                              f"{limits.max_total_bytes} ({limits.source})")


def _extract_zip(archive: Path, dest: Path, limits: Limits) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetRejected(f"the zip archive is corrupt: {exc}") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        total = 0
        for m in members:
            _safe_name(m.filename)
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DatasetRejected(f"archive member '{m.filename}' is a symbolic link; links are not accepted")
            total += m.file_size
            if m.compress_size and m.file_size / max(m.compress_size, 1) > MAX_COMPRESSION_RATIO \
                    and m.file_size > 1024 * 1024:
                raise DatasetRejected(f"archive member '{m.filename}' inflates {m.file_size // m.compress_size}x; "
                                      "this looks like a decompression bomb and was refused")
        _check_totals(len(members), total, limits)
        written = 0
        for m in members:
            target = dest / _safe_name(m.filename)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_total_bytes:  # sizes in the header can lie
                        raise DatasetRejected("the archive unpacks to more than MAX_DATASET_BYTES; refused")
                    out.write(chunk)


def _extract_tar(archive: Path, dest: Path, limits: Limits) -> None:
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as exc:
        raise DatasetRejected(f"the tar archive is corrupt: {exc}") from exc
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetRejected(f"the tar archive is corrupt or truncated: {exc}") from exc
        files = []
        total = 0
        for m in members:
            _safe_name(m.name)
            if m.issym() or m.islnk():
                raise DatasetRejected(f"archive member '{m.name}' is a link; links are not accepted")
            if m.isdev() or m.isfifo():
                raise DatasetRejected(f"archive member '{m.name}' is a device or pipe; only files are accepted")
            if m.isfile():
                files.append(m)
                total += m.size
        _check_totals(len(files), total, limits)
        try:
            tf.extractall(dest, members=files, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetRejected(f"the tar archive could not be extracted: {exc}") from exc


def _find_labels_csv(root: Path) -> Path | None:
    csvs = sorted(p for p in root.rglob("*.csv") if p.is_file())
    if not csvs:
        return None
    for preferred in ("labels.csv", "metadata.csv"):
        for p in csvs:
            if p.name == preferred:
                return p
    if len(csvs) > 1:
        raise DatasetRejected(f"the archive holds several CSV files ({', '.join(p.name for p in csvs[:5])}); "
                              "name the labels file labels.csv")
    return csvs[0]


def _read_labels(csv_path: Path, root: Path, require_labels: bool = True
                 ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(path -> label, path -> {extra column: value}) from a labels CSV; without ``require_labels`` the label
    column is optional and a label may be empty (images for SAE training)."""
    base = csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetRejected(f"{csv_path.name} is not UTF-8 text") from exc
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.strip().lower(): f for f in (reader.fieldnames or []) if f is not None}
    path_col = next((fields[c] for c in ("image", "filename", "file", "path") if c in fields), None)
    label_col = next((fields[c] for c in ("label", "class", "diagnosis") if c in fields), None)
    if path_col is None or (label_col is None and require_labels):
        raise DatasetRejected(f"{csv_path.name} needs a column naming the image (image/filename/path) and one "
                              f"naming its class (label/class); found columns: {', '.join(reader.fieldnames or [])}")
    extra_cols = [f for f in (reader.fieldnames or [])
                  if f is not None and f.strip() and f not in (path_col, label_col)
                  and f.strip().lower() not in RESERVED_COLUMNS]
    labels: dict[str, str] = {}
    extras: dict[str, dict[str, str]] = {}
    problems = []
    for line, row in enumerate(reader, start=2):
        rel = (row.get(path_col) or "").strip()
        label = (row.get(label_col) or "").strip() if label_col is not None else ""
        if not rel or (not label and require_labels):
            problems.append(f"line {line}: empty image or label")
            continue
        path = _safe_name(posixpath.join(posixpath.relpath(str(base), str(root)) if base != root else "", rel))
        if path in labels:
            problems.append(f"line {line}: '{rel}' is listed twice")
            continue
        labels[path] = label
        extras[path] = {col.strip(): (row.get(col) or "").strip() for col in extra_cols}
    if problems:
        raise DatasetRejected(f"{csv_path.name} has problems: {_list(problems)}")
    return labels, extras


def _metadata_columns(paths: list[str], extras: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """The CSV's extra columns worth keeping, as column -> values in ``paths`` order.

    A column is kept when its non-empty values take between 1 and MAX_METADATA_VALUES distinct values: a
    category or a 0/1 marker, not free text or an identifier.
    """
    kept = {}
    for col in next(iter(extras.values()), {}):
        values = [extras[p].get(col, "") for p in paths]
        if 1 <= len({v for v in values if v}) <= MAX_METADATA_VALUES:
            kept[col] = values
    return kept


def validate(root: Path, limits: Limits, require_labels: bool = True) -> ValidatedDataset:
    """Check the extracted files: images decode and are not too large, labels match the files.

    ``require_labels=False`` (a dataset for SAE training): labels are optional. A labels.csv is still checked
    against the files; without one, the images are unlabelled, whatever folders they sit in.
    """
    from PIL import Image

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = [f for f in files if not any(part.startswith(("__MACOSX", ".")) for part in f.split("/"))]
    image_files = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    other = [f for f in files if f not in image_files and not f.lower().endswith(".csv")]
    if other:
        raise DatasetRejected(f"the archive holds files that are not images: {_list(other)}; "
                              f"accepted image types are {', '.join(IMAGE_SUFFIXES)}")
    if not image_files:
        raise DatasetRejected("the dataset holds no images")
    if len(image_files) > limits.max_files:
        raise DatasetRejected(f"the dataset holds {len(image_files)} images; at most {limits.max_files} are accepted "
                              f"({limits.source})")
    csv_path = _find_labels_csv(root)
    extras: dict[str, dict[str, str]] = {}
    if csv_path is not None:
        labels, extras = _read_labels(csv_path, root, require_labels)
        missing = sorted(set(labels) - set(image_files))
        extra = sorted(set(image_files) - set(labels))
        problems = [f"listed but missing: {m}" for m in missing] + [f"image without a label: {e}" for e in extra]
        if problems:
            raise DatasetRejected(f"the labels CSV does not match the images: {_list(problems)}")
    elif not require_labels:
        labels = {f: "" for f in image_files}
    else:
        labels = {}
        for f in image_files:
            parts = f.split("/")
            if len(parts) < 2:
                raise DatasetRejected(f"'{f}' is not inside a class folder; put each image in a folder named after "
                                      "its class, or add a labels.csv with columns image,label (unlabelled "
                                      "images can be registered for SAE training only)")
            labels[f] = parts[-2]
    bad = []
    Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, from the header, before decoding
    for f in image_files:
        path = root / f
        try:
            with Image.open(path) as img:
                w, h = img.size
                if w * h > limits.max_image_pixels:
                    bad.append(f"{f} has {w}x{h} pixels, over the limit of {limits.max_image_pixels}")
                    continue
                img.load()
        except Exception as exc:  # PIL raises many types for broken files
            bad.append(f"{f} is not a readable image ({type(exc).__name__}: {exc})")
    if bad:
        raise DatasetRejected(f"some images cannot be used: {_list(bad)}")
    class_names = sorted(set(labels.values()) - {""})
    if require_labels and len(class_names) < 2:
        raise DatasetRejected(f"the dataset has a single class ({class_names[0]}); an audit compares classes, "
                              "so upload images of at least two classes (a single class or unlabelled images "
                              "can be registered for SAE training only)")
    counts = {c: 0 for c in class_names}
    for f in image_files:
        if labels[f]:
            counts[labels[f]] += 1
    total = sum((root / f).stat().st_size for f in image_files)
    images = sorted(labels.items())
    return ValidatedDataset(root, images, class_names, counts, total, _metadata_columns([p for p, _ in images], extras))
