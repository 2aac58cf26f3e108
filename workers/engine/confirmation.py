"""Causal confirmation of flags: ablate and insert each flagged latent, against a baseline of latents of similar
activation mass, shard by shard (:func:`confirm_shard`), then sum (:func:`merge_confirmations`) and judge
(:func:`apply_confirmation`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .activations import ActivationStore
from .config import AuditConfig
from .context import AuditContext
from .hooks import select_tokens
from .interventions import shifted_outputs
from .sae import TopKSAE


def _similar_mass(class_mean: Tensor, latent: int, exclude: list[int], n: int = 5) -> list[int]:
    """The ``n`` other active latents whose mean activation on the class is closest to ``latent``'s (in log
    scale): removing any latent that carries that much mass flips some predictions, so these set the baseline."""
    mass = class_mean.clamp_min(0)
    candidates = [i for i in range(len(mass)) if i not in exclude and i != latent and float(mass[i]) > 0]
    if not candidates or float(mass[latent]) <= 0:
        return []
    target = float(torch.log(mass[latent]))
    candidates.sort(key=lambda i: abs(float(torch.log(mass[i])) - target))
    return candidates[:n]


_CONFIRM_COUNTS = ("ablation_images", "ablation_active", "ablation_flips", "correct_before", "correct_after",
                   "insertion_images", "insertion_flips_to_class", "others_called_before", "others_fixed",
                   "baseline_active", "baseline_flips")


def confirm_shard(ctx: AuditContext, store: ActivationStore, flags: list[dict], amounts: list[float], start: int,
                  count: int, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Counts of one shard for each flag: ablate the flagged latent on its class's images (and, as the baseline,
    each of ``flag["baseline_latents"]``), ablate it on other classes' images it is active on (does that stop them
    being called the flag's class?), insert it (by ``amounts``) into other classes' images.
    :func:`merge_confirmations` adds shards up."""
    config, device, tail, sae = ctx.config, ctx.device, ctx.tail, ctx.sae
    labels = store.labels
    stats = [dict.fromkeys(_CONFIRM_COUNTS, 0) for _ in flags]
    with torch.no_grad():
        for lo, acts, _ in store.iter_batches(config.batch_size, start, start + count):
            acts = acts.to(device)
            b = acts.shape[0]
            y = labels[lo:lo + b].to(device)
            activity = _image_activity(sae, acts, config)  # [b, L]
            base = {h: head(tail(acts)).argmax(1) for h, head in ctx.heads.items()}
            for flag, amount, st in zip(flags, amounts, stats):
                head = ctx.heads[flag["head"]]
                c = ctx.class_names.index(flag["class_name"])
                latent = flag["latent"]
                own = y == c
                before_all = base[flag["head"]]
                if own.any():
                    after = shifted_outputs(tail, sae, head, acts[own], latent, token=config.token).argmax(1)
                    before = before_all[own]
                    st["ablation_images"] += int(own.sum())
                    st["ablation_active"] += int((activity[own, latent] > 0).sum())
                    st["ablation_flips"] += int((after != before).sum())
                    st["correct_before"] += int((before == c).sum())
                    st["correct_after"] += int((after == c).sum())
                    for other_latent in flag.get("baseline_latents", []):
                        after_b = shifted_outputs(tail, sae, head, acts[own], other_latent,
                                                  token=config.token).argmax(1)
                        st["baseline_active"] += int((activity[own, other_latent] > 0).sum())
                        st["baseline_flips"] += int((after_b != before).sum())
                other = ~own
                called = other & (activity[:, latent] > 0) & (before_all == c)
                if called.any():
                    after = shifted_outputs(tail, sae, head, acts[called], latent, token=config.token).argmax(1)
                    st["others_called_before"] += int(called.sum())
                    st["others_fixed"] += int((after != c).sum())
                if other.any():
                    after = shifted_outputs(tail, sae, head, acts[other], latent, insert=amount,
                                            token=config.token).argmax(1)
                    before = before_all[other]
                    st["insertion_images"] += int(other.sum())
                    st["insertion_flips_to_class"] += int(((before != c) & (after == c)).sum())
            if progress:
                progress(lo - start + b, count)
    return stats


