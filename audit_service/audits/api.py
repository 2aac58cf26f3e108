from django.conf import settings
from django.core.exceptions import TooManyFilesSent
from django.db.models import F
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from django.shortcuts import get_object_or_404
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from audit_service.parsers import JSONParser
from audit_service.projects.models import Project, Role
from audit_service.projects.permissions import ProjectRolePermission, project_for
from audit_service.registry.api import as_validation_error
from audit_service.registry.models import ClipModel, Dataset, Probe, SparseAutoencoder
from audit_service.registry.services import RegistrationError

from . import report
from .checklists import CHECKLIST, IMAGES_MAX, create_checklist, shipped_checklists
from .fields import LATENT_FIELDS
from .corrections import CORRECTION, create_correction
from .explanations import EXPLANATION, create_explanation
from .jobs import JOB_FIELDS, JobKind
from .models import Audit, Flag, IllegalTransition, Latent, Status
from .serializers import (AuditSerializer, ChecklistRequestSerializer, ChecklistSerializer,
                          CorrectionRequestSerializer, CorrectionSerializer, ExplanationRequestSerializer, ExplanationSerializer, FlagSerializer, LatentSerializer,
                          ReviewSerializer)
from .services import AUDIT, create_audit


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The jobs of one kind (``kind``, audits.jobs) in the caller's projects: list, follow, cancel (members)."""

    kind: JobKind
    permission_classes = [ProjectRolePermission]
    filterset_fields = ["project", "status"]
    ordering_fields = ["created_at", "finished_at"]

    def get_queryset(self):
        return self.kind.for_user(self.request.user)

    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel it: a queued job at once, a running one is asked to stop (409 when it is finished)."""
        job = self.get_object()
        project_for(request.user, job.project_id, Role.MEMBER)
        try:
            job.cancel()
        except IllegalTransition as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(self.get_serializer(job).data)


def job_serializer(kind: JobKind) -> type[serializers.ModelSerializer]:
    """A read-only serializer of a kind's jobs: the fields every job has and the kind's own (``kind.fields``)."""
    fields = [*JOB_FIELDS, *kind.fields]
    meta = type("Meta", (), {"model": kind.model, "fields": fields, "read_only_fields": fields})
    return type(f"{kind.model.__name__}Serializer", (serializers.ModelSerializer,), {
        "Meta": meta, "project": serializers.IntegerField(source="project_id", read_only=True)})


def job_viewset(kind: JobKind) -> type[JobViewSet]:
    """The API of a kind that declares nothing more: list, read and cancel its jobs."""
    return type(f"{kind.model.__name__}ViewSet", (JobViewSet,), {
        "kind": kind, "serializer_class": job_serializer(kind), "__doc__": f"{kind.plural.capitalize()} of the "
                                                                           "caller's projects: follow, cancel."})


class AuditViewSet(mixins.CreateModelMixin, JobViewSet):
    """Audits of the caller's projects: submit, follow progress, cancel, read results."""

    kind = AUDIT
    serializer_class = AuditSerializer
    filterset_fields = ["project", "status", "probe", "clip_model", "dataset"]

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        project = project_for(request.user, data["project_id"], Role.MEMBER)
        objects = {}
        for field, model, noun in (("clip_model", ClipModel, "clip model"), ("probe", Probe, "probe"),
                                   ("dataset", Dataset, "dataset"), ("sae_dataset", Dataset, "dataset"),
                                   ("sae", SparseAutoencoder, "SAE")):
            if data.get(f"{field}_id") is None:  # sae_dataset and sae are optional (the serializer requires the rest)
                continue
            objects[field] = model.objects.filter(pk=data[f"{field}_id"], project=project).first()
            if objects[field] is None:
                raise ValidationError({field: [f"no such {noun} in this project"]})
        try:
            audit = create_audit(project=project, user=request.user, options=data.get("config"),
                                 context=data.get("context"), **objects)
        except RegistrationError as exc:
            raise as_validation_error(exc) from exc
        return Response(self.get_serializer(audit).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["get"], url_path=r"download/(?P<fmt>html|json|latents\.csv|flags\.csv)")
    def download(self, request, pk=None, fmt=None):
        """The report as one offline HTML file, the full result as JSON, latents or flags as CSV."""
        audit = self.get_object()
        if audit.status != Status.SUCCEEDED:
            return Response({"detail": f"the audit is {audit.status}; downloads exist once it succeeded"},
                            status=status.HTTP_409_CONFLICT)
        return report.download_response(audit, fmt)

    @action(detail=True, methods=["get"])
    def diff(self, request, pk=None):
        """Flags new, gone or changed against ``?baseline=<audit id>`` (an earlier audit of the same project),
        matched by the meaning of their latents; benign verdicts of the baseline carry over to matches."""
        from .diff import DEFAULT_THRESHOLD, audit_diff

        audit = self.get_object()
        try:
            baseline_id = int(request.query_params.get("baseline", ""))
            threshold = float(request.query_params.get("threshold", DEFAULT_THRESHOLD))
        except ValueError:
            raise ValidationError({"baseline": ["give ?baseline=<audit id> (and optionally ?threshold=0.9)"]})
        baseline = get_object_or_404(self.get_queryset(), pk=baseline_id)
        if baseline.project_id != audit.project_id:
            raise ValidationError({"baseline": ["the baseline belongs to another project"]})
        for a in (audit, baseline):
            if a.status != Status.SUCCEEDED:
                return Response({"detail": f"audit {a.pk} is {a.status}; only succeeded audits can be compared"},
                                status=status.HTTP_409_CONFLICT)
        return Response(audit_diff(baseline, audit, threshold))

    @action(detail=True, methods=["get"])
    def summary(self, request, pk=None):
        """Per class: accuracy, flags (confirmed, with measured harm), probe vs zero-shot share; plus SAE quality
        and timings."""
        audit = self.get_object()
        if audit.status != Status.SUCCEEDED:
            return Response({"detail": f"the audit is {audit.status}; results exist once it succeeded"},
                            status=status.HTTP_409_CONFLICT)
        r = audit.result
        return Response({"audit": audit.pk, "classes": report.class_summary(audit), "sae": r["sae"],
                         "accuracy": r["accuracy"], "timings": r["timings"], "environment": r["environment"],
                         "sae_dataset": r.get("sae_dataset"), "slices": r.get("slices") or {}})


    @extend_schema(request=CorrectionRequestSerializer, responses=CorrectionSerializer(many=True),
                   methods=["POST"], description="Make a corrected probe from this audit's flags (members).")
    @extend_schema(responses=CorrectionSerializer(many=True), methods=["GET"])
    @action(detail=True, methods=["get", "post"])
    def corrections(self, request, pk=None):
        """GET: this audit's corrections. POST: make a corrected probe from its flags (members); the job corrects
        the probe, compares old and new, registers the new probe and audits it; follow it at
        /api/v1/corrections/{id}/."""
        audit = self.get_object()
        if request.method == "GET":
            rows = audit.corrections.select_related("reaudit").prefetch_related("flags")
            return Response(CorrectionSerializer(rows, many=True).data)
        project_for(request.user, audit.project_id, Role.MEMBER)
        serializer = CorrectionRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        training = None
        if data.get("training_dataset") is not None:
            training = Dataset.objects.filter(pk=data["training_dataset"], project=audit.project).first()
            if training is None:
                raise ValidationError({"training_dataset": ["no such dataset in this project"]})
        try:
            correction = create_correction(audit=audit, user=request.user, flag_ids=data.get("flags"),
                                           method=data.get("method", ""), options=data.get("options"),
                                           training_dataset=training)
        except RegistrationError as exc:
            raise as_validation_error(exc) from exc
        return Response(CorrectionSerializer(correction).data, status=status.HTTP_201_CREATED)


    @extend_schema(request={"multipart/form-data": ExplanationRequestSerializer,
                            "application/json": ExplanationRequestSerializer},
                   responses=ExplanationSerializer, description=(
                       "Explain one image with this audit (members): an uploaded `image` or an `item` of the audited "
                       "dataset. A short job on a worker; follow it at /api/v1/explanations/{id}/."))
    @action(detail=True, methods=["post"], parser_classes=[MultiPartParser, FormParser, JSONParser])
    def explain(self, request, pk=None):
        audit = self.get_object()
        project_for(request.user, audit.project_id, Role.MEMBER)
        serializer = ExplanationRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            explanation = create_explanation(audit=audit, user=request.user, image=data.get("image"),
                                             item=data.get("item", ""))
        except RegistrationError as exc:
            raise as_validation_error(exc) from exc
        return Response(ExplanationSerializer(explanation).data, status=status.HTTP_201_CREATED)

    @extend_schema(request={"application/json": ChecklistRequestSerializer,
                            "multipart/form-data": ChecklistRequestSerializer},
                   responses=ChecklistSerializer, methods=["POST"], description=(
        "Ask this audit whether its probe relies on each suspect (members): `suspects` (your own list) or "
        "`checklist` (a shipped one by name). To name suspects by example images you upload, send a multipart "
        "form: `suspects`, the JSON text of the list, whose with/without entries name uploaded files as "
        "`upload:FILENAME`, and the files as repeated `images` fields (each must be named by a suspect). A short "
        "job on a worker; follow it at /api/v1/checklists/{id}/."))
    @extend_schema(responses=ChecklistSerializer(many=True), methods=["GET"])
    @action(detail=True, methods=["get", "post"], parser_classes=[JSONParser, MultiPartParser, FormParser])
    def checklists(self, request, pk=None):
        """GET: this audit's checklists, newest first. POST: ask it about suspects (members), as JSON or as a
        multipart form with uploaded example images."""
        audit = self.get_object()
        if request.method == "GET":
            return Response(ChecklistSerializer(audit.checklists.prefetch_related("images"), many=True).data)
        project_for(request.user, audit.project_id, Role.MEMBER)
        try:
            serializer = ChecklistRequestSerializer(data=request.data)
        except TooManyFilesSent:
            raise ValidationError({"images": [
                f"too many files in one request: at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES} (and at most "
                f"{IMAGES_MAX} example images in one checklist); give fewer per suspect"]}) from None
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            checklist = create_checklist(audit=audit, user=request.user, suspects=data.get("suspects"),
                                         checklist=data.get("checklist", ""), images=data.get("images") or ())
        except RegistrationError as exc:
            raise as_validation_error(exc) from exc
        return Response(ChecklistSerializer(checklist).data, status=status.HTTP_201_CREATED)


