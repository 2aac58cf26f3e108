"""Small generated inputs for the tests: a tiny OpenCLIP model, a probe, an image archive.

Nothing here is downloaded: the model is a real OpenCLIP architecture with
random weights saved as safetensors, the images are drawn with Pillow, and
the probe is fitted with scikit-learn on the model's own embeddings.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np


def write_tiny_model(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a random tiny OpenCLIP ViT."""
    from safetensors.torch import save_file

    from workers.engine.tiny import TINY_VIT, tiny_clip

    folder.mkdir(parents=True, exist_ok=True)
    bundle = tiny_clip(seed)
    config_path = folder / "tiny-vit.json"
    config_path.write_text(json.dumps(TINY_VIT, indent=2))
    ckpt = folder / "tiny-vit.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in bundle.model.state_dict().items()}, str(ckpt))
    return config_path, ckpt


def draw_image(rng: np.random.Generator, label: int, size: int = 32):
    """A textured background with a blob; class 1 images also carry a bright square in a corner."""
    from PIL import Image, ImageDraw

    base = rng.integers(120, 200, size=3)
    pixels = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(5, 10))
    cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(40, 110, size=3)))
    if label == 1:
        draw.rectangle([0, 0, 9, 9], fill=(250, 250, 250))
    return img


def write_dataset_zip(path: Path, class_names=("nevus", "melanoma"), per_class: int = 24, seed: int = 0,
                      with_csv: bool = True) -> Path:
    """A zip of PNGs: a labels.csv (image,label) or, without it, one folder per class."""
    rng = np.random.default_rng(seed)
    rows = ["image,label"]
    with zipfile.ZipFile(path, "w") as zf:
        for label, name in enumerate(class_names):
            for i in range(per_class):
                buf = io.BytesIO()
                draw_image(rng, label).save(buf, format="PNG")
                member = f"images/{name}-{i:04d}.png" if with_csv else f"{name}/{i:04d}.png"
                zf.writestr(member, buf.getvalue())
                rows.append(f"{member},{name}")
        if with_csv:
            zf.writestr("labels.csv", "\n".join(rows) + "\n")
    return path


def with_columns(source: Path, target: Path, columns: Mapping[str, Callable[[int, str], object]]) -> Path:
    """A copy of the dataset zip ``source`` whose labels.csv has extra ``columns``: name -> value of the i-th row
    (given ``i`` and the row's ``image,label`` text)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            if item.filename != "labels.csv":
                zout.writestr(item, zin.read(item))
        rows = zin.read("labels.csv").decode().strip().splitlines()
        lines = [",".join([rows[0], *columns])]
        lines += [",".join([row, *(str(value(i, row)) for value in columns.values())])
                  for i, row in enumerate(rows[1:])]
        zout.writestr("labels.csv", "\n".join(lines) + "\n")
    return target


def fit_probe(config_path: Path, ckpt: Path, dataset_zip: Path, out: Path) -> Path:
    """A logistic-regression probe on the tiny model's L2-normalized embeddings of the archive's images."""
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from workers.engine.heads import LinearProbe
    from workers.engine.loading import load_clip

    bundle = load_clip(model_config=config_path, checkpoint=ckpt)
    pixels, labels, classes = [], [], []
    with zipfile.ZipFile(dataset_zip) as zf:
        rows = [r.split(",") for r in zf.read("labels.csv").decode().strip().splitlines()[1:]]
        classes = sorted({lab for _, lab in rows})
        for member, lab in rows:
            pixels.append(bundle.preprocess(Image.open(io.BytesIO(zf.read(member))).convert("RGB")))
            labels.append(classes.index(lab))
    with torch.no_grad():
        emb = torch.nn.functional.normalize(bundle.model.encode_image(torch.stack(pixels)), dim=-1).numpy()
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(emb, labels)
    LinearProbe(clf.coef_, clf.intercept_, classes, "l2").save(out)
    return out
