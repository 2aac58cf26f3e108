"""Registering models, probes and datasets: validate first, then store, all or nothing."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from workers.engine import jsonsafe
from workers.engine import registration as engine
from workers.engine.errors import EngineError

from .archives import DatasetRejected, Limits, extract, validate
from .models import (SAE_FILES, ClipModel, Dataset, DatasetLayout, DatasetPurpose, DatasetSource, Probe,
                     SparseAutoencoder)


# An open_clip model config is a few hundred bytes (the largest built-in one about 1.5 KB); a larger upload is not
# one, and is refused before it is parsed.
MAX_MODEL_CONFIG_BYTES = 100_000


class RegistrationError(Exception):
    """Input that cannot be registered; the message says what is wrong and what to do, and never where the server
    keeps things (see :func:`without_server_paths`): every refusal a user sees passes through here."""

    def __init__(self, message: str, field: str | None = None):
        message = without_server_paths(message)
        super().__init__(message)
        self.message = message
        self.field = field


def _server_folders() -> list[str]:
    """The folders whose paths a message must not show: temporary files, the media store, the code, the Python
    environment and the model caches, longest first (so the most specific one is replaced)."""
    import sys

    folders = {tempfile.gettempdir(), str(settings.MEDIA_ROOT), str(settings.BASE_DIR), sys.prefix,
               sys.base_prefix, settings.MODEL_CACHE_DIR or "", os.environ.get("HF_HOME", "")}
    folders |= {os.path.realpath(f) for f in folders if f}
    return sorted((f.rstrip("/") for f in folders if len(f.rstrip("/")) > 1), key=len, reverse=True)


def without_server_paths(message: str) -> str:
    """``message`` with each path under a server folder (:func:`_server_folders`) cut to its file name: "/tmp/
    tmpab12/images/x.png is not ..." reads "x.png is not ...", a folder itself "a server folder". A path inside
    the folders open for datasets by reference (DATASET_ROOTS) is one the user gave, and is kept."""
    given = [os.path.normpath(r) for r in settings.DATASET_ROOTS]

    def cut(match) -> str:
        path = match.group(0).rstrip("/")
        if any(path == r or path.startswith(r + "/") for r in given):
            return match.group(0)
        return "a server folder" if path in folders else path.rsplit("/", 1)[-1]

    folders = _server_folders()
    for folder in folders:
        message = re.sub(re.escape(folder) + r"(?:/[^\s'\",;:()\[\]]*)?", cut, message)
    return message


def read_json_upload(data):
    """The JSON value of an uploaded .json file or of text (anything else is returned as it is), refused before
    it is parsed when too large to be a model config or a class list, and when nested too deeply to parse.

    One reader for the API's upload fields and the web form: raises RegistrationError (its message only).
    """
    size = getattr(data, "size", None) if hasattr(data, "read") else len(data) if isinstance(data, str) else None
    if size is not None and size > MAX_MODEL_CONFIG_BYTES:
        raise RegistrationError(f"{size} bytes of JSON; at most {MAX_MODEL_CONFIG_BYTES} are accepted here (an "
                                "open_clip model config is a few hundred)")
    try:
        if hasattr(data, "read"):
            data.seek(0)
            return jsonsafe.loads(data.read(), what="the JSON")
        return jsonsafe.loads(data, what="the JSON") if isinstance(data, str) else data
    except jsonsafe.JSONLimitError as exc:
        raise RegistrationError(str(exc)) from None


def sha256_of(fileobj) -> str:
    digest = hashlib.sha256()
    fileobj.seek(0)
    for chunk in iter(lambda: fileobj.read(1 << 20), b""):
        digest.update(chunk)
    fileobj.seek(0)
    return digest.hexdigest()


def spool_upload(upload, suffix: str, folder: Path) -> tuple[Path, str]:
    """Write an uploaded file to a private temporary path (the engine reads paths); returns it and its sha256.

    The hash is taken while copying, so a large checkpoint or archive is read once, not twice.
    """
    name = Path(upload.name or "").name  # the user's file name, so messages speak of the file they sent
    if not name or name.startswith(".") or not name.lower().endswith(suffix):
        name = f"{name or 'upload'}{suffix}"
    path = folder / name
    digest = hashlib.sha256()
    upload.seek(0)
    with open(path, "wb") as out:
        for chunk in iter(lambda: upload.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    upload.seek(0)
    return path, digest.hexdigest()


def _save_with_file(record, field_file, upload) -> None:
    """Store ``upload`` in ``field_file`` and save ``record``; a failed save leaves no stored file behind."""
    with transaction.atomic():
        if upload is not None:
            field_file.save(Path(upload.name).name, File(upload), save=False)
        try:
            record.save()
        except Exception:
            if field_file:
                field_file.delete(save=False)
            raise


def check_upload_size(upload, what: str, field: str = "file") -> None:
    if upload.size is not None and upload.size > settings.MAX_UPLOAD_BYTES:
        raise RegistrationError(f"the {what} is {upload.size} bytes, over the upload limit of "
                                f"{settings.MAX_UPLOAD_BYTES} (MAX_UPLOAD_BYTES)", field=field)


# --------------------------------------------------------------------------- models

def _billions(n: int) -> str:
    return f"{n / 1e9:.1f} billion" if n >= 1e8 else f"{n:,}"


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def size_model(architecture: str | None, model_config: dict | None):
    """The model's :class:`~workers.engine.model_config.ModelSize`, counted from its config (nothing is built),
    or a refusal naming the config key of the wrong type or the setting the model exceeds."""
    field = "model_config" if model_config is not None else "architecture"
    if model_config is None:
        model_config = engine.model_config_of(architecture)
        if model_config is None:
            raise RegistrationError(f"unknown OpenCLIP architecture '{architecture}'", field="architecture")
    try:
        size = engine.size_model(model_config, builtin=field == "architecture")
    except EngineError as exc:
        message = exc.message if field == "model_config" else f"architecture {architecture}: {exc.message}"
        raise RegistrationError(message, field=field) from exc
    bounds = (("vision_cfg.layers", size.vision_layers, "MODEL_MAX_LAYERS"),
              ("text_cfg.layers", size.text_layers, "MODEL_MAX_LAYERS"),
              ("vision_cfg.width", size.vision_width, "MODEL_MAX_WIDTH"),
              ("text_cfg.width", size.text_width, "MODEL_MAX_WIDTH"),
              ("vision_cfg.image_size", size.image_size, "MODEL_MAX_IMAGE_SIZE"),
              ("the patches per image (image_size / patch_size, squared)", size.image_tokens - 1,
               "MODEL_MAX_PATCHES"),
              ("text_cfg.context_length", size.context_length, "MODEL_MAX_CONTEXT_LENGTH"))
    for what, value, setting in bounds:
        limit = getattr(settings, setting)
        if value > limit:
            raise RegistrationError(f"{what} is {value}, over the limit of {limit} ({setting}); this service "
                                    "does not build models that large", field=field)
    if size.parameters > settings.MODEL_MAX_PARAMETERS:
        raise RegistrationError(
            f"the model has {_billions(size.parameters)} parameters (about {_bytes(size.float32_bytes)} in "
            f"float32), over the limit of {_billions(settings.MODEL_MAX_PARAMETERS)} (MODEL_MAX_PARAMETERS); "
            "check the config's widths, layers and vocab_size", field=field)
    return size


def _check_layer_and_token(size, layer: int, token: str, config: dict, field: str = "architecture") -> None:
    refusal = engine.layer_and_token_refusal(size, layer, token, config)
    if refusal:  # the text side builds the zero-shot head and the labels (docs/engine.md: "Supported architectures")
        at, message = refusal
        raise RegistrationError(message, field=field if at == "config" else at)


def register_model(*, project, user, name: str, architecture: str = "", pretrained_tag: str = "",
                   checkpoint=None, model_config: dict | None = None, layer: int = -1,
                   token: str = "cls") -> ClipModel:
    if model_config is not None and architecture:
        raise RegistrationError("give an architecture name or a model config, not both", field="model_config")
    if not architecture and model_config is None:
        raise RegistrationError("name an OpenCLIP architecture (e.g. ViT-B-32) or upload a model config",
                                field="architecture")
    if engine.is_hub_name(architecture):
        return _register_hub_model(project=project, user=user, name=name, architecture=architecture,
                                   pretrained_tag=pretrained_tag, checkpoint=checkpoint, layer=layer, token=token)
    if pretrained_tag and checkpoint is not None:
        raise RegistrationError("give a pretrained tag or a checkpoint file, not both", field="checkpoint")
    if not pretrained_tag and checkpoint is None:
        raise RegistrationError("the model needs weights: a pretrained tag or a checkpoint file", field="checkpoint")
    if pretrained_tag and model_config is not None:
        raise RegistrationError("pretrained tags belong to built-in architectures; a custom config needs a "
                                "checkpoint file", field="pretrained_tag")
    size = size_model(architecture or None, model_config)
    n_blocks = size.vision_layers
    _check_layer_and_token(size, layer, token,
                           model_config if model_config is not None else engine.model_config_of(architecture),
                           field="model_config" if model_config is not None else "architecture")
    sha = ""
    if pretrained_tag:
        refusal = engine.pretrained_tag_refusal(architecture, pretrained_tag)
        if refusal:
            raise RegistrationError(refusal, field="pretrained_tag")
        sha = _weights_digest(architecture, pretrained_tag, field="pretrained_tag")
    else:
        check_upload_size(checkpoint, "checkpoint")
        suffix = Path(checkpoint.name).suffix.lower()
        with tempfile.TemporaryDirectory() as tmp:
            path, sha = spool_upload(checkpoint, suffix, Path(tmp))
            try:
                engine.check_checkpoint(architecture or None, path, model_config)
            except EngineError as exc:
                raise RegistrationError(exc.message, field="checkpoint") from exc
    clip_model = ClipModel(project=project, name=name, architecture=architecture, pretrained_tag=pretrained_tag,
                           checkpoint_sha256=sha, model_config=model_config, layer=layer, token=token,
                           created_by=user, embed_dim=size.embed_dim, n_blocks=n_blocks, width=size.vision_width)
    _save_with_file(clip_model, clip_model.checkpoint, checkpoint)
    return clip_model


def _weights_digest(architecture: str, pretrained_tag: str = "", *, field: str) -> str:
    """The SHA-256 of the weights a tag or an hf-hub: name resolves to (from MODEL_CACHE_DIR, downloaded when
    online): the registration records exactly which weights its audits use."""
    try:
        path = engine.weights_file(architecture, pretrained_tag, settings.MODEL_CACHE_DIR)
    except EngineError as exc:
        raise RegistrationError(exc.message, field=field) from exc
    with open(path, "rb") as fh:
        return sha256_of(fh)


def _register_hub_model(*, project, user, name: str, architecture: str, pretrained_tag: str, checkpoint,
                        layer: int, token: str) -> ClipModel:
    """An open_clip model from the Hugging Face hub (hf-hub:ORG/NAME): its config and weights come from the model
    cache (downloaded when online); the registration records the weights' digest."""
    if pretrained_tag or checkpoint is not None:
        raise RegistrationError(f"{architecture} brings its own weights: give no pretrained tag or checkpoint",
                                field="architecture")
    try:
        config = engine.hub_model_config(architecture, settings.MODEL_CACHE_DIR)
    except EngineError as exc:
        raise RegistrationError(exc.message, field="architecture") from exc
    size = size_model(None, config)
    _check_layer_and_token(size, layer, token, config)
    sha = _weights_digest(architecture, field="architecture")
    clip_model = ClipModel(project=project, name=name, architecture=architecture, checkpoint_sha256=sha,
                           layer=layer, token=token, created_by=user, embed_dim=size.embed_dim,
                           n_blocks=size.vision_layers, width=size.vision_width)
    clip_model.save()
    return clip_model


