from django.apps import AppConfig


class ProjectsConfig(AppConfig):
    name = "audit_service.projects"
    label = "projects"
