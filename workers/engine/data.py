"""Image sets the engine reads: labelled images, loaded lazily and preprocessed for the model."""
from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import EngineError
from .imagefiles import SUFFIXES, open_image


def check_metadata(metadata: Mapping[str, Sequence] | None, n: int) -> dict[str, list[str]]:
    """``metadata`` as column -> one string per image (``n`` of them), or a refusal naming the column."""
    out = {}
    for column, values in (metadata or {}).items():
        values = [str(v) for v in values]
        if len(values) != n:
            raise EngineError(f"metadata column '{column}' has {len(values)} values for {n} images")
        out[str(column)] = values
    return out


class ImageSet(Dataset):
    """Labelled images: ``set[i] -> (pixels [3, H, W], label)``; ``ids[i]`` names image i in reports.

    ``metadata[column][i]`` is a value of image i from the dataset's labels.csv (e.g. "a ruler": "1"); every
    view of the set (remapped, preprocessed, a subset) keeps it aligned with the images.
    """

    class_names: list[str]
    labels: Tensor  # [n] long, index into class_names
    ids: list[str]
    metadata: Mapping[str, list[str]] = MappingProxyType({})  # column -> [n] values; sets without any share this

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

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        """The images at ``indices``, in that order; labels, ids and metadata follow them."""
        idx = [int(i) for i in indices]
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone.labels = self.labels[torch.as_tensor(idx, dtype=torch.long)]
        clone.ids = [self.ids[i] for i in idx]
        clone.metadata = {column: [values[i] for i in idx] for column, values in self.metadata.items()}
        self._take(clone, idx)
        return clone

    def _take(self, clone: "ImageSet", idx: list[int]) -> None:
        """Give ``clone`` the pixels (or files) of images ``idx``; each kind of set stores them its own way."""
        raise EngineError(f"{type(self).__name__} cannot be subset")


class TensorImages(ImageSet):
    """Images already as a tensor [n, 3, H, W] (tests, benchmarks)."""

    def __init__(self, images: Tensor, labels: Sequence[int] | Tensor, class_names: Sequence[str],
                 ids: Sequence[str] | None = None, metadata: Mapping[str, Sequence] | None = None):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.class_names = list(class_names)
        self.ids = list(ids) if ids is not None else [f"image-{i:06d}" for i in range(len(images))]
        if len(self.images) != len(self.labels):
            raise EngineError("one label per image is needed")
        self.metadata = check_metadata(metadata, len(self.labels))

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def _take(self, clone: "TensorImages", idx: list[int]) -> None:
        clone.images = self.images[torch.as_tensor(idx, dtype=torch.long)]


class ImageFiles(ImageSet):
    """Image files on disk with labels; pixels come from ``preprocess`` (the model's transform)."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], class_names: Sequence[str],
                 preprocess: Callable | None = None, ids: Sequence[str] | None = None,
                 metadata: Mapping[str, Sequence] | None = None):
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.ids = list(ids) if ids is not None else [p.name for p in self.paths]
        if len(self.paths) != len(self.labels):
            raise EngineError("one label per image is needed")
        self.metadata = check_metadata(metadata, len(self.labels))

    def with_preprocess(self, preprocess: Callable) -> "ImageFiles":
        return ImageFiles(self.paths, self.labels.tolist(), self.class_names, preprocess, self.ids, self.metadata)

    def _take(self, clone: "ImageFiles", idx: list[int]) -> None:
        clone.paths = [self.paths[i] for i in idx]

    def __getitem__(self, i: int):
        with open_image(self.paths[i]) as img:
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
                if p.suffix.lower() in SUFFIXES:
                    paths.append(p)
                    labels.append(label)
        return cls(paths, labels, classes, preprocess, ids=[f"{p.parent.name}/{p.name}" for p in paths])