# --------------------------------------------------------------------------- SAEs trained elsewhere

def register_sae(*, project, user, name: str, clip_model: ClipModel, format: str, config, weights
                 ) -> SparseAutoencoder:
    """Register an SAE trained elsewhere (``config`` and ``weights`` uploads, in ``format``) for ``clip_model``'s
    registered layer and token: it must read that layer's width, and a SAELens config naming any hook but the
    residual stream after the audited block is refused. The files are stored under the names the format gives
    them; a refusal stores nothing."""
    if clip_model.project_id != project.id:
        raise RegistrationError("the model belongs to another project", field="clip_model")
    if format not in SAE_FILES:
        raise RegistrationError(f"format must be one of {', '.join(SAE_FILES)}, got {format!r}", field="format")
    config_name, weights_name = SAE_FILES[format]
    for upload, what, field in ((config, "SAE config", "config"), (weights, "SAE weights", "weights")):
        if upload is None:
            raise RegistrationError(f"upload the {what} ({config_name if field == 'config' else weights_name})",
                                    field=field)
        check_upload_size(upload, what, field=field)
    config_value = _read_sae_config(config, config_name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / config_name).write_text(json.dumps(config_value))
        path, sha = spool_upload(weights, ".safetensors", folder)
        if path.name != weights_name:
            path.rename(folder / weights_name)
        description, sae = _check_sae(folder, format, clip_model)
        prefix = f"projects/{project.pk}/saes/{uuid.uuid4().hex}"
        stored = []
        try:
            with transaction.atomic():
                for file_name in (config_name, weights_name):
                    with open(folder / file_name, "rb") as fh:
                        stored.append(default_storage.save(f"{prefix}/{file_name}", File(fh)))
                record = SparseAutoencoder.objects.create(
                    project=project, clip_model=clip_model, name=name, format=format, storage_prefix=prefix,
                    sha256=sha, d_model=sae.d_model, n_latents=sae.n_latents, k=sae.k,
                    description=description.to_dict(), created_by=user)
        except Exception:
            for key in stored:
                default_storage.delete(key)
            raise
    return record


