"""The study store: a SQLite catalogue, per-pack Parquet and per-pack safetensors files.

Layout of a study directory (readable without sensgen: ``sqlite3``, pandas, safetensors)::

    DIR/results.db                      # table `runs` (one row per model), table `meta`
    DIR/points/<pack_id>.parquet        # per-test-point results of every run of a pack
    DIR/weights/<pack_id>.safetensors   # trained weights of a pack

Contract:

* **Who writes.** Only the driver process (``sensgen run``) writes, through one `Store`.
  Workers (local processes, Ray tasks) train a pack and *return* `RunResult`s, a points
  frame and weights; the driver hands them to `Store.finish_pack`.
* **Statuses.** ``pending -> running -> done | failed | diverged``; ``pending`` may also go
  straight to a final status, and `Store.reset_stale` sends ``running`` back to ``pending``
  (rows left by a crashed driver). Every other transition is a ``ValueError``. Final rows
  (``done``, ``failed``, ``diverged``) never change.
* **Packs.** The pack a run belongs to is fixed by the first `Store.add_runs` that names it.
  A pack is finished once, as a whole: `Store.finish_pack` takes a result for every run.
* **Atomicity.** `Store.finish_pack` writes each file under a temporary name
  (``*.tmp-<pid>``), fsyncs it and renames it into place, *then* updates every row of the
  pack in one transaction. A crash before the commit leaves the rows unfinished and, at
  worst, orphan files that no reader trusts (only final runs are read) and that the next
  `finish_pack` of the pack overwrites. `add_runs` and `mark_running` are one
  transaction each.
* **Readers.** SQLite runs in WAL mode, so readers (``sensgen status``, ``sensgen report``,
  `open_results`) see the last committed state while the driver writes, without blocking.
* **Schema.** ``meta.schema_version`` is `SCHEMA_VERSION`; older databases are migrated on
  open, in one transaction (see ``_MIGRATIONS``), newer ones are refused with a
  `~sensgen.errors.UserError`. A new database is built by the same migrations, so new and
  migrated ones have one layout. v2 added the per-model measurements ``jacobian_norm_train``,
  ``transitions`` (exact), ``transitions_sampled`` and ``transitions_sign`` (smooth φ,
  never pooled with the others), and ``pair_id``/``pair_role`` of paired studies (NULL in
  rows from v1 and for unpaired runs).

Example:
    >>> import tempfile
    >>> with Store.open(tempfile.mkdtemp()) as store:
    ...     store.add_runs([PlannedRun("r1", "p1", '{"width": 8}')])
    ...     store.finish_pack("p1", [RunResult("r1", Status.DONE, {"test_acc": 0.9})])
    ...     store.runs()[["run_id", "status", "test_acc", "width"]].values.tolist()
    1
    [['r1', 'done', 0.9, 8]]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Self

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from sensgen.errors import UserError

SCHEMA_VERSION = 2
DB_NAME = "results.db"


class Status(StrEnum):
    """Status of one run in the catalogue."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DIVERGED = "diverged"


FINAL = frozenset({Status.DONE, Status.FAILED, Status.DIVERGED})

