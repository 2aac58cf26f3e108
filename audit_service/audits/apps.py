from importlib import import_module

from django.apps import AppConfig

# the modules that declare the job kinds (audits.jobs), in the order the kinds are listed: importing one registers
# its kind (corrections' also connects the receiver that finishes a correction when its re-audit finishes;
# checklists' the one that asks an audit's option suspects once it succeeded)
JOB_MODULES = ("services", "corrections", "explanations", "checklists")


class AuditsConfig(AppConfig):
    name = "audit_service.audits"
    label = "audits"

    def ready(self) -> None:
        for module in JOB_MODULES:
            import_module(f"{self.name}.{module}")
