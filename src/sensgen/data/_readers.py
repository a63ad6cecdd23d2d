"""Readers for the original on-disk formats: IDX (.gz), CIFAR python pickles, CSV (.gz).

Every reader returns raw integer pixels, flattened in (C, H, W) order, plus int64 labels,
and validates what it reads: a truncated archive, a wrong IDX magic number, a header that
disagrees with its payload, or a pickle of the wrong shape is a `UserError` naming the file.
Scaling and standardisation happen later (`_transforms`), so the cache holds uint8 arrays.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sensgen.errors import UserError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions: [N, H, W]
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension: [N]

_FIX = "delete it and run `sensgen datasets fetch {name}` to download a fresh copy"


class RawSplit(NamedTuple):
    """One split as stored on disk.

    Attributes:
        x: uint8 [N, C*H*W], pixels in (C, H, W) order, values in [0, max_value].
        y: int64 [N], class labels.
    """

    x: np.ndarray
    y: np.ndarray


class RawData(NamedTuple):
    """Both splits of a dataset, plus the largest possible pixel value (255 or 16)."""

    train: RawSplit
    test: RawSplit
    max_value: int


def corrupt(name: str, path: Path, what: str) -> UserError:
    """The one-paragraph error for a file that cannot be read as the expected format."""
    return UserError(
        f"Dataset {name!r}: file {path} is corrupt or not in the expected format: {what}. "
        f"Fix: {_FIX.format(name=name)} (or replace it with an intact copy)."
    )


def read_gzip(path: Path, *, name: str) -> bytes:
    """Return the decompressed bytes of a .gz file, as a `UserError` if it is damaged."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise corrupt(name, path, f"gzip stream is truncated or damaged ({e})") from e


def parse_idx(data: bytes, *, magic: int, path: Path, name: str) -> np.ndarray:
    """Parse an IDX buffer of unsigned bytes (LeCun's MNIST format).

    Layout: a big-endian uint32 magic number ``0x000008NN`` (0x08 = uint8, NN = number of
    dimensions), NN big-endian uint32 sizes, then ``prod(sizes)`` bytes of payload.

    Args:
        data: the decompressed file contents.
        magic: the expected magic number (`IDX_IMAGES_MAGIC` or `IDX_LABELS_MAGIC`).
        path, name: the file and dataset, for error messages.

    Returns:
        uint8 array with the shape given by the header ([N, H, W] or [N]); a read-only view.
    """
    if len(data) < 4:
        raise corrupt(name, path, f"only {len(data)} bytes, too short for an IDX header")
    (got,) = struct.unpack(">I", data[:4])
    if got != magic:
        raise corrupt(name, path, f"IDX magic number is 0x{got:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise corrupt(name, path, f"IDX header needs {header} bytes, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise corrupt(
            name,
            path,
            f"IDX header declares shape {tuple(dims)} = {expected} bytes of payload, "
            f"but the file holds {len(data) - header}",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(
    folder: Path, images: str, labels: str, *, name: str, image_hw: tuple[int, int]
) -> RawSplit:
    """Read one split from a pair of gzipped IDX files in `folder`."""
    ipath, lpath = folder / images, folder / labels
    x = parse_idx(read_gzip(ipath, name=name), magic=IDX_IMAGES_MAGIC, path=ipath, name=name)
    y = parse_idx(read_gzip(lpath, name=name), magic=IDX_LABELS_MAGIC, path=lpath, name=name)
    if tuple(x.shape[1:]) != image_hw:
        raise corrupt(name, ipath, f"images are {x.shape[1:]}, expected {image_hw}")
    if x.shape[0] != y.shape[0]:
        raise corrupt(name, lpath, f"{y.shape[0]} labels for {x.shape[0]} images in {ipath}")
    return RawSplit(x.reshape(x.shape[0], -1), y.astype(np.int64))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (no arbitrary code)."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_batch(tar: tarfile.TarFile, member: str, label_key: bytes) -> RawSplit:
    f = tar.extractfile(member)
    if f is None:
        raise KeyError(member)
    with f:
        batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    try:
        x, y = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    except KeyError as e:  # a key of the batch's dict, not a missing archive member
        raise ValueError(f"{member}: the batch has no key {e}") from None
    if x.dtype != np.uint8 or x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"{member}: data {x.dtype} {x.shape} and labels {y.shape} disagree")
    return RawSplit(x, y)


def read_cifar(
    path: Path,
    *,
    name: str,
    train: Sequence[str],
    test: Sequence[str],
    label_key: bytes,
    n_features: int,
) -> tuple[RawSplit, RawSplit]:
    """Read the CIFAR "python version" archive (a tar.gz of pickled batch dicts).

    Each batch is a dict with ``b"data"``: uint8 [n, 3072] (1024 red, then green, then blue
    values of a 32x32 image in row-major order, i.e. (C, H, W)) and ``label_key``: n ints.

    Returns:
        (train, test) splits, the batches of each concatenated in the order given.
    """
    splits = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for members in (train, test):
                parts = [_read_batch(tar, m, label_key) for m in members]
                splits.append(
                    RawSplit(
                        np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
                    )
                )
    except KeyError as e:
        raise corrupt(name, path, f"archive member {e} is missing") from e
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise corrupt(name, path, f"tar.gz archive is truncated or damaged ({e})") from e
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise corrupt(name, path, f"a pickled batch is malformed ({e})") from e
    for split in splits:
        if split.x.shape[1] != n_features:
            raise corrupt(name, path, f"rows have {split.x.shape[1]} values, not {n_features}")
    return splits[0], splits[1]


def read_csv_gz(path: Path, *, name: str, n_columns: int, max_value: int) -> RawSplit:
    """Read a gzipped CSV of integer pixels followed by a final label column.

    Returns:
        RawSplit with x uint8 [N, n_columns - 1] and y int64 [N].
    """
    data = read_gzip(path, name=name)
    try:
        table = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise corrupt(name, path, f"not a CSV of integers ({e})") from e
    if table.shape[1] != n_columns:
        raise corrupt(name, path, f"{table.shape[1]} columns, expected {n_columns}")
    x = table[:, :-1]
    if x.min(initial=0) < 0 or x.max(initial=0) > max_value:
        raise corrupt(name, path, f"pixel values outside [0, {max_value}]")
    return RawSplit(x.astype(np.uint8), table[:, -1].copy())
