from django.apps import AppConfig


class AuditsConfig(AppConfig):
    name = "audit_service.audits"
    label = "audits"
