"""What the vote of several dictionaries costs and buys, side by side on one planted case.

    python -m workers.casestudy.bench_dictionaries [--seed 0] [--artifact "a ruler"] [--sae-seeds 0 1 2]

For each setting (one dictionary, the default three) the case is audited once per SAE seed with the defaults;
printed per setting: the mean audit time and its ratio to one dictionary, the concepts each SAE seed flags
(the ground truth's description of each probe flag) and their overlap across seeds (flagged by every seed /
by any), the flags per audit and how many of them are precise.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .benchmark import audit_and_score
from .build import CaseConfig, build_case, default_cache

SETTINGS = {"one dictionary": {"dictionaries": 1}, "defaults (3 dictionaries)": {}}


def concepts(scored: dict) -> set[str]:
    return {f"{f['class']}: {f['concepts'][0] if f['concepts'] else 'none'}" for f in scored["flags"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", default="a ruler")
    parser.add_argument("--sae-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    case = build_case(default_cache(), CaseConfig(seed=args.seed, artifact=args.artifact), log=lambda line: None)
    rows = {}
    for name, options in SETTINGS.items():
        seconds, flagged, n_flags, n_precise = [], [], [], []
        for sae_seed in args.sae_seeds:
            started = time.perf_counter()
            scored = audit_and_score(case, {**options, "sae": {"seed": sae_seed}})
            seconds.append(time.perf_counter() - started)
            flagged.append(concepts(scored))
            n_flags.append(scored["n_flags"])
            n_precise.append(scored["n_precise"])
        every, anyone = set.intersection(*flagged), set.union(*flagged)
        rows[name] = {"seconds": float(np.mean(seconds)), "overlap": len(every) / len(anyone) if anyone else 1.0,
                      "flagged": flagged, "flags": n_flags, "precise": n_precise}
    base = rows["one dictionary"]["seconds"]
    print(f"case: seed {args.seed}, {args.artifact} -> melanoma; SAE seeds {args.sae_seeds}")
    print("| setting | audit s (mean) | vs one dictionary | seed overlap | flags per audit | precise |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x | {r['overlap']:.2f} | "
              f"{' / '.join(map(str, r['flags']))} | {' / '.join(map(str, r['precise']))} |")
    for name, r in rows.items():
        for sae_seed, found in zip(args.sae_seeds, r["flagged"]):
            print(f"{name}, SAE seed {sae_seed}: {', '.join(sorted(found)) or 'nothing'}")


if __name__ == "__main__":
    main()
