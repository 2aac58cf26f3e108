"""The command-line client under its earlier name: ``python -m audit_service.cli ...`` runs ``clip-audit ...``.

The client lives in the ``clip_audit_client`` package (HTTP only, no Django or torch), which ``pip install .``
installs with its ``clip-audit`` command; importing this module gives that package's ``cli`` module itself.
"""
import sys

from clip_audit_client import cli

if __name__ == "__main__":
    sys.exit(cli.main())
else:
    sys.modules[__name__] = cli
