"""Image sets the engine reads: labelled images, loaded lazily and preprocessed for the model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import EngineError


class ImageSet(Dataset):
    """Labelled images: ``set[i] -> (pixels [3, H, W], label)``; ``ids[i]`` names image i in reports."""

    class_names: list[str]
    labels: Tensor  # [n] long, index into class_names
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def with_preprocess(self, preprocess: Callable) -> "ImageSet":
        return self

    def remap(self, class_names: Sequence[str]) -> "ImageSet":
        """The same images with labels indexed into ``class_names`` (e.g. the probe's order)."""
        missing = sorted(set(self.class_names) - set(class_names))
        if missing:
            raise EngineError(f"the dataset has classes the probe does not know: {', '.join(missing)}; "
                              f"the probe's classes are {', '.join(class_names)}")
        lookup = torch.tensor([list(class_names).index(c) for c in self.class_names])
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone.labels = lookup[self.labels]
        clone.class_names = list(class_names)
        return clone


class TensorImages(ImageSet):
    """Images already as a tensor [n, 3, H, W] (tests, benchmarks)."""

    def __init__(self, images: Tensor, labels: Sequence[int] | Tensor, class_names: Sequence[str],
                 ids: Sequence[str] | None = None):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.class_names = list(class_names)
        self.ids = list(ids) if ids is not None else [f"image-{i:06d}" for i in range(len(images))]
        if len(self.images) != len(self.labels):
            raise EngineError("one label per image is needed")

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class ImageFiles(ImageSet):
    """Image files on disk with labels; pixels come from ``preprocess`` (the model's transform)."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], class_names: Sequence[str],
                 preprocess: Callable | None = None, ids: Sequence[str] | None = None):
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.ids = list(ids) if ids is not None else [p.name for p in self.paths]

    def with_preprocess(self, preprocess: Callable) -> "ImageFiles":
        return ImageFiles(self.paths, self.labels.tolist(), self.class_names, preprocess, self.ids)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            pixels = self.preprocess(img.convert("RGB"))
        return pixels, int(self.labels[i])

    @classmethod
    def from_folders(cls, root: str | os.PathLike, preprocess: Callable | None = None) -> "ImageFiles":
        """One sub-folder per class, images inside."""
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        paths, labels = [], []
        for label, name in enumerate(classes):
            for p in sorted((root / name).iterdir()):
                if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
                    paths.append(p)
                    labels.append(label)
        return cls(paths, labels, classes, preprocess, ids=[f"{p.parent.name}/{p.name}" for p in paths])
