import copy

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from workers.engine import jsonsafe

from .fields import FLAG_FIELDS, LATENT_FIELDS, api_names
from .models import STAGE_NAMES, Audit, Checklist, Correction, Explanation, Flag, Latent, Review
from .services import options_schema


@extend_schema_field(options_schema())
class AuditOptionsField(serializers.JSONField):
    """Any JSON here: the service checks it against the options' schema and answers 400 naming the option (a
    string or a list is refused there too), so the API, the web form and the engine refuse alike."""


class AuditSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id")
    clip_model = serializers.IntegerField(source="clip_model_id")
    probe = serializers.IntegerField(source="probe_id")
    dataset = serializers.IntegerField(source="dataset_id")
    sae_dataset = serializers.IntegerField(
        source="sae_dataset_id", required=False, allow_null=True,
        help_text="optional: a dataset of the project (e.g. a larger, unlabelled one registered with purpose "
                  "sae_training) whose images train the SAE; attribution, labels and flags still use `dataset`")
    sae = serializers.IntegerField(
        source="sae_id", required=False, allow_null=True,
        help_text="optional: an SAE registered for the model (/api/v1/saes/), used instead of training one; its FVU, "
                  "L0 and dead fraction are measured on the audited images")
    config = AuditOptionsField(required=False)
    context = serializers.JSONField(required=False, help_text="free-form facts stored with the audit")
    n_flags = serializers.SerializerMethodField()
    shard_progress = serializers.SerializerMethodField(
        help_text="for an audit spread over shards (`shards` > 0): finished and total shards of each step, "
                  f"in order: {', '.join(STAGE_NAMES)}")

    class Meta:
        model = Audit
        fields = ["id", "project", "clip_model", "probe", "dataset", "sae_dataset", "sae", "config", "context", "status",
                  "stage", "percent", "cancel_requested", "error", "attempts", "worker_host", "device", "timings",
                  "created_at", "started_at", "finished_at", "n_flags", "shards", "shard_progress", "sae_from",
                  "correction"]
        read_only_fields = [f for f in fields
                            if f not in ("project", "clip_model", "probe", "dataset", "sae_dataset", "sae", "config",
                                         "context")]

    sae_from = serializers.IntegerField(source="sae_from_id", read_only=True, allow_null=True,
                                        help_text="the audit whose SAE this one reused (a corrected probe's re-audit)")
    correction = serializers.SerializerMethodField(help_text="the correction this audit re-audits (null: none)")

    def get_correction(self, audit) -> int | None:
        return (audit.context or {}).get("correction")

    def get_n_flags(self, audit) -> int | None:
        return audit.flags.count() if audit.status == "succeeded" else None

    def get_shard_progress(self, audit) -> dict[str, dict[str, int]] | None:
        return audit.progress()


class ResultRowSerializer(serializers.ModelSerializer):
    """A flag or a latent: the fields of its list (``Meta.row_fields``, see audits/fields.py), all read-only,
    plus each name a field had before, served read-only for one release."""

    def get_fields(self):
        fields = super().get_fields()
        for field in self.Meta.row_fields:
            for old in field.aliases:
                alias = copy.deepcopy(fields[field.name])
                alias.source = field.name
                alias.help_text = f"deprecated: the same as `{field.name}`; removed in the next release"
                fields[old] = alias
        return fields


def _help_texts(row_fields) -> dict:
    return {f.name: {"help_text": f.help} for f in row_fields if f.help}


class LatentSerializer(ResultRowSerializer):
    class Meta:
        model = Latent
        row_fields = LATENT_FIELDS
        fields = read_only_fields = api_names(LATENT_FIELDS)
        extra_kwargs = _help_texts(LATENT_FIELDS)


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


class FlagSerializer(ResultRowSerializer):
    # the fields of FLAG_FIELDS that are not one model field each
    latest_review = ReviewSerializer(read_only=True)
    confirmation = ConfirmationSerializer(source="*", read_only=True)
    corrections = serializers.PrimaryKeyRelatedField(
        many=True, read_only=True, help_text="corrections made for this flag (/api/v1/corrections/{id}/)")

    class Meta:
        model = Flag
        row_fields = FLAG_FIELDS
        fields = read_only_fields = ["id", "audit", *api_names(FLAG_FIELDS), "corrections"]
        extra_kwargs = _help_texts(FLAG_FIELDS)


