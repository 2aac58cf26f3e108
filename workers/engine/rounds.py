"""A correction in rounds: after each re-audit, what the next round corrects.

Pure Python (no torch, no Django), so the service decides on a next round without loading the engine; the
engine measures which latents track a concept (:func:`workers.engine.correct_audit.tracking_latents`)::

    step = next_round(concepts, outcome.shortcut["tracking"], flagged_latents_of_the_reaudit)
    if step["changed"]:
        concepts = step["concepts"]  # and correct the audited probe again

Two things a re-audit can still flag, each answered in the next round:

- a latent that **tracks** a corrected concept (most of its activation on the images that show it) but is not
  part of it: the SAE spread the concept over more latents than the flag held. It joins the concept.
- latents **of** a corrected concept: one direction per concept (the regression of the features on the concept's
  summed activation) did not take all of them out of what the probe reads. They become a concept of their own as
  well, so the next round removes their direction too (on the benchmark's ruler, ``project`` then closed 76 % and
  80 % of the two hurt slices' gaps instead of 43 % and 54 %).
"""
from __future__ import annotations

from typing import Iterable, Sequence


def next_round_latents(tracking: Sequence[dict], flagged: Iterable[int]) -> list[list[int]]:
    """Per concept of ``tracking`` (:func:`~workers.engine.correct_audit.tracking_latents`), the latents among
    ``flagged`` (the latents a re-audit still flags for the probe) that track it and are not yet part of it, in
    ``flagged``'s order. Each latent joins the concept it tracks best."""
    flagged = list(dict.fromkeys(int(i) for i in flagged))
    added: list[list[int]] = [[] for _ in tracking]
    for latent in flagged:
        shares = [(entry["latents"].get(str(latent)), g) for g, entry in enumerate(tracking)
                  if latent not in entry["concept"]]
        shares = [(s, g) for s, g in shares if s is not None]
        if shares:
            added[max(shares)[1]].append(latent)
    return added


def still_flagged_groups(concepts: Sequence[Sequence[int]], flagged: Iterable[int]) -> list[list[int]]:
    """Per concept, its latents among ``flagged``, as a new concept when they are not all of it and not already
    one of ``concepts`` (so a round never repeats one)."""
    flagged = {int(i) for i in flagged}
    known = {tuple(sorted(map(int, c))) for c in concepts}
    out: list[list[int]] = []
    for concept in concepts:
        part = [int(i) for i in concept if int(i) in flagged]
        key = tuple(sorted(part))
        if part and len(part) < len(concept) and key not in known:
            known.add(key)
            out.append(part)
    return out


def grown_concepts(concepts: Sequence[Sequence[int]], added: Sequence[Sequence[int]],
                   split: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """``concepts`` with each one's ``added`` latents appended (no latent twice), then the ``split`` groups."""
    grown = [list(dict.fromkeys([*map(int, c), *map(int, a)])) for c, a in zip(concepts, added)]
    return grown + [list(map(int, s)) for s in split]


def next_round(concepts: Sequence[Sequence[int]], tracking: Sequence[dict], flagged: Iterable[int],
               method: str = "project", column: bool = False) -> dict:
    """What the round after a re-audit that flags ``flagged`` corrects: ``added`` (per concept, the flagged
    latents that track it), ``split`` (the concepts' flagged latents as concepts of their own), ``concepts``
    (the next round's) and ``changed`` (False: a next round would repeat this one, so stop). ``method``
    "reweight" splits nothing: it balances the union of the concepts' latents, which a split leaves as it was.
    ``column``: the direction was read from a labels.csv column (option ``column``), which the concepts do not
    change, so a next round would repeat this one: ``added`` still says what tracks the concept."""
    flagged = list(flagged)
    added = next_round_latents(tracking, flagged) if tracking else [[] for _ in concepts]
    if column:
        return {"added": added, "split": [], "concepts": [list(c) for c in concepts], "changed": False}
    split = still_flagged_groups(concepts, flagged) if method != "reweight" else []
    return {"added": added, "split": split, "concepts": grown_concepts(concepts, added, split),
            "changed": any(added) or bool(split)}
