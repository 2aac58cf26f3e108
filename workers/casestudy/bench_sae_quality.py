"""Cleaner dictionaries: purity, stability, FVU and cost of SAE settings, side by side on one planted case.

    python -m workers.casestudy.bench_sae_quality [--seed 0] [--artifact "a ruler"] [--sae-seeds 0 1 2]
                                                  [--separate 6000] [--json FILE]

Every setting trains one dictionary per SAE seed on activations of the case's tiny CLIP (the audit's layer, the
last block) and is read on the audited images' CLS tokens, as an audit reads it:

- **purity**: for each generated artifact, the AUROC of the one latent that best tells its presence apart (the
  generator's ground truth), averaged over the artifacts; ``planted`` is the planted artifact's;
- **concept purity**: the same with a concept's latents summed, as a flag sums them: the best latent, then each of
  the next best that raises the AUROC by more than 0.01 (a dictionary that splits a concept over several latents
  is not penalised for the split);
- **mixed**: the share of the artifacts whose best latent tells a second artifact apart at AUROC >= 0.7 too;
- **latent stability**: the share of a dictionary's live latents (active on >= 1 % of the images) whose activation
  correlates >= 0.7 with some latent of another seed's dictionary, averaged over ordered pairs of seeds;
- **artifact stability**: the share of (artifact, pair of seeds) whose best latents correlate >= 0.7: the same
  concept found again;
- **FVU** on the audited CLS tokens, and the training time against the default's.

Training sources: the audited images (the default), patch tokens of the audited images as extra vectors, or a
separate unlabelled image set drawn by the case generator (``--separate`` images, every artifact independent
at 30 %). ``overcomplete``'s TopK and relaxed-archetypal SAEs (Fel et al. 2025) train on the same vectors with the
same steps when the package imports (``pip install overcomplete``; the settings are skipped, and say so,
otherwise).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .bench_dictionaries import flag_figures, print_flagged
from .build import GENERATOR_VERSION, CaseConfig, build_case, default_cache
from .images import ARTIFACTS, draw_samples, independent_rates, read_split, write_split

LIVE = 0.01  # a latent is live when active on at least this share of the images
SAME = 0.7  # two latents are the same concept when their activations correlate at least this much

# name -> (training source, SAE options); "default" is what an audit of 2 000 images gets (size_sae)
SETTINGS = {
    "default": ("audited", {}),
    "k 4": ("audited", {"k": 4}),
    "256 latents, k 8": ("audited", {"n_latents": 256, "k": 8}),
    "Matryoshka, 256 latents, k 8": ("audited", {"n_latents": 256, "k": 8, "variant": "matryoshka"}),
    "patch tokens too, 256 latents, k 8": ("patches", {"n_latents": 256, "k": 8}),
    "16 patch tokens per image too, 256 latents, k 8": ("patches16", {"n_latents": 256, "k": 8}),
    "16 patch tokens per image too, 256 latents, k 8, 600 steps": ("patches16", {"n_latents": 256, "k": 8,
                                                                               "steps": 600}),
    "16 patch tokens per image too, 256 latents, k 8, 1200 steps": ("patches16", {"n_latents": 256, "k": 8,
                                                                                "steps": 1200}),
    "16 patch tokens per image too, 256 latents, k 8, batch 1024, 1000 steps": (
        "patches16", {"n_latents": 256, "k": 8, "batch_size": 1024, "steps": 1000}),
    "16 patch tokens per image too, 256 latents, k 8, batch 1024, 1000 steps, lr 2e-3": (
        "patches16", {"n_latents": 256, "k": 8, "batch_size": 1024, "steps": 1000, "lr": 2e-3}),
    "16 patch tokens per image too, 64 latents, k 16": ("patches16", {"n_latents": 64, "k": 16}),
    "separate set, 64 latents, k 16": ("separate", {"n_latents": 64, "k": 16}),
    "separate set, 256 latents, k 8": ("separate", {"n_latents": 256, "k": 8}),
    "separate set, Matryoshka, 256 latents, k 8": ("separate", {"n_latents": 256, "k": 8, "variant": "matryoshka"}),
    "overcomplete TopK, 256 latents, k 8": ("audited", {"n_latents": 256, "k": 8, "trainer": "overcomplete"}),
    "overcomplete RA-TopK, 256 latents, k 8": ("audited", {"n_latents": 256, "k": 8, "trainer": "overcomplete-ra"}),
}


def extract(bundle, folder: Path, out: Path, token: str):
    """The audit's activations of the images in ``folder`` (every token for ``token="spatial"``)."""
    from workers.engine.activations import extract_activations
    from workers.engine.data import ImageFiles

    rows = read_split(folder)
    classes = sorted({r["label"] for r in rows})
    images = ImageFiles([folder / r["image"] for r in rows], [classes.index(r["label"]) for r in rows], classes)
    store = extract_activations(bundle, images.with_preprocess(bundle.preprocess), out, token=token)
    acts, _ = store.read(0, store.n)
    return acts.float(), rows


