"""A verdict that holds: the audit's flags put to the vote of dictionaries trained with other seeds.

A single SAE is one draw: trained again with another seed it splits and merges concepts differently, and a flag
that only one draw raises is a statement about that draw, not about the model. An audit trains
``dictionaries`` SAEs on the same activations (seeds ``sae.seed``, ``sae.seed + 1``, ...) and finds each one's
flags with the same rule. A flag of the first (the audit's SAE, whose latents the report shows) is *found* by
another dictionary when a set of that dictionary's flags for the same head and class has a summed activation
correlating with the flag's concept at least ``match_min_correlation`` over the audited images; the concept's
activation is ``a(x) = sum_{i in S} z_i(x)`` over its latents ``S``, so a dictionary that splits the concept over
two latents, or two flags, still finds it. A flag is kept when more than ``flag_min_stability`` of the
dictionaries find it (by default a majority), once per concept with its summed share.

Pure numpy and torch over activations; no Django.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .activations import ActivationStore
from .config import AuditConfig
from .errors import checkpoint
from .hooks import select_tokens
from .sae import TopKSAE

MIN_GAIN = 0.05  # a flag joins a match only when it raises the correlation by more than this


@torch.no_grad()
def concept_activity(sae: TopKSAE, store: ActivationStore, config: AuditConfig, concepts: list[list[int]],
                     device) -> np.ndarray:
    """[n images, len(concepts)]: each concept's summed activation per image (a spatial SAE's latents pooled
    over the patches as the audit pools them, then summed)."""
    out = np.zeros((store.n, len(concepts)), np.float32)
    if not concepts:
        return out
    members = torch.zeros(sae.n_latents, len(concepts), device=device)  # [L, F] 1 where a latent is in a concept
    for f, latents in enumerate(concepts):
        members[list(latents), f] = 1.0
    for lo, z in pooled_activations(sae, store, config, device):
        out[lo:lo + z.shape[0]] = (z @ members).cpu().numpy()
    return out


@torch.no_grad()
def best_latents(sae: TopKSAE, store: ActivationStore, config: AuditConfig, target: np.ndarray, device,
                 candidates: int = 8) -> tuple[float, list[int]]:
    """The set of ``sae``'s latents whose summed activation correlates best with ``target`` [n images]: the
    ``candidates`` latents correlating best on their own (:func:`correlated_latents`), then :func:`best_match`
    among them."""
    top, columns = correlated_latents(sae, store, config, target, device, candidates)
    best, chosen = best_match(target, columns)
    return best, [top[c] for c in chosen]


def correlated_latents(sae: TopKSAE, store: ActivationStore, config: AuditConfig, target: np.ndarray, device,
                       candidates: int = 8) -> tuple[list[int], np.ndarray]:
    """The ``candidates`` latents whose activation correlates best with ``target`` [n images] on its own, best
    first (one pass over the store), and their activations [n, candidates] (a second pass)."""
    n, t = store.n, torch.as_tensor(target, dtype=torch.float64)
    sums = torch.zeros(sae.n_latents, dtype=torch.float64)
    squares = torch.zeros_like(sums)
    products = torch.zeros_like(sums)
    for lo, z in pooled_activations(sae, store, config, device):
        z = z.double().cpu()
        sums += z.sum(0)
        squares += z.pow(2).sum(0)
        products += t[lo:lo + z.shape[0]] @ z
    centred_t = t - t.mean()
    covariance = products - t.mean() * sums
    spread = (squares - sums.pow(2) / n).clamp_min(0).sqrt() * centred_t.norm()
    rho = torch.where(spread > 0, covariance / spread.clamp_min(1e-12), torch.zeros_like(spread))
    top = rho.topk(min(candidates, sae.n_latents)).indices.tolist()
    columns = np.zeros((n, len(top)), np.float32)
    for lo, z in pooled_activations(sae, store, config, device):
        columns[lo:lo + z.shape[0]] = z[:, top].cpu().numpy()
    return top, columns


@torch.no_grad()
def pooled_activations(sae: TopKSAE, store: ActivationStore, config: AuditConfig, device):
    """(first row, [b, n_latents] activations per image) over the store, pooled as the audit pools them."""
    for lo, acts, _ in store.iter_batches(config.batch_size):
        checkpoint()
        z = sae.encode(select_tokens(acts.to(device), config.token).float())
        if z.ndim == 3:
            z = z.amax(1) if config.spatial_pool == "max" else z.mean(1)
        yield lo, z


def correlations(target: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``target`` [n] with each column of ``candidates`` [n, m]; 0 where either is
    constant (a concept active on no image matches nothing)."""
    t = target - target.mean()
    c = candidates - candidates.mean(0, keepdims=True)
    denom = np.sqrt((t * t).sum() * (c * c).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (t @ c) / np.where(denom > 0, denom, 1.0), 0.0)


