from django.apps import AppConfig


class AuditsConfig(AppConfig):
    name = "audit_service.audits"
    label = "audits"

    def ready(self) -> None:
        from . import corrections  # noqa: F401 (its receiver finishes corrections when their re-audit finishes)
