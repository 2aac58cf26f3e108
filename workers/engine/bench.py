"""Engine benchmark: how close an audit comes to one forward pass over the data, measured side by side.

    python -m workers.engine.bench                          # tiny OpenCLIP ViT, 512 images (a minute on a CPU)
    python -m workers.engine.bench --model ViT-B-32 --images 2000 --memory-sizes 2000,8000 --out docs/bench.json

Prints a table and writes JSON. Every figure comes from the same model, data
and device in one run: images/s of plain ``encode_image`` (the bound), of
activation extraction, of attribution for all classes (probe and zero-shot)
with the engine's tail-only act x grad and with the straightforward way (a
full forward and backward pass through the spliced model per image and class)
plus their ratio and largest difference, SAE training throughput and time to
an FVU, the whole audit's wall time over the ``encode_image`` time, and peak
memory at two dataset sizes (each in its own process). ``--check`` (CI) fails
only when the two attribution methods disagree, never on timings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .data import ImageSet


def _model(name: str, device, seed: int = 0):
    from .loading import load_clip
    from .tiny import tiny_clip

    if name == "tiny":
        return tiny_clip(seed=seed, device=str(device))
    torch.manual_seed(seed)
    return load_clip(name, allow_random=True, device=str(device))  # the architecture with random weights


class SyntheticImages(ImageSet):
    """n deterministic random images made when read: the data never sits in memory as a whole, so peak memory
    measures the engine, not the benchmark's dataset."""

    def __init__(self, n: int, size: int, n_classes: int, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed
        self.labels = torch.tensor([i % n_classes for i in range(n)])
        self.class_names = [f"class {c}" for c in range(n_classes)]
        self.ids = [f"image-{i:06d}" for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(3, self.size, self.size, generator=gen), int(self.labels[i])

    def stack(self, n: int) -> torch.Tensor:
        return torch.stack([self[i][0] for i in range(n)])


def _data(bundle, n: int, n_classes: int, seed: int = 0):
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return SyntheticImages(n, size, n_classes, seed)


def _heads(bundle, n_classes: int, seed: int = 0):
    from .heads import LinearProbe, ZeroShotHead

    e = bundle.model.visual.output_dim
    gen = torch.Generator().manual_seed(seed + 7)
    names = [f"class {c}" for c in range(n_classes)]
    probe = LinearProbe(torch.randn(n_classes, e, generator=gen), torch.randn(n_classes, generator=gen), names)
    return probe, ZeroShotHead(torch.randn(n_classes, e, generator=gen), names)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _encode_rate(bundle, data, batch_size, device, dtype) -> tuple[float, float]:
    """Plain ``encode_image`` over the data, read the same way extraction reads it: the bound."""
    from torch.utils.data import DataLoader

    from .activations import autocast_context

    def run():
        with torch.inference_mode(), autocast_context(device, dtype):
            for x, _ in DataLoader(data, batch_size=batch_size):
                bundle.model.encode_image(x.to(device))

    with torch.inference_mode():
        bundle.model.encode_image(data.stack(2).to(device))  # warm-up
    seconds, _ = _timed(run, device)
    return len(data) / seconds, seconds


def _full_backprop(bundle, x, layer, token, sae, head) -> torch.Tensor:
    """The straightforward way: per image and class, a full forward and backward pass through the model."""
    from .hooks import spliced_sae

    rows = []
    for i in range(len(x)):
        per_class = []
        for c in range(len(head.class_names)):
            with spliced_sae(bundle.model.visual, layer, sae, token, latents_require_grad=True) as store:
                y = head(bundle.model.encode_image(x[i:i + 1]))[0, c]
            z = store["latents"]
            per_class.append((z * torch.autograd.grad(y, z)[0])[0])
        rows.append(torch.stack(per_class))
    return torch.stack(rows)  # [images, classes, latents]


def measure(args) -> dict:
    from .activations import extract_activations
    from .loading import resolve_device

    device = resolve_device(args.device)
    bundle = _model(args.model, device)
    bundle.model.eval().requires_grad_(False)
    data = _data(bundle, args.images, args.classes)
    probe, zero_shot = _heads(bundle, args.classes)
    probe, zero_shot = probe.to(device), zero_shot.to(device)
    out = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "device": str(device),
           "dtype": args.dtype, "classes": args.classes}

    encode_rate, encode_seconds = _encode_rate(bundle, data, args.batch_size, device, args.dtype)
    out["encode_image"] = {"images_per_s": encode_rate, "seconds": encode_seconds}

    with tempfile.TemporaryDirectory() as tmp:
        seconds, store = _timed(lambda: extract_activations(bundle, data, Path(tmp) / "acts", layer=-1,
                                                            token="cls", batch_size=args.batch_size,
                                                            device=device, dtype=args.dtype), device)
        out["extraction"] = {"images_per_s": len(data) / seconds, "seconds": seconds,
                             "ratio_to_encode": seconds / encode_seconds}
        sae, out["sae"] = _measure_sae(args, store, device)
        out["attribution"] = _measure_attribution(args, bundle, data, store, sae, (probe, zero_shot), device)
    out["audit"] = _measure_audit(args, bundle, data, probe, device, encode_seconds)
    return out


def _measure_sae(args, store, device) -> tuple:
    """SAE training throughput, its FVU and the time to reach ``args.fvu_target``; returns the SAE too."""
    from .config import SAEConfig
    from .sae import evaluate_sae, train_sae

    cfg = SAEConfig(n_latents=args.n_latents, k=args.k, steps=args.sae_steps, seed=0)
    sample = store.sample(min(4096, store.n), 0, cfg.tokens_per_image)
    batches = store.training_batches(cfg.batch_size, 0, cfg.tokens_per_image)
    seconds, (sae, curve) = _timed(lambda: train_sae(
        batches, d_model=store.d_model, n_latents=args.n_latents, k=args.k, steps=args.sae_steps,
        init_sample=sample, config=cfg, device=device), device)
    quality = evaluate_sae(sae, (b for _, b, _ in store.iter_batches(1024)), device)
    per_step = seconds / args.sae_steps
    reached = next((step for step, fvu in curve if fvu <= args.fvu_target), None)
    sae.eval().requires_grad_(False)
    return sae, {"activations_per_s": args.sae_steps * cfg.batch_size / seconds, "seconds": seconds,
                 "steps": args.sae_steps, "n_latents": args.n_latents, "k": args.k, "fvu": quality["fvu"],
                 "fvu_target": args.fvu_target,
                 "seconds_to_fvu_target": None if reached is None else (reached + 1) * per_step}


def _measure_attribution(args, bundle, data, store, sae, heads, device) -> dict:
    """Tail-only act x grad over all images for both heads, and against a full backward pass on a subset."""
    from .attribution import get_method
    from .hooks import VisionTail

    probe, zero_shot = heads
    tail = VisionTail(bundle.model.visual, -1, "cls")
    attribution = {}
    for name, head in (("probe", probe), ("zero_shot", zero_shot)):
        method = get_method("act_grad", tail=tail, sae=sae, head=head, token="cls")

        def attribute_all(method=method):
            for _, acts, _ in store.iter_batches(args.batch_size):
                method.attribute(acts.to(device))

        seconds, _ = _timed(attribute_all, device)
        attribution[name] = {"images_per_s": len(data) / seconds, "seconds": seconds}
    # the straightforward way on a subset (it is slow), compared on the same images in float32
    n = min(args.compare_images, len(data))
    x = data.stack(n).to(device)
    acts, _ = store.gather(list(range(n)))
    fast_seconds, fast = _timed(lambda: get_method("act_grad", tail=tail, sae=sae, head=probe, token="cls")
                                .attribute(acts.to(device)), device)
    slow_seconds, slow = _timed(lambda: _full_backprop(bundle, x, -1, "cls", sae, probe), device)
    attribution["probe_subset"] = {"images": n, "tail_only_images_per_s": n / fast_seconds,
                                   "full_backprop_images_per_s": n / slow_seconds,
                                   "speedup": slow_seconds / fast_seconds,
                                   "max_abs_diff": float((fast.detach().cpu() - slow.detach().cpu()).abs().max()),
                                   "max_abs_value": float(slow.detach().abs().max())}
    return attribution


def _measure_audit(args, bundle, data, probe, device, encode_seconds: float) -> dict:
    """One whole audit's wall time over the ``encode_image`` time, with and without the SAE fit."""
    from .config import AuditConfig
    from .pipeline import run_audit

    config = AuditConfig(device=str(device), dtype=args.dtype, batch_size=args.batch_size, general_vocabulary=False,
                         sae={"n_latents": args.n_latents, "k": args.k, "steps": args.sae_steps},
                         faithfulness_max_images=32, causal=True)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, result = _timed(lambda: run_audit(config, bundle, probe.cpu(), data, workdir=tmp), device)
    fit = result.timings.get("train_sae", 0.0)
    return {"seconds": seconds, "timings": result.timings, "ratio_to_encode": seconds / encode_seconds,
            "ratio_to_encode_without_sae_fit": (seconds - fit) / encode_seconds}


def memory_probe(args) -> dict:
    """Peak memory of one whole audit at ``args.images`` (run in a fresh process by the parent)."""
    from .config import AuditConfig
    from .loading import resolve_device
    from .pipeline import run_audit

    device = resolve_device(args.device)
    bundle = _model(args.model, device)
    data = _data(bundle, args.images, args.classes)
    probe, _ = _heads(bundle, args.classes)
    config = AuditConfig(device=str(device), dtype=args.dtype, batch_size=args.batch_size, general_vocabulary=False,
                         sae={"n_latents": args.n_latents, "k": args.k, "steps": args.sae_steps},
                         faithfulness_max_images=32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        run_audit(config, bundle, probe, data, workdir=tmp)
    out = {"images": args.images, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_audit_mib": before / 1024,
           }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _memory(args, sizes) -> list[dict]:
    rows = []
    for n in sizes:
        command = [sys.executable, "-m", "workers.engine.bench", "--memory-probe", "--images", str(n),
                   "--model", args.model, "--batch-size", str(args.batch_size), "--device", args.device,
                   "--dtype", args.dtype, "--n-latents", str(args.n_latents), "--k", str(args.k),
                   "--sae-steps", str(args.sae_steps), "--classes", str(args.classes)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(r: dict) -> str:
    a = r["attribution"]
    lines = [f"model {r['model']}, {r['images']} images, batch {r['batch_size']}, {r['device']} {r['dtype']}",
             f"{'what':<44}{'value':>14}",
             f"{'encode_image (the bound), images/s':<44}{r['encode_image']['images_per_s']:>14.1f}",
             f"{'activation extraction, images/s':<44}{r['extraction']['images_per_s']:>14.1f}",
             f"{'attribution all classes, probe, images/s':<44}{a['probe']['images_per_s']:>14.1f}",
             f"{'attribution all classes, zero-shot, images/s':<44}{a['zero_shot']['images_per_s']:>14.1f}",
             f"{'  tail-only on the subset, images/s':<44}{a['probe_subset']['tail_only_images_per_s']:>14.1f}",
             f"{'  full backprop on the subset, images/s':<44}{a['probe_subset']['full_backprop_images_per_s']:>14.2f}",
             f"{'  speed-up (same images)':<44}{a['probe_subset']['speedup']:>13.1f}x",
             f"{'  max abs difference (fp32)':<44}{a['probe_subset']['max_abs_diff']:>14.2e}",
             f"{'SAE training, activations/s':<44}{r['sae']['activations_per_s']:>14.0f}",
             f"{'SAE FVU after ' + str(r['sae']['steps']) + ' steps':<44}{r['sae']['fvu']:>14.3f}",
             f"{'seconds to FVU <= ' + str(r['sae']['fvu_target']):<44}"
             f"{(r['sae']['seconds_to_fvu_target'] or float('nan')):>14.2f}",
             f"{'whole audit / encode_image time':<44}{r['audit']['ratio_to_encode']:>13.2f}x",
             f"{'  without the SAE fit':<44}{r['audit']['ratio_to_encode_without_sae_fit']:>13.2f}x"]
    for m in r.get("memory", []):
        lines.append(f"{'peak RSS at ' + str(m['images']) + ' images, MiB':<44}{m['peak_rss_mib']:>14.0f}")
    if len(r.get("memory", [])) == 2:
        lines.append(f"{'  growth':<44}{r['memory_growth']:>13.1%}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers.engine.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' or an OpenCLIP architecture (random weights)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--n-latents", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--sae-steps", type=int, default=300)
    p.add_argument("--fvu-target", type=float, default=0.5)
    p.add_argument("--compare-images", type=int, default=16, help="images for the full-backprop comparison")
    p.add_argument("--memory-sizes", default="", help="two dataset sizes for the memory check, e.g. 2000,8000")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--check", action="store_true", help="fail only if the two attribution methods disagree")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.manual_seed(0)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0
    result = measure(args)
    sizes = [int(s) for s in args.memory_sizes.split(",") if s.strip()]
    if sizes:
        result["memory"] = _memory(args, sizes)
        if len(sizes) == 2:
            first, second = result["memory"]
            result["memory_growth"] = second["peak_rss_mib"] / first["peak_rss_mib"] - 1
    result["run"] = {"command": "python -m workers.engine.bench " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": {"host": platform.node(), "cpu_count": os.cpu_count(),
                                 "processor": platform.processor() or platform.machine(),
                                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    diff = result["attribution"]["probe_subset"]["max_abs_diff"]
    if args.check and not diff <= 1e-4 * max(1.0, result["attribution"]["probe_subset"]["max_abs_value"]):
        print(f"FAIL: the tail-only and full-backprop attributions differ by {diff:.3e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
