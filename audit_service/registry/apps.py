from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "audit_service.registry"
    label = "registry"