def separate_set(case: dict, n: int) -> Path:
    """An unlabelled set beside the cases: ``n`` images with every artifact independent, drawn from the case's seed
    (kept for reuse by every case of that seed)."""
    seed = case["config"]["seed"]
    folder = Path(case["audit_dir"]).parent.parent / f"unlabelled-v{GENERATOR_VERSION}-seed{seed}-{n}"
    if not (folder / "labels.csv").is_file():
        partial = folder.with_name(folder.name + ".part")
        write_split(partial, draw_samples(n, np.random.default_rng([seed, 7]), independent_rates(0.3)),
                    np.random.default_rng([seed, 8]))
        partial.rename(folder)
    return folder


def _import_overcomplete():
    """``import overcomplete``; its 0.3.0 release reads ``matplotlib.cm.get_cmap`` on import, which matplotlib 3.9
    removed: given back as the colormap registry's own lookup."""
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    import overcomplete

    return overcomplete


def _sample_patches(acts: torch.Tensor, per_image: int) -> torch.Tensor:
    """``per_image`` patch tokens of each image, drawn at random (fixed seed) as a spatial audit samples them."""
    gen = torch.Generator().manual_seed(0)
    patches = acts[:, 1:]
    pick = torch.rand(patches.shape[:2], generator=gen).argsort(1)[:, :per_image]
    return patches.gather(1, pick.unsqueeze(-1).expand(-1, -1, patches.shape[-1])).reshape(-1, patches.shape[-1])


def _batches(vectors: torch.Tensor, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(vectors), generator=gen)
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            yield vectors[order[lo:lo + batch_size]]


def train(vectors: torch.Tensor, options: dict, seed: int):
    """(encode: [n, d] -> [n, latents], reconstruct: [n, d] -> [n, d], seconds); ``train.last`` keeps our
    trainer's SAE (the flag-level comparison hands it to an audit)."""
    from workers.engine.config import SAEConfig
    from workers.engine.sae import size_sae, train_sae

    trainer = options.get("trainer", "ours")
    cfg = SAEConfig.from_dict({**{k: v for k, v in options.items() if k != "trainer"}, "seed": seed})
    n_latents, k, steps = size_sae(vectors.shape[1], len(vectors), cfg)
    torch.manual_seed(seed)
    started = time.perf_counter()
    if trainer == "ours":
        sae, _ = train_sae(_batches(vectors, cfg.batch_size, seed), d_model=vectors.shape[1], n_latents=n_latents,
                           k=k, steps=steps, init_sample=vectors[:16384], config=cfg)
        train.last = (sae, steps)
        return sae.encode, lambda h: sae(h)[0], time.perf_counter() - started
    # overcomplete's SAEs on the same vectors, centred and scaled as ours are, Adam at our learning rate
    _import_overcomplete()
    from overcomplete.sae import RATopKSAE, TopKSAE
    from overcomplete.sae.losses import top_k_auxiliary_loss

    mean = vectors.mean(0)
    scale = float((vectors - mean).pow(2).sum(-1).mean().div(vectors.shape[1]).sqrt())
    normed = (vectors - mean) / scale
    if trainer == "overcomplete-ra":
        from sklearn.cluster import KMeans

        points = KMeans(min(n_latents * 4, len(normed)), n_init=1, random_state=seed).fit(normed.numpy())
        model = RATopKSAE(vectors.shape[1], n_latents, torch.as_tensor(points.cluster_centers_, dtype=torch.float32),
                          top_k=k, delta=1.0)
    else:
        model = TopKSAE(vectors.shape[1], n_latents, top_k=k)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = _batches(normed, cfg.batch_size, seed)
    for _ in range(steps):
        x = next(batches)
        pre, z, x_hat = model(x)
        loss = top_k_auxiliary_loss(x, x_hat, pre, z, model.get_dictionary())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    def encode(h):
        return model.encode((h - mean) / scale)[1]

    def reconstruct(h):
        return model(((h - mean) / scale))[2] * scale + mean
    return encode, reconstruct, time.perf_counter() - started


def _auroc_matrix(z: np.ndarray, has: np.ndarray) -> np.ndarray:
    """[artifacts, latents] AUROC of each latent's activation for each artifact's presence (rank-based)."""
    from scipy.stats import rankdata

    ranks = rankdata(z, axis=0)  # ties share their mean rank, so an idle latent scores 0.5
    pos = has.sum(0).astype(float)  # [A]
    neg = len(has) - pos
    rank_sums = has.T.astype(float) @ ranks  # [A, L]
    return (rank_sums - pos[:, None] * (pos[:, None] + 1) / 2) / (pos[:, None] * neg[:, None])


