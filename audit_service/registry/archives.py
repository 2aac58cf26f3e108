"""Turning an uploaded archive into a validated, labelled image folder, or a precise refusal.

Uploads are hostile until proven otherwise: paths that escape the folder,
links, decompression bombs, huge images, corrupt files and labels that do not
match the files are all refused with a message naming the problem, and
nothing of a refused upload is kept.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from workers.engine.imagefiles import SUFFIXES, ImageRefused, open_image

IMAGE_SUFFIXES = SUFFIXES  # the file names a dataset's images may have (their content is checked too)
MAX_PROBLEMS_LISTED = 5
MAX_COMPRESSION_RATIO = 200  # a zip member that inflates more than this is treated as a bomb
# A labels.csv column besides image and label is kept as metadata (e.g. "a ruler" 0/1, "site") when its non-empty
# values take at most this many distinct values; more (a caption, a patient id) is free text and is dropped.
MAX_METADATA_VALUES = 20
# Every metadata column becomes a slice the engine measures and the report shows: a dataset may have this many
# (labels.csv columns besides image and label, or keys of the WebDataset samples' .json besides label).
MAX_METADATA_COLUMNS = 32
MAX_LABEL_CHARS = 200  # characters of a class name, a metadata column's name or one of its values
RESERVED_COLUMNS = ("image", "label")  # the canonical labels.csv's own columns


class DatasetRejected(Exception):
    """The upload cannot become a dataset; ``str(exc)`` says why and what to do."""


@dataclass
class Limits:
    max_files: int
    max_total_bytes: int
    max_image_pixels: int
    source: str = "MAX_DATASET_IMAGES / MAX_DATASET_BYTES"  # where the limits come from, named in refusals
    # every entry of the archive counts, folders and empty files too (MAX_ARCHIVE_MEMBERS); None: max_files plus
    # room for the folders and a labels file
    max_members: int | None = None
    where: str = "the archive"  # what holds the files, in messages (a dataset by reference names its prefix/folder)

    @property
    def member_limit(self) -> int:
        return self.max_members if self.max_members is not None else self.max_files + 1000


@dataclass
class ValidatedDataset:
    root: Path
    images: list[tuple[str, str]]  # (relative path, label), sorted by path; label "" when unlabelled
    class_names: list[str]
    class_counts: dict = field(default_factory=dict)
    total_bytes: int = 0
    # metadata column -> one value per image, in the order of ``images`` ("" where the CSV left it empty)
    metadata: dict[str, list[str]] = field(default_factory=dict)


def safe_member_name(name: str) -> str:
    """A member name as a safe relative POSIX path, or a refusal."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DatasetRejected(f"archive member '{name}' has an absolute path; archives must hold relative paths")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        raise DatasetRejected(f"archive member '{name}' points outside the archive (path traversal)")
    return norm


def is_ignored(path: str) -> bool:
    """macOS resource forks and hidden files ride along in archives made by hand; they are skipped, not refused."""
    return any(part.startswith(("__MACOSX", ".")) for part in path.split("/"))


def problem_list(problems: list[str]) -> str:
    """'a; b; c; and 13 more': the first problems of a long list."""
    shown = "; ".join(problems[:MAX_PROBLEMS_LISTED])
    more = len(problems) - MAX_PROBLEMS_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def some_names(names: list[str]) -> str:
    """'a, b, c and 13 more': a few names of a long list."""
    shown = ", ".join(names[:MAX_PROBLEMS_LISTED])
    more = len(names) - MAX_PROBLEMS_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _without(text: str, folder: Path) -> str:
    """``text`` with the server's temporary folder taken out, so a message shows paths inside the archive only."""
    for prefix in (f"{folder}{os.sep}", str(folder)):
        text = text.replace(prefix, "")
    return text


def extract(archive: Path, dest: Path, limits: Limits) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``dest`` after checking every member.

    The checks are one pass over the member list, before any member's content is read: the number of members
    (folders and empty files included), paths, links, sizes and file types. Members that are skipped anyway
    (hidden files, __MACOSX) are not written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, limits)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, dest, limits)
    else:
        raise DatasetRejected("the upload is neither a zip nor a tar archive; upload a .zip or .tar.gz of images")


def check_member_count(n_members: int, limits: Limits) -> None:
    if n_members > limits.member_limit:
        raise DatasetRejected(f"the archive holds more than {limits.member_limit} members (files and folders "
                              f"together); at most {limits.member_limit} are accepted (MAX_ARCHIVE_MEMBERS)")


