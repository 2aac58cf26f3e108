from django.contrib.auth import get_user_model
from rest_framework import serializers

from workers.engine.checklist import parse_suspects, refuse_uploads, stored
from workers.engine.errors import EngineError

from .models import Membership, Project, Role


class ProjectSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField()

    class Meta:
        model = Project
        fields = ["id", "name", "description", "created_at", "max_concurrent_audits", "max_dataset_images",
                  "max_dataset_bytes", "role", "checklist"]
        # limits are the service's to set (Django admin), not the project owner's
        read_only_fields = ["id", "created_at", "role", "max_concurrent_audits", "max_dataset_images",
                            "max_dataset_bytes"]

    def get_role(self, project) -> str | None:
        return project.role_of(self.context["request"].user)

    def validate_checklist(self, value):
        """The project's own checklist: suspects as a checklist takes them (``[]`` clears it)."""
        if value == []:
            return value
        try:
            parsed = parse_suspects(value)
            refuse_uploads(parsed, "a project's saved checklist")
            return stored(parsed)
        except EngineError as exc:
            raise serializers.ValidationError(exc.message) from exc


class UsernameField(serializers.SlugRelatedField):
    """A user by username; a name with a NUL character names nobody (PostgreSQL refuses to even look it up)."""

    def to_internal_value(self, data):
        if isinstance(data, str) and "\x00" in data:
            self.fail("does_not_exist", slug_name=self.slug_field, value="(a name with a NUL character)")
        return super().to_internal_value(data)


class MembershipSerializer(serializers.ModelSerializer):
    username = UsernameField(source="user", slug_field="username", queryset=get_user_model().objects.all())
    role = serializers.ChoiceField(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["id", "username", "role", "created_at"]
        read_only_fields = ["id", "created_at"]