def _group_auroc(z: np.ndarray, has: np.ndarray, row: np.ndarray, candidates: int = 8) -> float:
    """The AUROC of the summed activation of the latents that together best tell one artifact apart: the best
    latent, then each of the next ``candidates`` that raises it by more than 0.01."""
    from sklearn.metrics import roc_auc_score

    order = np.argsort(-row)[:candidates]
    total, best = z[:, order[0]].copy(), float(row[order[0]])
    for j in order[1:]:
        score = float(roc_auc_score(has, total + z[:, j]))
        if score > best + 0.01:
            total, best = total + z[:, j], score
    return best


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a columns, b columns] Pearson correlation (0 for a constant column)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num((a.T @ b) / np.outer(na, nb))


def measure(codes: list[np.ndarray], fvus: list[float], seconds: list[float], has: np.ndarray, planted: int) -> dict:
    """The figures of one setting from its dictionaries' codes on the audited images [n, latents] (one per seed)."""
    aurocs = [_auroc_matrix(z, has) for z in codes]
    best = [a.argmax(1) for a in aurocs]  # [A] the best latent per artifact, per seed
    purity = [float(a.max(1).mean()) for a in aurocs]
    grouped = [[_group_auroc(z, has[:, i], a[i]) for i in range(has.shape[1])] for z, a in zip(codes, aurocs)]
    mixed = [float(np.mean([np.sort(a[:, b[i]])[-2] >= SAME for i in range(len(b))])) for a, b in zip(aurocs, best)]
    latent_stable, artifact_stable = [], []
    for s, zs in enumerate(codes):
        for t, zt in enumerate(codes):
            if s == t:
                continue
            live = (zs > 0).mean(0) >= LIVE
            rho = _corr(zs[:, live], zt)
            latent_stable.append(float((rho.max(1) >= SAME).mean()) if live.any() else 0.0)
            if s < t:
                artifact_stable.append(float(np.mean([_corr(zs[:, [best[s][i]]], zt[:, [best[t][i]]])[0, 0] >= SAME
                                                      for i in range(has.shape[1])])))
    return {"purity": float(np.mean(purity)), "purity_min": float(np.min(purity)),
            "planted": float(np.mean([a[planted].max() for a in aurocs])),
            "concept_purity": float(np.mean(grouped)), "concept_planted": float(np.mean([g[planted] for g in grouped])),
            "mixed": float(np.mean(mixed)), "latent_stability": float(np.mean(latent_stable or [1.0])),
            "artifact_stability": float(np.mean(artifact_stable or [1.0])),
            "fvu": float(np.mean(fvus)), "seconds": float(np.mean(seconds)),
            "l0": float(np.mean([(z > 0).sum(1).mean() for z in codes]))}


def audit_flags(case: dict, vectors: torch.Tensor, cls: torch.Tensor, options: dict, seeds: list[int]) -> dict:
    """The case audited with the defaults, its dictionaries (seeds ``seeds``: the audit's SAE first, then the
    voters) trained by this study's ``options`` on ``vectors`` and placed where the audit reuses finished ones;
    scored against the ground truth as the benchmark scores it."""
    import shutil
    import tempfile

    from workers.engine.sae import SAEMetrics, evaluate_sae

    from .benchmark import audit_with_truth, score_case

    work = Path(tempfile.mkdtemp(prefix="sae-quality-"))
    try:
        for i, seed in enumerate(seeds):
            train(vectors, options, seed)
            sae, steps = train.last
            folder = work / "sae" / ("" if i == 0 else f"dictionaries/{i}")
            sae.save(folder)
            metrics = SAEMetrics(**evaluate_sae(sae, [cls]), n_latents=sae.n_latents, k=sae.k, steps=steps,
                                 n_train_vectors=len(vectors))
            (folder / "metrics.json").write_text(json.dumps(metrics.to_dict()))
        started = time.perf_counter()
        result, activity = audit_with_truth(case, {"sae": {"seed": seeds[0]}, "dictionaries": len(seeds)}, work)
        scored = score_case(case, result, activity)
        scored["seconds"] = time.perf_counter() - started
        return scored
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", default="a ruler")
    parser.add_argument("--sae-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--separate", type=int, default=6000, help="images in the separate unlabelled set")
    parser.add_argument("--only", nargs="*", help="settings to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--flags", action="store_true",
                        help="also audit the case with each setting's dictionaries (three per audit, one audit per "
                             "SAE seed) and compare the flags: overlap across seeds, precision, purity")
    return parser.parse_args(argv)