def _images_of(names: list[str], limits: Limits) -> list[str]:
    """The image files among ``names`` (skipped ones left out), or a refusal: a file that is neither an image nor
    a CSV, or more images than a dataset may hold. Checked on the member list before extraction and again on
    what was extracted."""
    images = [name for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    other = [name for name in names if not name.lower().endswith(IMAGE_SUFFIXES + (".csv",))]
    if other:
        raise DatasetRejected(f"{limits.where} holds files that are not images: {problem_list(other)}; "
                              f"accepted image types are {', '.join(IMAGE_SUFFIXES)}")
    if len(images) > limits.max_files:
        raise DatasetRejected(f"{limits.where} holds {len(images)} images; at most {limits.max_files} images "
                              f"are accepted per dataset ({limits.source})")
    return images


def plan_extraction(files: list[tuple[str, int]], limits: Limits) -> set[str]:
    """The files worth extracting, from (safe path, declared size) pairs, or a refusal; nothing is read yet."""
    kept = [(name, size) for name, size in files if not is_ignored(name)]
    _images_of([name for name, _ in kept], limits)
    empty = [name for name, size in kept if size == 0 and name.lower().endswith(IMAGE_SUFFIXES)]
    if empty:
        raise DatasetRejected(f"{len(empty)} image{'s are' if len(empty) > 1 else ' is'} empty (0 bytes): "
                              f"{some_names(empty)}; an image file cannot be empty, so check how "
                              f"{limits.where} was made")
    total = sum(size for _, size in kept)
    if total > limits.max_total_bytes:
        raise DatasetRejected(f"{limits.where} {'unpacks' if limits.where == 'the archive' else 'adds up'} to "
                              f"{total} bytes, over the limit of "
                              f"{limits.max_total_bytes} ({limits.source})")
    return {name for name, _ in kept}


def _zip_entries_over(archive: Path, limit: int) -> bool:
    """Does the zip's central directory hold more than ``limit`` entries? Counted header by header and stopped
    past the limit, before zipfile builds its list of every member (which an archive of millions of tiny entries
    would make take gigabytes). Anything unexpected answers False: ZipFile then reads the archive, reports its
    corruption, and the count is checked again on its list."""
    try:
        with open(archive, "rb") as fp:
            end = zipfile._EndRecData(fp)
            if end is None:
                return False
            if end[zipfile._ECD_ENTRIES_TOTAL] > limit:
                return True
            size, offset = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]
            prefix = end[zipfile._ECD_LOCATION] - size - offset  # bytes before the zip (a self-extractor's)
            if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
                prefix -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
            fp.seek(offset + prefix)
            count = read = 0
            while read < size:
                header = fp.read(zipfile.sizeCentralDir)
                if len(header) != zipfile.sizeCentralDir or header[:4] != zipfile.stringCentralDir:
                    return False
                fields = struct.unpack(zipfile.structCentralDir, header)
                skip = (fields[zipfile._CD_FILENAME_LENGTH] + fields[zipfile._CD_EXTRA_FIELD_LENGTH]
                        + fields[zipfile._CD_COMMENT_LENGTH])
                fp.seek(skip, os.SEEK_CUR)
                read += zipfile.sizeCentralDir + skip
                count += 1
                if count > limit:
                    return True
    except (OSError, struct.error, AttributeError, IndexError):  # AttributeError: zipfile's internals moved
        return False
    return False


def _extract_zip(archive: Path, dest: Path, limits: Limits) -> None:
    if _zip_entries_over(archive, limits.member_limit):
        check_member_count(limits.member_limit + 1, limits)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetRejected(f"the zip archive is corrupt: {exc}") from exc
    with zf:
        infos = zf.infolist()
        check_member_count(len(infos), limits)
        members = []
        for m in infos:
            name = safe_member_name(m.filename)
            if m.is_dir():
                continue
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DatasetRejected(f"archive member '{m.filename}' is a symbolic link; links are not accepted")
            if m.compress_size and m.file_size / max(m.compress_size, 1) > MAX_COMPRESSION_RATIO \
                    and m.file_size > 1024 * 1024:
                raise DatasetRejected(f"archive member '{m.filename}' inflates {m.file_size // m.compress_size}x; "
                                      "this looks like a decompression bomb and was refused")
            members.append((m, name))
        wanted = plan_extraction([(name, m.file_size) for m, name in members], limits)
        written = 0
        for m, name in members:
            if name not in wanted:
                continue
            target = dest / name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > limits.max_total_bytes:  # sizes in the header can lie
                            raise DatasetRejected("the archive unpacks to more than MAX_DATASET_BYTES; refused")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
                # a bad CRC, an encrypted member, an unsupported compression, a file where a folder must go
                raise DatasetRejected(f"archive member '{m.filename}' cannot be extracted: "
                                      f"{_without(str(exc), dest)}") from exc


