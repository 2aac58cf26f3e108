from django.utils import timezone
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from .models import ApiToken


class ApiTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "created_at", "last_used_at", "revoked_at"]


class ApiTokenViewSet(mixins.ListModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin,
                      viewsets.GenericViewSet):
    """The caller's own API tokens. Creating one returns its key once; deleting one revokes it."""

    serializer_class = ApiTokenSerializer

    def get_queryset(self):
        return ApiToken.objects.filter(user=self.request.user)

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, key = ApiToken.issue(request.user, serializer.validated_data["name"],
                                    serializer.validated_data.get("expires_at"))
        body = {**self.get_serializer(token).data, "key": key,
                "note": "store the key now: only its SHA-256 digest is kept, it cannot be shown again"}
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        instance.revoked_at = timezone.now()
        instance.save(update_fields=["revoked_at"])
