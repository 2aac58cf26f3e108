"""Synthetic dermoscopy-like images with known ground truth.

Skin-toned textured background; a lesion whose look depends on its class
(melanoma: irregular, asymmetric, several dark colours; nevus: round, smooth,
uniform brown); optional artifacts that are distinct visual concepts: a
ruler, a band-aid, an ink marking, hair, dark corners, and two that no
built-in vocabulary names (a sticker, a stain), so an audit meets artifacts
it has no word for. Every image gets a caption built from its attributes.

Every artifact also leaves a pixel mask, the ground truth of where it lies
(:func:`render_with_masks`). A split written by :func:`write_split` keeps
them in ``masks/<image stem>.npz``, one boolean [SIZE, SIZE] array per
artifact the image shows, named by the artifact (:func:`read_masks`). A mask
marks the pixels where the artifact was drawn and is still seen: an opaque
artifact drawn later (in :func:`render`'s order) takes its pixels out of the
masks before it. The translucent ones (a stain, dark corners) count where
their blending weight is at least half of its full strength, and hide
nothing. Drawing the masks draws no random numbers, so images are the same
with or without them.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("melanoma", "nevus")
ARTIFACTS = ("a ruler", "a band-aid", "ink marking", "hair", "dark corners", "a sticker", "a stain")
# artifacts the audit's built-in artifact vocabulary does not name: labels for them must admit ignorance
NOVEL_ARTIFACTS = ("a sticker", "a stain")
SIZE = 64
_DRAW = 2 * SIZE  # drawn at twice the size, then downsampled: smoother edges
# artifacts that blend into what lies below them instead of covering it: they hide no other artifact's pixels
TRANSLUCENT = ("a stain", "dark corners")
MASKS_DIR = "masks"  # of a split: masks/<image stem>.npz


@dataclass
class Sample:
    label: str
    artifacts: list[str] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return self.partial_caption(with_class=True, with_artifacts=True)

    def partial_caption(self, with_class: bool, with_artifacts: bool, prefix: str = "a dermoscopy image",
                        article: bool = True) -> str:
        """E.g. "a dermoscopy image of a melanoma with a ruler and hair." or parts of it."""
        text = prefix
        if with_class:
            text += f" of a {self.label}" if article else f" of {self.label}"
        if with_artifacts and self.artifacts:
            names = self.artifacts
            text += " with " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
        return text + "."


def _skin(rng: np.random.Generator) -> Image.Image:
    tone = np.array([rng.uniform(200, 240), rng.uniform(150, 190), rng.uniform(120, 160)])
    noise = rng.normal(0, 6, size=(_DRAW // 8, _DRAW // 8, 3))
    coarse = np.kron(noise, np.ones((8, 8, 1)))  # blotchy texture
    fine = rng.normal(0, 4, size=(_DRAW, _DRAW, 3))
    arr = np.clip(tone + coarse + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.5))


def _lesion(img: Image.Image, rng: np.random.Generator, label: str) -> None:
    """Both classes share one drawing routine; melanoma shifts it towards irregular, asymmetric and multicoloured.

    The classes overlap (as real lesions do), so a classifier has to look
    closely, and a planted artifact is an easier cue than the lesion itself.
    """
    draw = ImageDraw.Draw(img)
    cx, cy = (_DRAW / 2 + rng.uniform(-10, 10) for _ in range(2))
    melanoma = label == "melanoma"
    irregular = rng.uniform(0.12, 0.4) if melanoma else rng.uniform(0.0, 0.22)
    asymmetry = rng.uniform(0.1, 0.35) if melanoma else rng.uniform(0.0, 0.18)
    n = 24
    base = rng.uniform(18, 30)
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    smooth = np.convolve(np.tile(rng.standard_normal(n), 3), np.ones(3) / 3, mode="same")[n:2 * n]
    radii = base * (1 + irregular * smooth).clip(0.5, 1.7)
    radii *= 1 + asymmetry * np.cos(angles - rng.uniform(0, 2 * math.pi))
    points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
    darkness = rng.uniform(0.55, 0.85) if melanoma else rng.uniform(0.7, 1.0)
    brown = tuple(int(v * darkness) for v in (rng.uniform(125, 150), rng.uniform(78, 95), rng.uniform(48, 65)))
    draw.polygon(points, fill=brown)
    n_spots = int(rng.integers(1, 5)) if melanoma else int(rng.integers(0, 2))
    for _ in range(n_spots):
        colour = [(45, 30, 25), (80, 80, 100), (110, 65, 50)][int(rng.integers(0, 3 if melanoma else 1))]
        px, py = points[int(rng.integers(0, n))]
        qx, qy = cx + (px - cx) * rng.uniform(0.1, 0.6), cy + (py - cy) * rng.uniform(0.1, 0.6)
        s = rng.uniform(3, 7)
        draw.ellipse([qx - s, qy - s, qx + s, qy + s], fill=colour)


# Each drawer paints one artifact onto the image (drawn at _DRAW px) and returns its mask there: an "L" image,
# 255 where the artifact is. The masks repeat the drawing's shapes and draw no random numbers of their own.

def _blank() -> Image.Image:
    return Image.new("L", (_DRAW, _DRAW), 0)


def _ruler(img, rng) -> Image.Image:
    draw = ImageDraw.Draw(img)
    mask = _blank()
    horizontal = rng.random() < 0.5
    pos = rng.uniform(6, 16) if rng.random() < 0.5 else _DRAW - rng.uniform(16, 26)
    if horizontal:
        draw.rectangle([0, pos, _DRAW, pos + 12], fill=(235, 235, 225))
        ImageDraw.Draw(mask).rectangle([0, pos, _DRAW, pos + 12], fill=255)  # the ticks lie inside the band
        for i, x in enumerate(range(2, _DRAW, 6)):
            draw.line([x, pos, x, pos + (9 if i % 5 == 0 else 5)], fill=(20, 20, 20), width=1)
    else:
        draw.rectangle([pos, 0, pos + 12, _DRAW], fill=(235, 235, 225))
        ImageDraw.Draw(mask).rectangle([pos, 0, pos + 12, _DRAW], fill=255)
        for i, y in enumerate(range(2, _DRAW, 6)):
            draw.line([pos, y, pos + (9 if i % 5 == 0 else 5), y], fill=(20, 20, 20), width=1)
    return mask


def _band_aid(img, rng) -> Image.Image:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = rng.uniform(60, 80), rng.uniform(22, 28)
    cx = rng.uniform(w / 2, _DRAW - w / 2)
    cy = rng.choice([rng.uniform(h, 30), rng.uniform(_DRAW - 30, _DRAW - h)])
    draw.rounded_rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], radius=10, fill=(214, 170, 130, 255))
    draw.rectangle([cx - 10, cy - h / 2 + 3, cx + 10, cy + h / 2 - 3], fill=(240, 225, 205, 255))
    for dx in (-25, -18, 18, 25):
        for dy in (-5, 0, 5):
            draw.ellipse([cx + dx - 1, cy + dy - 1, cx + dx + 1, cy + dy + 1], fill=(170, 125, 95, 255))
    angle = rng.uniform(-30, 30)
    rotated = layer.rotate(angle, center=(cx, cy))
    img.paste(rotated, (0, 0), rotated)
    return rotated.getchannel("A")  # what the paste covered


def _ink(img, rng) -> Image.Image:
    draw = ImageDraw.Draw(img)
    mask = _blank()
    colour = (110, 40, 150) if rng.random() < 0.5 else (40, 60, 160)
    cx, cy, r = _DRAW / 2 + rng.uniform(-6, 6), _DRAW / 2 + rng.uniform(-6, 6), rng.uniform(40, 52)
    start = rng.uniform(0, 360)
    end = start + rng.uniform(200, 320)
    draw.arc([cx - r, cy - r, cx + r, cy + r], start, end, fill=colour, width=4)
    ImageDraw.Draw(mask).arc([cx - r, cy - r, cx + r, cy + r], start, end, fill=255, width=4)
    return mask


def _hair(img, rng) -> Image.Image:
    draw = ImageDraw.Draw(img)
    mask = _blank()
    for _ in range(int(rng.integers(4, 8))):
        x, y = rng.uniform(0, _DRAW, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        points = []
        for _ in range(12):
            points.append((x, y))
            angle += rng.normal(0, 0.15)
            x, y = x + 9 * math.cos(angle), y + 9 * math.sin(angle)
        draw.line(points, fill=(35, 25, 20), width=2)
        ImageDraw.Draw(mask).line(points, fill=255, width=2)
    return mask


def _dark_corners(img, rng) -> Image.Image:
    yy, xx = np.mgrid[0:_DRAW, 0:_DRAW]
    d = np.sqrt((xx - _DRAW / 2) ** 2 + (yy - _DRAW / 2) ** 2) / (_DRAW / 2)
    edge = rng.uniform(0.85, 1.0)
    mask = np.clip((d - edge) / 0.15, 0, 1)[..., None]
    arr = np.asarray(img).astype(np.float32) * (1 - 0.9 * mask)
    img.paste(Image.fromarray(arr.astype(np.uint8)))
    return Image.fromarray(np.where(mask[..., 0] >= 0.5, 255, 0).astype(np.uint8))  # darkened by 45 % or more


def _sticker(img, rng) -> Image.Image:
    """A round coloured sticker with a white rim, near a corner."""
    draw = ImageDraw.Draw(img)
    r = rng.uniform(13, 17)  # about two patches across at 64 px: small stickers the tiny CLIP barely sees
    cx = rng.uniform(r + 3, 36) if rng.random() < 0.5 else _DRAW - rng.uniform(r + 3, 36)
    cy = rng.uniform(r + 3, 36) if rng.random() < 0.5 else _DRAW - rng.uniform(r + 3, 36)
    colour = [(60, 200, 80), (250, 215, 40), (40, 190, 220)][int(rng.integers(0, 3))]
    draw.ellipse([cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3], fill=(250, 250, 250))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    mask = _blank()
    ImageDraw.Draw(mask).ellipse([cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3], fill=255)  # with its rim
    return mask


def _stain(img, rng) -> Image.Image:
    """A translucent teal blotch with a ragged edge, anywhere off the lesion's centre."""
    layer = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(layer)
    angle = rng.uniform(0, 2 * math.pi)
    dist = rng.uniform(44, 54)
    cx, cy = _DRAW / 2 + dist * math.cos(angle), _DRAW / 2 + dist * math.sin(angle)
    for _ in range(int(rng.integers(4, 7))):
        ox, oy, r = rng.normal(0, 6), rng.normal(0, 6), rng.uniform(6, 12)
        draw.ellipse([cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r], fill=170)
    layer = layer.filter(ImageFilter.GaussianBlur(2))
    tint = Image.new("RGB", img.size, (30, 140, 130))
    img.paste(Image.composite(tint, img, layer))
    return layer.point(lambda v: 255 if v >= 85 else 0)  # at least half the blotches' opacity (170)