def best_match(target: np.ndarray, candidates: np.ndarray) -> tuple[float, list[int]]:
    """The set of ``candidates``' columns whose sum correlates best with ``target`` (greedy: the best column,
    then each next one that raises the correlation), and that correlation."""
    if candidates.shape[1] == 0:
        return 0.0, []
    first = correlations(target, candidates)
    order = np.argsort(-first)
    chosen, best = [int(order[0])], float(first[order[0]])
    total = candidates[:, order[0]].copy()
    for j in order[1:]:
        rho = float(correlations(target, (total + candidates[:, j])[:, None])[0])
        if rho > best + MIN_GAIN:
            chosen.append(int(j))
            best = rho
            total += candidates[:, j]
    return best, chosen


def _same_place(flag: dict, other: dict) -> bool:
    return (flag["head"], flag["class_name"]) == (other["head"], other["class_name"])


def _merge_repeats(flags: list[dict], activity: np.ndarray, config: AuditConfig) -> tuple[list[dict], np.ndarray]:
    """One flag per concept: a flag whose concept's activation correlates with an earlier flag's of the same head
    and class (at ``match_min_correlation``) joins it, latents and shares summed."""
    groups: list[list[int]] = []
    for i, flag in enumerate(flags):
        same = [g for g in groups if _same_place(flag, flags[g[0]])]
        rho = correlations(activity[:, i], np.stack([activity[:, g].sum(1) for g in same], 1)) if same else []
        if len(rho) and rho.max() >= config.match_min_correlation:
            same[int(np.argmax(rho))].append(i)
        else:
            groups.append([i])
    return [_joined([flags[i] for i in g]) for g in groups], \
        np.stack([activity[:, g].sum(1) for g in groups], 1) if groups else activity[:, :0]


def _joined(members: list[dict]) -> dict:
    """Flags of one concept as one flag: the first (the rule's order) leads, latents joined, shares summed."""
    lead = dict(members[0])
    lead["concept_latents"] = list(dict.fromkeys(i for f in members for i in f["concept_latents"]))
    for key in ("share", "probe_share", "zero_shot_share", "mean_relevance"):
        lead[key] = sum(f[key] for f in members)
    return lead


def _brief(flag: dict) -> dict:
    """What a reviewer reads of a flag that is not shown as one: where, what it looks like, how much."""
    return {k: flag.get(k) for k in ("head", "class_name", "latent", "concept_latents", "label", "closest_concept",
                                     "share")}


Express = Callable[[dict, np.ndarray], "tuple[dict | None, float, str]"]


