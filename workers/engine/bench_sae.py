"""Our SAE trainer against SAELens' on the same cached activations, side by side in one run.

    python -m workers.engine.bench_sae --threads 1 --perf docs/perf.md     # about 4 minutes on 2 CPU cores

One activation set ([n, d_model] float32, ``acts.npy``: every patch token of the case study's audit images at
one layer, or of random images through the random tiny ViT when no case study is cached) is split by image into
a training part and a held-out tenth. Our :func:`~workers.engine.sae.train_sae` and SAELens' ``SAETrainer`` with
its ``TopKTrainingSAE`` then train with the same number of latents, k, steps, batch size and thread count, on
batches drawn the same way (:func:`epoch_batches`), each at every learning rate of ``--lr``: a shared learning
rate is not a shared step size (SAELens starts its decoder rows at norm 0.1, ours at 1), so the comparison that
counts is each trainer at its best rate. SAELens runs in its own virtual environment (its pins are not ours), as
a subprocess of this module (``theirs``).

Both trainers' SAEs are scored by our :func:`~workers.engine.sae.evaluate_sae`, SAELens' read through
:func:`~workers.engine.sae_formats.load_sae`: FVU on the held-out vectors and on the training ones, the dead
fraction (latents never active on the training vectors) and activations/s (training vectors per wall second of
the training call, after a 2-step warm-up) with its CPU seconds, since the development machine is shared. The
subprocess also scores its SAEs, and ours exported as SAELens folders, with SAELens' own forward pass: a run
fails if the import or the export disagrees with the library.

SAELens' options other than the shared ones are its defaults (decoder-norm rescaling, a 0.1 decoder init norm,
AuxK with coefficient 1 and a 1000-step dead window, gradient clipping at 1); its activation normalization runs as
``expected_average_only_in`` (its counterpart of our input scale) and ``none`` (its default).
Default sizes: 2 000 images x 64 patch tokens of d_model 96, 384 latents, k = 16, 2 000 steps of 256.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .activations import extract_activations
from .bench import SyntheticImages
from .config import SAEConfig
from .data import ImageFiles
from .errors import EngineError
from .hooks import resolve_layer, select_tokens
from .loading import load_clip
from .sae import TopKSAE, evaluate_sae, train_sae
from .sae_formats import export_sae_lens, load_sae, resid_post_hook
from .tiny import tiny_clip

DEFAULT_ECOSYSTEM_PYTHON = Path.home() / ".cache" / "clip-audit" / "ecosystem-venv" / "bin" / "python"
HELD_OUT = 0.1  # the last tenth of the images (all their tokens) is held out
PERF_BEGIN = "<!-- bench_sae: begin -->"
PERF_END = "<!-- bench_sae: end -->"


# ---------------------------------------------------------------------------------------------- the activations
def epoch_batches(vectors: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, d] batches: the rows in a new random order each epoch. Both trainers read this."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(vectors))
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(np.ascontiguousarray(vectors[np.sort(order[lo:lo + batch_size])]))


def split(acts: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) rows; rows are image-major, so the last tenth of the images is held out whole."""
    per_image = len(acts) // n_images
    cut = (n_images - max(1, round(HELD_OUT * n_images))) * per_image
    return acts[:cut], acts[cut:]


def _case_study() -> tuple[dict, list[Path]] | None:
    """The cached case with the most audit images whose model and images are all on disk, or None."""
    root = Path(os.environ.get("CLIP_AUDIT_CACHE", Path.home() / ".cache" / "clip-audit")) / "casestudy"
    best = None
    for case_json in sorted(root.glob("case-*/case.json")):
        try:
            case = json.loads(case_json.read_text())
            labels = Path(case["audit_dir"]) / "labels.csv"
            with labels.open() as f:
                paths = [labels.parent / row["image"] for row in csv.DictReader(f)]
        except (OSError, ValueError, KeyError):
            continue  # a case being built or from another layout
        if paths and all(p.is_file() for p in paths) and Path(case["checkpoint"]).is_file() \
                and (best is None or len(paths) > len(best[1])):
            best = (case, paths)
    return best