def _read_sae_config(upload, config_name: str) -> dict:
    """The JSON object of an uploaded SAE config, read with the bounded JSON reader: an integer of thousands of
    digits, NaN or deep nesting is a refusal naming the file, like malformed JSON."""
    upload.seek(0)
    data = upload.read(MAX_MODEL_CONFIG_BYTES + 1)
    upload.seek(0)
    if len(data) > MAX_MODEL_CONFIG_BYTES:
        raise RegistrationError(f"the SAE config {config_name} is over {MAX_MODEL_CONFIG_BYTES} bytes, the most "
                                "accepted (SAELens' cfg.json is a few kilobytes)", field="config")
    try:
        value = jsonsafe.loads(data, what=f"the SAE config {config_name}")
    except jsonsafe.JSONLimitError as exc:
        raise RegistrationError(str(exc), field="config") from None
    if not isinstance(value, dict):
        raise RegistrationError(f"the SAE config {config_name} is not a JSON object", field="config")
    return value


def _check_sae(folder: Path, format: str, clip_model: ClipModel):
    """(description, SAE) of the files in ``folder``, or a refusal naming the field (``engine.check_sae``: every
    size the config claims is checked before anything is allocated)."""
    block = clip_model.layer if clip_model.layer >= 0 else clip_model.n_blocks + clip_model.layer
    target = engine.SAETarget(
        width=clip_model.width, block=block, where=f"block {clip_model.layer} of model '{clip_model.name}'",
        layer_name=f"the audited layer of model '{clip_model.name}' (layer {clip_model.layer})",
        max_latents=settings.SAE_MAX_LATENTS)
    try:
        return engine.check_sae(folder, format, target)
    except engine.SAERefused as exc:
        raise RegistrationError(exc.message, field=exc.field) from exc