class ChecklistViewSet(JobViewSet):
    """Confounder checklists of the caller's projects: follow one, cancel it, read its answers."""

    kind = CHECKLIST
    serializer_class = ChecklistSerializer
    filterset_fields = ["project", "audit", "status"]

    def get_queryset(self):
        return super().get_queryset().prefetch_related("images")

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    @action(detail=False, methods=["get"])
    def shipped(self, request):
        """The shipped checklists (per domain, the confounders auditors in that field bring): name and suspects;
        ask one of an audit with {"checklist": name}."""
        return Response(shipped_checklists())


class ExplanationViewSet(JobViewSet):
    """Explanations of single images in the caller's projects: follow one, cancel it, read its answer."""

    kind = EXPLANATION
    serializer_class = ExplanationSerializer
    filterset_fields = ["project", "audit", "status"]


class CorrectionViewSet(JobViewSet):
    """Corrections of the caller's projects: follow one, cancel it, read its proof and its re-audit's diff."""

    kind = CORRECTION
    serializer_class = CorrectionSerializer
    filterset_fields = ["project", "audit", "status"]

    def get_queryset(self):
        return super().get_queryset().prefetch_related("flags")

    @action(detail=True, methods=["get"], url_path="training-data")
    def training_data(self, request, pk=None):
        """The probe's training images on which the corrected concept is active (image, class, activation),
        strongest first; a correction made with a training split (refit, reweight) has them once it ran."""
        return report.training_response(self.get_object())


