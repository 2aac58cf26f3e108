from pathlib import Path

from django.core.files.storage import default_storage
from django.http import FileResponse
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from audit_service.parsers import JSONParser
from audit_service.projects.models import Project, Role
from audit_service.projects.permissions import ProjectRolePermission, project_for

from . import services
from .models import ClipModel, Dataset, Probe, SparseAutoencoder
from .serializers import ClipModelSerializer, DatasetSerializer, ProbeSerializer, SparseAutoencoderSerializer


def as_validation_error(exc: services.RegistrationError) -> ValidationError:
    return ValidationError({exc.field or "detail": [exc.message]})


class ProjectScopedViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                           mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Objects of the caller's projects; ``?project=ID`` narrows the list. Members create and delete."""

    model = None
    permission_classes = [ProjectRolePermission]
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    filterset_fields = ["project"]

    def get_queryset(self):
        return self.model.objects.filter(project__in=Project.objects.for_user(self.request.user)).select_related("project")

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        project = project_for(request.user, data.pop("project_id"), Role.MEMBER)
        try:
            obj = self.register(project, data)
        except services.RegistrationError as exc:
            raise as_validation_error(exc) from exc
        return Response(self.get_serializer(obj).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        if instance.audits.exists():
            raise ValidationError({"detail": [f"{instance} is used by audits; delete those audits first"]})
        instance.delete()


class ClipModelViewSet(ProjectScopedViewSet):
    model = ClipModel
    serializer_class = ClipModelSerializer

    def register(self, project, data):
        return services.register_model(project=project, user=self.request.user, name=data["name"],
                                       architecture=data.get("architecture", ""),
                                       pretrained_tag=data.get("pretrained_tag", ""),
                                       checkpoint=data.get("checkpoint"), model_config=data.get("model_config"),
                                       layer=data.get("layer", -1), token=data.get("token", "cls"))


class ProbeViewSet(ProjectScopedViewSet):
    model = Probe
    serializer_class = ProbeSerializer
    filterset_fields = ["project", "clip_model"]

    def get_queryset(self):
        return super().get_queryset().select_related("made_by")

    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        """The probe's file (.npz or .safetensors), as uploaded or as a correction wrote it."""
        probe = self.get_object()
        return FileResponse(probe.file.open("rb"), as_attachment=True, filename=Path(probe.file.name).name)

    def perform_destroy(self, instance):
        if instance.versions.exists():
            raise ValidationError({"detail": [f"{instance} has corrected versions; delete those probes first"]})
        super().perform_destroy(instance)

    def register(self, project, data):
        clip_model = ClipModel.objects.filter(pk=data["clip_model_id"], project=project).first()
        if clip_model is None:
            raise services.RegistrationError("no such model in this project", field="clip_model")
        return services.register_probe(project=project, user=self.request.user, name=data["name"],
                                       clip_model=clip_model, file=data["file"],
                                       class_names=data.get("class_names"), normalization=data.get("normalization"))


class DatasetViewSet(ProjectScopedViewSet):
    model = Dataset
    serializer_class = DatasetSerializer

    def register(self, project, data):
        return services.add_dataset(project=project, user=self.request.user, name=data["name"],
                                    source=data["source"], archive=data.get("archive"),
                                    location=data.get("location", ""), layout=data["layout"],
                                    purpose=data.get("purpose", "audit"))

    def perform_destroy(self, instance):
        if instance.sae_audits.exists():
            raise ValidationError({"detail": [f"{instance} trained the SAE of audits; delete those audits first"]})
        super().perform_destroy(instance)


class SparseAutoencoderViewSet(ProjectScopedViewSet):
    """SAEs trained elsewhere, registered for a model's layer and token; an audit's ``sae`` uses one."""

    model = SparseAutoencoder
    serializer_class = SparseAutoencoderSerializer
    filterset_fields = ["project", "clip_model"]

    def register(self, project, data):
        clip_model = ClipModel.objects.filter(pk=data["clip_model_id"], project=project).first()
        if clip_model is None:
            raise services.RegistrationError("no such model in this project", field="clip_model")
        return services.register_sae(project=project, user=self.request.user, name=data["name"],
                                     clip_model=clip_model, format=data["format"], config=data["config"],
                                     weights=data["weights"])

    def perform_destroy(self, instance):
        if instance.audits.exists():
            raise ValidationError({"detail": [f"{instance} is used by audits; delete those audits first"]})
        for key in instance.file_keys().values():
            default_storage.delete(key)
        instance.delete()