# --------------------------------------------------------------------------- probes

def register_probe(*, project, user, name: str, clip_model: ClipModel, file, class_names: list | None = None,
                   normalization: str | None = None) -> Probe:
    if clip_model.project_id != project.id:
        raise RegistrationError("the model belongs to another project", field="clip_model")
    check_upload_size(file, "probe")
    suffix = Path(file.name).suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise RegistrationError(f"probe files must be .npz or .safetensors, got '{suffix or file.name}'", field="file")
    with tempfile.TemporaryDirectory() as tmp:
        path, sha = spool_upload(file, suffix, Path(tmp))
        try:
            probe = engine.check_probe(path, class_names=class_names, normalization=normalization,
                                       embed_dim=clip_model.embed_dim)
        except EngineError as exc:
            raise RegistrationError(exc.message, field="file") from exc
    record = Probe(project=project, clip_model=clip_model, name=name, sha256=sha,
                   class_names=probe.class_names, normalization=probe.normalization, embed_dim=probe.embed_dim,
                   created_by=user)
    _save_with_file(record, record.file, file)
    return record


def add_probe_version(parent: Probe, path: Path, *, note: str, user) -> Probe:
    """Register the probe file at ``path`` (made from ``parent``, e.g. corrected) as the next version of
    ``parent``: the same model, classes and normalization, named "<first version's name> v<n> (<note>)".

    Called inside the caller's transaction. The file is stored before the row and removed if the row is not
    written; a caller whose transaction fails later removes ``probe.file`` itself."""
    root = parent
    while root.parent_id:
        root = root.parent
    version = parent.version + 1  # a version of the probe it was made from (several corrections: siblings)
    with open(path, "rb") as fh:
        digest = sha256_of(fh)
    probe = Probe(project=parent.project, clip_model=parent.clip_model, name=f"{root.name} v{version} ({note})",
                  sha256=digest, class_names=parent.class_names, normalization=parent.normalization,
                  embed_dim=parent.embed_dim, parent=parent, version=version, created_by=user)
    with open(path, "rb") as fh:
        probe.file.save(path.name, File(fh), save=False)
    try:
        probe.save()
    except Exception:
        probe.file.storage.delete(probe.file.name)
        raise
    return probe