# the kinds whose API declares more than list, read and cancel (job_viewset serves the others)
JOB_VIEWSETS = {"audit": AuditViewSet, "correction": CorrectionViewSet, "explanation": ExplanationViewSet,
                "checklist": ChecklistViewSet}


class _AuditChildViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    def audit(self) -> Audit:
        audit = get_object_or_404(Audit.objects.filter(project__in=Project.objects.for_user(self.request.user)),
                                  pk=self.kwargs["audit_pk"])
        return audit


class FlagViewSet(_AuditChildViewSet):
    """Flags of one audit; filter by head, class, category, confirmed. Members review them."""

    serializer_class = FlagSerializer
    filterset_fields = ["head", "class_name", "category", "confirmed"]
    ordering_fields = ["share", "rank"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no request
            return Flag.objects.none()
        return Flag.objects.filter(audit=self.audit()).prefetch_related("reviews", "corrections")

    @action(detail=True, methods=["get", "post"])
    def reviews(self, request, audit_pk=None, pk=None):
        flag = self.get_object()
        if request.method == "GET":
            return Response(ReviewSerializer(flag.reviews.all(), many=True).data)
        project_for(request.user, flag.audit.project_id, Role.MEMBER)
        serializer = ReviewSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        serializer.save(flag=flag, reviewer=request.user)
        return Response(serializer.data, status=status.HTTP_201_CREATED)


# ?ordering= by a field's deprecated name (fields.py: aliases) still works for one release
LATENT_ORDERING_ALIASES = {old: F(f.name) for f in LATENT_FIELDS for old in f.aliases}


class LatentViewSet(_AuditChildViewSet):
    """Every latent of one audit (paginated): label, label alignment, clarity, references."""

    serializer_class = LatentSerializer
    lookup_field = "latent"
    filterset_fields = {"label": ["exact", "icontains"], "label_category": ["exact"], "clarity": ["gte", "lte"]}
    ordering_fields = ["latent", "clarity", "frequency", "label_alignment", *LATENT_ORDERING_ALIASES]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Latent.objects.none()
        return Latent.objects.filter(audit=self.audit()).annotate(**LATENT_ORDERING_ALIASES)
