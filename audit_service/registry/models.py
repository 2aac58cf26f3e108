"""What a project registers before an audit: CLIP models, linear probes, datasets."""
from __future__ import annotations

import csv
import io
import uuid

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import models

from audit_service.projects.models import Project


def _upload_path(instance, kind: str, filename: str) -> str:
    return f"projects/{instance.project_id}/{kind}/{uuid.uuid4().hex}/{filename}"


def upload_checkpoint(instance, filename: str) -> str:
    return _upload_path(instance, "models", filename)


def upload_probe(instance, filename: str) -> str:
    return _upload_path(instance, "probes", filename)


class TokenType(models.TextChoices):
    CLS = "cls", "CLS token"
    SPATIAL = "spatial", "every patch token"


class ClipModel(models.Model):
    """An OpenCLIP model: architecture + pretrained tag, architecture + checkpoint, or config + checkpoint."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="clip_models")
    name = models.CharField(max_length=200)
    architecture = models.CharField(max_length=100, blank=True)
    pretrained_tag = models.CharField(max_length=100, blank=True)
    checkpoint = models.FileField(upload_to=upload_checkpoint, blank=True, max_length=500)
    checkpoint_sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    model_config = models.JSONField(null=True, blank=True)
    layer = models.IntegerField(default=-1)
    token = models.CharField(max_length=10, choices=TokenType.choices, default=TokenType.CLS)
    embed_dim = models.PositiveIntegerField()
    n_blocks = models.PositiveIntegerField()
    width = models.PositiveIntegerField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name

    @property
    def source(self) -> str:
        if self.architecture.startswith("hf-hub:"):
            return f"{self.architecture} (Hugging Face hub)"
        if self.pretrained_tag:
            return f"{self.architecture} / {self.pretrained_tag}"
        if self.model_config is not None:
            return "custom config + checkpoint"
        return f"{self.architecture} + checkpoint"


class Normalization(models.TextChoices):
    L2 = "l2", "L2-normalized embedding"
    NONE = "none", "raw embedding"


class Probe(models.Model):
    """A linear probe on a registered model's image embeddings (weights as .npz or .safetensors)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="probes")
    clip_model = models.ForeignKey(ClipModel, on_delete=models.CASCADE, related_name="probes")
    name = models.CharField(max_length=200)
    file = models.FileField(upload_to=upload_probe, max_length=500)
    sha256 = models.CharField(max_length=64, db_index=True)
    class_names = models.JSONField()
    normalization = models.CharField(max_length=10, choices=Normalization.choices, default=Normalization.L2)
    embed_dim = models.PositiveIntegerField()
    # lineage: a corrected probe is a version of the probe it was made from (audits.Correction.new_probe says
    # from which audit, flags, method and options)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="versions")
    version = models.PositiveIntegerField(default=1)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name


class DatasetPurpose(models.TextChoices):
    AUDIT = "audit", "audit (labelled images)"
    SAE_TRAINING = "sae_training", "SAE training (labels not needed)"


class DatasetSource(models.TextChoices):
    UPLOAD = "upload", "uploaded archive (images stored by the service)"
    S3 = "s3", "a prefix of the media store's S3 bucket (by reference)"
    FOLDER = "folder", "a server folder an admin allowed (by reference, DATASET_ROOTS)"


class DatasetLayout(models.TextChoices):
    FILES = "files", "image files (+ labels.csv or one folder per class)"
    WEBDATASET = "webdataset", "WebDataset .tar shards (a .cls or .json label per sample)"