# --------------------------------------------------------------------------- datasets

def dataset_limits(project=None) -> Limits:
    """The service's dataset limits, or the project's where an admin set stricter ones."""
    files, size = settings.MAX_DATASET_IMAGES, settings.MAX_DATASET_BYTES
    source = "MAX_DATASET_IMAGES / MAX_DATASET_BYTES"
    if project is not None and (project.max_dataset_images or project.max_dataset_bytes):
        files = min(files, project.max_dataset_images or files)
        size = min(size, project.max_dataset_bytes or size)
        source = f"the dataset limit of project '{project.name}'"
    return Limits(max_files=files, max_total_bytes=size, max_image_pixels=settings.MAX_IMAGE_PIXELS, source=source,
                  max_members=settings.MAX_ARCHIVE_MEMBERS)


def register_dataset(*, project, user, name: str, archive, purpose: str = DatasetPurpose.AUDIT) -> Dataset:
    """Validate an uploaded archive completely, then copy its images into storage and create the row.

    ``purpose`` "sae_training": the images only train audits' SAEs, so labels are optional (an archive of
    images alone is accepted). Extra labels.csv columns with few distinct values are kept as metadata.

    If anything fails, the files already copied are deleted: a refused or
    broken upload leaves no row and no file behind.
    """
    if purpose not in DatasetPurpose.values:
        raise RegistrationError(f"purpose must be one of {', '.join(DatasetPurpose.values)}", field="purpose")
    check_upload_size(archive, "dataset archive")
    prefix = f"projects/{project.id}/datasets/{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, sha = spool_upload(archive, ".upload", tmp)
        root = tmp / "files"
        try:
            limits = dataset_limits(project)
            extract(path, root, limits)
            checked = validate(root, limits, require_labels=purpose == DatasetPurpose.AUDIT)
        except DatasetRejected as exc:
            raise RegistrationError(str(exc), field="archive") from exc
        stored: list[str] = []
        try:
            for rel, _label in checked.images:
                with open(root / rel, "rb") as fh:
                    stored.append(default_storage.save(f"{prefix}/images/{rel}", File(fh)))
            keys = [key[len(prefix) + len("/images/"):] for key in stored]
            return _store_dataset(checked, keys, stored, project=project, name=name, sha256=sha, storage_prefix=prefix,
                                  purpose=purpose, created_by=user)
        except Exception:
            for key in stored:
                default_storage.delete(key)
            raise


