"""The attribution engine: pure PyTorch, no Django. See docs/method.md for the method.

The names below load their modules on first use, so reading a light module (``workers.engine.stages``,
``workers.engine.errors``) does not import torch.
"""
from importlib import import_module

_WHERE = {
    "AuditConfig": "config", "SAEConfig": "config", "EngineError": "errors", "AuditCancelled": "errors",
    "LinearProbe": "heads", "ZeroShotHead": "heads", "ClipBundle": "loading", "load_clip": "loading",
    "AuditResult": "result", "run_audit": "pipeline", "STAGES": "stages", "TopKSAE": "sae",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
