"""A correction in rounds: after each re-audit, which of the latents it still flags join the corrected concept.

Pure Python (no torch, no Django), so the service decides on a next round without loading the engine; the
engine measures which latents track a concept (:func:`workers.engine.correct_audit.tracking_latents`)::

    added = next_round_latents(outcome.shortcut["tracking"], flagged_latents_of_the_reaudit)
    if any(added):
        concepts = grown_concepts(concepts, added)  # and correct the original probe again
"""
from __future__ import annotations

from typing import Iterable, Sequence


def next_round_latents(tracking: Sequence[dict], flagged: Iterable[int]) -> list[list[int]]:
    """Per concept of ``tracking`` (:func:`~workers.engine.correct_audit.tracking_latents`), the latents among ``flagged`` (the latents a
    re-audit still flags for the probe) that track it and are not yet part of it, in ``flagged``'s order: what
    a correction's next round adds to the concept. Each latent joins the concept it tracks best."""
    flagged = list(dict.fromkeys(int(i) for i in flagged))
    added: list[list[int]] = [[] for _ in tracking]
    for latent in flagged:
        shares = [(entry["latents"].get(str(latent)), g) for g, entry in enumerate(tracking)
                  if latent not in entry["concept"]]
        shares = [(s, g) for s, g in shares if s is not None]
        if shares:
            added[max(shares)[1]].append(latent)
    return added


def grown_concepts(concepts: Sequence[Sequence[int]], added: Sequence[Sequence[int]]) -> list[list[int]]:
    """``concepts`` with each one's ``added`` latents appended (no latent twice)."""
    return [list(dict.fromkeys([*map(int, c), *map(int, a)])) for c, a in zip(concepts, added)]