_ARTIFACT_DRAWERS = {"a ruler": _ruler, "a band-aid": _band_aid, "ink marking": _ink, "hair": _hair,
                     "dark corners": _dark_corners, "a sticker": _sticker, "a stain": _stain}


def render(sample: Sample, rng: np.random.Generator) -> Image.Image:
    return render_with_masks(sample, rng)[0]


def render_with_masks(sample: Sample, rng: np.random.Generator) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """The image and, per artifact it shows, a boolean [SIZE, SIZE] mask of the pixels where it is seen.

    A mask pixel is set when any of the drawing pixels it is downsampled from belongs to the artifact (a hair
    one drawing pixel wide darkens the pixel it falls in).
    """
    img = _skin(rng)
    _lesion(img, rng, sample.label)
    drawn: dict[str, np.ndarray] = {}
    # hair lies over the lesion; corners darken everything, so they come last
    for name in sorted(sample.artifacts, key=lambda a: (a == "dark corners", a)):
        mask = np.asarray(_ARTIFACT_DRAWERS[name](img, rng)) >= 128
        if name not in TRANSLUCENT:
            for earlier in drawn.values():
                earlier &= ~mask
        drawn[name] = mask
    masks = {name: _downsample(mask) for name, mask in drawn.items()}
    return img.resize((SIZE, SIZE), Image.LANCZOS), masks