class CorrectionRequestSerializer(serializers.Serializer):
    """``POST /audits/{id}/corrections/``: what to correct and how."""

    flags = serializers.JSONField(required=False, allow_null=True, help_text=(
        "ids of the audit's probe flags to correct; omitted: the flags whose latest review is "
        "'confirmed_shortcut'"))
    method = serializers.CharField(required=False, allow_blank=True, default="", help_text=(
        "'project' (the shortcut's directions projected out of the probe's weights; needs only the audit's data) "
        "or 'refit' (the probe refitted on its training split with the shortcut removed; needs training_dataset); "
        "empty: refit when training_dataset is given, else project"))
    training_dataset = serializers.IntegerField(required=False, allow_null=True, help_text=(
        "a labelled dataset of the project (images with labels.csv): the probe's training split, for 'refit'"))
    options = serializers.JSONField(required=False, allow_null=True, help_text=(
        "anchor ('mean' (default), 'midpoint' or 'clean', for 'project'), directions ('regression' (default), "
        "'removal' or 'widened': the direction between the images the flags' concept is active on, widened to the "
        "side of the probe's features they lie on, and the others), column (a 0/1 column of the audited "
        "dataset's labels.csv marking the images that show the flags' concept: its direction, images marked vs not within each class, is removed instead of the SAE's, "
        "in one round; a training dataset with the column also says which of its images show it), C (the "
        "refit's regularization), rounds (1 to 5; 3), max_clean_drop (the "
        "accuracy the correction may cost on images without any chosen latent before its verdict fails; 0.02)"))


class CorrectionSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id", read_only=True)
    audit = serializers.IntegerField(source="audit_id", read_only=True)
    flags = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    training_dataset = serializers.IntegerField(source="training_dataset_id", read_only=True, allow_null=True)
    new_probe = serializers.IntegerField(source="new_probe_id", read_only=True, allow_null=True,
                                         help_text="the corrected probe (registered in the project)")
    reaudit = serializers.IntegerField(source="reaudit_id", read_only=True, allow_null=True,
                                       help_text="the new probe's audit (same model, data and SAE)")
    percent = serializers.FloatField(source="overall_percent", read_only=True)
    result = serializers.JSONField(read_only=True, help_text=(
        "correction: info (method, reason), table (old vs new probe: overall, per_class, slices), shortcut; "
        "reaudit: its audit id and diff against the original audit; verdict: passed, checks, reasons"))

    class Meta:
        model = Correction
        fields = ["id", "project", "audit", "flags", "method", "options", "training_dataset", "status", "stage",
                  "percent", "cancel_requested", "error", "attempts", "worker_host", "new_probe", "reaudit",
                  "result", "timings", "created_at", "started_at", "finished_at"]
        read_only_fields = fields


class ExplanationRequestSerializer(serializers.Serializer):
    """``POST /audits/{id}/explain/``: one image to explain, uploaded or from the audited dataset."""

    image = serializers.FileField(required=False, help_text=(
        "an image file (png, jpg, webp, bmp), checked as a dataset's images are; multipart"))
    item = serializers.CharField(required=False, allow_blank=True, default="", help_text=(
        "or: the path of an image of the audited dataset, as in its labels.csv"))


class ExplanationSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id", read_only=True)
    audit = serializers.IntegerField(source="audit_id", read_only=True)
    image = serializers.SerializerMethodField(help_text="the uploaded image's file name (null: a dataset item)")
    result = serializers.JSONField(read_only=True, help_text=(
        "classes; heads.{probe,zero_shot}: prediction, probabilities, per class the top latents for and against "
        "it (latent, relevance, activation, label, flagged_for), without_flagged (the prediction with the head's "
        "active flagged latents removed); heatmaps: latent -> grid 0..255; image: item, label, size"))

    class Meta:
        model = Explanation
        fields = ["id", "project", "audit", "item", "image", "status", "stage", "percent", "cancel_requested", "error",
                  "attempts", "worker_host", "device", "result", "timings", "created_at", "started_at", "finished_at"]
        read_only_fields = fields

    def get_image(self, explanation) -> str | None:
        return explanation.image.name.rsplit("/", 1)[-1] if explanation.image else None