def hold(flags: list[dict], activity: np.ndarray, others: list[tuple[list[dict], np.ndarray]],
         config: AuditConfig, seeds: list[int], express: Express | None = None) -> tuple[list[dict], dict]:
    """The audit's ``flags`` put to the vote of ``others``: per other dictionary, its flags and their concepts'
    activity [n, its flags].

    A dictionary finds a flag when a set of its flags for the same head and class matches the flag's concept, or
    when one of its flags is matched by a set of the audit's flags that holds this one: the audit's SAE split the
    concept into parts that the other dictionary keeps whole. Parts that more than ``flag_min_stability`` of the
    other dictionaries see as one concept become one flag here.

    Returns the flags kept (each with ``stability``: found_by, of, and per finding dictionary its index, seed,
    the correlation and its latents; re-ranked per head and class) and the audit's ``stability`` summary: the
    dictionaries, the rule, the flags dropped and the concepts more than ``flag_min_stability`` of the
    dictionaries flag that the audit's SAE does not. ``express(concept, activity)`` turns such a concept (one of
    its flags in another dictionary, and its activation) into a flag of the audit's SAE, with the correlation of
    the latents it found and, when it cannot (None), the reason: the verdict is then the same whichever
    dictionary reports it. Those it cannot are listed as ``missed``.
    """
    flags, activity = _merge_repeats(flags, activity, config)
    n_dictionaries = 1 + len(others)
    found = [{0: {"dictionary": 0, "seed": seeds[0], "correlation": 1.0, "latents": list(f["concept_latents"])}}
             for f in flags]
    matched = [np.zeros(len(other_flags), bool) for other_flags, _ in others]
    together: dict[tuple[int, int], set[int]] = {}  # two of the audit's flags -> dictionaries that see one concept
    for k, other in enumerate(others, start=1):
        _vote(k, other, flags, activity, config, seeds, found, matched[k - 1], together)
    # parts of one concept by the vote of the other dictionaries (one dictionary's mixed latent joins nothing)
    parts = [list(pair) for pair, by in together.items() if len(by) > config.flag_min_stability * len(others)]
    flags, found = _join_parts(flags, found, parts)
    for flag, by in zip(flags, found):
        flag["stability"] = {"found_by": len(by), "of": n_dictionaries, "dictionaries": [by[k] for k in sorted(by)]}
    holds = [f["stability"]["found_by"] > config.flag_min_stability * n_dictionaries for f in flags]
    kept = [f for f, keep in zip(flags, holds) if keep]
    dropped = [{**_brief(f), "found_by": f["stability"]["found_by"], "of": n_dictionaries}
               for f, keep in zip(flags, holds) if not keep]
    missed = _express_missed(kept, others, matched, config, seeds, express)
    _rerank(kept)
    summary = {
        "dictionaries": n_dictionaries, "seeds": list(seeds[:n_dictionaries]),
        "match_min_correlation": config.match_min_correlation, "flag_min_stability": config.flag_min_stability,
        "kept": len(kept), "dropped": dropped, "missed": missed,
    }
    return kept, summary


def _vote(k: int, other: tuple[list[dict], np.ndarray], flags: list[dict], activity: np.ndarray,
          config: AuditConfig, seeds: list[int], found: list[dict], matched: np.ndarray,
          together: dict[tuple[int, int], set[int]]) -> None:
    """Dictionary ``k``'s vote (``other``: its flags and their activity) on the audit's ``flags``: records in
    ``found`` the flags it finds (with the correlation and its latents), in ``matched`` its own flags that match
    one, and in ``together`` the pairs of the audit's flags it sees as one concept."""
    other_flags, other_activity = other

    def record(i: int, rho: float, picked: list[int]) -> None:
        matched[picked] = True
        if k not in found[i] or rho > found[i][k]["correlation"]:
            found[i][k] = {"dictionary": k, "seed": seeds[k], "correlation": round(rho, 4), "latents": sorted(
                {int(x) for j in picked for x in other_flags[j]["concept_latents"]})}

    for i, flag in enumerate(flags):
        same = [j for j, g in enumerate(other_flags) if _same_place(flag, g)]
        rho, chosen = best_match(activity[:, i], other_activity[:, same])
        if same and rho >= config.match_min_correlation:
            record(i, rho, [same[c] for c in chosen])
    for j, other_flag in enumerate(other_flags):
        same = [i for i, f in enumerate(flags) if _same_place(f, other_flag)]
        rho, chosen = best_match(other_activity[:, j], activity[:, same])
        if same and rho >= config.match_min_correlation:
            for c in chosen:
                record(same[c], rho, [j])
            for a in chosen:
                for b in chosen:
                    if same[a] < same[b]:
                        together.setdefault((same[a], same[b]), set()).add(k)


def _express_missed(kept: list[dict], others: list[tuple[list[dict], np.ndarray]], matched: list[np.ndarray],
                    config: AuditConfig, seeds: list[int], express: Express | None) -> list[dict]:
    """The concepts the other dictionaries flag that the audit's SAE does not: each that ``express`` turns into
    a flag of the audit's SAE, not already part of a kept flag, is appended to ``kept``; the others are returned,
    each with the reason."""
    n_dictionaries = 1 + len(others)
    missed = []
    for concept in _missed(others, matched, n_dictionaries, config, seeds):
        column, found = concept.pop("activity"), concept.pop("found")
        flag, rho, reason = express(concept, column) if express else (None, 0.0, "")
        taken = flag and {i for f in kept if _same_place(f, flag) for i in f["concept_latents"]}
        if taken and taken & set(flag["concept_latents"]):
            flag, reason = None, f"its latents here are part of a flag already (latents {sorted(taken)})"
        if flag is None:
            missed.append({**concept, "reason": reason})
            continue
        # the audit's SAE holds the concept without flagging it: the dictionaries that flag it decide
        flag["stability"] = {"found_by": len(found), "of": n_dictionaries, "expressed": True, "dictionaries": [
            {"dictionary": 0, "seed": seeds[0], "correlation": round(rho, 4), "latents": flag["concept_latents"],
             "flagged": False}, *found]}
        kept.append(flag)
    return missed


