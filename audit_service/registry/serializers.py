from rest_framework import serializers

from .models import (SAEFormat, SparseAutoencoder, ClipModel, Dataset, DatasetLayout, DatasetPurpose, DatasetSource,
                     Probe, TokenType)
from .services import RegistrationError, read_json_upload


class JSONUploadField(serializers.JSONField):
    """A JSON value sent as a multipart field or an uploaded .json file."""

    def get_value(self, dictionary):
        value = dictionary.get(self.field_name, serializers.empty)
        if hasattr(value, "read") or isinstance(value, str):
            return value  # DRF would wrap form values as JSON strings; parse them here instead
        return super().get_value(dictionary)

    def to_internal_value(self, data):
        try:
            data = read_json_upload(data)
        except RegistrationError as exc:
            raise serializers.ValidationError(exc.message) from exc
        return super().to_internal_value(data)


class ClipModelSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id")
    checkpoint = serializers.FileField(write_only=True, required=False)
    model_config = JSONUploadField(required=False, allow_null=True)
    has_checkpoint = serializers.SerializerMethodField()

    class Meta:
        model = ClipModel
        fields = ["id", "project", "name", "architecture", "pretrained_tag", "checkpoint", "has_checkpoint",
                  "checkpoint_sha256", "model_config", "layer", "token", "embed_dim", "n_blocks", "width",
                  "source", "created_at"]
        read_only_fields = ["id", "checkpoint_sha256", "embed_dim", "n_blocks", "width", "source", "created_at"]
        extra_kwargs = {"token": {"default": TokenType.CLS}, "layer": {"default": -1}}

    def get_has_checkpoint(self, obj) -> bool:
        return bool(obj.checkpoint)


class ProbeSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id")
    clip_model = serializers.IntegerField(source="clip_model_id")
    file = serializers.FileField(write_only=True)
    class_names = JSONUploadField(required=False)
    normalization = serializers.ChoiceField(choices=["l2", "none"], required=False)
    parent = serializers.IntegerField(source="parent_id", read_only=True, allow_null=True,
                                      help_text="the probe this one is a corrected version of (null: uploaded)")
    version = serializers.IntegerField(read_only=True, help_text="1 for an uploaded probe; its parent's + 1")
    correction = serializers.SerializerMethodField(
        help_text="the correction that made this probe (its audit, flags, method and options); null: uploaded")

    class Meta:
        model = Probe
        fields = ["id", "project", "clip_model", "name", "file", "sha256", "class_names", "normalization",
                  "embed_dim", "parent", "version", "correction", "created_at"]
        read_only_fields = ["id", "sha256", "embed_dim", "parent", "version", "correction", "created_at"]

    def get_correction(self, probe) -> int | None:
        made_by = getattr(probe, "made_by", None)  # reverse one-to-one: missing when no correction made it
        return made_by.pk if made_by is not None else None


class DatasetSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id")
    archive = serializers.FileField(write_only=True, required=False, help_text=(
        "a .zip or .tar(.gz) of the images (source upload)"))
    source = serializers.ChoiceField(choices=DatasetSource.choices, default=DatasetSource.UPLOAD, help_text=(
        "upload: the archive is stored by the service; s3 or folder: the images stay at location and are read "
        "from there (by reference)"))
    location = serializers.CharField(required=False, allow_blank=True, max_length=1000, help_text=(
        "by reference: a prefix of the media store's S3 bucket (datasets/lesions or s3://BUCKET/datasets/lesions), "
        "or an absolute server folder under DATASET_ROOTS"))
    layout = serializers.ChoiceField(choices=["auto", *DatasetLayout.values], default="auto", help_text=(
        "by reference: files (images + labels.csv, or one folder per class), webdataset (.tar shards, a .cls or "
        ".json label per sample), or auto (webdataset when every file is a .tar)"))
    purpose = serializers.ChoiceField(
        choices=DatasetPurpose.choices, default=DatasetPurpose.AUDIT,
        help_text="audit: labelled images of at least two classes; sae_training: images (labels optional) that "
                  "train an audit's SAE (an audit's sae_dataset), never audited themselves")
    metadata_columns = serializers.ListField(
        child=serializers.CharField(), read_only=True,
        help_text="labels.csv columns kept besides image and label (at most 20 distinct values each)")

    class Meta:
        model = Dataset
        fields = ["id", "project", "name", "archive", "source", "location", "layout", "purpose", "sha256", "n_images",
                  "class_names", "class_counts", "metadata_columns", "total_bytes", "created_at"]
        read_only_fields = ["id", "sha256", "n_images", "class_names", "class_counts", "metadata_columns",
                            "total_bytes", "created_at"]


class SparseAutoencoderSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id")
    clip_model = serializers.IntegerField(source="clip_model_id", help_text=(
        "the model (and so the layer and token) the SAE was trained on"))
    format = serializers.ChoiceField(choices=SAEFormat.choices, help_text=(
        "ours: sae.json + sae.safetensors (a finished audit's artifacts); sae_lens: SAELens' cfg.json + "
        "sae_weights.safetensors (TopK SAEs)"))
    config = serializers.FileField(write_only=True, help_text="the format's config file (sae.json or cfg.json)")
    weights = serializers.FileField(write_only=True, help_text=(
        "the format's weights file (sae.safetensors or sae_weights.safetensors)"))

    class Meta:
        model = SparseAutoencoder
        fields = ["id", "project", "clip_model", "name", "format", "config", "weights", "sha256", "d_model",
                  "n_latents", "k", "description", "created_at"]
        read_only_fields = ["id", "sha256", "d_model", "n_latents", "k", "description", "created_at"]
