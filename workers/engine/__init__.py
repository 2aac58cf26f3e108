"""The attribution engine: pure PyTorch, no Django. See DESIGN.md section 2 for the method."""
from .config import AuditConfig, SAEConfig
from .errors import AuditCancelled, EngineError
from .heads import LinearProbe, ZeroShotHead
from .loading import ClipBundle, load_clip
from .pipeline import STAGES, AuditResult, run_audit
from .sae import TopKSAE

__all__ = ["AuditConfig", "SAEConfig", "EngineError", "AuditCancelled", "LinearProbe", "ZeroShotHead",
           "ClipBundle", "load_clip", "AuditResult", "run_audit", "STAGES", "TopKSAE"]
