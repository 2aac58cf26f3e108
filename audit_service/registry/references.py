"""Datasets registered by reference: images that stay where they already are.

A prefix of the media store's S3 bucket or a server folder, under one an admin allowed (``DATASET_S3_PREFIXES``,
``DATASET_ROOTS``), holding image files with a labels.csv (or one folder per class), or WebDataset ``.tar`` shards
whose samples carry their label in a ``.cls`` file or a ``.json`` file's ``label``.

Registration reads the images once, one file or one shard at a time as a stream, with the checks and messages of
an upload; nothing is copied into the service's store but the canonical labels.csv and ``manifest.json``: each
file's or shard's size and SHA-256, and each sample's place in its shard. Workers copy the images they need (for
shards: the shards holding them) into their own cache and check them against the manifest, so an audit reads
exactly the data that was registered, or stops and says what changed.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import stat
import tarfile
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage

from workers.engine import jsonsafe

from .archives import (IMAGE_SUFFIXES, DatasetRejected, Limits, ValidatedDataset, check_member_count,
                       check_metadata_count, checked_dataset, image_problem, is_ignored, label_problem, metadata_problem,
                       plan_extraction, problem_list, safe_member_name, some_names, validate)

SHARD_SUFFIX = ".tar"
COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
MAX_LABELS_BYTES = 100 * 1024 ** 2  # a labels.csv of 200 000 rows is ~10 MB; a .cls or .json of one sample is tiny
MAX_SAMPLE_FIELD_BYTES = 1024 ** 2
SERVICE_AREA = "projects"  # the service's own files in the bucket: never a dataset by reference
READERS = 8  # objects read at once (object stores answer many small reads in parallel)


class SourceError(Exception):
    """The referenced data cannot be read (gone, unreachable, changed since registration); the message says so."""


class _Hashing(io.RawIOBase):
    """A read-only stream over ``raw`` that hashes and counts the bytes read through it."""

    def __init__(self, raw):
        self.raw, self.digest, self.bytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.bytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


# --------------------------------------------------------------------------- where the data is

class S3Source:
    """A key prefix in the media store's bucket, under one an admin allowed (``DATASET_S3_PREFIXES``; the service's
    own ``projects/`` area never)."""

    kind = "s3"

    def __init__(self, location: str):
        if not hasattr(default_storage, "bucket"):
            raise DatasetRejected("a dataset by S3 prefix is read from the media store's bucket, and this service "
                                  "stores files locally (STORAGE_BACKEND=local); use a server folder an admin "
                                  "allowed (DATASET_ROOTS) or upload an archive")
        prefix = location.strip()
        bucket = default_storage.bucket_name
        if prefix.startswith("s3://"):
            named, _, prefix = prefix[len("s3://"):].partition("/")
            if named != bucket:
                raise DatasetRejected(f"'{location}' is in bucket '{named}'; datasets by reference are read from the "
                                      f"media store's bucket '{bucket}' only: copy them there")
        prefix = prefix.strip("/")
        if not prefix:
            raise DatasetRejected(f"name the prefix in bucket '{bucket}' that holds the dataset (e.g. "
                                  "datasets/lesions)")
        try:
            prefix = safe_member_name(prefix)
        except DatasetRejected as exc:
            raise DatasetRejected(f"'{location}' is not a usable prefix: {exc}") from exc
        if prefix == SERVICE_AREA or prefix.startswith(f"{SERVICE_AREA}/"):
            raise DatasetRejected(f"'{prefix}/' is where this service keeps its own files; register data stored "
                                  "elsewhere in the bucket")
        allowed = settings.DATASET_S3_PREFIXES
        if not allowed:
            raise DatasetRejected("no S3 prefix is open for datasets by reference: an admin lists the allowed "
                                  "prefixes of the bucket in DATASET_S3_PREFIXES")
        if not any(prefix == p or prefix.startswith(f"{p}/") for p in allowed):
            raise DatasetRejected(f"'{prefix}/' is not under a prefix an admin allowed for datasets "
                                  f"(DATASET_S3_PREFIXES: {', '.join(f'{p}/' for p in allowed)})")
        # boto3's client (unlike its resources) may be shared by the reading threads
        self.location, self.bucket, self.client = prefix, bucket, default_storage.bucket.meta.client

    def describe(self) -> str:
        return f"the S3 prefix '{self.location}/'"

    def _call(self, what: str, fn):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise SourceError(f"{what} is no longer in {self.describe()}") from exc
            raise SourceError(f"{what} in {self.describe()} cannot be read ({code or exc})") from exc
        except BotoCoreError as exc:
            raise SourceError(f"the bucket cannot be reached to read {what}: {exc}") from exc

    def list(self, limits: Limits) -> list[tuple[str, int]]:
        def walk():
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=f"{self.location}/")
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self.location) + 1:]
                    if not name or name.endswith("/"):  # a "folder" marker some tools write
                        continue
                    out.append((safe_member_name(name), obj["Size"]))
                    check_member_count(len(out), limits)
            return out

        found = self._call("the listing", walk)
        if not found:
            raise DatasetRejected(f"{self.describe()} holds no files (bucket '{self.bucket}'); "
                                  "check the prefix")
        return sorted(found)

    def open(self, name: str):
        return self._call(f"'{name}'", lambda: self.client.get_object(
            Bucket=self.bucket, Key=f"{self.location}/{name}")["Body"])

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        return self._call(f"'{name}'", lambda: self.client.get_object(
            Bucket=self.bucket, Key=f"{self.location}/{name}", Range=f"bytes={offset}-{offset + size - 1}"
        )["Body"].read())


class FolderSource:
    """A folder on the server, under one of the folders an admin allowed (``DATASET_ROOTS``). Links are refused,
    so nothing outside the allowed folders is read."""

    kind = "folder"

    def __init__(self, location: str):
        roots = [Path(r).resolve() for r in settings.DATASET_ROOTS]
        if not roots:
            raise DatasetRejected("no server folder is open for datasets by reference: an admin lists the allowed "
                                  "folders in DATASET_ROOTS")
        path = Path(location.strip())
        if not path.is_absolute():
            raise DatasetRejected(f"'{location}' is not an absolute path; give the folder's full path on the server")
        outside = DatasetRejected(f"'{location}' is not inside a folder an admin allowed for datasets; ask an admin "
                                  "which folders are open (DATASET_ROOTS)")
        # the roots are checked on the path as written before the file system is asked anything, so the answer
        # for a folder outside them does not depend on whether it exists
        written = Path(os.path.normpath(path))
        allowed = roots + [Path(os.path.normpath(r)) for r in settings.DATASET_ROOTS]
        if not any(written == root or written.is_relative_to(root) for root in allowed):
            raise outside
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
            raise DatasetRejected(f"there is no folder '{location}' on the server") from None
        if not any(real == root or real.is_relative_to(root) for root in roots):  # a link inside leading out
            raise outside
        if not real.is_dir():
            raise DatasetRejected(f"'{location}' is not a folder")
        self.location, self.root = str(real), real

    def describe(self) -> str:
        return f"the folder '{self.location}'"

    def list(self, limits: Limits) -> list[tuple[str, int]]:
        out = []

        def unreadable(exc: OSError):
            raise DatasetRejected(f"'{Path(exc.filename).relative_to(self.root).as_posix() or '.'}' in "
                                  f"{self.describe()} cannot be read ({exc.strerror}); the service must be able to "
                                  "read every file and folder of a dataset")

        for folder, dirs, files in os.walk(self.root, onerror=unreadable):
            here = Path(folder)
            for name in sorted(dirs + files):
                rel = (here / name).relative_to(self.root).as_posix()
                if is_ignored(rel):
                    continue
                info = os.lstat(here / name)
                if stat.S_ISLNK(info.st_mode):
                    raise DatasetRejected(f"'{rel}' in {self.describe()} is a symbolic link; links are not accepted")
                if stat.S_ISREG(info.st_mode):
                    out.append((rel, info.st_size))
                elif not stat.S_ISDIR(info.st_mode):
                    raise DatasetRejected(f"'{rel}' in {self.describe()} is a device or pipe; only files are "
                                          "accepted")
                check_member_count(len(out), limits)
            dirs[:] = [d for d in dirs if not is_ignored(d)]
        if not out:
            raise DatasetRejected(f"{self.describe()} holds no files")
        return sorted(out)

    def _path(self, name: str) -> Path:
        path = self.root / safe_member_name(name)
        if not path.resolve().is_relative_to(self.root):  # a folder replaced by a link since the listing
            raise SourceError(f"'{name}' now leads outside {self.describe()}")
        return path

    def open(self, name: str):
        try:
            return os.fdopen(os.open(self._path(name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")
        except FileNotFoundError:
            raise SourceError(f"'{name}' is no longer in {self.describe()}") from None
        except OSError as exc:
            raise SourceError(f"'{name}' in {self.describe()} cannot be read: {exc.strerror}") from exc

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        with self.open(name) as fh:
            fh.seek(offset)
            return fh.read(size)


SOURCES = {"s3": S3Source, "folder": FolderSource}


def open_source(kind: str, location: str):
    """The source of a dataset by reference; DatasetRejected says what is wrong with ``kind`` or ``location``."""
    if kind not in SOURCES:
        raise DatasetRejected(f"source must be one of {', '.join(SOURCES)}, got {kind!r}")
    if not (location or "").strip():
        raise DatasetRejected("give the location: an S3 prefix of the media store's bucket, or a server folder")
    return SOURCES[kind](location)


# --------------------------------------------------------------------------- checking it once

def guess_layout(listing: list[tuple[str, int]]) -> str:
    """"webdataset" when every file (besides hidden ones) is a shard (.tar, or a compressed one, which is then
    refused by name), else "files"."""
    names = [n for n, _ in listing if not is_ignored(n)]
    return "webdataset" if names and all(n.lower().endswith((SHARD_SUFFIX, *COMPRESSED_SHARDS)) for n in names) \
        else "files"


def _spooled(stream, limit: int):
    """A rewound temporary copy of ``stream`` (in memory when small), at most ``limit`` bytes read."""
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 ** 2)
    while chunk := stream.read(min(1 << 20, limit - spool.tell() + 1)):
        spool.write(chunk)
        if spool.tell() > limit:
            break
    spool.seek(0)
    return spool


def check_files(source, listing: list[tuple[str, int]], limits: Limits, require_labels: bool
                ) -> tuple[ValidatedDataset, dict]:
    """Image files (+ CSV labels) by reference: the listing is checked as an archive's member list is; the CSV
    files are read; then every image is read once, hashed and decoded, a few at a time. Returns what
    :func:`archives.validate` returns and the manifest's ``objects``."""
    kept = plan_extraction(listing, limits)
    sizes = {name: size for name, size in listing if name in kept}
    objects: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, size in sizes.items():
            if not name.lower().endswith(".csv"):
                continue
            if size > MAX_LABELS_BYTES:
                raise DatasetRejected(f"'{name}' is {size} bytes; a labels file may have at most {MAX_LABELS_BYTES}")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            with source.open(name) as src, open(root / name, "wb") as out:
                reader = _Hashing(src)
                out.write(reader.read())
            objects[name] = {"size": reader.bytes, "sha256": reader.hexdigest()}

        def check(name: str) -> str | None:
            with source.open(name) as src:
                reader = _Hashing(src)
                with _spooled(io.BufferedReader(reader), sizes[name]) as copy:
                    if reader.bytes != sizes[name]:
                        return f"{name} changed while it was read ({reader.bytes} bytes, listed {sizes[name]})"
                    objects[name] = {"size": reader.bytes, "sha256": reader.hexdigest()}
                    return image_problem(copy, name, limits.max_image_pixels)

        def problems(images: list[str]) -> list[str]:
            with ThreadPoolExecutor(max_workers=READERS) as pool:
                return [p for p in pool.map(check, images) if p]

        checked = validate(root, limits, require_labels, files=sorted(sizes), image_problems=problems, sizes=sizes)
    return checked, objects