def _downsample(mask: np.ndarray) -> np.ndarray:
    """[_DRAW, _DRAW] bool -> [SIZE, SIZE] bool: set where any pixel of the block it covers is set."""
    f = _DRAW // SIZE
    return mask.reshape(SIZE, f, SIZE, f).any(axis=(1, 3))


def draw_samples(n: int, rng: np.random.Generator, artifact_rates: dict[str, dict[str, float]]) -> list[Sample]:
    """``n`` samples, half per class; ``artifact_rates[artifact][class]`` is the chance it is present."""
    samples = []
    for i in range(n):
        label = CLASSES[i % 2]
        artifacts = [a for a in ARTIFACTS if rng.random() < artifact_rates[a][label]]
        samples.append(Sample(label, artifacts))
    return samples


def independent_rates(rate: float = 0.3) -> dict:
    return {a: {c: rate for c in CLASSES} for a in ARTIFACTS}


def biased_rates(artifact: str, toward: str, strength: float, base: float = 0.3) -> dict:
    """The planted correlation: ``artifact`` appears in ``toward`` images with 0.5 + strength / 2 probability and
    in the other class's with 0.5 - strength / 2; other artifacts stay independent at ``base``."""
    if artifact not in ARTIFACTS or toward not in CLASSES:
        raise ValueError(f"artifact must be one of {ARTIFACTS} and class one of {CLASSES}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be within [0, 1]")
    rates = independent_rates(base)
    other = [c for c in CLASSES if c != toward][0]
    rates[artifact] = {toward: 0.5 + strength / 2, other: 0.5 - strength / 2}
    return rates


