"""What every shard of an audit works with once the SAE exists: :class:`AuditContext`.

Its own module because every stage reads it (attribution, labelling, the summary, confirmation) and the pipeline
that builds it imports those stages.
"""
from __future__ import annotations

from .attribution import REGISTRY, get_method
from .config import AuditConfig
from .heads import Centred, LinearProbe, ZeroShotHead
from .hooks import VisionTail
from .loading import ClipBundle
from .sae import TopKSAE


class AuditContext:
    """What every attribution and confirmation shard needs: the model's tail, the SAE and both heads."""

    def __init__(self, config: AuditConfig, bundle: ClipBundle, probe: LinearProbe, sae: TopKSAE, device):
        self.config, self.bundle, self.sae, self.device = config, bundle, sae, device
        self.class_names = list(probe.class_names)
        self.tail = VisionTail(bundle.model.visual, config.layer, config.token)
        zero_shot = ZeroShotHead.build(bundle, self.class_names, config.prompt_templates, config.class_prompts)
        # both heads attributed on one footing: each class's score minus the mean over classes
        self.heads = {"probe": Centred(probe).to(device), "zero_shot": Centred(zero_shot).to(device)}
        self._use(sae)

    def _use(self, sae: TopKSAE) -> None:
        """Read the audit through ``sae``: its attribution methods and how many latents per image are kept."""
        self.sae = sae
        self.methods = {h: {name: get_method(name, tail=self.tail, sae=sae, head=head, token=self.config.token,
                                             seed=self.config.seed) for name in REGISTRY}
                        for h, head in self.heads.items()}
        self.keep = min(sae.n_latents, max(2 * sae.k, 32))

    def with_sae(self, sae: TopKSAE) -> "AuditContext":
        """The same audit read through another dictionary: the same tail and heads, that SAE's methods."""
        other = object.__new__(AuditContext)
        other.__dict__.update(self.__dict__)
        other._use(sae)
        return other

    @classmethod
    def build(cls, config, bundle, probe, sae, device) -> "AuditContext":
        bundle.model.to(device)
        return cls(config, bundle, probe, sae, device)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)
