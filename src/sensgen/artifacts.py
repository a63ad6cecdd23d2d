"""Per-pack files of a study directory: their layout, crash-safe writes and their reads.

    DIR/points/<pack_id>.parquet        per test point: loss, correctness, ‖J‖ (paper §3 Study 6)
    DIR/profiles/<pack_id>.parquet      per (model, path, ellipse, angle bin): ‖J‖ and the
                                        transition density (Study 2, `sensgen.geometry`)
    DIR/measures/<pack_id>.parquet      per (model, measure): generalization measures
                                        (`sensgen.measures`, e.g. norms, margin, flatness)
    DIR/weights/<pack_id>.safetensors   trained weights, tensors "<run_id>.<parameter>"
    DIR/regions/<pack_id>.safetensors   region maps, tensors "<run_id>.<init|trained|anchors|
                                        labels|indices>" (Study 3, `sensgen.geometry`)

Tables hold one row per item with a ``run_id`` column; tensor files prefix every tensor
with its run's id. `write_atomic` writes under a temporary name (``*.tmp-<pid>``), fsyncs and
renames, so a reader never sees half a file. Only `sensgen.store.Store` calls the writers.

A file damaged after it was written (cut short by an interrupted copy or a full disk,
overwritten) is a user error, never a traceback: readers raise a `UserError` naming the
file and the fix, and `sensgen run` finds the finished packs with a damaged file
(`damaged_files`: a broken frame, or a file the user renamed to ``*.damaged``) and trains
them again (`sensgen.store.Store.requeue_pack`): nothing else is redone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import safetensors.torch
import torch
from safetensors import SafetensorError

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


# The process's umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
        # safetensors creates its files 0600: give every file the mode the umask gives
        with contextlib.suppress(OSError):  # (a file system without modes: vfat, CIFS)
            os.chmod(tmp, 0o666 & ~_UMASK)
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
            with _read_or_explain(path):
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
    with _read_or_explain(path):
        return safetensors.torch.load_file(path)


def read_run_tensors(root: Path, kind: str, pack_id: str, run_id: str) -> dict[str, torch.Tensor]:
    """One run's tensors of a pack's file, keys without the ``"<run_id>."`` prefix; only
    that run's tensors are read from disk (a pack file holds every run's)."""
    path = pack_file(root, kind, pack_id)
    if not path.is_file():
        raise UserError(f"{path} does not exist: pack {pack_id} was finished without {kind}.")
    prefix = f"{run_id}."
    with _read_or_explain(path), safetensors.safe_open(path, framework="pt") as file:
        keys = [k for k in file.keys() if k.startswith(prefix)]  # noqa: SIM118 (not a dict)
        return {k.removeprefix(prefix): file.get_tensor(k) for k in keys}


# What a reader of a damaged file meets: pyarrow's ArrowInvalid is a ValueError; pandas
# raises KeyError or TypeError for damaged pandas metadata in a whole footer; pyarrow
# raises an OSError without an errno for data that does not decompress. (An OSError with
# an errno is the disk's or the permissions' doing, not the file's: never damage.)
_DAMAGE_ERRORS = (ValueError, KeyError, TypeError, SafetensorError)


def _is_system_error(error: BaseException) -> bool:
    """An error of the operating system (I/O, permissions), not of the file's contents."""
    return isinstance(error, OSError) and error.errno is not None


# A file renamed to this suffix marks its pack for training again (`damaged_files`).
DAMAGED_SUFFIX = ".damaged"


def _mark(path: Path) -> Path:
    """The ``*.damaged`` mark of a pack file."""
    return path.with_name(path.name + DAMAGED_SUFFIX)


class DamagedFileError(UserError):
    """A pack file that cannot be read as what sensgen wrote (a `UserError`: exit 2)."""


def frame_damage(path: Path) -> str | None:
    """Why the pack file at ``path`` cannot be read, judged from its frame alone, or None if
    the frame is whole: a Parquet file's footer, its columns and pandas metadata (an empty
    table is converted); a safetensors file's header and length, which must cover its
    data. Cheap: no data is read. What a whole frame can still hide (bytes changed inside
    the data) shows when the file is read (`_read_or_explain`).

    Raises:
        UserError: the file cannot be read at all (permissions, an I/O error).
    """
    try:
        if path.suffix == ".parquet":
            schema = pq.read_schema(path)
            if missing := [c for c in TABLES[path.parent.name][0] if c not in schema.names]:
                return f"no column {missing[0]!r}"
            schema.empty_table().to_pandas()
        else:
            with safetensors.safe_open(path, framework="pt"):
                pass
    except (*_DAMAGE_ERRORS, OSError) as error:
        if _is_system_error(error):
            raise _unreadable(path, error) from None
        return f"{type(error).__name__}: {error}"
    return None


def damaged_files(root: Path, pack_ids: Iterable[str]) -> dict[str, tuple[Path, str]]:
    """The packs among ``pack_ids`` with a damaged file: pack id -> (file, why). A file is
    damaged if its frame is broken (`frame_damage`) or if the user renamed it (or a copy)
    to ``<file>.damaged``, as a reader's message says to do for damage inside the data."""
    found = {}
    for pack_id in pack_ids:
        for kind in FOLDERS:
            path = pack_file(root, kind, pack_id)
            if (marked := _mark(path)).exists():
                found[pack_id] = (path, f"marked damaged by {marked.name}")
            elif path.is_file() and (why := frame_damage(path)) is not None:
                found[pack_id] = (path, why)
            if pack_id in found:
                break
    return found


def remove_damage_marks(root: Path, pack_id: str) -> None:
    """Remove the ``*.damaged`` marks of a pack's files (its files were written anew)."""
    for kind in FOLDERS:
        _mark(pack_file(root, kind, pack_id)).unlink(missing_ok=True)


def remove_pack_files(root: Path, pack_id: str) -> None:
    """Remove every file of a pack, and the ``*.damaged`` marks beside them."""
    for kind in FOLDERS:
        pack_file(root, kind, pack_id).unlink(missing_ok=True)
    remove_damage_marks(root, pack_id)


def _unreadable(path: Path, error: OSError) -> UserError:
    return UserError(
        f"{path} cannot be read ({error}): check the disk and the file's permissions, then "
        "run the command again. Nothing was changed."
    )


@contextlib.contextmanager
def _read_or_explain(path: Path) -> Iterator[None]:
    """Turn a failed read of a pack file into a `DamagedFileError` naming the file and the
    fix (an I/O error: a `UserError` saying so)."""
    try:
        yield
    except (*_DAMAGE_ERRORS, OSError) as error:
        if _is_system_error(error):
            raise _unreadable(path, error) from None
        raise _damaged(path, error) from None


def _damaged(path: Path, error: Exception) -> DamagedFileError:
    root, pack_id = path.parent.parent, path.stem
    if frame_damage(path) is not None:  # `sensgen run` finds it by itself
        how = "Run again the study that trained it into this directory"
    else:  # damage inside the data: the user marks it
        how = (
            f"Rename it to {path.name}{DAMAGED_SUFFIX}, then run again the study that "
            "trained it into this directory"
        )
    return DamagedFileError(
        f"{path} is damaged ({type(error).__name__}: {error}). sensgen writes each file whole"
        " (under a temporary name, then renamed into place), so it was cut short or changed"
        f" afterwards (an interrupted copy, a full disk, an edit). {how} (`sensgen run"
        f" {root / 'study.toml'} --out {root}` runs the last study run there): it trains"
        f" pack {pack_id} again and rewrites its files; nothing else is redone."
    )
