"""What the vote of several dictionaries costs and buys, side by side on one planted case.

    python -m workers.casestudy.bench_dictionaries [--seed 0] [--artifact "a ruler"] [--sae-seeds 0 1 2]
                                                   [--setting NAME JSON ...] [--json FILE]

For each setting (one dictionary, the default three, and each ``--setting``: audit options as JSON on top of
the defaults, e.g. ``--setting patches '{"sae": {"patch_tokens": 16, "n_latents": 256, "k": 8}}'``) the case is
audited once per SAE seed;
printed per setting: the mean audit time and its ratio to the defaults', the concepts each SAE seed flags
(the ground truth's description of each probe flag) and their overlap across seeds (flagged by every seed /
by any), the flags per audit, how many of them are precise, the planted artifact flagged for its class, the
flags' mean purity and the SAE's FVU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .benchmark import audit_and_score
from .build import CaseConfig, build_case, default_cache

DEFAULTS = "defaults (3 dictionaries)"
SETTINGS = {"one dictionary": {"dictionaries": 1}, DEFAULTS: {}}


def concepts(scored: dict) -> set[str]:
    return {f"{f['class']}: {f['concepts'][0] if f['concepts'] else 'none'}" for f in scored["flags"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", default="a ruler")
    parser.add_argument("--sae-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                        help="another setting: its name and audit options as JSON")
    parser.add_argument("--only-given", action="store_true", help="run the defaults and the --setting ones only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    case = build_case(default_cache(), CaseConfig(seed=args.seed, artifact=args.artifact), log=lambda line: None)
    settings = {k: v for k, v in SETTINGS.items() if not args.only_given or k == DEFAULTS}
    settings.update({name: json.loads(options) for name, options in args.setting})
    rows = {}
    for name, options in settings.items():
        seconds, flagged, n_flags, n_precise, recall, purity, fvu = [], [], [], [], [], [], []
        for sae_seed in args.sae_seeds:
            started = time.perf_counter()
            scored = audit_and_score(case, {**options, "sae": {**options.get("sae", {}), "seed": sae_seed}})
            seconds.append(time.perf_counter() - started)
            flagged.append(concepts(scored))
            n_flags.append(scored["n_flags"])
            n_precise.append(scored["n_precise"])
            recall.append(bool(scored.get("recall")))
            purity += [f["purity"] for f in scored["flags"] if f.get("purity") is not None]
            fvu.append(scored.get("sae_fvu"))
        every, anyone = set.intersection(*flagged), set.union(*flagged)
        rows[name] = {"options": options, "seconds": float(np.mean(seconds)),
                      "overlap": len(every) / len(anyone) if anyone else 1.0, "every": len(every), "any": len(anyone),
                      "flagged": [sorted(f) for f in flagged], "flags": n_flags, "precise": n_precise,
                      "recall": recall, "flag_purity": float(np.mean(purity)) if purity else None, "fvu": fvu}
    base = rows[DEFAULTS]["seconds"]
    print(f"case: seed {args.seed}, {args.artifact} -> melanoma; SAE seeds {args.sae_seeds}")
    print("| setting | audit s (mean) | vs defaults | flagged by every seed / any | seed overlap | flags per audit | "
          "precise | planted flagged | flag purity | FVU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x | {r['every']} / {r['any']} | "
              f"{r['overlap']:.2f} | {' / '.join(map(str, r['flags']))} | {' / '.join(map(str, r['precise']))} | "
              f"{sum(r['recall'])} of {len(r['recall'])} | {r['flag_purity'] or 0:.3f} | "
              f"{' / '.join('-' if v is None else f'{v:.3f}' for v in r['fvu'])} |")
    for name, r in rows.items():
        for sae_seed, found in zip(args.sae_seeds, r["flagged"]):
            print(f"{name}, SAE seed {sae_seed}: {', '.join(found) or 'nothing'}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "artifact": args.artifact, "sae_seeds": args.sae_seeds,
                                         "settings": rows}, indent=1))


if __name__ == "__main__":
    main()