def _extract_tar(archive: Path, dest: Path, limits: Limits) -> None:
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as exc:
        raise DatasetRejected(f"the tar archive is corrupt: {exc}") from exc
    with tf:
        members = []
        try:
            # one header at a time, so an archive of too many members is refused before it is all read
            while (m := tf.next()) is not None:
                members.append(m)
                check_member_count(len(members), limits)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DatasetRejected(f"the tar archive is corrupt or truncated: {exc}") from exc
        files = []
        for m in members:
            name = safe_member_name(m.name)
            if m.issym() or m.islnk():
                raise DatasetRejected(f"archive member '{m.name}' is a link; links are not accepted")
            if m.isdev() or m.isfifo():
                raise DatasetRejected(f"archive member '{m.name}' is a device or pipe; only files are accepted")
            if m.isfile():
                files.append((m, name))
        wanted = plan_extraction([(name, m.size) for m, name in files], limits)
        try:
            tf.extractall(dest, members=[m for m, name in files if name in wanted], filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DatasetRejected(f"the tar archive could not be extracted: {_without(str(exc), dest)}") from exc


def _find_labels_csv(root: Path) -> Path | None:
    csvs = sorted(p for p in root.rglob("*.csv") if p.is_file() and not is_ignored(p.relative_to(root).as_posix()))
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


def _other_delimiter(header: str) -> str | None:
    """The delimiter a header line uses when it is not a comma (spreadsheets in many locales write ';')."""
    try:
        found = csv.Sniffer().sniff(header, delimiters=";\t|").delimiter
    except csv.Error:
        return None
    return found if found in header and "," not in header else None


@dataclass
class _Labels:
    labels: dict[str, str]  # archive path -> label
    extras: dict[str, dict[str, str]]  # archive path -> {extra column: value}
    written: dict[str, str]  # archive path -> the path as labels.csv wrote it


def _read_labels(csv_path: Path, root: Path, require_labels: bool = True) -> _Labels:
    """The rows of a labels CSV; without ``require_labels`` the label column is optional and a label may be empty
    (images for SAE training). Paths are read relative to the CSV's own folder."""
    base = csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetRejected(f"{csv_path.name} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in a "
                              "spreadsheet)") from exc
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.strip().lower(): f for f in (reader.fieldnames or []) if f is not None}
    path_col = next((fields[c] for c in ("image", "filename", "file", "path") if c in fields), None)
    label_col = next((fields[c] for c in ("label", "class", "diagnosis") if c in fields), None)
    if path_col is None or (label_col is None and require_labels):
        delimiter = _other_delimiter(text.splitlines()[0] if text.strip() else "")
        if delimiter is not None:
            shown = "a tab" if delimiter == "\t" else f"'{delimiter}'"
            raise DatasetRejected(f"{csv_path.name} is separated by {shown}; use commas (a header line such as "
                                  "image,label), e.g. export it from the spreadsheet as 'CSV (comma delimited)'")
        raise DatasetRejected(f"{csv_path.name} needs a column naming the image (image/filename/path) and one "
                              f"naming its class (label/class); found columns: {', '.join(reader.fieldnames or [])}")
    extra_cols = [f for f in (reader.fieldnames or [])
                  if f is not None and f.strip() and f not in (path_col, label_col)
                  and f.strip().lower() not in RESERVED_COLUMNS]
    check_metadata_count([f.strip() for f in extra_cols], f"columns in {csv_path.name} besides the image and label")
    folder = posixpath.relpath(str(base), str(root)) if base != root else ""
    rows = _Labels({}, {}, {})
    problems = []
    for line, row in enumerate(reader, start=2):
        rel = (row.get(path_col) or "").strip()
        label = (row.get(label_col) or "").strip() if label_col is not None else ""
        if not rel or (not label and require_labels):
            problems.append(f"line {line}: empty image or label")
            continue
        too_long = label_problem(label) or next(
            (p for col in extra_cols if (p := metadata_problem(col.strip(), (row.get(col) or "").strip()))), None)
        if too_long:
            problems.append(f"line {line}: {too_long}")
            continue
        path = safe_member_name(posixpath.join(folder, rel))
        if path in rows.labels:
            problems.append(f"line {line}: '{rel}' is listed twice")
            continue
        rows.labels[path] = label
        rows.written[path] = rel
        rows.extras[path] = {col.strip(): (row.get(col) or "").strip() for col in extra_cols}
    if problems:
        raise DatasetRejected(f"{csv_path.name} has problems: {problem_list(problems)}")
    return rows