def dump_activations(folder: Path, *, source: str = "auto", layer: int = -2, n_images: int = 2000,
                     device: str = "cpu") -> dict:
    """Write every patch token at ``layer`` of ``n_images`` images to ``folder/acts.npy`` ([n, d] float32,
    image-major) and describe them in ``folder/acts.json``.

    ``source``: ``casestudy`` (the case study's trained lesion CLIP on its audit images), ``tiny`` (the random
    tiny ViT on random images) or ``auto`` (the case study when one is cached)."""
    folder.mkdir(parents=True, exist_ok=True)
    case = _case_study() if source in ("auto", "casestudy") else None
    if source == "casestudy" and case is None:
        raise EngineError("no case study is cached: build one (python -m workers.casestudy) or use --source tiny")
    if case is not None:
        info, paths = case
        bundle = load_clip(model_config=info["model_config"], checkpoint=info["checkpoint"], device=device)
        paths = paths[:n_images]
        images = ImageFiles(paths, [0] * len(paths), ["image"], bundle.preprocess)
        described = {"source": "casestudy", "model": Path(info["checkpoint"]).parent.name,
                     "case": Path(info["audit_dir"]).parent.name}
    else:
        bundle = tiny_clip(0, device=device)
        size = bundle.model.visual.image_size
        images = SyntheticImages(n_images, size[0] if isinstance(size, (tuple, list)) else size, 2)
        described = {"source": "tiny", "model": "tiny ViT, random weights, random images"}
    store = extract_activations(bundle, images, folder / "store", layer=layer, token="spatial", batch_size=64,
                                device=device)
    acts = np.concatenate([select_tokens(a, "spatial").reshape(-1, store.d_model).numpy()
                           for _, a, _ in store.iter_batches(256)])
    np.save(folder / "acts.npy", acts.astype(np.float32))
    described.update(layer=layer, block=resolve_layer(bundle.model.visual, layer), token="spatial (every patch token)", n_images=len(images),
                     tokens_per_image=len(acts) // len(images), n_vectors=len(acts), d_model=store.d_model)
    (folder / "acts.json").write_text(json.dumps(described, indent=2))
    return described


# ----------------------------------------------------------------------------------------------------- trainers
def timed(train, steps: int, batch_size: int):
    """``train(steps)`` once for 2 steps untimed (the first optimizer step imports parts of torch, seconds that are
    no trainer's), then for ``steps``: (its result, wall and CPU seconds, activations per wall second)."""
    train(2)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, {"seconds": wall, "cpu_seconds": cpu, "activations_per_s": steps * batch_size / wall}


def train_ours(train: np.ndarray, args, lr: float) -> tuple[TopKSAE, dict]:
    rng = np.random.default_rng(args.seed)
    init = torch.from_numpy(train[np.sort(rng.permutation(len(train))[:16384])])  # as the audit does

    def run(steps):
        cfg = SAEConfig(n_latents=args.n_latents, k=args.k, lr=lr, batch_size=args.batch_size, steps=steps,
                        seed=args.seed)
        return train_sae(epoch_batches(train, args.batch_size, args.seed), d_model=train.shape[1],
                         n_latents=args.n_latents, k=args.k, steps=steps, init_sample=init, config=cfg)[0]

    return timed(run, args.steps, args.batch_size)


def run_theirs(args, acts_folder: Path, out: Path) -> dict:
    """SAELens' trainer, in its own environment; returns what it wrote to ``out/theirs.json``."""
    python = Path(args.ecosystem_python)
    if not python.is_file():
        raise EngineError(f"no SAELens environment at {python}: python3.11 -m venv {python.parent.parent} && "
                          f"{python.parent / 'pip'} install sae-lens")
    repo = Path(__file__).resolve().parents[2]
    command = [str(python), "-m", "workers.engine.bench_sae", "theirs", "--acts", str(acts_folder),
               "--out", str(out), "--n-latents", str(args.n_latents), "--k", str(args.k), "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--lr", args.lr, "--seed",
               str(args.seed), "--threads", str(args.threads), "--their-normalize", args.their_normalize]
    env = {**os.environ, "PYTHONPATH": str(repo), "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise EngineError(f"SAELens' run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "theirs.json").read_text())


def theirs_main(args) -> int:
    """In the SAELens environment: train one SAE per normalization and learning rate, time it, save it, and score
    it and our exported SAEs (``out/ours-*``) with SAELens' own forward pass."""
    # SAELens is installed only in its own environment, never in ours
    from sae_lens import __version__ as sae_lens_version
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAE
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(args.threads)
    acts_folder, out = Path(args.acts), Path(args.out)
    acts = np.load(acts_folder / "acts.npy")
    train, held_out = split(acts, json.loads((acts_folder / "acts.json").read_text())["n_images"])
    held = torch.from_numpy(held_out)

    def fvu(folder: Path) -> float:
        sae = SAE.load_from_disk(folder)
        with torch.no_grad():
            recon = sae(held)
        return float((held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum())

    result = {"sae_lens": sae_lens_version, "torch": torch.__version__, "runs": {}, "ours_by_sae_lens": {}}
    for norm in args.their_normalize.split(","):
        for lr in _rates(args.lr):
            def run(steps, norm=norm, lr=lr):
                torch.manual_seed(args.seed)
                sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=args.n_latents, k=args.k,
                                                            normalize_activations=norm))
                config = SAETrainerConfig(total_training_samples=steps * args.batch_size,
                                          train_batch_size_samples=args.batch_size, lr=lr,
                                          lr_end=lr / 10,  # as its runner sets it; unused by "constant"
                                          logger=LoggingConfig(log_to_wandb=False))
                return SAETrainer(config, sae, epoch_batches(train, args.batch_size, args.seed)).fit()

            trained, timing = timed(run, args.steps, args.batch_size)
            folder = out / f"theirs-{norm}-{lr:g}"
            trained.save_inference_model(folder)
            result["runs"][folder.name] = {**timing, "normalize": norm, "lr": lr, "fvu_held_out_by_sae_lens": fvu(folder)}
    for folder in sorted(out.glob("ours-*")):
        result["ours_by_sae_lens"][folder.name] = fvu(folder)
    (out / "theirs.json").write_text(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------------ compare
def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def score(sae, train: np.ndarray, held_out: np.ndarray) -> dict:
    def chunks(a):
        return (torch.from_numpy(a[i:i + 4096]) for i in range(0, len(a), 4096))

    on_train, on_held = evaluate_sae(sae, chunks(train)), evaluate_sae(sae, chunks(held_out))
    return {"fvu_held_out": on_held["fvu"], "fvu_train": on_train["fvu"], "dead_fraction": on_train["dead_fraction"],
            "mean_l0": on_held["mean_l0"]}


def compare(args, argv: list[str]) -> dict:
    """Every trainer at every learning rate on one activation set; rows named ``trainer (options, lr)``."""
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    rows, checks = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-sae-") as tmp:
        work = Path(tmp)
        acts_folder = Path(args.acts) if args.acts else work / "acts"
        if not args.acts:
            dump_activations(acts_folder, source=args.source, layer=args.layer, n_images=args.images)
        data = json.loads((acts_folder / "acts.json").read_text())
        train, held_out = split(np.load(acts_folder / "acts.npy"), data["n_images"])
        for lr in _rates(args.lr):
            sae, timing = train_ours(train, args, lr)
            rows[f"ours (lr {lr:g})"] = {"trainer": "ours", "lr": lr, **timing, **score(sae, train, held_out)}
            export_sae_lens(sae, work / f"ours-{lr:g}", hook_name=resid_post_hook(data["block"]))
        theirs = run_theirs(args, acts_folder, work)
        for lr in _rates(args.lr):
            checks[f"ours (lr {lr:g})"] = theirs["ours_by_sae_lens"][f"ours-{lr:g}"]
        for folder, run in theirs["runs"].items():
            name = f"SAELens {theirs['sae_lens']} ({run['normalize']}, lr {run['lr']:g})"
            rows[name] = {"trainer": "sae_lens", "lr": run["lr"], "normalize": run["normalize"],
                          **{k: run[k] for k in ("seconds", "cpu_seconds", "activations_per_s")},
                          **score(load_sae(work / folder), train, held_out)}
            checks[name] = run["fvu_held_out_by_sae_lens"]
    for name, their_reading in checks.items():
        ours_reading = rows[name]["fvu_held_out"]
        if abs(ours_reading - their_reading) > 1e-4 * max(1.0, their_reading):
            raise EngineError(f"{name}: our reading of the SAE gives FVU {ours_reading:.6f}, SAELens' own "
                              f"{their_reading:.6f}: the import or the export is wrong")
    return {"data": data, "n_train": len(train), "n_held_out": len(held_out),
            "settings": {k: getattr(args, k) for k in ("n_latents", "k", "steps", "batch_size", "lr", "seed",
                                                         "threads")},
            "rows": rows, "fvu_held_out_by_sae_lens": checks,
            "run": {"command": "python -m workers.engine.bench_sae " + " ".join(argv),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "load_average": [load_at_start, os.getloadavg()[0]],
                    "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                "torch": torch.__version__, "threads": args.threads}}}


def table(r: dict) -> str:
    lines = [f"{'trainer':<50}{'FVU held-out':>13}{'FVU train':>11}{'dead':>8}{'L0':>6}{'activations/s':>15}"
             f"{'CPU s':>8}"]
    for name, row in r["rows"].items():
        lines.append(f"{name:<50}{row['fvu_held_out']:>13.4f}{row['fvu_train']:>11.4f}{row['dead_fraction']:>8.1%}"
                     f"{row['mean_l0']:>6.1f}{row['activations_per_s']:>15,.0f}{row['cpu_seconds']:>8.1f}")
    return "\n".join(lines)


def _than(ours: float, theirs: float, unit: str = "") -> str:
    if unit == "pp":  # fractions compared in percentage points
        gap = 100 * (ours - theirs)
        return "the same" if abs(gap) < 0.05 else f"{abs(gap):.1f} points {'fewer' if gap < 0 else 'more'}"
    gap = ours / theirs - 1
    return "the same" if abs(gap) < 0.005 else f"{abs(gap):.0%} {'lower' if gap < 0 else 'higher'}"


def _versus(ours: dict, theirs: dict) -> str:
    return (f"held-out FVU {_than(ours['fvu_held_out'], theirs['fvu_held_out'])} ({ours['fvu_held_out']:.4f} vs "
            f"{theirs['fvu_held_out']:.4f}), dead latents {_than(ours['dead_fraction'], theirs['dead_fraction'], 'pp')} "
            f"({ours['dead_fraction']:.1%} vs {theirs['dead_fraction']:.1%})")


def verdict(r: dict) -> list[str]:
    """Ours against SAELens at each learning rate (SAELens' better normalization there) and best against best."""
    ours = {row["lr"]: row for row in r["rows"].values() if row["trainer"] == "ours"}
    theirs: dict[float, dict] = {}
    for name, row in r["rows"].items():
        if row["trainer"] == "sae_lens" and (row["lr"] not in theirs
                                             or row["fvu_held_out"] < theirs[row["lr"]]["fvu_held_out"]):
            theirs[row["lr"]] = {**row, "name": name}
    lines = [f"- lr {lr:g}: ours against {theirs[lr]['name']}: {_versus(ours[lr], theirs[lr])}."
             for lr in sorted(ours) if lr in theirs]
    best_ours = min(ours.values(), key=lambda row: row["fvu_held_out"])
    best_theirs = min(theirs.values(), key=lambda row: row["fvu_held_out"])
    sae_lens_rows = [row for row in r["rows"].values() if row["trainer"] == "sae_lens"]

    def mean(rows, key):
        return sum(row[key] for row in rows) / len(rows)

    wall = mean(ours.values(), "activations_per_s") / mean(sae_lens_rows, "activations_per_s")
    cpu = mean(sae_lens_rows, "cpu_seconds") / mean(ours.values(), "cpu_seconds")
    lines.append(f"- Each at its best learning rate here (ours {best_ours['lr']:g}, {best_theirs['name']}): "
                 f"{_versus(best_ours, best_theirs)}.")
    lines.append(f"- Speed, mean over every run: ours trains at {wall:.2f}x SAELens' activations/s and "
                 f"{cpu:.2f}x its activations per CPU second.")
    better_fvu = best_ours["fvu_held_out"] <= best_theirs["fvu_held_out"]
    fewer_dead = best_ours["dead_fraction"] <= best_theirs["dead_fraction"]
    lines.append("- Conclusion: " + (
        "ours is kept: at its best rate it reconstructs at least as well with no more dead latents."
        if better_fvu and fewer_dead else
        "SAELens' trainer reconstructs better at its best rate: adopt what makes the difference."
        if not better_fvu and not fewer_dead else
        "neither wins on both FVU and dead latents; see the rows."))
    return lines


def perf_section(r: dict) -> str:
    """The docs/perf.md section for this run, between markers so that a re-run replaces it."""
    d, s, run = r["data"], r["settings"], r["run"]
    where = (f"the case study's lesion CLIP ({d['model']}, audit images of {d['case']})" if d["source"] == "casestudy"
             else d["model"])
    rows = ["| trainer | FVU, held-out | FVU, train | dead latents | L0 | activations/s | CPU s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in r["rows"].items():
        rows.append(f"| {name} | {row['fvu_held_out']:.4f} | {row['fvu_train']:.4f} | {row['dead_fraction']:.1%} "
                    f"| {row['mean_l0']:.1f} | {row['activations_per_s']:,.0f} | {row['cpu_seconds']:.1f} |")
    threads = f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}"
    return "\n".join([
        PERF_BEGIN,
        "## SAE trainer: ours against SAELens",
        "",
        *textwrap.wrap(
        f"`{run['command']}` on {run['date'][:10]} ({run['machine']['cpu_count']} CPU cores, {threads} "
        f"per trainer, torch {run['machine']['torch']}, load average {run['load_average'][0]:.1f} at the "
        f"start and {run['load_average'][1]:.1f} at the end). Data: every patch token at layer {d['layer']} of "
        f"{where}: {d['n_images']} images x {d['tokens_per_image']} tokens, d_model {d['d_model']}; the last "
        f"tenth of the images ({r['n_held_out']} vectors) held out, {r['n_train']} for training. Both trainers: "
        f"{s['n_latents']} latents, k = {s['k']}, {s['steps']} steps of {s['batch_size']} vectors at each learning "
        "rate, the same batch stream; SAELens' other options at its defaults, its activation normalization in "
        "brackets. Both SAEs scored by our `evaluate_sae` (SAELens' read through `load_sae`; each held-out FVU "
        "also recomputed with SAELens' own forward pass, agreeing to 1e-4). Dead: latents never active on the "
        "training vectors. Activations/s: training vectors per wall-clock second of the training call after a "
        "2-step warm-up; CPU s: its processor time.", 110, break_on_hyphens=False),
        "",
        *rows,
        "",
        *(line for item in verdict(r) for line in textwrap.wrap(item, 110, subsequent_indent="  ",
                                                                 break_on_hyphens=False)),
        PERF_END,
    ])


def write_perf(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if PERF_BEGIN in text and PERF_END in text:
        head, rest = text.split(PERF_BEGIN, 1)
        text = head + section + rest.split(PERF_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers.engine.bench_sae", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="compare", choices=["compare", "theirs"],
                   help="'theirs' is what the SAELens environment runs")
    p.add_argument("--acts", help="a folder with acts.npy + acts.json (default: dump them first)")
    p.add_argument("--source", default="auto", choices=["auto", "casestudy", "tiny"])
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--n-latents", type=int, default=384)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", default="3e-4,1e-3,3e-3", help="learning rates, each trainer runs at each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--their-normalize", default="expected_average_only_in,none",
                   help="SAELens' normalize_activations, one run each")
    p.add_argument("--ecosystem-python", default=str(DEFAULT_ECOSYSTEM_PYTHON),
                   help="the python of a virtual environment with sae-lens installed")
    p.add_argument("--out", help="write the JSON here (compare) / the folder to write to (theirs)")
    p.add_argument("--perf", help="write the comparison section into this Markdown file (docs/perf.md)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.mode == "theirs":
        return theirs_main(args)
    result = compare(args, argv)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.perf:
        write_perf(Path(args.perf), perf_section(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
