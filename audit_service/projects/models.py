from __future__ import annotations

from django.conf import settings
from django.db import models


class Role(models.TextChoices):
    OWNER = "owner", "Owner"  # manages members, everything a member does
    MEMBER = "member", "Member"  # registers models, uploads data, submits audits
    VIEWER = "viewer", "Viewer"  # reads


ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.OWNER: 2}


class ProjectQuerySet(models.QuerySet):
    def for_user(self, user) -> "ProjectQuerySet":
        """Projects ``user`` belongs to; for a request made with a project-scoped API token, only those of its scope
        (none when its projects were all deleted)."""
        if not user.is_authenticated:
            return self.none()
        projects = self.filter(memberships__user=user)
        scope = getattr(user, "token_project_ids", None)
        return projects if scope is None else projects.filter(pk__in=scope)


class Project(models.Model):
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    max_concurrent_audits = models.PositiveIntegerField(default=2)
    # stricter than the service-wide MAX_DATASET_IMAGES / MAX_DATASET_BYTES where set (admins set them)
    max_dataset_images = models.PositiveIntegerField(null=True, blank=True)
    max_dataset_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    # the team's own confounder checklist (suspect dicts, workers.engine.checklist), asked as checklist "project"
    checklist = models.JSONField(default=list, blank=True)

    objects = ProjectQuerySet.as_manager()

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name

    def role_of(self, user) -> str | None:
        if not user.is_authenticated:
            return None
        membership = self.memberships.filter(user=user).only("role").first()
        return membership.role if membership else None

    def has_role(self, user, at_least: str) -> bool:
        role = self.role_of(user)
        return role is not None and ROLE_RANK[role] >= ROLE_RANK[at_least]


class Membership(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="one_membership_per_user")]

    def __str__(self) -> str:
        return f"{self.user} {self.role} of {self.project}"
