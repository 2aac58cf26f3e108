from rest_framework import serializers

from .models import STAGE_NAMES, Audit, Flag, Latent, Review


class AuditSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id")
    clip_model = serializers.IntegerField(source="clip_model_id")
    probe = serializers.IntegerField(source="probe_id")
    dataset = serializers.IntegerField(source="dataset_id")
    sae_dataset = serializers.IntegerField(
        source="sae_dataset_id", required=False, allow_null=True,
        help_text="optional: a dataset of the project (e.g. a larger, unlabelled one registered with purpose "
                  "sae_training) whose images train the SAE; attribution, labels and flags still use `dataset`")
    config = serializers.JSONField(required=False, help_text="audit options (workers.engine.AuditConfig)")
    context = serializers.JSONField(required=False, help_text="free-form facts stored with the audit")
    n_flags = serializers.SerializerMethodField()
    shard_progress = serializers.SerializerMethodField(
        help_text="for an audit spread over shards (`shards` > 0): finished and total shards of each step, "
                  f"in order: {', '.join(STAGE_NAMES)}")

    class Meta:
        model = Audit
        fields = ["id", "project", "clip_model", "probe", "dataset", "sae_dataset", "config", "context", "status",
                  "stage", "percent", "cancel_requested", "error", "attempts", "worker_host", "device", "timings",
                  "created_at", "started_at", "finished_at", "n_flags", "shards", "shard_progress"]
        read_only_fields = [f for f in fields
                            if f not in ("project", "clip_model", "probe", "dataset", "sae_dataset", "config",
                                         "context")]

    def get_n_flags(self, audit) -> int | None:
        return audit.flags.count() if audit.status == "succeeded" else None

    def get_shard_progress(self, audit) -> dict[str, dict[str, int]] | None:
        return audit.progress()


class LatentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Latent
        fields = ["index", "label", "label_source", "label_category", "alignment", "clarity", "frequency",
                  "max_activation", "references", "expected_alignment", "label_confidence", "closest_concept"]


class ReviewSerializer(serializers.ModelSerializer):
    reviewer = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Review
        fields = ["id", "verdict", "note", "reviewer", "created_at"]
        read_only_fields = ["id", "reviewer", "created_at"]


class ConfirmationSerializer(serializers.Serializer):
    status = serializers.CharField(source="confirmation_status", read_only=True,
                                   help_text="confirmed, relied_on_no_harm, not_confirmed or not_run; empty for "
                                             "audits run before harm was measured")
    text = serializers.CharField(source="confirmation_text", read_only=True)


class FlagSerializer(serializers.ModelSerializer):
    latest_review = ReviewSerializer(read_only=True)
    confirmation = ConfirmationSerializer(source="*", read_only=True)
    harm = serializers.JSONField(read_only=True, help_text=(
        "per head (probe, zero_shot): class_with / class_without (n, accuracy, mean_logit), others_with / "
        "others_without (n, called_class), accuracy_gap, called_gap; measured (bool), summary (a sentence). "
        "null for audits run before harm was measured"))

    class Meta:
        model = Flag
        fields = ["id", "audit", "head", "class_name", "latent_index", "rank", "share", "mean_relevance", "label",
                  "label_source", "category", "label_alignment", "expected_alignment", "clarity", "probe_share",
                  "zero_shot_share", "confirmed", "causal", "references", "top_images", "latest_review", "harm",
                  "confirmation", "label_confidence", "closest_concept", "metadata_auroc", "concept_latents"]
