from django.apps import AppConfig


class WebConfig(AppConfig):
    name = "audit_service.web"
    label = "web"
    verbose_name = "Web UI"
