"""Project scoping for every API view: members see their projects' objects, nobody else sees they exist."""
from __future__ import annotations

from django.http import Http404
from rest_framework import permissions
from rest_framework.exceptions import PermissionDenied

from .models import Project, Role


def project_for(user, project_id, at_least: str = Role.VIEWER) -> Project:
    """The project if ``user`` belongs to it with at least ``at_least``; 404 for outsiders, 403 for too low a role."""
    project = Project.objects.for_user(user).filter(pk=project_id).first()
    if project is None:
        raise Http404("no such project")
    if not project.has_role(user, at_least):
        raise PermissionDenied(f"your role in project '{project.name}' does not allow this; "
                               f"it needs {at_least} or above")
    return project


class ProjectRolePermission(permissions.IsAuthenticated):
    """Signed-in users only; reads need membership (enforced by the queryset); writes need ``write_role``."""

    def has_object_permission(self, request, view, obj) -> bool:
        project = obj if isinstance(obj, Project) else obj.project
        needed = Role.VIEWER if request.method in permissions.SAFE_METHODS else getattr(view, "write_role", Role.MEMBER)
        if not project.has_role(request.user, needed):
            raise PermissionDenied(f"your role in project '{project.name}' does not allow this; "
                                   f"it needs {needed} or above")
        return True