class _Sample:
    __slots__ = ("image", "offset", "size", "sha256", "label", "label_from", "meta")

    def __init__(self):
        self.image, self.offset, self.size, self.sha256, self.label, self.meta = None, 0, 0, "", None, {}
        self.label_from = ""  # "cls" once a .cls file gave the label


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: a member's sample key is its path up to the first dot of the file name; the rest is
    its field (``images/0001.seg.png`` -> ``images/0001``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, field = base.partition(".")
    return posixpath.join(folder, stem), field.lower()


def _read_field(tf, member, shard: str, problems: list[str]) -> bytes | None:
    if member.size > MAX_SAMPLE_FIELD_BYTES:
        problems.append(f"'{shard}/{member.name}' is {member.size} bytes; a label file may have at most "
                        f"{MAX_SAMPLE_FIELD_BYTES}")
        return None
    return tf.extractfile(member).read()


def _label_of(sample: _Sample, field: str, data: bytes, where: str, problems: list[str]) -> None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        problems.append(f"{where} is not UTF-8 text")
        return
    if field == "cls":
        if sample.label_from == "cls":
            problems.append(f"{where}: the sample has a second .cls file; give each sample one label")
        sample.label, sample.label_from = _bounded_label(text.strip(), where, problems), "cls"
        return
    try:
        value = jsonsafe.loads(text, what=where)
    except jsonsafe.JSONLimitError as exc:
        problems.append(str(exc))
        return
    if not isinstance(value, dict):
        problems.append(f"{where} holds a JSON {type(value).__name__}, not an object")
        return
    for key, item in value.items():
        if key.strip().lower() in ("label", "class"):
            if sample.label is None and isinstance(item, (str, int)) and not isinstance(item, bool):
                sample.label = _bounded_label(str(item).strip(), where, problems)
        elif isinstance(item, (str, int, float, bool)):
            problem = metadata_problem(key.strip(), str(item).strip())
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                sample.meta[key.strip()] = str(item).strip()


def _bounded_label(label: str, where: str, problems: list[str]) -> str | None:
    """``label``, or None with the problem noted when it cannot be a class name."""
    problem = label_problem(label)
    if problem:
        problems.append(f"{where}: {problem}")
        return None
    return label


def scan_shard(source, shard: str, limits: Limits, totals: dict, problems: list[str]) -> tuple[dict, dict]:
    """Read one shard as a stream: each member checked as an archive member is, each image decoded from memory.
    Returns its samples (key -> _Sample) and its manifest entry (size, SHA-256 of the whole file)."""
    with source.open(shard) as raw:
        reader = _Hashing(raw)
        samples: dict[str, _Sample] = {}
        count = 0
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tf:
                for member in tf:
                    count += 1
                    if count > limits.member_limit:
                        raise DatasetRejected(f"shard '{shard}' holds more than {limits.member_limit} members; at "
                                              f"most {limits.member_limit} are accepted per shard "
                                              "(MAX_ARCHIVE_MEMBERS)")
                    name = safe_member_name(member.name)
                    where = f"'{shard}/{member.name}'"
                    if member.issym() or member.islnk():
                        raise DatasetRejected(f"shard member {where} is a link; links are not accepted")
                    if member.isdev() or member.isfifo():
                        raise DatasetRejected(f"shard member {where} is a device or pipe; only files are accepted")
                    if not member.isfile() or is_ignored(name):
                        continue
                    key, field = _sample_key(name)
                    sample = samples.setdefault(key, _Sample())
                    if f".{field}" in IMAGE_SUFFIXES:  # the sample's image (a mask such as .seg.png is not)
                        if sample.image is not None:
                            problems.append(f"sample '{shard}/{key}' has two images ({sample.image}, {name}); "
                                            "give each sample one")
                            continue
                        totals["images"] += 1
                        totals["bytes"] += member.size
                        if totals["images"] > limits.max_files:
                            raise DatasetRejected(f"{limits.where} holds more than {limits.max_files} images; at "
                                                  f"most {limits.max_files} are accepted per dataset "
                                                  f"({limits.source})")
                        if totals["bytes"] > limits.max_total_bytes:
                            raise DatasetRejected(f"the images of {limits.where} add up to more than "
                                                  f"{limits.max_total_bytes} bytes, over the limit "
                                                  f"({limits.source})")
                        sample.image, sample.offset, sample.size = name, member.offset_data, member.size
                        if member.size == 0:
                            problems.append(f"{shard}/{name} is empty (0 bytes)")
                            continue
                        with _spooled(tf.extractfile(member), member.size) as copy:
                            sample.sha256 = hashlib.file_digest(copy, "sha256").hexdigest()
                            copy.seek(0)
                            problem = image_problem(copy, f"{shard}/{name}", limits.max_image_pixels)
                        if problem:
                            problems.append(problem)
                    elif field in ("cls", "json"):
                        data = _read_field(tf, member, shard, problems)
                        if data is not None:
                            _label_of(sample, field, data, where, problems)
                    # other fields (captions, segmentation masks, ...) are not needed by an audit
            reader.drain()  # the tar's end may be followed by padding: the digest covers the whole file
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DatasetRejected(f"shard '{shard}' is not a readable tar file: {exc}") from exc
    return samples, {"size": reader.bytes, "sha256": reader.hexdigest()}


def check_shards(source, listing: list[tuple[str, int]], limits: Limits, require_labels: bool
                 ) -> tuple[ValidatedDataset, dict, dict]:
    """WebDataset shards by reference, read one after the other. Returns the checked dataset (image ids
    ``SHARD/MEMBER``), the manifest's ``objects`` (per shard) and ``members`` (id -> shard, offset, size)."""
    names = [n for n, _ in listing if not is_ignored(n)]
    compressed = [n for n in names if n.lower().endswith(COMPRESSED_SHARDS)]
    if compressed:
        raise DatasetRejected(f"compressed shards are not read by reference ({some_names(compressed)}): store them as "
                              "plain .tar, WebDataset's usual form, so workers can read single images")
    other = [n for n in names if not n.lower().endswith(SHARD_SUFFIX)]
    if other:
        raise DatasetRejected(f"{limits.where} holds files that are not WebDataset shards (.tar): {problem_list(other)}")
    totals, problems = {"images": 0, "bytes": 0}, []
    objects, members, labels, extras = {}, {}, {}, {}
    unlabelled, imageless = [], []
    for shard in names:
        samples, objects[shard] = scan_shard(source, shard, limits, totals, problems)
        for key, sample in samples.items():
            if sample.image is None:
                if sample.label is not None:
                    imageless.append(f"{shard}/{key}")
                continue
            image_id = f"{shard}/{sample.image}"
            if not sample.label and require_labels:
                unlabelled.append(image_id)
            labels[image_id] = sample.label or ""
            extras[image_id] = sample.meta
            members[image_id] = [shard, sample.offset, sample.size, sample.sha256]
    if imageless:
        problems.append(f"{len(imageless)} sample{'s have' if len(imageless) > 1 else ' has'} a label but no image "
                        f"({some_names(imageless)}); images are {', '.join(IMAGE_SUFFIXES)}")
    if unlabelled:
        problems.append(f"{len(unlabelled)} image{'s' if len(unlabelled) > 1 else ''} without a label: "
                        f"{some_names(unlabelled)}; give each sample a .cls file or a .json with \"label\" (unlabelled "
                        "images can be registered for SAE training only)")
    if problems:
        raise DatasetRejected(f"some samples cannot be used: {problem_list(problems)}")
    if not labels:
        raise DatasetRejected(f"the shards of {limits.where} hold no images")
    keys = sorted({k for meta in extras.values() for k in meta})  # a sample's .json may lack another's keys
    check_metadata_count(keys, "keys in the samples' .json files besides label")
    checked = checked_dataset(Path("."), labels, {p: {k: meta.get(k, "") for k in keys} for p, meta in extras.items()},
                              totals["bytes"])
    if require_labels and len(checked.class_names) < 2:
        raise DatasetRejected(f"the dataset has a single class ({checked.class_names[0]}): every sample's label is "
                              "the same. An audit compares classes, so register images of at least two classes (a "
                              "single class or unlabelled images can be registered for SAE training only)")
    return checked, objects, members


# --------------------------------------------------------------------------- reading it later

def read_manifest(dataset) -> dict:
    """The dataset's manifest (read once per process: a registered dataset's manifest never changes)."""
    return _manifest(dataset.storage_prefix, dataset.sha256)


@functools.lru_cache(maxsize=8)
def _manifest(storage_prefix: str, sha256: str) -> dict:
    with default_storage.open(f"{storage_prefix}/manifest.json", "rb") as fh:
        return json.loads(fh.read().decode())


def _changed(dataset, source, name: str) -> SourceError:
    return SourceError(f"'{name}' in {source.describe()} is not the file registered with dataset '{dataset.name}' "
                       "(its SHA-256 differs): the data changed after registration; register the dataset again to "
                       "audit it as it is now")


def write_atomically(target: Path, data_stream) -> None:
    """``data_stream`` (anything with ``read``) into ``target``, which only ever holds a whole copy: a failed read
    leaves no file, and the temporary name carries the pid, so processes of one host writing the same file do not
    collide."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as out:
            while chunk := data_stream.read(1 << 20):
                out.write(chunk)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def fetch(dataset, folder: Path, wanted: list[str]) -> list[str]:
    """Copy the images ``wanted`` (ids from labels.csv) of a dataset by reference into ``folder``, each checked
    against the manifest; image files are read one by one, shards whole (only those holding a wanted image).
    Returns the shards read. Raises SourceError when the data is gone or changed."""
    manifest = read_manifest(dataset)
    try:
        source = open_source(dataset.source, dataset.location)
    except DatasetRejected as exc:
        raise SourceError(f"dataset '{dataset.name}' cannot be read from {dataset.location}: {exc}") from exc
    objects = manifest["objects"]
    if dataset.layout == "files":
        def copy(name: str) -> None:
            part = folder / f".{hashlib.sha1(name.encode()).hexdigest()}.{os.getpid()}.checking"
            try:
                with source.open(name) as src:
                    reader = _Hashing(src)
                    write_atomically(part, reader)
                if reader.hexdigest() != objects[name]["sha256"]:
                    raise _changed(dataset, source, name)
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, folder / name)
            finally:
                part.unlink(missing_ok=True)

        with ThreadPoolExecutor(max_workers=READERS) as pool:
            list(pool.map(copy, wanted))
        return []
    by_shard: dict[str, set[str]] = {}
    for image_id in wanted:
        shard = manifest["members"][image_id][0]
        by_shard.setdefault(shard, set()).add(image_id[len(shard) + 1:])

    def read_shard(shard: str) -> str:
        names = by_shard[shard]
        with tempfile.TemporaryDirectory(dir=folder, prefix=".shard-") as tmp, source.open(shard) as raw:
            reader = _Hashing(raw)
            try:
                with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tf:
                    for member in tf:
                        if member.isfile() and (name := safe_member_name(member.name)) in names:
                            write_atomically(Path(tmp) / name, tf.extractfile(member))
                reader.drain()
            except (tarfile.TarError, EOFError, zlib.error, DatasetRejected) as exc:
                raise _changed(dataset, source, shard) from exc
            if reader.hexdigest() != objects[shard]["sha256"]:
                raise _changed(dataset, source, shard)
            for name in names:
                (folder / shard / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / name, folder / shard / name)
        return shard

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(READERS, 4)) as pool:
        return list(pool.map(read_shard, sorted(by_shard)))


def read_image(dataset, image_id: str) -> bytes:
    """One image's bytes, for a thumbnail or a heatmap's background: a file, or the member's bytes read from its
    shard by range; checked against the manifest as a worker's copy is, so a page never shows an image that is
    not the one registered (and audited). Raises SourceError when it changed or is gone."""
    source = open_source(dataset.source, dataset.location)
    manifest = read_manifest(dataset)
    if dataset.layout == "files":
        with source.open(image_id) as fh:
            data = fh.read(manifest["objects"][image_id]["size"] + 1)
        if hashlib.sha256(data).hexdigest() != manifest["objects"][image_id]["sha256"]:
            raise _changed(dataset, source, image_id)
        return data
    shard, offset, size, *digest = manifest["members"][image_id]
    if not digest:  # registered before members carried their digest: the whole shard must be the registered one
        with source.open(shard) as raw:
            reader = _Hashing(raw)
            reader.drain()
        if reader.hexdigest() != manifest["objects"][shard]["sha256"]:
            raise _changed(dataset, source, shard)
    data = source.read_range(shard, offset, size)
    if digest and hashlib.sha256(data).hexdigest() != digest[0]:
        raise _changed(dataset, source, shard)
    return data
