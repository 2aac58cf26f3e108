"""Build the whole case: splits, the tiny CLIP, the biased probe, and the numbers that show the shortcut.

Everything is seeded and cached under one folder per configuration, so a
machine trains the model once and re-runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .images import ARTIFACTS, CLASSES, biased_rates, draw_samples, independent_rates, read_split, write_split
from .images import Sample
from .pretrain import LESION_CLIP, caption_variants, deterministic, to_pixels, train_clip

GENERATOR_VERSION = 5  # bump when images, captions or training change: cached cases are rebuilt
TEMPLATE = "a dermoscopy image {}."  # matches the captions: "a dermoscopy image of a melanoma with a ruler."
CLASS_CONCEPTS = {"melanoma": "of a melanoma", "nevus": "of a nevus"}
ARTIFACT_CONCEPTS = {a: f"with {a}" for a in ARTIFACTS}


@dataclass
class CaseConfig:
    seed: int = 0
    n_pretrain: int = 3000
    pretrain_steps: int = 600
    batch_size: int = 128
    n_probe_train: int = 800
    n_audit: int = 2000  # the audited dataset: the probe's test split, artifacts independent of the class
    artifact: str = "a ruler"  # the planted shortcut ...
    toward: str = "melanoma"  # ... correlated with this class in the probe's training split
    strength: float = 0.8  # 0: no correlation; 1: the artifact appears in every melanoma and no nevus
    # the tiny CLIP's patch in pixels: 8 gives 8 x 8 patches of a 64 px image; 4 gives 16 x 16, so that thin
    # artifacts (a ruler, hair, ink) fill whole patches and a patch-level heatmap can lie on them (issue 30)
    patch_size: int = 8

    def clip_config(self) -> dict:
        """The tiny CLIP's open_clip config for this case."""
        return lesion_clip_config(self.patch_size)

    def model_key(self) -> str:
        parts = {k: getattr(self, k) for k in ("seed", "n_pretrain", "pretrain_steps", "batch_size")}
        return _digest({"v": GENERATOR_VERSION, **parts, "clip": self.clip_config()})

    def key(self) -> str:
        fields = asdict(self)
        if self.patch_size == LESION_CLIP["vision_cfg"]["patch_size"]:
            del fields["patch_size"]  # the cases built before the option keep their keys (and caches)
        return _digest({"v": GENERATOR_VERSION, **fields, "clip": self.clip_config()})


def lesion_clip_config(patch_size: int) -> dict:
    """The case study's tiny CLIP (``pretrain.LESION_CLIP``) with another patch size."""
    if patch_size < 1 or LESION_CLIP["vision_cfg"]["image_size"] % patch_size:
        raise ValueError(f"the patch size must divide the {LESION_CLIP['vision_cfg']['image_size']} px image, got "
                         f"{patch_size}")
    return {**LESION_CLIP, "vision_cfg": {**LESION_CLIP["vision_cfg"], "patch_size": patch_size}}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def default_cache() -> Path:
    """Where cases are cached: one trained model per machine, shared by clones (CLIP_AUDIT_CACHE overrides)."""
    import os

    return Path(os.environ.get("CLIP_AUDIT_CACHE", Path.home() / ".cache" / "clip-audit")) / "casestudy"


def audit_options(**overrides) -> dict:
    """Audit options that speak the case's language (its captions)."""
    options = {
        "prompt_templates": [TEMPLATE],
        "class_prompts": {c: [p] for c, p in CLASS_CONCEPTS.items()},
        "expected_concepts": {c: [p] for c, p in CLASS_CONCEPTS.items()},
        "artifact_vocabulary": list(ARTIFACT_CONCEPTS.values()),
        "general_vocabulary": False,
        # the SAE is sized by the defaults (a hand-sized 16-latent dictionary fused the ruler into the class latent
        # once the generator drew seven artifacts)
    }
    options.update(overrides)
    return options


def _images(folder: Path) -> tuple[np.ndarray, list[dict]]:
    rows = read_split(folder)
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in rows]), rows


def _embed(bundle, images: np.ndarray) -> torch.Tensor:
    norm = bundle.preprocess.transforms[-1]
    with torch.no_grad():
        return torch.cat([F.normalize(bundle.model.encode_image(to_pixels(images[i:i + 256], norm.mean, norm.std)),
                                      dim=-1) for i in range(0, len(images), 256)])


