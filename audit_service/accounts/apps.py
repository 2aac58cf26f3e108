from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "audit_service.accounts"
    label = "accounts"
    verbose_name = "API tokens"

    def ready(self):
        from . import schema  # noqa: F401  registers the OpenAPI description of token authentication
