from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "audit_service.accounts"
    label = "accounts"
    verbose_name = "API tokens"