# v2: measured by sensgen.measure (paper §2.1 on training points, §2.2 on test ellipses)
_V2_METRICS = ("jacobian_norm_train", "transitions", "transitions_sampled", "transitions_sign")
_PAIR_COLUMNS = ("pair_id", "pair_role")  # v2: paired studies (paper §3 Study 4)
_METRICS: dict[str, type] = {
    "steps": int,
    "n_params": int,
    **dict.fromkeys(["train_loss", "train_acc", "test_loss", "test_acc", "gap"], float),
    **dict.fromkeys(["loss_gap", "jacobian_norm", "jacobian_norm_logits", "wall_s"], float),
    **dict.fromkeys(_V2_METRICS, float),
}
_RUN_DTYPES: dict[str, str] = {
    **dict.fromkeys(["run_id", "pack_id", "spec", "status", "error"], "str"),
    **{k: "Int64" if t is int else "float64" for k, t in _METRICS.items()},
    **dict.fromkeys(_PAIR_COLUMNS, "str"),
}
_V2_COLUMNS = (*_V2_METRICS, *_PAIR_COLUMNS)
# The table's column order: ALTER TABLE appends, so v2's columns follow v1's timestamps.
_RUN_COLUMNS = (
    *(c for c in _RUN_DTYPES if c not in _V2_COLUMNS),
    "created_at",
    "finished_at",
    *_V2_COLUMNS,
)
_POINT_DTYPES: dict[str, str] = {
    "run_id": "str",
    "split": "str",
    "index": "int64",
    "label": "int64",
    "loss": "float64",
    "correct": "bool",
    **dict.fromkeys(["p_y", "margin", "jacobian_norm", "jacobian_norm_logits"], "float64"),
}
_SCHEMA_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE runs (run_id TEXT PRIMARY KEY, pack_id TEXT NOT NULL, spec TEXT NOT NULL,"
    " status TEXT NOT NULL CHECK (status IN ('pending','running','done','failed','diverged')),"
    " error TEXT, steps INTEGER, n_params INTEGER, train_loss REAL, train_acc REAL,"
    " test_loss REAL, test_acc REAL, gap REAL, loss_gap REAL, jacobian_norm REAL,"
    " jacobian_norm_logits REAL, wall_s REAL, created_at TEXT, finished_at TEXT)",
    "CREATE INDEX runs_pack_id ON runs (pack_id)",
    "CREATE INDEX runs_status ON runs (status)",
)
_SCHEMA_V2 = (
    *(f"ALTER TABLE runs ADD COLUMN {name} REAL" for name in _V2_METRICS),
    *(f"ALTER TABLE runs ADD COLUMN {name} TEXT" for name in _PAIR_COLUMNS),
    "CREATE INDEX runs_pair_id ON runs (pair_id)",
)


def _statements(schema: tuple[str, ...]) -> Callable[[sqlite3.Connection], None]:
    def migrate(conn: sqlite3.Connection) -> None:
        for statement in schema:
            conn.execute(statement)

    return migrate


# Migration from version v to v + 1, run inside the open transaction. Add one entry per
# schema change and bump SCHEMA_VERSION; a checked-in old database must then migrate in tests
# (tests/fixtures/results_v<v>.db).
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _statements(_SCHEMA_V2)}
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_id(kind: str, value: str) -> None:
    # ids become file names: no separators, no leading dot
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value):
        raise ValueError(f"{kind} must match {_SAFE_ID.pattern}, got {value!r}")


@dataclass(frozen=True)
class PlannedRun:
    """A run the planner wants: its id, its pack and its canonical spec JSON (an object).

    Runs of a paired study (paper §3 Study 4) also carry ``pair_id``, shared by the runs
    that agree on everything but the paired factor, and ``pair_role``, this run's side of
    that factor (e.g. ``"relu"``, ``"full"``, ``"0.0"``). Both are catalogue data, not identity.
    """

    run_id: str
    pack_id: str
    spec_json: str
    pair_id: str | None = None
    pair_role: str | None = None

    def __post_init__(self) -> None:
        _check_id("run_id", self.run_id)
        _check_id("pack_id", self.pack_id)
        if not isinstance(json.loads(self.spec_json), dict):
            raise ValueError(f"spec_json of {self.run_id} must be a JSON object")
        for name in _PAIR_COLUMNS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} of {self.run_id} must be a non-empty string or None")
        if self.pair_role is not None and self.pair_id is None:
            raise ValueError(f"run {self.run_id} has a pair_role but no pair_id")


@dataclass(frozen=True)
class RunResult:
    """The final outcome of one run, as returned by a worker.

    Example:
        >>> RunResult("r1", "diverged", {"train_loss": float("nan")}).status
        <Status.DIVERGED: 'diverged'>
    """

    run_id: str
    status: Status
    metrics: Mapping[str, float | int | None] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        if self.status not in FINAL:
            raise ValueError(f"a RunResult needs a final status, got {self.status!r}")
        if unknown := set(self.metrics) - set(_METRICS):
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {list(_METRICS)}")

    def __reduce__(self) -> tuple:
        # Workers send results to the driver by pickle; a mappingproxy cannot be pickled.
        return (type(self), (self.run_id, self.status, dict(self.metrics), self.error))


