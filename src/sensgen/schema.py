"""The catalogue's layout: statuses, columns, rows (`PlannedRun`, `RunResult`), migrations.

`sensgen.store` reads and writes the catalogue (``DIR/results.db``, table ``runs``) through
these definitions. ``meta.schema_version`` is `SCHEMA_VERSION`; `MIGRATIONS` maps a version v
to the statements that turn a v database into a v + 1 one, and a new database is built by
the same steps, so new and migrated databases have one layout.

History: v1 the first layout; v2 added the per-model measurements ``jacobian_norm_train``,
``transitions`` (exact), ``transitions_sampled``, ``transitions_sign`` (smooth φ, never pooled
with the others) and ``pair_id``/``pair_role`` of paired studies (paper §3 Study 4).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

SCHEMA_VERSION = 2
DB_NAME = "results.db"
STUDY_FILE = "study.toml"  # DIR/study.toml, the study as last run (`sensgen.study_dir`)


class Status(StrEnum):
    """Status of one run in the catalogue."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DIVERGED = "diverged"


FINAL = frozenset({Status.DONE, Status.FAILED, Status.DIVERGED})

# v2: measured by sensgen.measure (paper §2.1 on training points, §2.2 on test ellipses)
V2_METRICS = ("jacobian_norm_train", "transitions", "transitions_sampled", "transitions_sign")
PAIR_COLUMNS = ("pair_id", "pair_role")  # v2: paired studies (paper §3 Study 4)
METRICS: dict[str, type] = {
    "steps": int,
    "n_params": int,
    **dict.fromkeys(["train_loss", "train_acc", "test_loss", "test_acc", "gap"], float),
    **dict.fromkeys(["loss_gap", "jacobian_norm", "jacobian_norm_logits", "wall_s"], float),
    **dict.fromkeys(V2_METRICS, float),
}
RUN_DTYPES: dict[str, str] = {
    **dict.fromkeys(["run_id", "pack_id", "spec", "status", "error"], "str"),
    **{k: "Int64" if t is int else "float64" for k, t in METRICS.items()},
    **dict.fromkeys(PAIR_COLUMNS, "str"),
}
V2_COLUMNS = (*V2_METRICS, *PAIR_COLUMNS)
# The table's column order: ALTER TABLE appends, so v2's columns follow v1's timestamps.
RUN_COLUMNS = (
    *(c for c in RUN_DTYPES if c not in V2_COLUMNS),
    "created_at",
    "finished_at",
    *V2_COLUMNS,
)
SCHEMA_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE runs (run_id TEXT PRIMARY KEY, pack_id TEXT NOT NULL, spec TEXT NOT NULL,"
    " status TEXT NOT NULL CHECK (status IN ('pending','running','done','failed','diverged')),"
    " error TEXT, steps INTEGER, n_params INTEGER, train_loss REAL, train_acc REAL,"
    " test_loss REAL, test_acc REAL, gap REAL, loss_gap REAL, jacobian_norm REAL,"
    " jacobian_norm_logits REAL, wall_s REAL, created_at TEXT, finished_at TEXT)",
    "CREATE INDEX runs_pack_id ON runs (pack_id)",
    "CREATE INDEX runs_status ON runs (status)",
)
SCHEMA_V2 = (
    *(f"ALTER TABLE runs ADD COLUMN {name} REAL" for name in V2_METRICS),
    *(f"ALTER TABLE runs ADD COLUMN {name} TEXT" for name in PAIR_COLUMNS),
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
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _statements(SCHEMA_V2)}

SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_id(kind: str, value: str) -> None:
    # ids become file names: no separators, no leading dot
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value):
        raise ValueError(f"{kind} must match {SAFE_ID.pattern}, got {value!r}")


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
        check_id("run_id", self.run_id)
        check_id("pack_id", self.pack_id)
        if not isinstance(json.loads(self.spec_json), dict):
            raise ValueError(f"spec_json of {self.run_id} must be a JSON object")
        for name in PAIR_COLUMNS:
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
        if unknown := set(self.metrics) - set(METRICS):
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {list(METRICS)}")

    def __reduce__(self) -> tuple:
        # Workers send results to the driver by pickle; a mappingproxy cannot be pickled.
        return (type(self), (self.run_id, self.status, dict(self.metrics), self.error))


def sql_value(kind: type, value: object) -> float | int | None:
    """A metric as stored: NaN and None become NULL; ints must be integral."""
    if value is None or math.isnan(number := float(value)):
        return None
    if kind is float:
        return number
    if not number.is_integer():
        raise ValueError(f"expected an integer metric, got {value!r}")
    return value if isinstance(value, int) else int(number)
