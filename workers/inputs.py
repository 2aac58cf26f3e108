"""Turning stored registrations into what the engine reads: local files, a ClipBundle, a probe, images."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage

from audit_service.registry import references
from workers.engine.data import ImageFiles
from workers.engine.heads import LinearProbe
from workers.engine.errors import EngineError
from workers.engine.loading import HF_HUB_PREFIX, load_clip, weights_file


def local_path(field_file, sha256: str = "") -> Path:
    """A local path for a stored file: the file itself on disk storage, else a cached download."""
    try:
        return Path(field_file.path)
    except NotImplementedError:  # remote storage (S3): download once per worker
        key = sha256 or hashlib.sha256(field_file.name.encode()).hexdigest()
        target = settings.AUDIT_WORK_DIR / "cache" / key / Path(field_file.name).name
        if not target.exists():
            with field_file.open("rb") as src:
                references.write_atomically(target, src)
        return target


def dataset_folder(dataset, only: list[str] | None = None) -> Path:
    """A local folder with the dataset's images/: the store's own folder on local storage; with remote storage
    (S3), or for a dataset registered by reference, a per-worker cache, filled with every image, or with the images
    in ``only`` (a worker extracting one shard of a sharded audit fetches that shard's images, not the dataset;
    for WebDataset shards, the shards that hold them)."""
    if not dataset.by_reference:
        try:
            return Path(default_storage.path(dataset.storage_prefix))
        except NotImplementedError:
            pass
    target = settings.AUDIT_WORK_DIR / "cache" / f"dataset-{dataset.sha256}-{dataset.pk}"
    done = target / ".complete"
    if done.exists():
        return target
    wanted = [rel for rel, _ in dataset.labels()] if only is None else only
    missing = [rel for rel in wanted if not (target / "images" / rel).exists()]
    if dataset.by_reference:
        if missing:
            try:
                shards = references.fetch(dataset, target / "images", missing)
            except references.SourceError as exc:
                raise EngineError(str(exc)) from exc
            for shard in shards:  # which shards this worker read, for whoever looks at its cache
                (target / "shards" / shard).parent.mkdir(parents=True, exist_ok=True)
                (target / "shards" / shard).touch()
    else:
        def fetch(rel: str) -> None:
            with default_storage.open(f"{dataset.storage_prefix}/images/{rel}", "rb") as src:
                references.write_atomically(target / "images" / rel, src)

        with ThreadPoolExecutor(max_workers=8) as pool:  # object stores answer many small reads in parallel
            list(pool.map(fetch, missing))
    if only is None:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
    return target


def load_model(clip_model):
    """The registered model as a ClipBundle. A pretrained tag's or hf-hub: model's weights come from
    MODEL_CACHE_DIR and must be the ones the registration recorded."""
    m = clip_model
    if m.pretrained_tag or m.architecture.startswith(HF_HUB_PREFIX):
        if m.checkpoint_sha256:
            path = weights_file(m.architecture, m.pretrained_tag, settings.MODEL_CACHE_DIR)
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if digest != m.checkpoint_sha256:
                raise EngineError(f"the weights of {m.source} in the model cache ({path}) are not the ones registered "
                                  f"(SHA-256 {digest[:12]}..., registered {m.checkpoint_sha256[:12]}...): the "
                                  "repository or the cache changed; register the model again to audit these weights")
        return load_clip(m.architecture, pretrained=m.pretrained_tag or None, cache_dir=settings.MODEL_CACHE_DIR)
    return load_clip(m.architecture or None, checkpoint=local_path(m.checkpoint, m.checkpoint_sha256),
                     model_config=m.model_config)


def load_probe(probe) -> LinearProbe:
    """The registered probe."""
    return LinearProbe.load(local_path(probe.file, probe.sha256), class_names=probe.class_names,
                            normalization=probe.normalization)


def dataset_images(dataset, fetch_images: bool = True) -> ImageFiles:
    """A labelled dataset's images, with its metadata columns (``fetch_images``: see :func:`load_inputs`)."""
    folder = dataset_folder(dataset, None if fetch_images else [])
    rows, metadata = dataset.table()
    classes = list(dataset.class_names)
    return ImageFiles([folder / "images" / rel for rel, _ in rows], [classes.index(lab) for _, lab in rows],
                      classes, ids=[rel for rel, _ in rows], metadata=metadata)


def load_inputs(audit, fetch_images: bool = True):
    """(ClipBundle, LinearProbe, ImageFiles) for an audit; the images carry the dataset's metadata columns.

    ``fetch_images=False``: with remote storage, download no image yet (see :func:`dataset_folder`'s ``only``).
    """
    return load_model(audit.clip_model), load_probe(audit.probe), dataset_images(audit.dataset, fetch_images)


SAE_CLASS = "unlabelled"  # the one class of the images an SAE trains on: their labels do not matter


def load_sae_images(audit):
    """The images of the audit's ``sae_dataset`` (all of them, downloaded with remote storage) as one class,
    or None when the audit trains its SAE on its own dataset."""
    if audit.sae_dataset_id is None:
        return None
    folder = dataset_folder(audit.sae_dataset)
    keys = [rel for rel, _ in audit.sae_dataset.labels()]
    return ImageFiles([folder / "images" / rel for rel in keys], [0] * len(keys), [SAE_CLASS], ids=keys)


def sae_dataset_facts(audit) -> dict | None:
    """What the result says about the dataset its SAE was trained on (None: the audited dataset)."""
    d = audit.sae_dataset
    return None if d is None else {"id": d.pk, "name": d.name, "n_images": d.n_images}


def registered_sae_facts(audit) -> dict | None:
    """What the result says about a registered SAE the audit used instead of training one (None: it trained one)."""
    s = audit.sae
    return None if s is None else {"id": s.pk, "name": s.name, "format": s.format, "sha256": s.sha256}


def load_registered_sae(sae_record, device="cpu"):
    """An SAE registered for the model (``registry.SparseAutoencoder``), read from a per-worker local copy."""
    from workers.engine.sae_formats import load_sae

    folder = settings.AUDIT_WORK_DIR / "cache" / f"sae-{sae_record.sha256}-{sae_record.pk}"
    for name, key in sae_record.file_keys().items():
        if not (folder / name).exists():
            with default_storage.open(key, "rb") as src:
                references.write_atomically(folder / name, src)
    return load_sae(folder, sae_record.format, device=device)