def _train_and_read(vectors: torch.Tensor, options: dict, cls: torch.Tensor, sae_seeds: list[int]):
    """One dictionary per SAE seed trained on ``vectors``: their codes of ``cls``, FVUs and training seconds."""
    codes, fvus, seconds = [], [], []
    for sae_seed in sae_seeds:
        encode, reconstruct, took = train(vectors, options, sae_seed)
        with torch.no_grad():
            codes.append(encode(cls).numpy())
            err = (cls - reconstruct(cls)).pow(2).sum()
            fvus.append(float(err / (cls - cls.mean(0)).pow(2).sum()))
        seconds.append(took)
    return codes, fvus, seconds


def _run_setting(name: str, source: str, options: dict, sources: dict, case: dict, cls: torch.Tensor,
                 has: np.ndarray, args: argparse.Namespace) -> dict:
    """One setting's figures (printed as they come), or why it was skipped."""
    if options.get("trainer", "ours") != "ours":
        try:
            _import_overcomplete()
        except ImportError as exc:
            print(f"{name}: skipped, overcomplete does not import ({exc})", flush=True)
            return {"skipped": f"overcomplete does not import here ({exc})"}
    vectors = sources[source]()
    codes, fvus, seconds = _train_and_read(vectors, options, cls, args.sae_seeds)
    result = {"source": source, "options": options, "n_vectors": len(vectors),
              **measure(codes, fvus, seconds, has, ARTIFACTS.index(args.artifact))}
    if args.flags and options.get("trainer", "ours") == "ours":
        runs = [audit_flags(case, vectors, cls, options, [s, s + 1, s + 2]) for s in args.sae_seeds]
        result["audits"] = flag_figures(runs)
        print(f"{name}, flags: {json.dumps(result['audits'])}", flush=True)
    print(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})}",
          flush=True)
    return result


def _print_settings(results: dict, args: argparse.Namespace, cls: torch.Tensor) -> None:
    """The table of every setting's figures, the training time against the default's."""
    base = results.get("default", {}).get("seconds") or math.nan
    print(f"\ncase: seed {args.seed}, {args.artifact} -> melanoma; SAE seeds {args.sae_seeds}; audited images "
          f"{len(cls)}, d_model {cls.shape[1]}")
    print("| setting | training vectors | L0 | FVU | purity (mean / worst seed) | planted artifact | concept purity | "
          "planted concept | mixed | latent stability | artifact stability | training s | vs default |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | {r['skipped']} | | | | | | | | | | | |")
            continue
        print(f"| {name} | {r['n_vectors']} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['purity']:.3f} / "
              f"{r['purity_min']:.3f} | {r['planted']:.3f} | {r['concept_purity']:.3f} | {r['concept_planted']:.3f} | "
              f"{r['mixed']:.2f} | {r['latent_stability']:.2f} | "
              f"{r['artifact_stability']:.2f} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x |")


def _print_flags(results: dict, sae_seeds: list[int]) -> None:
    """The table of the flags each setting's audits raised, and the concepts they flagged."""
    print("\n| setting | flagged concepts, every SAE seed / any | overlap | flags per audit | precise | "
          "planted flag on top | flag purity | audit s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "audits" in r:
            a = r["audits"]
            print(f"| {name} | {a['every']} / {a['any']} | {a['overlap']:.2f} | "
                  f"{' / '.join(map(str, a['flags']))} | {' / '.join(map(str, a['precise']))} | "
                  f"{sum(a['recall'])} of {len(a['recall'])} | {a['flag_purity'] or 0:.3f} | {a['seconds']:.0f} |")
    print_flagged({name: r["audits"] for name, r in results.items() if "audits" in r}, sae_seeds)


def main(argv=None) -> None:
    args = _parse_args(argv)
    from workers.engine.loading import load_clip

    torch.set_num_threads(2)
    case = build_case(default_cache(), CaseConfig(seed=args.seed, artifact=args.artifact), log=lambda line: None)
    bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
    work = Path(case["audit_dir"]).parent / "sae-quality"
    audited, rows = extract(bundle, Path(case["audit_dir"]), work / "audited", "spatial")
    cls = audited[:, 0].contiguous()
    has = np.array([[r[a] == "1" for a in ARTIFACTS] for r in rows])
    sources = {"audited": lambda: cls,
               "patches": lambda: torch.cat([cls, audited[:, 1:].reshape(-1, cls.shape[1])]),
               "patches16": lambda: torch.cat([cls, _sample_patches(audited, 16)]),
               "separate": lambda: extract(bundle, separate_set(case, args.separate), work / f"separate-{args.separate}",
                                           "cls")[0]}
    results = {name: _run_setting(name, source, options, sources, case, cls, has, args)
               for name, (source, options) in SETTINGS.items() if not (args.only and name not in args.only)}
    _print_settings(results, args, cls)
    if args.flags:
        _print_flags(results, args.sae_seeds)
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "artifact": args.artifact, "sae_seeds": args.sae_seeds,
                                         "settings": results}, indent=1))


if __name__ == "__main__":
    main()
