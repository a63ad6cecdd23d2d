"""The study store: a SQLite catalogue, per-pack Parquet and per-pack safetensors files.

Layout of a study directory (readable without sensgen: ``sqlite3``, pandas, safetensors)::

    DIR/results.db                      # table `runs` (one row per model), table `meta`
    DIR/points/<pack_id>.parquet        # per-test-point results of every run of a pack
    DIR/profiles/<pack_id>.parquet      # ‖J‖ and transition density along ellipses (Fig. 2)
    DIR/measures/<pack_id>.parquet      # generalization measures (`sensgen.measures`)
    DIR/weights/<pack_id>.safetensors   # trained weights of a pack
    DIR/regions/<pack_id>.safetensors   # region maps before/after training (Fig. 3)

The catalogue's columns and migrations are in `sensgen.schema`; the per-pack files'
layouts, atomic writes and reads in `sensgen.artifacts`; the read-only view `Results`
(which `Store` extends) and `open_results` in `sensgen.results`, re-exported here.

Contract:

* **Who writes.** Only the driver process (``sensgen run``) writes, through one `Store`.
  Workers (local processes, Ray tasks) train a pack and *return* `RunResult`s and its
  files' contents (points, profiles, weights, region maps); the driver hands them to
  `Store.finish_pack`.
* **Statuses.** ``pending -> running -> done | failed | diverged``; ``pending`` may also go
  straight to a final status, and `Store.reset_stale` sends ``running`` back to ``pending``
  (rows left by a crashed driver). Every other transition is a ``ValueError``. Final rows
  (``done``, ``failed``, ``diverged``) never change, but for a pack whose files were
  damaged after they were written, or that failed: `Store.requeue_pack` sends it back to
  ``pending``, to be trained again (seeded: to the same results).
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
  Readers only read files of *final* runs, so an orphan never reaches them. A file
  damaged after it was written is a `~sensgen.artifacts.DamagedFileError` for its
  reader; while `requeue_pack` trains its pack again, the pack's runs are not final and
  readers leave them out. One exception to "readers do not write": opening a database of
  an older schema migrates it in place (one transaction), whoever opens it.
* **A damaged catalogue.** Every open runs SQLite's integrity check (``quick_check``) first;
  damage there, or met by a later read or write, is a `~sensgen.errors.UserError` naming
  ``results.db`` and the fix (`sensgen.catalogue_damage`), found before anything is
  written. The catalogue cannot be rebuilt from the per-pack files.
* **Schema.** ``meta.schema_version`` is `SCHEMA_VERSION`; older databases are migrated on
  open, in one transaction (see ``MIGRATIONS``), newer ones are refused with a
  `~sensgen.errors.UserError`. A new database is built by the same migrations, so new and
  migrated ones have one layout (history in `sensgen.schema`).

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

import json
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch

from sensgen import artifacts
from sensgen.results import Results, open_results, utc_now
from sensgen.schema import (
    DB_NAME,
    FINAL,
    METRICS,
    SCHEMA_VERSION,
    PlannedRun,
    RunResult,
    Status,
    check_id,
    sql_value,
)

__all__ = [
    "DB_NAME", "FINAL", "SCHEMA_VERSION", "PlannedRun", "Results", "RunResult", "Status",
    "Store", "open_results",
]  # fmt: skip


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
        now, added = utc_now(), 0
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
        for kind in artifacts.FOLDERS:
            for tmp in self.root.glob(f"{kind}/*.tmp-*"):
                tmp.unlink(missing_ok=True)
        with self._transaction() as conn:
            sql = "UPDATE runs SET status = 'pending' WHERE status = 'running'"
            return conn.execute(sql).rowcount

    def requeue_pack(self, pack_id: str) -> int:
        """Send a finished pack back to ``pending``, its results and files removed, so that
        it is trained again: for a pack with a damaged file (`artifacts.damaged_files`), or
        one that failed.
        Returns its number of runs.

        The rows change first, in one transaction: a crash before the files are gone
        leaves a pending pack whose old files no reader trusts (as after any crash)."""
        check_id("pack_id", pack_id)
        query = "SELECT status FROM runs WHERE pack_id = ?"
        statuses = {row[0] for row in self._rows(query, (pack_id,))[0]}
        if not statuses or not statuses <= FINAL:
            raise ValueError(f"pack {pack_id!r} is unknown or not finished")
        cleared = ", ".join(f"{name} = NULL" for name in METRICS)
        with self._transaction() as conn:
            n = conn.execute(
                f"UPDATE runs SET status = 'pending', error = NULL, finished_at = NULL,"
                f" {cleared} WHERE pack_id = ?",
                (pack_id,),
            ).rowcount
        artifacts.remove_pack_files(self.root, pack_id)
        return n

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
        profiles: pd.DataFrame | None = None,
        regions: Mapping[str, torch.Tensor] | None = None,
        measures: pd.DataFrame | None = None,
    ) -> None:
        """Record the final results of every run of a pack, with its files (`artifacts`).

        Files are renamed into place first, then all rows change in one transaction. A file
        not given is removed (it could only be an orphan of an earlier crashed attempt).

        Raises:
            ValueError: results do not cover exactly the runs of ``pack_id``, a run is
                already final, or a table lacks columns or names other runs.
        """
        check_id("pack_id", pack_id)
        self._check_pack(pack_id, results)
        ids = [r.run_id for r in results]
        tables = {"points": points, "profiles": profiles, "measures": measures}
        tables = {
            k: None if f is None else artifacts.validated_table(k, f, set(ids))
            for k, f in tables.items()
        }
        meta = {"pack_id": pack_id, "run_ids": json.dumps(ids)}
        for kind, frame in tables.items():
            artifacts.write_table(artifacts.pack_file(self.root, kind, pack_id), frame)
        for kind, tensors in {"weights": weights, "regions": regions}.items():
            artifacts.write_tensors(artifacts.pack_file(self.root, kind, pack_id), tensors, meta)
        artifacts.remove_damage_marks(self.root, pack_id)  # its files are new
        self._commit_results(results)

    def _check_pack(self, pack_id: str, results: Sequence[RunResult]) -> None:
        query = "SELECT run_id, status FROM runs WHERE pack_id = ?"
        stored = dict(self._rows(query, (pack_id,))[0])
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
        columns = ", ".join(f"{name} = ?" for name in METRICS)
        sql = (
            f"UPDATE runs SET status = ?, error = ?, finished_at = ?, {columns}"
            " WHERE run_id = ? AND status IN ('pending', 'running')"
        )
        now = utc_now()
        with self._transaction() as conn:
            for r in results:
                values = [sql_value(kind, r.metrics.get(name)) for name, kind in METRICS.items()]
                cur = conn.execute(sql, (r.status.value, r.error, now, *values, r.run_id))
                if cur.rowcount != 1:
                    raise ValueError(f"run {r.run_id} is not pending or running")