class Dataset(models.Model):
    """Images, validated, with a canonical ``labels.csv`` (``image,label`` and the metadata columns) under
    ``storage_prefix``.

    An uploaded dataset's images are stored there too (``images/``). A dataset registered by reference keeps its
    images where they are (``source`` and ``location``: an S3 prefix or a server folder, in ``layout``), and
    ``storage_prefix`` holds a ``manifest.json`` beside labels.csv: each file's or shard's size and SHA-256, which
    workers check when they copy what they need (``registry.references``).

    An audit dataset is labelled with at least two classes; an SAE-training dataset may be unlabelled (its
    labels are "", ``class_names`` empty) and only trains an audit's SAE.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    sha256 = models.CharField(max_length=64, db_index=True)
    storage_prefix = models.CharField(max_length=300, unique=True)
    n_images = models.PositiveIntegerField()
    class_names = models.JSONField()
    class_counts = models.JSONField()
    total_bytes = models.BigIntegerField(default=0)
    purpose = models.CharField(max_length=20, choices=DatasetPurpose.choices, default=DatasetPurpose.AUDIT)
    # labels.csv columns kept besides image and label (e.g. "a ruler" 0/1, "site"), in the CSV's order
    metadata_columns = models.JSONField(default=list, blank=True)
    source = models.CharField(max_length=10, choices=DatasetSource.choices, default=DatasetSource.UPLOAD)
    location = models.CharField(max_length=1000, blank=True)  # by reference: the S3 key prefix or the folder
    layout = models.CharField(max_length=20, choices=DatasetLayout.choices, default=DatasetLayout.FILES)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name

    @property
    def by_reference(self) -> bool:
        return self.source != DatasetSource.UPLOAD

    @property
    def where(self) -> str:
        """Where the images are, in words."""
        layout = "WebDataset shards" if self.layout == DatasetLayout.WEBDATASET else "image files"
        if self.source == DatasetSource.S3:
            return f"S3 prefix {self.location}/, {layout}"
        if self.source == DatasetSource.FOLDER:
            return f"folder {self.location}, {layout}"
        return "uploaded"

    def table(self) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
        """From the stored labels.csv: (image key relative to the dataset's images/ folder, label) pairs, and
        metadata column -> one value per image in the same order."""
        with default_storage.open(f"{self.storage_prefix}/labels.csv", "rb") as fh:
            rows = list(csv.reader(io.StringIO(fh.read().decode())))
        header, body = rows[0], rows[1:]
        where = {c: header.index(c) for c in self.metadata_columns if c in header}
        metadata = {c: [r[i] for r in body] for c, i in where.items()}
        return [(r[0], r[1]) for r in body], metadata

    def labels(self) -> list[tuple[str, str]]:
        """(image key relative to the dataset's images/ folder, label) pairs from the stored labels.csv."""
        return self.table()[0]


class SAEFormat(models.TextChoices):
    OURS = "ours", "this service's (sae.json + sae.safetensors)"
    SAE_LENS = "sae_lens", "SAELens (cfg.json + sae_weights.safetensors)"


# the files of each format, under the names the format gives them (config, weights)
SAE_FILES = {SAEFormat.OURS: ("sae.json", "sae.safetensors"),
             SAEFormat.SAE_LENS: ("cfg.json", "sae_weights.safetensors")}


class SparseAutoencoder(models.Model):
    """An SAE trained elsewhere, registered for a model's layer and token: an audit may use it instead of training
    one. Its two files sit under ``storage_prefix`` with the names its format gives them (``SAE_FILES``)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="saes")
    clip_model = models.ForeignKey(ClipModel, on_delete=models.CASCADE, related_name="saes")
    name = models.CharField(max_length=200)
    format = models.CharField(max_length=20, choices=SAEFormat.choices)
    storage_prefix = models.CharField(max_length=300, unique=True)
    sha256 = models.CharField(max_length=64, db_index=True)  # of the weights file
    d_model = models.PositiveIntegerField()
    n_latents = models.PositiveIntegerField()
    k = models.PositiveIntegerField()
    description = models.JSONField(default=dict, blank=True)  # what its config says (hook, model name, ...)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name

    def file_keys(self) -> dict[str, str]:
        """File name -> storage key."""
        return {name: f"{self.storage_prefix}/{name}" for name in SAE_FILES[self.format]}
