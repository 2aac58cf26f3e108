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
from .errors import checkpoint
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


def baseline_groups(class_mean: Tensor, concept: list[int], exclude: list[int], n: int = 5) -> list[list[int]]:
    """``n`` groups of latents to remove instead of a concept's: group j stands each of the concept's latents
    in for by its j-th closest latent in activation mass on the class (see :func:`_similar_mass`), so a concept
    of three latents is compared with three latents of the same weight that mean something else."""
    peers = [_similar_mass(class_mean, latent, exclude=list(exclude) + list(concept), n=n) for latent in concept]
    groups = []
    for j in range(n):
        group = sorted({p[j] for p in peers if len(p) > j})
        if group:
            groups.append(group)
    return groups


_CONFIRM_COUNTS = ("ablation_images", "ablation_active", "ablation_flips", "correct_before", "correct_after",
                   "insertion_images", "insertion_flips_to_class", "others_called_before", "others_fixed",
                   "baseline_active", "baseline_flips", "baseline_called", "baseline_fixed")


def confirm_shard(ctx: AuditContext, store: ActivationStore, flags: list[dict], amounts: list[float], start: int,
                  count: int, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Counts of one shard for each flag, :func:`merge_confirmations` adds shards up.

    The flag's concept (all of ``flag["concept_latents"]``) is removed from the other classes' images it is
    active on that the head calls the flag's class (does that stop them being called so?), and from the class's
    own images (how many predictions flip?); each group of ``flag["baseline_groups"]`` (latents of similar
    activation mass) is removed the same way, from the images it is active on, as the baseline. The lead latent
    is also inserted (by ``amounts``) into the other classes' images.
    """
    config, device, tail, sae = ctx.config, ctx.device, ctx.tail, ctx.sae
    labels = store.labels
    stats = [dict.fromkeys(_CONFIRM_COUNTS, 0) for _ in flags]
    with torch.no_grad():
        for lo, acts, _ in store.iter_batches(config.batch_size, start, start + count):
            checkpoint()
            acts = acts.to(device)
            y = labels[lo:lo + acts.shape[0]].to(device)
            activity = _image_activity(sae, acts, config) > 0  # [b, L]
            base = {h: head(tail(acts)).argmax(1) for h, head in ctx.heads.items()}
            for flag, amount, st in zip(flags, amounts, stats):
                checkpoint()  # each flag is several forward passes over the batch
                _count_flag(ctx, flag, amount, acts, y, activity, base[flag["head"]], st)
            if progress:
                progress(lo - start + acts.shape[0], count)
    return stats


def _groups_of(flag: dict) -> list[list[int]]:
    """A flag's baseline groups (a draft written before groups existed names single latents)."""
    return flag.get("baseline_groups") or [[b] for b in flag.get("baseline_latents", [])]


def _count_flag(ctx: AuditContext, flag: dict, amount: float, acts: Tensor, y: Tensor, activity: Tensor,
                before: Tensor, st: dict) -> None:
    """Add one batch's counts of one flag to ``st`` (see :func:`confirm_shard`)."""
    head, token = ctx.heads[flag["head"]], ctx.config.token
    c = ctx.class_names.index(flag["class_name"])
    concept = flag.get("concept_latents") or [flag["latent"]]
    groups = _groups_of(flag)
    own, other = y == c, y != c

    def removed(latents: list[int], where: Tensor) -> Tensor:
        return shifted_outputs(ctx.tail, ctx.sae, head, acts[where], latents, token=token).argmax(1)

    if own.any():
        after = removed(concept, own)
        own_activity = activity[own]
        st["ablation_images"] += int(own.sum())
        st["ablation_active"] += int(own_activity[:, concept].any(1).sum())
        st["ablation_flips"] += int((after != before[own]).sum())
        st["correct_before"] += int((before[own] == c).sum())
        st["correct_after"] += int((after == c).sum())
        for group in groups:
            st["baseline_active"] += int(own_activity[:, group].any(1).sum())
            st["baseline_flips"] += int((removed(group, own) != before[own]).sum())
    wrongly_called = other & (before == c)
    for latents, called_key, fixed_key in [(concept, "others_called_before", "others_fixed")] + [
            (group, "baseline_called", "baseline_fixed") for group in groups]:
        called = wrongly_called & activity[:, latents].any(1)
        if called.any():
            st[called_key] += int(called.sum())
            st[fixed_key] += int((removed(latents, called) != c).sum())
    if other.any():
        after = shifted_outputs(ctx.tail, ctx.sae, head, acts[other], flag["latent"], insert=amount,
                                token=token).argmax(1)
        st["insertion_images"] += int(other.sum())
        st["insertion_flips_to_class"] += int(((before[other] != c) & (after == c)).sum())


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

    Confirmed means both: the harm is measured (with/without split), and removing the concept stops the other
    classes' images it is active on from being called the class clearly more often than removing latents of
    similar activation mass stops the images they are active on (the baseline; one-sided z >= ``harm_min_z``).
    Any heavy latent flips some predictions when removed; a shortcut is what undoes the errors it causes.
    """
    min_z = config.harm_min_z if config is not None else 3.0
    if stats is None:
        for flag in flags:
            flag["confirmation"] = confirmation_verdict(flag["class_name"], None,
                                                        bool((flag.get("harm") or {}).get("measured")))
        return
    for flag, st, amount in zip(flags, stats, amounts):
        flag["causal"] = _causal_block(flag, st, amount, min_z)
        measured = bool((flag.get("harm") or {}).get("measured"))
        flag["causal"]["confirmed"] = flag["causal"]["beyond_baseline"] and measured
        flag["confirmation"] = confirmation_verdict(flag["class_name"], flag["causal"], measured)


def _causal_block(flag: dict, st: dict, amount: float, min_z: float) -> dict:
    n_own = max(st["ablation_images"], 1)
    fix_rate = st["others_fixed"] / st["others_called_before"] if st["others_called_before"] else 0.0
    baseline_fix = st["baseline_fixed"] / st["baseline_called"] if st["baseline_called"] else 0.0
    groups = _groups_of(flag)
    return {
        "concept_latents": flag.get("concept_latents") or [flag["latent"]],
        "ablation_images": st["ablation_images"], "ablation_active": st["ablation_active"],
        "ablation_flips": st["ablation_flips"], "flip_rate": st["ablation_flips"] / max(st["ablation_active"], 1),
        "baseline_flip_rate": st["baseline_flips"] / st["baseline_active"] if st["baseline_active"] else 0.0,
        "baseline_latents": sorted({i for g in groups for i in g}),
        "accuracy_before": st["correct_before"] / n_own, "accuracy_after": st["correct_after"] / n_own,
        "accuracy_change": (st["correct_after"] - st["correct_before"]) / n_own,
        "others_called_before": st["others_called_before"], "others_fixed": st["others_fixed"],
        "fix_rate": fix_rate, "baseline_called": st["baseline_called"], "baseline_fixed": st["baseline_fixed"],
        "baseline_fix_rate": baseline_fix,
        "beyond_baseline": _rate_beyond(st["others_fixed"], st["others_called_before"], baseline_fix, min_z),
        "insertion_images": st["insertion_images"], "insertion_flips_to_class": st["insertion_flips_to_class"],
        "insertion_amount": amount,
    }


def confirmation_verdict(class_name: str, causal: dict | None, measured: bool) -> dict:
    """The flag's verdict in words; flags with measured harm rank above those without."""
    if not measured:
        return {"status": "relied_on_no_harm",
                "text": "relied on, no measured harm: the with/without split shows no harm the probe adds"}
    if causal is None:
        return {"status": "not_run", "text": "measured harm; causal confirmation was not run"}
    if causal["others_called_before"]:
        fixes = (f"removing it fixes {causal['others_fixed']} of the {causal['others_called_before']} other images "
                 f"it is active on that are wrongly called {class_name} ({causal['fix_rate']:.0%}; latents of "
                 f"similar activation mass fix {causal['baseline_fix_rate']:.0%} of theirs)")
    else:
        fixes = f"no image of another class it is active on is wrongly called {class_name}"
    fixes += (f"; removing it flips {causal['flip_rate']:.0%} of the {class_name} images it is active on "
              f"(similar latents: {causal['baseline_flip_rate']:.0%})")
    if causal["confirmed"]:
        return {"status": "confirmed", "text": f"confirmed shortcut, measured harm: {fixes}"}
    return {"status": "not_confirmed",
            "text": f"measured harm, but removing it undoes little beyond the baseline: {fixes}"}