def write_split(folder: Path, samples: list[Sample], rng: np.random.Generator) -> Path:
    """PNG files plus labels.csv (image,label,caption,<artifact columns>): the service's upload format; and each
    image's artifact masks in masks/ (:func:`read_masks`), which the upload format does not carry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "caption", *ARTIFACTS])
        for i, s in enumerate(samples):
            name = f"images/{i:05d}.png"
            img, masks = render_with_masks(s, rng)
            img.save(folder / name)
            write_masks(folder, name, masks)
            writer.writerow([name, s.label, s.caption, *[int(a in s.artifacts) for a in ARTIFACTS]])
    return folder


def read_split(folder: Path) -> list[dict]:
    with open(folder / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def samples_of(rows: list[dict]) -> list[Sample]:
    """The samples a split was rendered from, read back from its labels.csv rows."""
    return [Sample(r["label"], [a for a in ARTIFACTS if r[a] == "1"]) for r in rows]


def mask_path(folder: Path, image_name: str) -> Path:
    """Where the masks of ``image_name`` (a labels.csv path such as ``images/00007.png``) are kept."""
    return Path(folder) / MASKS_DIR / f"{Path(image_name).stem}.npz"


def write_masks(folder: Path, image_name: str, masks: dict[str, np.ndarray]) -> None:
    path = mask_path(folder, image_name)
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, **masks)  # an image without artifacts gets an empty file: "none", not "not written"


def read_masks(folder: Path, image_name: str) -> dict[str, np.ndarray]:
    """artifact -> boolean [SIZE, SIZE] mask for each artifact the image shows; FileNotFoundError for a split
    written before masks were (``workers.casestudy.masks.regenerate_masks`` adds them)."""
    with np.load(mask_path(folder, image_name)) as data:
        return {name: data[name].astype(bool) for name in data.files}
