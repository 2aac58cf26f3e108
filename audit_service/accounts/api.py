from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from audit_service.projects.models import Project

from .authentication import refuse_scoped_token
from .models import ApiToken


class ApiTokenSerializer(serializers.ModelSerializer):
    projects = serializers.PrimaryKeyRelatedField(many=True, required=False, queryset=Project.objects.all(),
                                                  help_text="limit the token to these projects (default: all yours)")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "projects", "scoped", "created_at", "last_used_at", "expires_at",
                  "revoked_at"]
        read_only_fields = ["id", "prefix", "scoped", "created_at", "last_used_at", "revoked_at"]

    def validate_projects(self, projects):
        mine = set(Project.objects.for_user(self.context["request"].user).values_list("pk", flat=True))
        foreign = [p.pk for p in projects if p.pk not in mine]
        if foreign:
            raise serializers.ValidationError(f"you are not a member of project(s) {foreign}")
        return projects


class ApiTokenViewSet(mixins.ListModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin,
                      viewsets.GenericViewSet):
    """The caller's own API tokens. Creating one returns its key once; deleting one revokes it. A token limited to
    projects sees and revokes only itself, and creates none."""

    serializer_class = ApiTokenSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ApiToken.objects.none()
        tokens = ApiToken.objects.filter(user=self.request.user)
        if self.action == "list" and isinstance(self.request.auth, ApiToken) and self.request.auth.scoped:
            return tokens.filter(pk=self.request.auth.pk)
        return tokens

    def create(self, request, *args, **kwargs):
        refuse_scoped_token(request, "create tokens")
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, key = ApiToken.issue(request.user, serializer.validated_data["name"],
                                    serializer.validated_data.get("expires_at"),
                                    serializer.validated_data.get("projects", ()))
        body = {**self.get_serializer(token).data, "key": key,
                "note": "store the key now: only its SHA-256 digest is kept, it cannot be shown again"}
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        if instance != self.request.auth:  # a leaked scoped key may still revoke itself
            refuse_scoped_token(self.request, "revoke other tokens")
        instance.revoke()