def _sql_value(kind: type, value: object) -> float | int | None:
    """A metric as stored: NaN and None become NULL; ints must be integral."""
    if value is None or math.isnan(number := float(value)):
        return None
    if kind is float:
        return number
    if not number.is_integer():
        raise ValueError(f"expected an integer metric, got {value!r}")
    return value if isinstance(value, int) else int(number)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None] | None) -> None:
    """Write ``path`` via a temporary name and a rename; ``write=None`` removes ``path``."""
    if write is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def _validated_points(points: pd.DataFrame, run_ids: set[str]) -> pd.DataFrame:
    """A copy of ``points`` with the required columns checked and cast to their dtypes."""
    if missing := [c for c in _POINT_DTYPES if c not in points.columns]:
        raise ValueError(f"points frame lacks columns {missing}")
    exact = ["run_id", "split", "index", "label", "correct"]
    if points[exact].isna().any().any():
        raise ValueError(f"points columns {exact} must not contain missing values")
    if foreign := set(points["run_id"]) - run_ids:
        raise ValueError(f"points rows for runs without a result here: {sorted(foreign)[:5]}")
    return points.astype(_POINT_DTYPES).reset_index(drop=True)


def _empty_points() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in _POINT_DTYPES.items()})


class Results:
    """A read-only view of a study directory: catalogue, points and weights.

    Open one with `open_results`; `Store` adds the driver's writes to it.
    """

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        """Use `open_results` or `Store.open`."""
        self.root = root
        self.db_path = root / DB_NAME
        self._conn = conn

    @classmethod
    def open(cls, out_dir: str | Path, *, create: bool = True) -> Self:
        """Open (and with ``create``, make) the study directory ``out_dir``.

        Raises:
            UserError: ``out_dir`` is not a usable study directory or its ``results.db``
                is not a sensgen database (corrupt, foreign, or from a newer sensgen).
        """
        root = Path(out_dir)
        db = root / DB_NAME
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} is a file, not a directory; choose another --out DIR.")
        if not create and not db.is_file():
            raise UserError(
                f"{root} is not a sensgen study directory: no {DB_NAME}; "
                f"run `sensgen run STUDY --out {root}` first."
            )
        if db.exists() and not db.is_file():
            raise UserError(f"{db} is not a file; move it away or choose another --out DIR.")
        try:
            for sub in (root, root / "points", root / "weights") if create else ():
                sub.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db, timeout=30.0, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as exc:
            raise UserError(
                f"Cannot create or open the study directory {root} ({exc}); choose a writable "
                "--out DIR."
            ) from exc
        store = cls(root, conn)
        try:
            store._prepare(create)
        except BaseException as exc:
            store.close()
            busy = getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
            if isinstance(exc, sqlite3.DatabaseError) and not busy:
                msg = f"{db} is not a readable sensgen results database ({exc}); move it away."
                raise UserError(msg) from exc
            raise
        return store

    def _prepare(self, create: bool) -> None:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        if not self._tables():
            if not create:
                raise UserError(f"{self.db_path} is empty; run `sensgen run STUDY` on {self.root}.")
            with self._transaction():
                if not self._tables():  # another process may have won the race
                    self._create_schema()
        if self._schema_version() != SCHEMA_VERSION:
            with self._transaction():
                self._migrate()
        names = [row[1] for row in self._conn.execute("PRAGMA table_info(runs)")]
        if tuple(names) != _RUN_COLUMNS:
            raise UserError(f"{self.db_path} has no valid `runs` table; move it away.")

    def _tables(self) -> set[str]:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        return {row[0] for row in self._conn.execute(query)}

    def _create_schema(self) -> None:
        from sensgen import __version__

        for statement in _SCHEMA_V1:
            self._conn.execute(statement)
        for version in range(1, SCHEMA_VERSION):  # the same layout as a migrated database
            _MIGRATIONS[version](self._conn)
        meta = {"schema_version": str(SCHEMA_VERSION), "created_at": _now()}
        meta["sensgen_version"] = __version__
        self._conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())

    def _schema_version(self) -> int:
        bad = UserError(f"{self.db_path} is not a sensgen results database (no schema_version).")
        if "meta" not in self._tables():
            raise bad
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or not str(row[0]).isdigit():
            raise bad
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.db_path} has schema_version {version}, newer than this sensgen "
                f"understands ({SCHEMA_VERSION}); upgrade sensgen (pip install -U sensgen)."
            )
        return version

    def _migrate(self) -> None:
        version = self._schema_version()  # re-read inside the transaction
        while version < SCHEMA_VERSION:
            if version not in _MIGRATIONS:
                raise UserError(f"{self.db_path}: no migration from schema_version {version}.")
            _MIGRATIONS[version](self._conn)
            version += 1
        self._conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),)
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def runs(self) -> pd.DataFrame:
        """All runs: catalogue columns, then the spec's fields flattened (``"a.b"`` for nested).

        Floats are float64 with NaN for NULL, ``steps``/``n_params`` nullable Int64, the
        timestamps datetime64 UTC, ``pair_id``/``pair_role`` strings (NaN when unpaired).
        Sorted by ``(pack_id, run_id)``.
        """
        query = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs ORDER BY pack_id, run_id"
        rows = self._conn.execute(query).fetchall()
        frame = pd.DataFrame.from_records(rows, columns=_RUN_COLUMNS).astype(_RUN_DTYPES)
        for col in ("created_at", "finished_at"):
            frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
        specs = pd.json_normalize([json.loads(s) for s in frame["spec"]], sep=".")
        specs = specs.drop(columns=[c for c in specs.columns if c in frame.columns])
        return pd.concat([frame, specs.set_axis(frame.index)], axis=1)

    def points(self, *, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Per-test-point rows of the ``done`` runs (only ``run_ids`` if given)."""
        done = self._conn.execute("SELECT run_id, pack_id FROM runs WHERE status = 'done'")
        by_pack: dict[str, set[str]] = {}
        wanted = None if run_ids is None else set(run_ids)
        for run_id, pack_id in done.fetchall():
            if wanted is None or run_id in wanted:
                by_pack.setdefault(pack_id, set()).add(run_id)
        frames = []
        for pack_id, ids in sorted(by_pack.items()):
            path = self.root / "points" / f"{pack_id}.parquet"
            if path.is_file():
                frame = pd.read_parquet(path)
                frames.append(frame[frame["run_id"].isin(ids)])
        return pd.concat(frames, ignore_index=True) if frames else _empty_points()

    def pack_status(self) -> pd.DataFrame:
        """One row per pack: run counts by status, summed ``wall_s`` of final runs, ``status``.

        ``status`` is ``running`` if any run is, else ``pending`` if any run is, else (all
        final) ``done`` when all are done, ``failed`` when none is, and ``partial`` otherwise.
        """
        counts = ", ".join(f"SUM(status = '{s}') AS n_{s}" for s in Status)
        query = (
            f"SELECT pack_id, COUNT(*) AS n_runs, {counts}, TOTAL(CASE WHEN status IN"
            " ('done', 'failed', 'diverged') THEN wall_s END) AS wall_s"
            " FROM runs GROUP BY pack_id ORDER BY pack_id"
        )
        cur = self._conn.execute(query)
        frame = pd.DataFrame.from_records(cur.fetchall(), columns=[d[0] for d in cur.description])
        frame = frame.astype({c: "int64" for c in frame.columns[1:-1]} | {"wall_s": "float64"})
        conditions = [
            frame["n_running"] > 0,
            frame["n_pending"] > 0,
            frame["n_done"] == frame["n_runs"],
            frame["n_done"] == 0,
        ]
        status = np.select(conditions, ["running", "pending", "done", "failed"], "partial")
        return frame.assign(status=pd.Series(status, index=frame.index, dtype="str"))

    def load_weights(self, pack_id: str) -> dict[str, torch.Tensor]:
        """The trained weights of a finished pack, as saved by `finish_pack`."""
        _check_id("pack_id", pack_id)
        query = "SELECT status FROM runs WHERE pack_id = ?"
        statuses = {row[0] for row in self._conn.execute(query, (pack_id,))}
        if not statuses or not statuses <= FINAL:
            raise ValueError(f"pack {pack_id!r} is unknown or not finished")
        path = self.root / "weights" / f"{pack_id}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} does not exist: pack {pack_id} was finished without weights.")
        return safetensors.torch.load_file(path)


class Store(Results):
    """The study directory's store; the driver's only handle for writing results.

    Example:
        >>> import tempfile
        >>> store = Store.open(tempfile.mkdtemp())
        >>> store.add_runs([PlannedRun("a", "p", "{}"), PlannedRun("b", "p", "{}")])
        2
        >>> store.mark_running(["a", "b"])
        >>> store.reset_stale()  # after a crash: running -> pending
        2
        >>> store.close()
    """

    def add_runs(self, runs: Iterable[PlannedRun]) -> int:
        """Insert new runs as pending; known runs are left alone. Returns how many were new.

        Like the pack, a run's ``pair_id`` and ``pair_role`` are fixed by the first call.

        Raises:
            ValueError: a known ``run_id`` arrives with a different spec (nothing is inserted).
        """
        now, added = _now(), 0
        with self._transaction() as conn:
            for run in runs:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO runs (run_id, pack_id, spec, status, created_at,"
                    " pair_id, pair_role) VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                    (run.run_id, run.pack_id, run.spec_json, now, run.pair_id, run.pair_role),
                )
                added += cur.rowcount
                if cur.rowcount == 0:
                    query = "SELECT spec FROM runs WHERE run_id = ?"
                    (spec,) = conn.execute(query, (run.run_id,)).fetchone()
                    if spec != run.spec_json:
                        raise ValueError(f"run {run.run_id} is stored with a different spec")
        return added

    def reset_stale(self) -> int:
        """Re-queue runs left ``running`` by a crashed driver; remove its temporary files.

        Call only from the driver at start-up, when no other writer can be alive.
        """
        for tmp in [*self.root.glob("points/*.tmp-*"), *self.root.glob("weights/*.tmp-*")]:
            tmp.unlink(missing_ok=True)
        with self._transaction() as conn:
            sql = "UPDATE runs SET status = 'pending' WHERE status = 'running'"
            return conn.execute(sql).rowcount

    def mark_running(self, run_ids: Iterable[str]) -> None:
        """Move pending runs to running (all or none); any other current status is an error."""
        ids = list(run_ids)
        with self._transaction() as conn:
            for run_id in ids:
                cur = conn.execute(
                    "UPDATE runs SET status = 'running' WHERE run_id = ? AND status = 'pending'",
                    (run_id,),
                )
                if cur.rowcount != 1:
                    raise ValueError(f"run {run_id} is unknown or not pending")

    def finish_pack(
        self,
        pack_id: str,
        results: Sequence[RunResult],
        *,
        points: pd.DataFrame | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record the final results of every run of a pack, with its points and weights.

        Files are renamed into place first, then all rows change in one transaction. A file
        not given is removed (it could only be an orphan of an earlier crashed attempt).

        Raises:
            ValueError: results do not cover exactly the runs of ``pack_id``, a run is
                already final, or ``points`` lacks columns or names other runs.
        """
        _check_id("pack_id", pack_id)
        self._check_pack(pack_id, results)
        ids = [r.run_id for r in results]
        frame = None if points is None else _validated_points(points, set(ids))
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in (weights or {}).items()}
        meta = {"pack_id": pack_id, "run_ids": json.dumps(ids)}
        _write_atomic(
            self.root / "points" / f"{pack_id}.parquet",
            None if frame is None else lambda p: frame.to_parquet(p, index=False),
        )
        _write_atomic(
            self.root / "weights" / f"{pack_id}.safetensors",
            None if weights is None else lambda p: safetensors.torch.save_file(tensors, p, meta),
        )
        self._commit_results(results)

    def _check_pack(self, pack_id: str, results: Sequence[RunResult]) -> None:
        query = "SELECT run_id, status FROM runs WHERE pack_id = ?"
        stored = dict(self._conn.execute(query, (pack_id,)).fetchall())
        ids = [r.run_id for r in results]
        if not stored:
            raise ValueError(f"unknown pack {pack_id!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate run_ids in the results for pack {pack_id}")
        if set(ids) != set(stored):
            foreign, missing = sorted(set(ids) - set(stored)), sorted(set(stored) - set(ids))
            raise ValueError(
                f"pack {pack_id}: results for other runs {foreign}, none for {missing}"
            )
        if final := [i for i in ids if stored[i] in FINAL]:
            raise ValueError(f"runs {final} are already final and immutable")

    def _commit_results(self, results: Sequence[RunResult]) -> None:
        columns = ", ".join(f"{name} = ?" for name in _METRICS)
        sql = (
            f"UPDATE runs SET status = ?, error = ?, finished_at = ?, {columns}"
            " WHERE run_id = ? AND status IN ('pending', 'running')"
        )
        now = _now()
        with self._transaction() as conn:
            for r in results:
                values = [_sql_value(kind, r.metrics.get(name)) for name, kind in _METRICS.items()]
                cur = conn.execute(sql, (r.status.value, r.error, now, *values, r.run_id))
                if cur.rowcount != 1:
                    raise ValueError(f"run {r.run_id} is not pending or running")


def open_results(out_dir: str | Path) -> Results:
    """Open a study directory for reading; it must exist.

    Example:
        >>> with open_results("runs/quickstart") as results:  # doctest: +SKIP
        ...     results.runs().groupby("status").size()
    """
    return Results.open(out_dir, create=False)