def _store_dataset(checked, keys: list[str], stored: list[str], files: dict | None = None, **fields) -> Dataset:
    """Write the canonical labels.csv (``keys``: the images' ids, in ``checked.images``' order) and ``files``
    (name -> bytes) under the dataset's storage prefix, then create the row; ``stored`` collects what was written,
    for the caller to delete when this fails."""
    prefix, columns = fields["storage_prefix"], list(checked.metadata)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "label", *columns])
    for i, ((_rel, label), key) in enumerate(zip(checked.images, keys)):
        writer.writerow([key, label, *(checked.metadata[c][i] for c in columns)])
    for file_name, data in {"labels.csv": buf.getvalue().encode(), **(files or {})}.items():
        stored.append(default_storage.save(f"{prefix}/{file_name}", ContentFile(data)))
    with transaction.atomic():
        return Dataset.objects.create(n_images=len(checked.images), class_names=checked.class_names,
                                      class_counts=checked.class_counts, total_bytes=checked.total_bytes,
                                      metadata_columns=columns, **fields)


def add_dataset(*, project, user, name: str, source: str = DatasetSource.UPLOAD, archive=None, location: str = "",
                layout: str = "auto", purpose: str = DatasetPurpose.AUDIT) -> Dataset:
    """An uploaded ``archive`` (``source`` "upload") or images read where they are (``source`` "s3" or "folder",
    ``location``, ``layout``): the one entry of the API and the web form, which refuses giving both or neither."""
    if source == DatasetSource.UPLOAD:
        if location:
            raise RegistrationError("a location is read by reference: give source s3 or folder with it",
                                    field="source")
        if archive is None:
            raise RegistrationError("upload an archive of the images, or register them by reference (source s3 or "
                                    "folder, and location)", field="archive")
        return register_dataset(project=project, user=user, name=name, archive=archive, purpose=purpose)
    if archive is not None:
        raise RegistrationError("give an archive to upload or a location to read by reference, not both",
                                field="archive")
    return register_dataset_by_reference(project=project, user=user, name=name, source=source, location=location,
                                         layout=layout, purpose=purpose)


def register_dataset_by_reference(*, project, user, name: str, source: str, location: str, layout: str = "auto",
                                  purpose: str = DatasetPurpose.AUDIT) -> Dataset:
    """Register images that stay where they are: ``source`` "s3" (a prefix of the media store's bucket) or
    "folder" (under DATASET_ROOTS), ``layout`` "files", "webdataset" or "auto" (shards when every file is a
    .tar). They are read once, a file or a shard at a time, with an upload's checks and messages; only the
    canonical labels.csv and the manifest (``registry.references``) are stored. A refusal stores nothing."""
    from . import references

    if purpose not in DatasetPurpose.values:
        raise RegistrationError(f"purpose must be one of {', '.join(DatasetPurpose.values)}", field="purpose")
    if layout not in ("auto", *DatasetLayout.values):
        raise RegistrationError(f"layout must be auto, {' or '.join(DatasetLayout.values)}, got {layout!r}",
                                field="layout")
    require_labels = purpose == DatasetPurpose.AUDIT
    try:
        where = references.open_source(source, location)
        limits = dataset_limits(project)
        limits.where = where.describe()
        listing = where.list(limits)
        if layout == "auto":
            layout = references.guess_layout(listing)
        members = None
        if layout == DatasetLayout.WEBDATASET:
            checked, objects, members = references.check_shards(where, listing, limits, require_labels)
        else:
            checked, objects = references.check_files(where, listing, limits, require_labels)
    except DatasetRejected as exc:
        raise RegistrationError(str(exc), field="location") from exc
    except references.SourceError as exc:
        raise RegistrationError(f"{exc}; nothing was registered", field="location") from exc
    except OSError as exc:  # a file the listing showed, unreadable to the service
        raise RegistrationError(f"{exc.filename or 'a file'} cannot be read ({exc.strerror}); the service must be "
                                "able to read every file of a dataset", field="location") from exc
    manifest = {"source": source, "location": where.location, "layout": layout, "objects": objects,
                **({"members": members} if members is not None else {})}
    data = json.dumps(manifest, sort_keys=True).encode()
    prefix = f"projects/{project.id}/datasets/{uuid.uuid4().hex}"
    stored: list[str] = []
    try:
        return _store_dataset(checked, [rel for rel, _ in checked.images], stored, {"manifest.json": data},
                              project=project, name=name, sha256=hashlib.sha256(data).hexdigest(),
                              storage_prefix=prefix, purpose=purpose, created_by=user, source=source,
                              location=where.location, layout=layout)
    except Exception:
        for key in stored:
            default_storage.delete(key)
        raise