def _join_parts(flags: list[dict], found: list[dict], parts: list[list[int]]) -> tuple[list[dict], list[dict]]:
    """Flags that some dictionary sees as one concept joined into one (in the order of their first member), with
    every dictionary that found any of them (its best correlation kept)."""
    owner = list(range(len(flags)))

    def root(i: int) -> int:
        while owner[i] != i:
            i = owner[i]
        return i

    for part in parts:
        for i in part[1:]:
            a, b = sorted((root(part[0]), root(i)))
            owner[b] = a
    groups: dict[int, list[int]] = {}
    for i in range(len(flags)):
        groups.setdefault(root(i), []).append(i)
    joined_flags, joined_found = [], []
    for members in groups.values():
        by: dict[int, dict] = {}
        for i in members:
            for k, entry in found[i].items():
                if k not in by or entry["correlation"] > by[k]["correlation"]:
                    by[k] = dict(entry)
        by[0]["latents"] = list(dict.fromkeys(x for i in members for x in flags[i]["concept_latents"]))
        joined_flags.append(_joined([flags[i] for i in members]))
        joined_found.append(by)
    return joined_flags, joined_found


def _missed(others, matched, n_dictionaries: int, config: AuditConfig, seeds: list[int]) -> list[dict]:
    """Concepts that more than ``flag_min_stability`` of all dictionaries flag, none of them the audit's SAE:
    the other dictionaries' unmatched flags, grouped across dictionaries by the same correlation rule. Each comes
    with the activation of its first flag (``activity``) and the flags that make it (``found``)."""
    groups: list[dict] = []
    for k, ((other_flags, other_activity), used) in enumerate(zip(others, matched), start=1):
        for j, flag in enumerate(other_flags):
            if used[j]:
                continue
            column = other_activity[:, j]
            rho = {id(g): float(correlations(g["activity"], column[:, None])[0]) for g in groups}
            home = next((g for g in groups if _same_place(flag, g["flag"]) and k not in g["found"]
                         and rho[id(g)] >= config.match_min_correlation), None)
            if home is None:
                home = {"flag": flag, "activity": column, "found": {}}
                groups.append(home)
            home["found"][k] = {"dictionary": k, "seed": seeds[k], "correlation": round(rho.get(id(home), 1.0), 4),
                                "latents": list(flag["concept_latents"])}
    return [{**_brief(g["flag"]), "dictionary": min(g["found"]), "found_by": len(g["found"]), "of": n_dictionaries,
             "seeds": [seeds[k] for k in sorted(g["found"])], "activity": g["activity"],
             "found": [g["found"][k] for k in sorted(g["found"])]}
            for g in groups if len(g["found"]) > config.flag_min_stability * n_dictionaries]


def _rerank(flags: list[dict]) -> None:
    """Ranks 1.. per head and class, in the flags' order (the order the flag rule kept them in)."""
    counts: dict[tuple, int] = {}
    for flag in flags:
        place = (flag["head"], flag["class_name"])
        counts[place] = counts.get(place, 0) + 1
        flag["rank"] = counts[place]


def single(flags: list[dict], seed: int) -> tuple[list[dict], dict]:
    """The flags of an audit with one dictionary (a registered or reused SAE, or ``dictionaries`` 1): nothing
    votes, so each flag is found by 1 of 1 and the summary says stability was not measured."""
    for flag in flags:
        flag["stability"] = {"found_by": 1, "of": 1, "dictionaries": [
            {"dictionary": 0, "seed": seed, "correlation": 1.0, "latents": list(flag["concept_latents"])}]}
    return flags, {"dictionaries": 1, "seeds": [seed], "kept": len(flags), "dropped": [], "missed": [],
                   "match_min_correlation": None, "flag_min_stability": None}
