from django.contrib.auth import get_user_model
from rest_framework import serializers

from .models import Membership, Project, Role


class ProjectSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField()

    class Meta:
        model = Project
        fields = ["id", "name", "description", "created_at", "max_concurrent_audits", "role"]
        read_only_fields = ["id", "created_at", "role"]

    def get_role(self, project) -> str | None:
        return project.role_of(self.context["request"].user)


class MembershipSerializer(serializers.ModelSerializer):
    username = serializers.SlugRelatedField(source="user", slug_field="username",
                                            queryset=get_user_model().objects.all())
    role = serializers.ChoiceField(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["id", "username", "role", "created_at"]
        read_only_fields = ["id", "created_at"]
