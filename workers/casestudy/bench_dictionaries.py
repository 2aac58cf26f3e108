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

from .benchmark import audit_and_score, flagged_concepts
from .build import CaseConfig, build_case, default_cache

DEFAULTS = "defaults (3 dictionaries)"
SETTINGS = {"one dictionary": {"dictionaries": 1}, DEFAULTS: {}}


def flag_figures(runs: list[dict]) -> dict:
    """Over scored audits of one case with different SAE seeds (each with its ``seconds``): the mean time, the
    concepts each flags, how many every audit flags and any does and their ratio (the overlap), the flags and
    precise flags per audit, whether each flagged the planted artifact for its class, the flags' mean purity
    and each SAE's FVU."""
    flagged = [flagged_concepts(r) for r in runs]
    every, anyone = set.intersection(*flagged), set.union(*flagged)
    purities = [f["purity"] for r in runs for f in r["flags"] if f.get("purity") is not None]
    return {"seconds": float(np.mean([r["seconds"] for r in runs])),
            "overlap": len(every) / len(anyone) if anyone else 1.0, "every": len(every), "any": len(anyone),
            "flagged": [sorted(f) for f in flagged], "flags": [r["n_flags"] for r in runs],
            "precise": [r["n_precise"] for r in runs], "recall": [bool(r.get("recall")) for r in runs],
            "flag_purity": float(np.mean(purities)) if purities else None, "fvu": [r.get("sae_fvu") for r in runs]}


def print_flagged(rows: dict[str, dict], sae_seeds: list[int]) -> None:
    """Each setting's flagged concepts (:func:`flag_figures`), one line per SAE seed."""
    for name, r in rows.items():
        for sae_seed, found in zip(sae_seeds, r["flagged"]):
            print(f"{name}, SAE seed {sae_seed}: {', '.join(found) or 'nothing'}")


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
        runs = []
        for sae_seed in args.sae_seeds:
            started = time.perf_counter()
            scored = audit_and_score(case, {**options, "sae": {**options.get("sae", {}), "seed": sae_seed}})
            runs.append({**scored, "seconds": time.perf_counter() - started})
        rows[name] = {"options": options, **flag_figures(runs)}
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
    print_flagged(rows, args.sae_seeds)
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "artifact": args.artifact, "sae_seeds": args.sae_seeds,
                                         "settings": rows}, indent=1))


if __name__ == "__main__":
    main()