class SuspectsField(serializers.JSONField):
    """The suspects: a JSON list in a JSON body; in a multipart form (with uploaded example images) the JSON text
    of that list, read with the service's bounded JSON reader as a JSON body is."""

    def to_internal_value(self, data):
        if getattr(data, "is_json_string", False):  # a form field: JSONField marks its text so
            try:
                return jsonsafe.loads(str(data), what="suspects")
            except jsonsafe.JSONLimitError as exc:
                raise serializers.ValidationError(
                    f"{exc}; in a multipart form, suspects is the JSON text of the list, e.g. "
                    '[{"name": "ruler", "with": ["upload:r1.png", ...], "without": ["upload:n1.png", ...]}]'
                ) from None
        return super().to_internal_value(data)


class ChecklistRequestSerializer(serializers.Serializer):
    """``POST /audits/{id}/checklists/``: the suspects to ask about, or the name of a shipped checklist; as JSON,
    or as a multipart form with uploaded example images."""

    suspects = SuspectsField(required=False, allow_null=True, help_text=(
        "a list of suspects, each {\"name\", \"text\"} (\"a ruler\"), {\"name\", \"column\"} (a 0/1 column of "
        "the audited dataset's labels.csv) or {\"name\", \"with\": [images], \"without\": [images]} (at least 3 "
        "images each: images of the audited dataset, named as its labels.csv names them, or uploaded ones, named "
        "\"upload:FILENAME\"); names must differ. In a multipart form: the JSON text of the list"))
    checklist = serializers.CharField(required=False, allow_blank=True, default="", help_text=(
        "or: the name of a shipped checklist (/api/v1/checklists/shipped/), e.g. 'dermoscopy'"))
    images = serializers.ListField(child=serializers.FileField(), required=False, default=list, help_text=(
        "multipart only, repeatable: example image files (png, jpg, webp, bmp; at most 100, names distinct), each "
        "named by a suspect's with or without as \"upload:\" + its file name; with your own suspects only"))


class ChecklistSerializer(serializers.ModelSerializer):
    project = serializers.IntegerField(source="project_id", read_only=True)
    audit = serializers.IntegerField(source="audit_id", read_only=True)
    result = serializers.JSONField(read_only=True, help_text=(
        "suspects: one answer per suspect, in the order asked: name, kind, text/column/with/without; match "
        "(latents, score, found, needed; for text, by: 'reading' when the latents follow the audited CLIP's reading "
        "of the text, score then their correlation with it and meaning the best latent's alignment, or 'meaning' "
        "when they are those closest to it in meaning, score that alignment; for examples, side: the latents joined to "
        "those that tell the examples apart because they follow, over every audited image, the side the audited CLIP "
        "puts the examples on, and that correlation); present (images, of, how); top_images (the audited images that show it "
        "most) and heatmaps (image -> rows of 0..255 over the patches: where its latents are); classes (per class "
        "probe_share, zero_shot_share, relied_on, shift (probability, z, moves: the class's probability with it "
        "vs without), harm, shortcuts (the reliance asked again on the images without each of the audit's "
        "probe flags, confirmed or not: latents, images, relied_on), explained_by (the latents of the flag whose "
        "reliance it was, or null), suspects (the reliance asked again on the images without each other suspect of "
        "the list relied on: suspect, images, relied_on) and explained_by_suspect (the name of the suspect whose "
        "reliance it was, or null)); verdict ('relied on, harmful', 'relied on, no measured harm', 'represented, not "
        "relied on' or 'not found by the dictionary': a column suspect relied on is so even where its best latents "
        "match it below what a match needs), verdict_class and evidence"))

    images = serializers.SerializerMethodField(help_text=(
        "the file names of the example images uploaded with it, as its suspects name them (upload:NAME)"))

    class Meta:
        model = Checklist
        fields = ["id", "project", "audit", "suspects", "shipped", "images", "status", "stage", "percent",
                  "cancel_requested", "error", "attempts", "worker_host", "device", "result", "timings", "created_at",
                  "started_at", "finished_at"]
        read_only_fields = fields

    def get_images(self, checklist) -> list[str]:
        return [image.name for image in checklist.images.all()]