def _image_activity(sae: TopKSAE, acts: Tensor, config: AuditConfig) -> Tensor:
    """[b, n_latents]: each latent's activation per image (pooled over patches for a spatial SAE)."""
    z = sae.encode(select_tokens(acts, config.token))
    if z.ndim == 3:
        z = z.amax(1) if config.spatial_pool == "max" else z.mean(1)
    return z


def merge_confirmations(per_shard: list[list[dict]]) -> list[dict]:
    return [{key: sum(s[i].get(key, 0) for s in per_shard) for key in _CONFIRM_COUNTS}
            for i in range(len(per_shard[0]))]


def _rate_beyond(k: int, n: int, baseline: float, min_z: float) -> bool:
    """Is k of n clearly above the rate ``baseline`` (one-sided z on the binomial)?"""
    if n == 0 or k == 0:
        return False
    p0 = min(max(baseline, 1.0 / n), 1 - 1e-6)
    return (k / n - p0) / (p0 * (1 - p0) / n) ** 0.5 >= min_z


def apply_confirmation(flags: list[dict], stats: list[dict] | None, amounts: list[float],
                       config: AuditConfig | None = None) -> None:
    """Write each flag's ``causal`` block from the summed counts, and its ``confirmation`` verdict
    (``stats`` None: confirmation was not run, the verdict says so).

    Confirmed means both: removing the latent flips the class's predictions clearly more often than removing
    latents of similar activation mass does (the baseline), and the harm is measured (with/without split).
    """
    min_z = config.harm_min_z if config is not None else 3.0
    if stats is None:
        for flag in flags:
            flag["confirmation"] = confirmation_verdict(flag["class_name"], None,
                                                        bool((flag.get("harm") or {}).get("measured")))
        return
    for flag, st, amount in zip(flags, stats, amounts):
        n_own = max(st["ablation_images"], 1)
        flip_rate = st["ablation_flips"] / max(st["ablation_active"], 1)
        baseline = st["baseline_flips"] / st["baseline_active"] if st["baseline_active"] else 0.0
        beyond = _rate_beyond(st["ablation_flips"], st["ablation_active"], baseline, min_z)
        causal = {
            "ablation_images": st["ablation_images"], "ablation_active": st["ablation_active"],
            "ablation_flips": st["ablation_flips"], "flip_rate": flip_rate, "baseline_flip_rate": baseline,
            "baseline_latents": flag.get("baseline_latents", []), "beyond_baseline": beyond,
            "accuracy_before": st["correct_before"] / n_own, "accuracy_after": st["correct_after"] / n_own,
            "accuracy_change": (st["correct_after"] - st["correct_before"]) / n_own,
            "others_called_before": st["others_called_before"], "others_fixed": st["others_fixed"],
            "insertion_images": st["insertion_images"], "insertion_flips_to_class": st["insertion_flips_to_class"],
            "insertion_amount": amount,
        }
        measured = bool((flag.get("harm") or {}).get("measured"))
        causal["confirmed"] = beyond and measured
        flag["causal"] = causal
        flag["confirmation"] = confirmation_verdict(flag["class_name"], causal, measured)


def confirmation_verdict(class_name: str, causal: dict | None, measured: bool) -> dict:
    """The flag's verdict in words; flags with measured harm rank above those without."""
    if not measured:
        return {"status": "relied_on_no_harm",
                "text": "relied on, no measured harm: the with/without split shows no harm the probe adds"}
    if causal is None:
        return {"status": "not_run", "text": "measured harm; causal confirmation was not run"}
    flips = (f"ablation flips {causal['flip_rate']:.0%} of the {class_name} images it is active on "
             f"(latents of similar activation mass: {causal['baseline_flip_rate']:.0%})")
    if causal["others_called_before"]:
        flips += (f"; it fixes {causal['others_fixed']} of {causal['others_called_before']} other images "
                  f"wrongly called {class_name}")
    if causal["confirmed"]:
        return {"status": "confirmed", "text": f"confirmed shortcut, measured harm: {flips}"}
    return {"status": "not_confirmed",
            "text": f"measured harm, but removing it does little beyond the baseline: {flips}"}
