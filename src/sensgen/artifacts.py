"""Per-pack files of a study directory: their layout, crash-safe writes and their reads.

    DIR/points/<pack_id>.parquet        per test point: loss, correctness, ‖J‖ (paper §3 Study 6)
    DIR/profiles/<pack_id>.parquet      per (model, path, ellipse, angle bin): ‖J‖ and the
                                        transition density (Study 2, `sensgen.geometry`)
    DIR/measures/<pack_id>.parquet      per (model, measure): generalization measures
                                        (`sensgen.measures`, e.g. norms, margin, flatness)
    DIR/weights/<pack_id>.safetensors   trained weights, tensors "<run_id>.<parameter>"
    DIR/regions/<pack_id>.safetensors   region maps, tensors "<run_id>.<init|trained|anchors|
                                        labels>" (Study 3, `sensgen.geometry`)

Tables hold one row per item with a ``run_id`` column; tensor files prefix every tensor
with its run's id. `write_atomic` writes under a temporary name (``*.tmp-<pid>``), fsyncs and
renames, so a reader never sees half a file. Only `sensgen.store.Store` calls the writers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pandas as pd
import safetensors.torch
import torch

from sensgen.errors import UserError

POINT_DTYPES: dict[str, str] = {
    "run_id": "str",
    "split": "str",
    "index": "int64",
    "label": "int64",
    "loss": "float64",
    "correct": "bool",
    **dict.fromkeys(["p_y", "margin", "jacobian_norm", "jacobian_norm_logits"], "float64"),
}
PROFILE_DTYPES: dict[str, str] = {
    "run_id": "str",
    "path": "str",  # random | different_class | same_class
    "ellipse": "int64",
    "bin": "int64",
    "angle": "float64",  # the bin's centre, radians
    "jacobian_norm": "float64",
    "transition_density": "float64",  # NaN for smooth φ (no linear regions)
}
MEASURE_DTYPES: dict[str, str] = {
    "run_id": "str",
    "measure": "str",  # a key of `sensgen.measures.all_measures`
    "value": "float64",  # inf / NaN where the measure overflows or is undefined
}
# Per table kind: its columns' dtypes and those that may hold no missing value.
TABLES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "points": (POINT_DTYPES, ("run_id", "split", "index", "label", "correct")),
    "profiles": (PROFILE_DTYPES, ("run_id", "path", "ellipse", "bin", "angle")),
    "measures": (MEASURE_DTYPES, ("run_id", "measure")),
}
TENSOR_KINDS = ("weights", "regions")
FOLDERS = (*TABLES, *TENSOR_KINDS)


def pack_file(root: Path, kind: str, pack_id: str) -> Path:
    """The path of a pack's file of one kind (`FOLDERS`)."""
    suffix = ".parquet" if kind in TABLES else ".safetensors"
    return root / kind / f"{pack_id}{suffix}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None] | None) -> None:
    """Write ``path`` via a temporary name and a rename; ``write=None`` removes ``path``."""
    if write is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def validated_table(kind: str, frame: pd.DataFrame, run_ids: set[str]) -> pd.DataFrame:
    """A copy of a ``kind`` table with its columns checked and cast to their dtypes.

    Raises:
        ValueError: a column is missing, a key column holds a missing value, or a row
            names a run outside ``run_ids``.
    """
    dtypes, exact = TABLES[kind]
    if missing := [c for c in dtypes if c not in frame.columns]:
        raise ValueError(f"{kind} frame lacks columns {missing}")
    if frame[list(exact)].isna().any().any():
        raise ValueError(f"{kind} columns {list(exact)} must not contain missing values")
    if foreign := set(frame["run_id"]) - run_ids:
        raise ValueError(f"{kind} rows for runs without a result here: {sorted(foreign)[:5]}")
    return frame.astype(dtypes).reset_index(drop=True)


def write_table(path: Path, frame: pd.DataFrame | None) -> None:
    """Write (or, for None, remove) a pack's table atomically."""
    write_atomic(path, None if frame is None else lambda p: frame.to_parquet(p, index=False))


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor] | None, metadata: dict[str, str]
) -> None:
    """Write (or, for None, remove) a pack's tensors atomically, as contiguous CPU copies."""
    if tensors is None:
        write_atomic(path, None)
        return
    copies = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    write_atomic(path, lambda p: safetensors.torch.save_file(copies, p, metadata))


def read_tables(root: Path, kind: str, by_pack: Mapping[str, Iterable[str]]) -> pd.DataFrame:
    """The rows of runs ``by_pack[pack_id]`` from each pack's ``kind`` table.

    A pack without a file contributes nothing (e.g. a study that did not measure it).
    """
    frames = []
    for pack_id, run_ids in sorted(by_pack.items()):
        path = pack_file(root, kind, pack_id)
        if path.is_file():
            frame = pd.read_parquet(path)
            frames.append(frame[frame["run_id"].isin(set(run_ids))])
    if frames:
        return pd.concat(frames, ignore_index=True)
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in TABLES[kind][0].items()})


def read_tensors(root: Path, kind: str, pack_id: str) -> dict[str, torch.Tensor]:
    """A pack's tensors of one kind; a clear error when the file is missing."""
    path = pack_file(root, kind, pack_id)
    if not path.is_file():
        raise UserError(f"{path} does not exist: pack {pack_id} was finished without {kind}.")
    return safetensors.torch.load_file(path)


def read_run_tensors(root: Path, kind: str, pack_id: str, run_id: str) -> dict[str, torch.Tensor]:
    """One run's tensors of a pack's file, keys without the ``"<run_id>."`` prefix; only
    that run's tensors are read from disk (a pack file holds every run's)."""
    path = pack_file(root, kind, pack_id)
    if not path.is_file():
        raise UserError(f"{path} does not exist: pack {pack_id} was finished without {kind}.")
    prefix = f"{run_id}."
    with safetensors.safe_open(path, framework="pt") as file:
        keys = [k for k in file.keys() if k.startswith(prefix)]  # noqa: SIM118 (not a dict)
        return {k.removeprefix(prefix): file.get_tensor(k) for k in keys}