def zip_split(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(folder / "labels.csv", "labels.csv")
        for p in sorted((folder / "images").iterdir()):
            zf.write(p, f"images/{p.name}")
    return out


def build_case(root: Path, config: CaseConfig, log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the case under ``root``; returns its paths and metrics (``case.json``)."""
    from sklearn.metrics import roc_auc_score

    from workers.engine.heads import encode_concepts
    from workers.engine.loading import load_clip

    case_dir = root / f"case-{config.key()}"
    if (case_dir / "case.json").is_file():
        case = json.loads((case_dir / "case.json").read_text())
        if not Path(case.get("reference_probe", "")).is_file():  # a case cached before it had a reference probe
            bundle = load_clip(model_config=case["model_config"], checkpoint=case["checkpoint"])
            test_images, test_rows = _images(Path(case["audit_dir"]))
            case = _add_reference(case_dir, case, config, bundle, _embed(bundle, test_images), test_rows, log)
        return case
    config_path, ckpt = _lesion_clip(root / f"model-{config.model_key()}", config, log)
    bundle = load_clip(model_config=config_path, checkpoint=ckpt)

    log(f"Generating the probe's splits: train with '{config.artifact}' tied to {config.toward} "
        f"(strength {config.strength}), test with every artifact independent ...")
    train_dir = write_split(case_dir / "probe-train", draw_samples(config.n_probe_train, np.random.default_rng(
        [config.seed, 3]), biased_rates(config.artifact, config.toward, config.strength)),
        np.random.default_rng([config.seed, 4]))
    test_rates = independent_rates(0.3)
    test_rates[config.artifact] = {c: 0.5 for c in CLASSES}
    test_dir = write_split(case_dir / "audit", draw_samples(config.n_audit, np.random.default_rng([config.seed, 5]),
                                                            test_rates), np.random.default_rng([config.seed, 6]))
    test_images, test_rows = _images(test_dir)
    test_emb = _embed(bundle, test_images)
    classes = sorted(CLASSES)
    y_test = np.array([classes.index(r["label"]) for r in test_rows])
    probe_path = case_dir / "probe.npz"
    clf = _fit_probe(bundle, train_dir, probe_path)

    class_text = encode_concepts(bundle, [CLASS_CONCEPTS[c] for c in classes], [TEMPLATE])
    zs_pred = (test_emb @ class_text.T).argmax(1).numpy()
    probe_pred = clf.predict(test_emb.numpy())
    has = np.array([r[config.artifact] == "1" for r in test_rows])
    accuracy = {name: _accuracy_with_without(pred, y_test, has, classes, config.artifact)
                for name, pred in (("probe", probe_pred), ("zero_shot", zs_pred))}
    artifact_text = encode_concepts(bundle, [ARTIFACT_CONCEPTS[a] for a in ARTIFACTS], [TEMPLATE])
    empty = encode_concepts(bundle, [""], [TEMPLATE])[0]
    auroc = {a: float(roc_auc_score([r[a] == "1" for r in test_rows], (test_emb @ (artifact_text[i] - empty)).numpy()))
             for i, a in enumerate(ARTIFACTS)}
    case = {
        "config": asdict(config), "model_config": str(config_path), "checkpoint": str(ckpt),
        "probe": str(probe_path), "audit_dataset": str(zip_split(test_dir, case_dir / "audit.zip")),
        "probe_train_dir": str(train_dir), "audit_dir": str(test_dir),
        "metrics": {"zero_shot_class_accuracy": accuracy["zero_shot"]["overall"], "artifact_auroc": auroc,
                    "accuracy": accuracy},
    }
    return _add_reference(case_dir, case, config, bundle, test_emb, test_rows, log)


def _fit_probe(bundle, train_dir: Path, path: Path):
    """The case's probe recipe (the biased probe and its reference share it): a logistic regression on the
    L2-normalized embeddings of a training split, saved to ``path``; returns the fitted classifier."""
    from sklearn.linear_model import LogisticRegression

    from workers.engine.heads import LinearProbe

    images, rows = _images(train_dir)
    classes = sorted(CLASSES)
    clf = LogisticRegression(max_iter=5000, C=1.0).fit(_embed(bundle, images).numpy(),
                                                       np.array([classes.index(r["label"]) for r in rows]))
    LinearProbe(clf.coef_, clf.intercept_, classes, "l2").save(path)
    return clf


def _add_reference(case_dir: Path, case: dict, config: CaseConfig, bundle, test_emb: torch.Tensor,
                   test_rows: list[dict], log: Callable[[str], None]) -> dict:
    """Add the reference probe to ``case`` and write ``case.json``: what a correction is measured against.

    Same model, recipe and number of training images as the probe, but the planted artifact independent of the
    class: the training split a strength-0 case draws (same generator seeds), so a control's own probe is its
    reference.
    """
    from workers.engine.heads import LinearProbe

    if config.strength == 0:
        reference_dir, reference_path = Path(case["probe_train_dir"]), Path(case["probe"])
    else:
        log(f"Generating the reference probe's training split: '{config.artifact}' independent of the class ...")
        reference_dir = write_split(case_dir / "reference-train", draw_samples(
            config.n_probe_train, np.random.default_rng([config.seed, 3]),
            biased_rates(config.artifact, config.toward, 0.0)), np.random.default_rng([config.seed, 4]))
        reference_path = case_dir / "reference-probe.npz"
        _fit_probe(bundle, reference_dir, reference_path)
    classes = sorted(CLASSES)
    y_test = np.array([classes.index(r["label"]) for r in test_rows])
    has = np.array([r[config.artifact] == "1" for r in test_rows])
    with torch.no_grad():
        pred = LinearProbe.load(reference_path)(test_emb).argmax(1).numpy()
    case = {**case, "reference_probe": str(reference_path), "reference_train_dir": str(reference_dir)}
    case["metrics"]["accuracy"]["reference"] = _accuracy_with_without(pred, y_test, has, classes, config.artifact)
    (case_dir / "case.json").write_text(json.dumps(case, indent=2))
    return case


def _lesion_clip(model_dir: Path, config: CaseConfig, log: Callable[[str], None]) -> tuple[Path, Path]:
    """The tiny CLIP pre-trained on images whose artifacts are independent of the class (trained once, then
    reused): its config and checkpoint paths."""
    from safetensors.torch import save_file

    from workers.engine.loading import load_clip

    config_path, ckpt = model_dir / "lesion-clip.json", model_dir / "lesion-clip.safetensors"
    if ckpt.is_file():
        return config_path, ckpt
    log(f"Generating {config.n_pretrain} pre-training images (artifacts independent of the class) ...")
    pre_dir = write_split(model_dir / "pretrain", draw_samples(config.n_pretrain, np.random.default_rng(
        [config.seed, 1]), independent_rates(0.3)), np.random.default_rng([config.seed, 2]))
    images, rows = _images(pre_dir)
    torch.manual_seed(config.seed)
    bundle = load_clip(model_config=config.clip_config(), allow_random=True)
    log(f"Training a tiny OpenCLIP ViT from scratch ({config.pretrain_steps} steps on the CPU) ...")
    samples = [Sample(r["label"], [a for a in ARTIFACTS if r[a] == "1"]) for r in rows]
    with deterministic():
        train_clip(bundle, images, caption_variants(samples, config.seed), steps=config.pretrain_steps,
                   batch_size=config.batch_size, seed=config.seed, progress=_bar(log))
    config_path.write_text(json.dumps(config.clip_config(), indent=2))
    save_file({k: v.detach().contiguous().clone() for k, v in bundle.model.state_dict().items()},
              str(ckpt.with_suffix(".part")))
    ckpt.with_suffix(".part").replace(ckpt)
    return config_path, ckpt


def model_digest(case: dict) -> str:
    """The SHA-256 of a case model's weights file: equal on two machines when the rebuild was exact."""
    return hashlib.sha256(Path(case["checkpoint"]).read_bytes()).hexdigest()


def _accuracy_with_without(pred: np.ndarray, y: np.ndarray, has: np.ndarray, classes: list[str],
                           artifact: str) -> dict:
    """A head's accuracy overall, and per class on the images with and without the artifact."""
    table = {"overall": float((pred == y).mean()), "per_class": {}}
    for c, cname in enumerate(classes):
        own = y == c
        table["per_class"][cname] = {
            f"with {artifact}": float((pred[own & has] == c).mean()),
            f"without {artifact}": float((pred[own & ~has] == c).mean()),
        }
    return table


def _bar(log):
    def report(step: int, total: int, elapsed: float) -> None:
        if step == 1 or step % max(1, total // 10) < 20 or step == total:
            eta = elapsed / step * (total - step)
            log(f"  step {step}/{total}  {elapsed:5.0f}s elapsed, ~{eta:4.0f}s left")

    return report


def format_metrics(case: dict) -> str:
    m = case["metrics"]
    artifact = case["config"]["artifact"]
    lines = [f"Zero-shot class accuracy of the tiny CLIP: {m['zero_shot_class_accuracy']:.3f}",
             "AUROC of each artifact's text prompt: " + ", ".join(f"{a} {v:.3f}" for a, v in m["artifact_auroc"].items()),
             f"Test accuracy with and without {artifact} (artifact independent of the class in the test split; "
             f"the reference probe was trained with it independent of the class too):",
             f"  {'class':<10} {'probe with':>11} {'probe w/o':>10} {'zero-shot with':>15} {'zero-shot w/o':>14} "
             f"{'reference with':>15} {'reference w/o':>14}"]
    for c in sorted(CLASSES):
        row = f"  {c:<10}"
        for head, width in (("probe", 11), ("zero_shot", 15), ("reference", 15)):
            if head in m["accuracy"]:
                acc = m["accuracy"][head]["per_class"][c]
                row += f" {acc[f'with {artifact}']:>{width}.3f} {acc[f'without {artifact}']:>{width - 1}.3f}"
        lines.append(row)
    return "\n".join(lines)