def _inside(path: str) -> str | None:
    try:
        return safe_member_name(path)
    except DatasetRejected:
        return None


def _mismatch(csv_path: Path, root: Path, rows: _Labels, images: set[str], holder: str = "the archive"
              ) -> str | None:
    """What is wrong between labels.csv and the images, with what to do; None when they match."""
    missing = sorted(set(rows.labels) - images)
    unlabelled = sorted(images - set(rows.labels))
    folder = csv_path.parent.relative_to(root).as_posix()
    top = "the archive's top folder" if holder == "the archive" else holder  # a reference: a prefix or folder
    where = top if folder == "." else f"'{folder}/'"
    parts = []
    if missing:
        n = len(missing)
        part = (f"{csv_path.name} lists {n} image{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not in "
                f"{holder}: {some_names(missing)}. Paths in {csv_path.name} are read relative to the folder that "
                f"holds it ({where})")
        written = [rows.written[m] for m in missing]
        by_name: dict[str, list[str]] = {}
        for image in images:
            by_name.setdefault(posixpath.basename(image), []).append(image)
        if folder != "." and all(_inside(w) in images for w in written):
            part += (f"; these paths are relative to {top} instead: move {csv_path.name} "
                     f"there, or write them relative to '{folder}/'")
        else:
            found = next(((w, by_name[posixpath.basename(w)][0]) for w in written
                          if len(by_name.get(posixpath.basename(w), [])) == 1), None)
            if found:
                part += f"; e.g. '{found[0]}' is in {holder} as '{found[1]}'"
            part += "; correct the paths or add the missing images"
        parts.append(part)
    if unlabelled:
        n = len(unlabelled)
        parts.append(f"{n} image{'s' if n > 1 else ''} without a label: {some_names(unlabelled)}; add a row "
                     f"(image,label) for each to {csv_path.name} or remove {'them' if n > 1 else 'it'} from "
                     f"{holder}")
    return ". ".join(parts) if parts else None


def check_metadata_count(columns: list[str], what: str) -> None:
    """Refuse more than MAX_METADATA_COLUMNS metadata columns (``what`` names where they come from)."""
    if len(columns) > MAX_METADATA_COLUMNS:
        raise DatasetRejected(f"{len(columns)} {what} ({some_names(sorted(columns))}); each would become a metadata "
                              f"column, and a dataset may have at most {MAX_METADATA_COLUMNS}: keep the columns you "
                              "want audited as slices and drop the rest")


def label_problem(label: str) -> str | None:
    """Why a class name cannot be kept, or None."""
    if len(label) > MAX_LABEL_CHARS:
        return f"a label of {len(label)} characters; a class name may have at most {MAX_LABEL_CHARS}"
    return None


def metadata_problem(column: str, value: str) -> str | None:
    """Why a metadata column's name or value cannot be kept, or None."""
    if len(column) > MAX_LABEL_CHARS:
        return f"a metadata column name of {len(column)} characters; at most {MAX_LABEL_CHARS} are accepted"
    if len(value) > MAX_LABEL_CHARS:
        return (f"a value of {len(value)} characters in metadata column '{column[:40]}'; at most {MAX_LABEL_CHARS} "
                "are accepted")
    return None


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


