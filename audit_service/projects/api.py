from django.db import transaction
from rest_framework import mixins, viewsets
from rest_framework.exceptions import ValidationError

from audit_service.accounts.authentication import refuse_scoped_token

from .models import Membership, Project, Role
from .permissions import ProjectRolePermission, project_for
from .serializers import MembershipSerializer, ProjectSerializer


class ProjectViewSet(viewsets.ModelViewSet):
    """Projects the caller belongs to. Anyone signed in may create one (and owns it), though not with a token limited
    to projects; owners manage it."""

    serializer_class = ProjectSerializer
    permission_classes = [ProjectRolePermission]
    write_role = Role.OWNER

    def get_queryset(self):
        return Project.objects.for_user(self.request.user).distinct()

    def create(self, request, *args, **kwargs):
        refuse_scoped_token(request, "create projects")
        return super().create(request, *args, **kwargs)

    def perform_create(self, serializer):
        with transaction.atomic():
            project = serializer.save()
            Membership.objects.create(project=project, user=self.request.user, role=Role.OWNER)


class MembershipViewSet(mixins.ListModelMixin, mixins.CreateModelMixin, mixins.UpdateModelMixin,
                        mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Members of one project: everyone in it reads the list, owners add, change and remove members."""

    serializer_class = MembershipSerializer

    def project(self, write: bool):
        return project_for(self.request.user, self.kwargs["project_pk"], Role.OWNER if write else Role.VIEWER)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no request
            return Membership.objects.none()
        write = self.request.method not in ("GET", "HEAD", "OPTIONS")
        return Membership.objects.filter(project=self.project(write)).select_related("user")

    def perform_create(self, serializer):
        project = self.project(write=True)
        if Membership.objects.filter(project=project, user=serializer.validated_data["user"]).exists():
            raise ValidationError({"username": "this user is already a member; change their role instead"})
        serializer.save(project=project)

    def perform_destroy(self, instance):
        if instance.role == Role.OWNER and instance.project.memberships.filter(role=Role.OWNER).count() == 1:
            raise ValidationError({"role": "a project keeps at least one owner"})
        instance.delete()

    def perform_update(self, serializer):
        instance = serializer.instance
        demoting_last_owner = (instance.role == Role.OWNER and serializer.validated_data.get("role") != Role.OWNER
                               and instance.project.memberships.filter(role=Role.OWNER).count() == 1)
        if demoting_last_owner:
            raise ValidationError({"role": "a project keeps at least one owner"})
        serializer.save()
