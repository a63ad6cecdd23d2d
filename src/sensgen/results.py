"""Reading a study directory: `Results`, the read-only view, and `open_results`.

`sensgen.store` holds the directory's contract (layout, statuses, atomicity, readers,
schema) and `Store`, the driver's writing handle, which extends `Results`. Readers see
the last committed state while a driver writes (SQLite in WAL mode) and read only the
files of final runs. Opening a database of an older schema migrates it in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import torch

from sensgen import artifacts, catalogue_damage
from sensgen.errors import UserError
from sensgen.schema import (
    DB_NAME,
    FINAL,
    MIGRATIONS,
    RUN_COLUMNS,
    RUN_DTYPES,
    SCHEMA_V1,
    SCHEMA_VERSION,
    Status,
    check_id,
)


def utc_now() -> str:
    """The time now, UTC, as ISO 8601 to the millisecond (the store's timestamps)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
            fix = "choose another --out DIR" if create else "pass a study directory"
            raise UserError(f"{root} is a file, not a directory; {fix}.")
        if not create and not db.is_file():
            if root.is_dir() and catalogue_damage.holds_study_files(root):
                raise catalogue_damage.missing(root)
            raise UserError(
                f"{root} is not a sensgen study directory: no {DB_NAME}; "
                f"run `sensgen run STUDY --out {root}` first."
            )
        if db.exists() and not db.is_file():
            raise UserError(f"{db} is not a file; move it away or choose another --out DIR.")
        try:
            for sub in (root, *(root / k for k in artifacts.FOLDERS)) if create else ():
                sub.mkdir(parents=True, exist_ok=True)
            target, uri = db, False
            if not create and not os.access(root, os.W_OK):  # (a read-only mount, an archive)
                target, uri = _read_only_uri(db), True
            conn = sqlite3.connect(target, uri=uri, timeout=30.0, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as exc:
            raise UserError(
                f"Cannot create or open the study directory {root} ({exc}); choose a writable "
                "--out DIR."
            ) from exc
        store = cls(root, conn)
        try:
            store._prepare(create)
        except BaseException as exc:
            store.close()  # first: the fix names the files SQLite leaves behind after it
            if isinstance(exc, catalogue_damage.Foreign):
                raise catalogue_damage.foreign(root, str(exc)) from None
            if catalogue_damage.is_damage(exc):
                raise catalogue_damage.damaged(root, exc) from exc
            raise
        return store

    def _prepare(self, create: bool) -> None:
        # (Before the pragmas, which write a header into an empty file.)
        if not self._tables() and catalogue_damage.holds_study_files(self.root):
            raise sqlite3.DatabaseError("it holds no tables")  # cut short: not a new study
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._check_integrity()
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
        if tuple(names) != RUN_COLUMNS:
            raise catalogue_damage.Foreign("no valid `runs` table")

    def _check_integrity(self) -> None:
        """Find damage anywhere in the catalogue when it is opened (SQLite's quick_check
        reads every page), before anything reads or writes: damage in an index page that
        `runs` never reads broke the first insert of a `sensgen run` half-way through."""
        problems = [str(row[0]) for row in self._conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            lines = [line for p in problems for line in p.splitlines() if "***" not in line]
            raise sqlite3.DatabaseError(f"integrity check: {(lines or problems)[0]}")

    def _tables(self) -> set[str]:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        return {row[0] for row in self._conn.execute(query)}

    def _create_schema(self) -> None:
        from sensgen import __version__

        for statement in SCHEMA_V1:
            self._conn.execute(statement)
        for version in range(1, SCHEMA_VERSION):  # the same layout as a migrated database
            MIGRATIONS[version](self._conn)
        meta = {"schema_version": str(SCHEMA_VERSION), "created_at": utc_now()}
        meta["sensgen_version"] = __version__
        self._conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())

    def _schema_version(self) -> int:
        bad = catalogue_damage.Foreign("no schema_version")
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
            if version not in MIGRATIONS:
                raise UserError(f"{self.db_path}: no migration from schema_version {version}.")
            MIGRATIONS[version](self._conn)
            version += 1
        self._conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),)
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._damage_as_user_error():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _damage_as_user_error(self) -> Iterator[None]:
        """Turn damage that SQLite meets in the catalogue after it was opened into the user
        error that names DIR/results.db and the fix (`sensgen.catalogue_damage`), not a
        traceback; a busy, read-only or full machine's errors pass through. The handle is
        closed first: nothing more may be written to a damaged catalogue, and the fix names
        the files SQLite leaves behind once it is closed."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if catalogue_damage.is_damage(exc):
                self.close()
                raise catalogue_damage.damaged(self.root, exc, at_open=False) from exc
            raise

    def _rows(self, query: str, params: tuple = ()) -> tuple[list[tuple], list[str]]:
        """The rows of a read of the catalogue and their column names (`_damage_as_user_error`)."""
        with self._damage_as_user_error():
            cur = self._conn.execute(query, params)
            return cur.fetchall(), [d[0] for d in cur.description]

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
        query = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs ORDER BY pack_id, run_id"
        rows, _ = self._rows(query)
        frame = pd.DataFrame.from_records(rows, columns=RUN_COLUMNS).astype(RUN_DTYPES)
        for col in ("created_at", "finished_at"):
            frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
        specs = pd.json_normalize([json.loads(s) for s in frame["spec"]], sep=".")
        specs = specs.drop(columns=[c for c in specs.columns if c in frame.columns])
        return pd.concat([frame, specs.set_axis(frame.index)], axis=1)

    def points(self, *, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Per-test-point rows of the ``done`` runs (only ``run_ids`` if given)."""
        return artifacts.read_tables(self.root, "points", self._done_by_pack(run_ids))

    def profiles(self, *, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Per (run, path, ellipse, angle bin) rows of the ``done`` runs (paper Fig. 2).

        Columns: run_id, path (random | different_class | same_class), ellipse, bin, angle
        (bin centre, radians; anchors at π/3, π, 5π/3), jacobian_norm (mean ‖J‖_F in the
        bin), transition_density (exact crossings per unit arc length; NaN for smooth φ).
        Empty when the study did not set ``measure.profile_ellipses``.
        """
        return artifacts.read_tables(self.root, "profiles", self._done_by_pack(run_ids))

    def measures(self, *, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Generalization measures of the ``done`` runs (`sensgen.measures`), one row per
        run and one column per measure; empty when the study did not set
        ``measure.generalization_measures``."""
        long = artifacts.read_tables(self.root, "measures", self._done_by_pack(run_ids))
        if long.empty:
            return pd.DataFrame({"run_id": pd.Series(dtype="str")})
        wide = long.pivot_table(index="run_id", columns="measure", values="value", dropna=False)
        wide = wide.reset_index().rename_axis(columns=None)
        depth = self.runs().set_index("run_id")["depth"].reindex(wide["run_id"])
        return geometric_normalised(wide, depth.to_numpy() + 1)  # L = depth + 1 layers

    def region_maps(self, run_id: str) -> dict[str, torch.Tensor]:
        """Region maps of a ``done`` run (paper Fig. 3): ``init`` and ``trained`` int32
        [P, R, R] pattern ids of the last hidden layer, ``anchors`` float64 [P, 3, 2] the
        (row, column) pixels of the three training points, ``labels`` int64 [P, 3] and
        ``indices`` int64 [P, 3] (rows of the run's training subset).

        Raises:
            UserError: the run is not done or its study did not set ``measure.region_planes``.
        """
        pack = self._done_by_pack([run_id])
        if not pack:
            raise UserError(f"run {run_id!r} is not a done run of {self.root}.")
        (pack_id,) = pack
        if not artifacts.pack_file(self.root, "regions", pack_id).is_file():
            raise UserError(f"run {run_id} has no region maps; set measure.region_planes > 0.")
        maps = artifacts.read_run_tensors(self.root, "regions", pack_id, run_id)
        if not maps:
            raise UserError(f"run {run_id} has no region maps; set measure.region_planes > 0.")
        return maps

    def _done_by_pack(self, run_ids: Iterable[str] | None) -> dict[str, set[str]]:
        done, _ = self._rows("SELECT run_id, pack_id FROM runs WHERE status = 'done'")
        by_pack: dict[str, set[str]] = {}
        wanted = None if run_ids is None else set(run_ids)
        for run_id, pack_id in done:
            if wanted is None or run_id in wanted:
                by_pack.setdefault(pack_id, set()).add(run_id)
        return by_pack

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
        rows, columns = self._rows(query)
        frame = pd.DataFrame.from_records(rows, columns=columns)
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
        check_id("pack_id", pack_id)
        rows, _ = self._rows("SELECT status FROM runs WHERE pack_id = ?", (pack_id,))
        statuses = {row[0] for row in rows}
        if not statuses or not statuses <= FINAL:
            raise ValueError(f"pack {pack_id!r} is unknown or not finished")
        return artifacts.read_tensors(self.root, "weights", pack_id)


def open_results(out_dir: str | Path) -> Results:
    """Open a study directory for reading; it must exist.

    Example:
        >>> with open_results("runs/quickstart") as results:  # doctest: +SKIP
        ...     results.runs().groupby("status").size()
    """
    return Results.open(out_dir, create=False)


def _read_only_uri(db: Path) -> str:
    """A URI that opens ``db`` for reading in a folder this process may not write: SQLite
    cannot create the write-ahead log's files there, so a database without a log left
    beside it is opened immutable (no driver can be writing it either), one with a log
    read-only, so that the log's commits are read too."""
    log = db.with_name(f"{db.name}-wal").exists()
    return f"{db.absolute().as_uri()}?{'mode=ro' if log else 'immutable=1'}"


def geometric_normalised(wide: pd.DataFrame, n_layers: np.ndarray) -> pd.DataFrame:
    """``wide`` (one row per run, one column per measure) with the two margin-normalised
    geometric means (`sensgen.measures.GEOMETRIC`) derived from the stored means and the
    margin, L·(Π_l ‖W_l‖²/γ²)^{1/L} with L = ``n_layers`` per row, as the measures compute
    them now: directories measured before that definition was fixed stored
    L·(Π_l ‖W_l‖²)^{1/L}/γ², and a resumed study would rank its old values with new ones."""
    from sensgen.measures import GEOMETRIC
    from sensgen.measures.margins import normalised

    if "margin" not in wide.columns:
        return wide
    for name in GEOMETRIC:
        if name in wide.columns and f"{name}_normalised" in wide.columns:
            rows = zip(wide[name], wide["margin"], n_layers, strict=True)
            wide[f"{name}_normalised"] = [
                normalised(float(v), float(gamma), root=int(n)) for v, gamma, n in rows
            ]
    return wide