def image_problem(path, name: str, max_pixels: int, root: Path | None = None) -> str | None:
    """Why the image file at ``path`` (a path or an open binary file; called ``name`` in messages) cannot be used,
    or None: it must decode and have at most ``max_pixels`` pixels (read from its header, before decoding)."""
    try:
        with open_image(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                return f"{name} has {w}x{h} pixels, over the limit of {max_pixels}"
            img.load()
    except Exception as exc:  # PIL raises many types for broken files
        text = _without(str(exc), root) if root is not None else str(exc).replace(str(path), name)
        kind = "" if isinstance(exc, ImageRefused) else f"{type(exc).__name__}: "
        return f"{name} is not a readable image ({kind}{text})"
    return None


def _labels_from_folders(image_files: list[str]) -> tuple[dict[str, str], set[str]]:
    """Each image's class as the name of the folder it sits in (image path -> label), and those folders; a
    refusal for an image that is not inside a class folder."""
    labels: dict[str, str] = {}
    folders: set[str] = set()
    for f in image_files:
        parts = f.split("/")
        if len(parts) < 2:
            raise DatasetRejected(f"'{f}' is not inside a class folder; put each image in a folder named after "
                                  "its class, or add a labels.csv with columns image,label (unlabelled "
                                  "images can be registered for SAE training only)")
        labels[f] = parts[-2]
        folders.add(posixpath.dirname(f))
    return labels, folders


def _check_images(root: Path, image_files: list[str], limits: Limits, image_problems=None) -> None:
    """Refuse the dataset when some of its images cannot be used (see :func:`validate`'s ``image_problems``)."""
    if image_problems is None:
        bad = [problem for f in image_files if (problem := image_problem(root / f, f, limits.max_image_pixels, root))]
    else:
        bad = image_problems(image_files)
    if bad:
        raise DatasetRejected(f"some images cannot be used: {problem_list(bad)}")


def _refuse_single_class(csv_path: Path | None, image_files: list[str], folders: set[str],
                         class_names: list[str]) -> None:
    """The refusal of a labelled dataset of a single class, saying where that one class came from."""
    if csv_path is None:
        where = (f"all {len(image_files)} images sit in '{next(iter(folders))}/'" if len(folders) == 1
                 else f"every image sits in a folder named '{class_names[0]}'")
        example = f"{next(iter(folders))}/" if len(folders) == 1 else ""
        raise DatasetRejected(
            f"the dataset has a single class ({class_names[0]}): without a labels.csv an image's class is the "
            f"name of the folder it sits in, and {where}. An audit compares classes: give each class its own "
            f"folder (e.g. {example}nevus/a.png, {example}melanoma/b.png), or add a labels.csv with columns "
            "image,label (a single class or unlabelled images can be registered for SAE training only)")
    raise DatasetRejected(f"the dataset has a single class ({class_names[0]}): {csv_path.name} gives every "
                          "image the same label. An audit compares classes, so upload images of at least two "
                          "classes (a single class or unlabelled images can be registered for SAE training "
                          "only)")


def validate(root: Path, limits: Limits, require_labels: bool = True, *, files: list[str] | None = None,
             image_problems=None, sizes: dict[str, int] | None = None) -> ValidatedDataset:
    """Check the extracted files: images decode and are not too large, labels match the files.

    ``require_labels=False`` (a dataset for SAE training): labels are optional. A labels.csv is still checked
    against the files; without one, the images are unlabelled, whatever folders they sit in.

    A dataset whose images are not under ``root`` (one registered by reference: ``root`` then holds its CSV files
    only) gives their relative paths as ``files``, their ``sizes``, and ``image_problems``: called with the image
    paths once the labels match them, it returns what :func:`image_problem` says about each unusable one.

    Every check is linear in the number of files (sets, not lists, for membership), so an archive at the
    member limit costs seconds, not hours.
    """
    if files is None:
        files = sorted(f for f in (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
                       if not is_ignored(f))
    image_files = _images_of(files, limits)
    if not image_files:
        raise DatasetRejected("the dataset holds no images")
    csv_path = _find_labels_csv(root)
    extras: dict[str, dict[str, str]] = {}
    folders: set[str] = set()
    if csv_path is not None:
        rows = _read_labels(csv_path, root, require_labels)
        problem = _mismatch(csv_path, root, rows, set(image_files), limits.where)
        if problem:
            raise DatasetRejected(problem)
        labels, extras = rows.labels, rows.extras
    elif not require_labels:
        labels = {f: "" for f in image_files}
    else:
        labels, folders = _labels_from_folders(image_files)
    _check_images(root, image_files, limits, image_problems)
    total = sum(sizes[f] if sizes is not None else (root / f).stat().st_size for f in image_files)
    checked = checked_dataset(root, labels, extras, total)
    if require_labels and len(checked.class_names) < 2:
        _refuse_single_class(csv_path, image_files, folders, checked.class_names)
    return checked


def checked_dataset(root: Path, labels: dict[str, str], extras: dict[str, dict[str, str]], total_bytes: int
                    ) -> ValidatedDataset:
    """The dataset that image path -> label ("" when unlabelled) and image path -> {column: value} (the same
    columns for every image, or no entries) describe: its classes, images per class, images sorted by path, and
    the metadata columns worth keeping."""
    class_names = sorted(set(labels.values()) - {""})
    counts = {c: 0 for c in class_names}
    for label in labels.values():
        if label:
            counts[label] += 1
    images = sorted(labels.items())
    return ValidatedDataset(root, images, class_names, counts, total_bytes,
                            _metadata_columns([p for p, _ in images], extras))
