"""Store conformance suite: the contract in `sensgen.store`'s docstring, checked end to end."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors
import safetensors.torch
import torch

from sensgen import schema
from sensgen import store as store_module
from sensgen.errors import UserError
from sensgen.store import (
    FINAL,
    SCHEMA_VERSION,
    PlannedRun,
    Results,
    RunResult,
    Status,
    Store,
    open_results,
)

CATALOGUE = [
    "run_id", "pack_id", "spec", "status", "error", "steps", "n_params", "train_loss",
    "train_acc", "test_loss", "test_acc", "gap", "loss_gap", "jacobian_norm",
    "jacobian_norm_logits", "wall_s", "created_at", "finished_at", "jacobian_norm_train",
    "transitions", "transitions_sampled", "transitions_sign", "pair_id", "pair_role",
]  # fmt: skip
V2_COLUMNS = CATALOGUE[CATALOGUE.index("jacobian_norm_train") :]
FIXTURES = Path(__file__).parent / "fixtures"
POINT_COLUMNS = [
    "run_id", "split", "index", "label", "loss", "correct", "p_y", "margin",
    "jacobian_norm", "jacobian_norm_logits",
]  # fmt: skip


def plan(pack_id: str, n: int, **spec: object) -> list[PlannedRun]:
    """``n`` runs of one pack; the spec differs by seed so every run_id has its own spec."""
    return [
        PlannedRun(f"{pack_id}-r{i}", pack_id, json.dumps({"seed": i, **spec}, sort_keys=True))
        for i in range(n)
    ]


def done(run_id: str, acc: float = 0.9) -> RunResult:
    metrics = {"steps": 100, "n_params": 1234, "train_acc": 1.0, "test_acc": acc, "wall_s": 2.0}
    return RunResult(run_id, Status.DONE, metrics)


def points_for(run_ids: list[str], n: int = 4, *, loss: float = 0.5) -> pd.DataFrame:
    index = np.tile(np.arange(n), len(run_ids))
    columns = {
        "run_id": np.repeat(run_ids, n), "split": "test", "index": index, "label": index % 3,
        "loss": loss, "correct": index % 2 == 1, "p_y": 0.6, "margin": 0.1,
        "jacobian_norm": 1.5, "jacobian_norm_logits": 3.0, "extra": index * 10,
    }  # fmt: skip
    return pd.DataFrame(columns)


def row(store: Store, run_id: str) -> dict:
    frame = store.runs()
    return frame.loc[frame["run_id"] == run_id].iloc[0].to_dict()


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "study") as s:
        yield s


# -- opening, layout, schema ----------------------------------------------------------------


def test_open_creates_the_documented_layout(tmp_path: Path) -> None:
    root = tmp_path / "a" / "study"
    Store.open(root).close()
    assert (root / "results.db").is_file()
    assert (root / "points").is_dir()
    assert (root / "weights").is_dir()
    with contextlib.closing(sqlite3.connect(root / "results.db")) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        indexed = {r[1] for r in conn.execute("PRAGMA index_list(runs)")}
        index_cols = {
            conn.execute(f"PRAGMA index_info({name})").fetchone()[2]
            for name in indexed
            if not name.startswith("sqlite_autoindex")
        }
    assert columns == CATALOGUE
    assert meta["schema_version"] == str(SCHEMA_VERSION) == "2"
    assert "created_at" in meta
    assert mode == "wal"
    assert {"pack_id", "status"} <= index_cols


def test_open_without_create_on_empty_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not a sensgen study directory.*sensgen run"):
        Store.open(tmp_path, create=False)
    with pytest.raises(UserError, match=r"no results\.db"):
        open_results(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "points").exists()


def test_corrupt_database_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    db.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    for create in (True, False):
        with pytest.raises(UserError, match=r"results\.db") as info:
            Store.open(tmp_path, create=create)
        assert str(db) in str(info.value)


def test_newer_schema_is_a_user_error_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    with contextlib.closing(sqlite3.connect(tmp_path / "results.db")) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UserError, match=r"schema_version 99.*upgrade sensgen") as info:
        open_results(tmp_path)
    assert str(tmp_path / "results.db") in str(info.value)


def test_foreign_sqlite_database_is_a_user_error(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "results.db")) as conn, conn:
        conn.execute("CREATE TABLE other (x INTEGER)")
    with pytest.raises(UserError, match="not a sensgen results database"):
        Store.open(tmp_path)


def test_out_dir_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        Store.open(tmp_path / "f")


def test_reopening_a_current_database_is_a_no_op_and_keeps_rows(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s.add_runs(plan("p", 2))
        s.finish_pack("p", [done("p-r0"), done("p-r1")], points=points_for(["p-r0", "p-r1"]))
        before, meta_before = s.runs(), dict(s._conn.execute("SELECT * FROM meta"))
    with Store.open(tmp_path) as s:
        pd.testing.assert_frame_equal(s.runs(), before)
        assert dict(s._conn.execute("SELECT * FROM meta")) == meta_before
    with open_results(tmp_path) as r:
        pd.testing.assert_frame_equal(r.runs(), before)
        assert len(r.points()) == 8


def test_migrations_cover_every_older_version() -> None:
    # Every older version has a migration and a checked-in database that must migrate.
    assert set(schema.MIGRATIONS) == set(range(1, SCHEMA_VERSION))
    for version in range(1, SCHEMA_VERSION):
        assert (FIXTURES / f"results_v{version}.db").is_file()


def v1_copy(tmp_path: Path) -> tuple[Path, list[tuple], dict[str, str]]:
    """A copy of the checked-in v1 database, its raw `runs` rows and its `meta`."""
    root = tmp_path / "old"
    root.mkdir()
    shutil.copyfile(FIXTURES / "results_v1.db", root / "results.db")
    with contextlib.closing(sqlite3.connect(root / "results.db")) as conn:
        rows = conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == "1" and len(rows) == 6
    return root, rows, meta


def test_a_v1_database_migrates_keeping_every_row_and_value(tmp_path: Path) -> None:
    root, old_rows, old_meta = v1_copy(tmp_path)
    with Store.open(root) as s:
        frame = s.runs()
    with contextlib.closing(sqlite3.connect(root / "results.db")) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
        rows = conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(runs)")}
    assert columns == CATALOGUE
    assert [r[: len(old_rows[0])] for r in rows] == old_rows  # every v1 value, bit for bit
    assert all(r[len(old_rows[0]) :] == (None,) * len(V2_COLUMNS) for r in rows)
    assert meta == {**old_meta, "schema_version": "2"}
    assert "runs_pair_id" in indexes
    # runs() shows the v2 columns as missing, typed like a new database's
    assert list(frame.columns[: len(CATALOGUE)]) == CATALOGUE
    assert frame[V2_COLUMNS].isna().all().all()
    for col in schema.V2_METRICS:
        assert frame[col].dtype == np.float64
    by_id = frame.set_index("run_id")
    assert by_id["status"].to_dict() == {
        "v1-a-r0": "done", "v1-a-r1": "diverged", "v1-b-r0": "done", "v1-b-r1": "failed",
        "v1-c-r0": "running", "v1-c-r1": "pending",
    }  # fmt: skip
    assert by_id.loc["v1-a-r0", "test_acc"] == 0.875
    assert by_id.loc["v1-a-r0", "jacobian_norm_logits"] == 12.25
    assert by_id.loc["v1-b-r0", "steps"] == 200
    assert by_id.loc["v1-b-r1", "error"] == "RuntimeError: boom"
    assert by_id["width"].tolist() == [8] * 6  # the spec still flattens


def test_opening_a_migrated_database_again_is_a_no_op(tmp_path: Path) -> None:
    root, _, _ = v1_copy(tmp_path)
    with Store.open(root) as s:
        before, meta = s.runs(), dict(s._conn.execute("SELECT * FROM meta"))
    for opener in (Store.open, open_results):
        with opener(root) as r:
            pd.testing.assert_frame_equal(r.runs(), before)
            assert dict(r._conn.execute("SELECT * FROM meta")) == meta


def test_a_reader_migrates_a_v1_database_too(tmp_path: Path) -> None:
    root, old_rows, _ = v1_copy(tmp_path)
    with open_results(root) as r:
        assert len(r.runs()) == len(old_rows)
        assert r._schema_version() == SCHEMA_VERSION


def test_a_failed_migration_leaves_the_v1_database_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, old_rows, old_meta = v1_copy(tmp_path)
    real = schema.MIGRATIONS[1]

    def crash_midway(conn: sqlite3.Connection) -> None:
        real(conn)
        raise OSError("power cut")

    monkeypatch.setitem(schema.MIGRATIONS, 1, crash_midway)
    with pytest.raises(OSError, match="power cut"):
        Store.open(root)
    with contextlib.closing(sqlite3.connect(root / "results.db")) as conn:
        assert [r[1] for r in conn.execute("PRAGMA table_info(runs)")] == CATALOGUE[:18]
        assert conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall() == old_rows
        assert dict(conn.execute("SELECT key, value FROM meta")) == old_meta
    monkeypatch.setitem(schema.MIGRATIONS, 1, real)
    with Store.open(root) as s:
        assert len(s.runs()) == len(old_rows)


def test_a_migrated_database_honours_the_contract(tmp_path: Path) -> None:
    root, _, _ = v1_copy(tmp_path)
    with Store.open(root) as s:
        assert s.reset_stale() == 1  # v1-c-r0 was left running
        s.add_runs([PlannedRun("v2-r0", "v1-c", '{"seed": 9}', "pair-1", "random")])
        s.mark_running(["v1-c-r0"])
        metrics = {"test_acc": 0.5, "jacobian_norm_train": 0.25, "transitions": 40.0}
        s.finish_pack(
            "v1-c",
            [
                RunResult("v1-c-r0", Status.DONE, {**metrics, "transitions_sampled": 38.5}),
                RunResult("v1-c-r1", Status.DONE, {"transitions_sign": 12.0}),
                RunResult("v2-r0", Status.FAILED, {}, "boom"),
            ],
        )
        with pytest.raises(ValueError, match="already final"):
            s.finish_pack("v1-a", [RunResult("v1-a-r0", Status.DONE, {}), done("v1-a-r1")])
        frame = s.runs().set_index("run_id")
    assert frame.loc["v1-c-r0", ["jacobian_norm_train", "transitions"]].tolist() == [0.25, 40]
    assert frame.loc["v1-c-r0", "transitions_sampled"] == 38.5
    assert frame.loc["v1-c-r1", "transitions_sign"] == 12.0
    assert frame.loc["v2-r0", ["pair_id", "pair_role"]].tolist() == ["pair-1", "random"]
    assert frame.loc["v1-a-r0", "test_acc"] == 0.875  # done rows untouched


def test_pair_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="pair_role but no pair_id"):
        PlannedRun("r", "p", "{}", pair_role="random")
    with pytest.raises(ValueError, match="pair_id of r must be a non-empty string"):
        PlannedRun("r", "p", "{}", pair_id="")


def test_add_runs_stores_pairs_and_keeps_the_first_assignment(store: Store) -> None:
    store.add_runs(
        [
            PlannedRun("t", "p", '{"labels": 0}', pair_id="g0", pair_role="true"),
            PlannedRun("r", "p", '{"labels": 1}', pair_id="g0", pair_role="random"),
            PlannedRun("u", "p", '{"labels": 2}'),
        ]
    )
    assert store.add_runs([PlannedRun("t", "p", '{"labels": 0}', "g9", "x")]) == 0
    frame = store.runs().set_index("run_id")
    assert frame.loc[["t", "r"], "pair_id"].tolist() == ["g0", "g0"]
    assert frame.loc[["t", "r"], "pair_role"].tolist() == ["true", "random"]
    assert frame.loc["u", ["pair_id", "pair_role"]].isna().all()


def test_v2_metrics_are_stored_as_reals_with_nan_as_null(store: Store) -> None:
    store.add_runs(plan("p", 2))
    nan = float("nan")
    sign = {"jacobian_norm_train": 3.5, "transitions_sign": 17.25, "transitions": nan}
    store.finish_pack(
        "p", [RunResult("p-r0", Status.DONE, sign), RunResult("p-r1", Status.DONE, {})]
    )
    frame = store.runs().set_index("run_id")
    assert frame.loc["p-r0", "jacobian_norm_train"] == 3.5
    assert frame.loc["p-r0", "transitions_sign"] == 17.25
    assert frame.loc["p-r0", ["transitions", "transitions_sampled"]].isna().all()
    assert frame.loc["p-r1", list(schema.V2_METRICS)].isna().all()


# -- add_runs, mark_running, reset_stale ----------------------------------------------------


def test_add_runs_is_idempotent(store: Store) -> None:
    runs = plan("p", 3)
    assert store.add_runs(runs) == 3
    assert store.add_runs(runs) == 0
    assert store.add_runs([*runs, *plan("q", 1)]) == 1
    frame = store.runs()
    assert len(frame) == 4
    assert set(frame["status"]) == {"pending"}


def test_add_runs_with_a_different_spec_raises_and_inserts_nothing(store: Store) -> None:
    store.add_runs(plan("p", 1))
    clash = PlannedRun("p-r0", "p", '{"seed": 7}')
    with pytest.raises(ValueError, match="different spec"):
        store.add_runs([*plan("q", 2), clash])
    assert store.runs()["run_id"].tolist() == ["p-r0"]


def test_add_runs_keeps_the_first_pack_assignment(store: Store) -> None:
    (run,) = plan("p", 1)
    store.add_runs([run])
    assert store.add_runs([PlannedRun(run.run_id, "other", run.spec_json)]) == 0
    assert store.runs()["pack_id"].tolist() == ["p"]


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "", "a b"])
def test_ids_must_be_safe_file_names(bad: str) -> None:
    with pytest.raises(ValueError):
        PlannedRun("r", bad, "{}")
    with pytest.raises(ValueError):
        PlannedRun(bad, "p", "{}")


def test_spec_must_be_a_json_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        PlannedRun("r", "p", "[1, 2]")


def test_mark_running_only_from_pending_and_all_or_nothing(store: Store) -> None:
    store.add_runs(plan("p", 2) + plan("q", 1))
    store.mark_running(["p-r0"])
    assert row(store, "p-r0")["status"] == "running"
    for bad in (["p-r0"], ["nope"], ["p-r1", "p-r0"]):
        with pytest.raises(ValueError, match="not pending"):
            store.mark_running(bad)
    assert row(store, "p-r1")["status"] == "pending"  # the failed batch rolled back
    store.finish_pack("q", [done("q-r0")])
    with pytest.raises(ValueError, match="not pending"):
        store.mark_running(["q-r0"])


def test_reset_stale_requeues_running_and_removes_temp_files(store: Store) -> None:
    store.add_runs(plan("p", 3) + plan("q", 1))
    store.mark_running(["p-r0", "p-r1"])
    store.finish_pack("q", [done("q-r0")])
    (store.root / "points" / "p.parquet.tmp-123").write_bytes(b"partial")
    assert store.reset_stale() == 2
    assert store.reset_stale() == 0
    statuses = store.runs().set_index("run_id")["status"].to_dict()
    assert statuses == {"p-r0": "pending", "p-r1": "pending", "p-r2": "pending", "q-r0": "done"}
    assert tmp_files(store.root) == []


# -- finish_pack: atomic files, transitions, immutability -----------------------------------


def test_finish_pack_files_read_back_without_sensgen(store: Store) -> None:
    store.add_runs(plan("p", 2))
    store.mark_running(["p-r0", "p-r1"])
    weights = {"w": torch.arange(12.0).reshape(2, 6).T, "b": torch.ones(2, 3)}  # w: a view
    pts = points_for(["p-r0", "p-r1"])
    store.finish_pack("p", [done("p-r0"), done("p-r1")], points=pts, weights=weights)

    assert tmp_files(store.root) == []
    frame = pd.read_parquet(store.root / "points" / "p.parquet")
    assert list(frame.columns) == [*POINT_COLUMNS, "extra"]  # extra columns are kept
    assert frame["index"].dtype == "int64"
    assert frame["label"].dtype == "int64"
    assert frame["correct"].dtype == bool
    assert frame["loss"].dtype == "float64"
    pd.testing.assert_frame_equal(frame, pts, check_dtype=False)
    loaded = safetensors.torch.load_file(store.root / "weights" / "p.safetensors")
    assert set(loaded) == {"w", "b"}
    for name, tensor in weights.items():
        torch.testing.assert_close(loaded[name], tensor)
    with safetensors.safe_open(store.root / "weights" / "p.safetensors", "pt") as f:
        assert json.loads(f.metadata()["run_ids"]) == ["p-r0", "p-r1"]
    for name, tensor in store.load_weights("p").items():
        torch.testing.assert_close(tensor, weights[name])


def test_pending_may_finish_directly_with_every_final_status(store: Store) -> None:
    store.add_runs(plan("p", 3))
    nan = float("nan")
    results = [
        done("p-r0"),
        RunResult("p-r1", Status.FAILED, {"train_loss": nan}, error="RuntimeError: boom"),
        RunResult("p-r2", "diverged", {"train_loss": math.inf, "test_loss": None}),
    ]
    store.finish_pack("p", results)
    frame = store.runs().set_index("run_id")
    assert frame["status"].tolist() == ["done", "failed", "diverged"]
    assert frame.loc["p-r1", "error"] == "RuntimeError: boom"
    assert np.isnan(frame.loc["p-r1", "train_loss"])
    assert frame.loc["p-r2", "train_loss"] == math.inf
    assert frame["finished_at"].notna().all()


def test_run_results_must_be_final_with_known_metrics() -> None:
    for status in ("pending", "running"):
        with pytest.raises(ValueError, match="final status"):
            RunResult("r", status)
    with pytest.raises(ValueError):
        RunResult("r", "finished")
    with pytest.raises(ValueError, match="unknown metrics"):
        RunResult("r", Status.DONE, {"accuracy": 1.0})
    assert {Status(s) for s in ("done", "failed", "diverged")} == FINAL


def test_done_rows_are_immutable(store: Store) -> None:
    store.add_runs(plan("p", 1))
    store.finish_pack("p", [done("p-r0")], points=points_for(["p-r0"]))
    before = store.runs()
    parquet = (store.root / "points" / "p.parquet").read_bytes()
    for status in ("done", "failed", "diverged"):
        with pytest.raises(ValueError, match="immutable"):
            store.finish_pack("p", [RunResult("p-r0", status, {"test_acc": 0.1})])
    with pytest.raises(ValueError, match="immutable"):
        store.finish_pack("p", [done("p-r0", 0.1)], points=points_for(["p-r0"], loss=9.0))
    pd.testing.assert_frame_equal(store.runs(), before)
    assert (store.root / "points" / "p.parquet").read_bytes() == parquet


def test_finish_pack_rejects_results_that_do_not_match_the_pack(store: Store) -> None:
    store.add_runs(plan("p", 2) + plan("q", 1))
    before = store.runs()
    cases = [
        ("p", [done("p-r0")], None, "none for"),  # a missing run
        ("p", [done("p-r0"), done("p-r1"), done("q-r0")], None, "other runs"),
        ("p", [done("p-r0"), done("p-r0")], None, "duplicate"),
        ("nope", [done("p-r0")], None, "unknown pack"),
        ("p", [done("p-r0"), done("p-r1")], points_for(["q-r0"]), "without a result"),
        ("p", [done("p-r0"), done("p-r1")], points_for(["p-r0"]).drop(columns="p_y"), "lacks"),
    ]
    for pack_id, results, points, message in cases:
        with pytest.raises(ValueError, match=message):
            store.finish_pack(pack_id, results, points=points)
    pd.testing.assert_frame_equal(store.runs(), before)
    assert list((store.root / "points").iterdir()) == []


# -- crash safety ----------------------------------------------------------------------------


def test_crash_between_files_and_transaction_leaves_runs_unfinished(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_runs(plan("p", 2))
    store.mark_running(["p-r0", "p-r1"])
    results = [done("p-r0"), done("p-r1")]

    def crash(self: Store, results: object) -> None:
        raise KeyboardInterrupt  # the process dies after the renames, before the commit

    with monkeypatch.context() as m:
        m.setattr(Store, "_commit_results", crash)
        with pytest.raises(KeyboardInterrupt):
            store.finish_pack(
                "p",
                results,
                points=points_for(["p-r0", "p-r1"], loss=9.0),
                weights={"w": torch.ones(1)},
            )
    assert (store.root / "points" / "p.parquet").exists()  # an orphan nobody trusts
    assert set(store.runs()["status"]) == {"running"}
    assert store.points().empty
    assert store.pack_status()["status"].tolist() == ["running"]

    assert store.reset_stale() == 2
    store.finish_pack("p", results, points=points_for(["p-r0", "p-r1"], loss=0.25))
    assert set(store.runs()["status"]) == {"done"}
    assert store.points()["loss"].tolist() == [0.25] * 8  # the orphan was overwritten
    assert not (store.root / "weights" / "p.safetensors").exists()  # orphan weights removed
    assert tmp_files(store.root) == []


def test_a_failure_inside_the_transaction_rolls_back_every_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_runs(plan("p", 3))
    real = store_module.sql_value
    calls = {"n": 0}

    def fail_on_second_run(kind: type, value: object) -> object:
        calls["n"] += 1
        if calls["n"] > len(schema.METRICS):
            raise OSError("disk full")
        return real(kind, value)

    monkeypatch.setattr(store_module, "sql_value", fail_on_second_run)
    with pytest.raises(OSError):
        store.finish_pack("p", [done(f"p-r{i}") for i in range(3)])
    monkeypatch.setattr(store_module, "sql_value", real)
    assert set(store.runs()["status"]) == {"pending"}
    store.finish_pack("p", [done(f"p-r{i}") for i in range(3)])
    assert set(store.runs()["status"]) == {"done"}


def test_a_failed_file_write_leaves_no_temp_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_runs(plan("p", 1))

    def broken_save(tensors: object, path: Path, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        store.finish_pack("p", [done("p-r0")], weights={"w": torch.ones(2)})
    assert tmp_files(store.root) == []
    assert not (store.root / "weights" / "p.safetensors").exists()
    assert row(store, "p-r0")["status"] == "pending"


# -- concurrency -----------------------------------------------------------------------------


def test_readers_see_committed_state_while_a_writer_holds_a_transaction(store: Store) -> None:
    store.add_runs(plan("p", 2))
    with contextlib.closing(sqlite3.connect(store.db_path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE runs SET status = 'running'")
        with open_results(store.root) as reader:  # opening must not wait for the writer
            assert set(reader.runs()["status"]) == {"pending"}
            assert reader.pack_status()["n_pending"].tolist() == [2]
            writer.execute("COMMIT")
            assert set(reader.runs()["status"]) == {"running"}


def test_the_writer_commits_while_a_reader_holds_a_snapshot(store: Store) -> None:
    # In a rollback journal the commit would need the reader gone (SQLITE_BUSY); WAL lets a
    # long `sensgen report` read run while the driver keeps finishing packs.
    store._conn.execute("PRAGMA busy_timeout = 100")  # fail fast instead of waiting 30 s
    store.add_runs(plan("p", 2))
    pending = "SELECT COUNT(*) FROM runs WHERE status = 'pending'"
    with contextlib.closing(sqlite3.connect(store.db_path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        assert reader.execute(pending).fetchone() == (2,)
        store.mark_running(["p-r0"])
        assert reader.execute(pending).fetchone() == (2,)  # a stable snapshot
        reader.execute("COMMIT")
        assert reader.execute(pending).fetchone() == (1,)


def test_a_reader_during_finish_pack_sees_before_or_after_never_between(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_runs(plan("p", 3))
    seen = []
    real = store_module.sql_value

    def peek(kind: type, value: object) -> object:
        with open_results(store.root) as reader:
            seen.append(tuple(reader.runs()["status"]))
        return real(kind, value)

    monkeypatch.setattr(store_module, "sql_value", peek)
    store.finish_pack("p", [done(f"p-r{i}") for i in range(3)])
    assert set(seen) == {("pending",) * 3}


# -- reading ---------------------------------------------------------------------------------


def test_runs_flattens_the_spec_with_typed_columns(store: Store) -> None:
    nested = {"model": {"width": 64, "act": {"name": "relu"}}, "lr": 0.1, "status": "spec!"}
    store.add_runs(plan("b", 1, **nested) + plan("a", 2, **nested))
    store.finish_pack("a", [done("a-r0"), RunResult("a-r1", Status.DIVERGED, {"gap": None})])
    frame = store.runs()
    assert list(frame.columns[: len(CATALOGUE)]) == CATALOGUE
    assert {"model.width", "model.act.name", "lr", "seed"} <= set(frame.columns)
    assert list(frame.columns).count("status") == 1  # the catalogue wins the clash
    assert frame["status"].tolist() == ["done", "diverged", "pending"]
    assert frame["run_id"].tolist() == ["a-r0", "a-r1", "b-r0"]  # sorted by (pack, run)
    assert frame["model.width"].tolist() == [64, 64, 64]
    for col in ["train_loss", "test_acc", "gap", "wall_s", "jacobian_norm"]:
        assert frame[col].dtype == np.float64
    assert frame["test_acc"].tolist()[0] == 0.9
    assert frame["test_acc"].iloc[1:].isna().all()  # NULL -> NaN
    assert frame["steps"].tolist()[0] == 100
    assert frame["steps"].iloc[1:].isna().all()
    assert isinstance(frame["created_at"].dtype, pd.DatetimeTZDtype)
    assert frame["finished_at"].isna().tolist() == [False, False, True]


def test_empty_store_gives_empty_typed_frames(store: Store) -> None:
    runs = store.runs()
    assert runs.empty
    assert list(runs.columns) == CATALOGUE
    assert runs["test_acc"].dtype == np.float64
    points = store.points()
    assert points.empty
    assert list(points.columns) == POINT_COLUMNS
    assert store.pack_status().empty


def test_points_come_from_done_runs_only_and_filter_by_run_id(store: Store) -> None:
    store.add_runs(plan("p", 2) + plan("q", 1) + plan("z", 1))
    failed = RunResult("p-r1", Status.FAILED, {}, error="x")
    store.finish_pack("p", [done("p-r0"), failed], points=points_for(["p-r0", "p-r1"]))
    store.finish_pack("q", [done("q-r0")], points=points_for(["q-r0"], n=2))
    pts = store.points()
    assert pts["run_id"].value_counts().to_dict() == {"p-r0": 4, "q-r0": 2}
    assert "extra" in pts.columns
    assert store.points(run_ids=["q-r0"])["run_id"].unique().tolist() == ["q-r0"]
    assert store.points(run_ids=["p-r1", "z-r0"]).empty


def test_pack_status_counts_and_summarises(store: Store) -> None:
    store.add_runs(plan("a", 2) + plan("b", 2) + plan("c", 2) + plan("d", 1) + plan("e", 1))
    store.finish_pack("a", [done("a-r0"), done("a-r1")])
    store.finish_pack("b", [done("b-r0"), RunResult("b-r1", "diverged", {"wall_s": 1.0})])
    store.finish_pack("c", [RunResult(f"c-r{i}", "failed", {}) for i in range(2)])
    store.mark_running(["d-r0"])
    frame = store.pack_status().set_index("pack_id")
    assert frame["status"].to_dict() == {
        "a": "done", "b": "partial", "c": "failed", "d": "running", "e": "pending",
    }  # fmt: skip
    assert frame.loc["a", "wall_s"] == 4.0
    assert frame.loc["b", "wall_s"] == 3.0
    assert frame.loc["c", "wall_s"] == 0.0
    assert frame.loc["b"][["n_runs", "n_done", "n_diverged"]].tolist() == [2, 1, 1]
    assert frame["n_runs"].dtype == np.int64


def test_load_weights_needs_a_finished_pack_with_weights(store: Store) -> None:
    store.add_runs(plan("p", 1) + plan("q", 1))
    with pytest.raises(ValueError, match="not finished"):
        store.load_weights("p")
    store.finish_pack("p", [done("p-r0")])
    with pytest.raises(UserError, match=r"p\.safetensors"):
        store.load_weights("p")


def test_results_is_a_read_only_view(store: Store) -> None:
    store.add_runs(plan("p", 1))
    store.finish_pack("p", [done("p-r0")], points=points_for(["p-r0"]))
    with open_results(store.root) as results:
        assert isinstance(results, Results)
        assert not hasattr(results, "add_runs")
        assert not hasattr(results, "finish_pack")
        pd.testing.assert_frame_equal(results.runs(), store.runs())
        pd.testing.assert_frame_equal(results.points(), store.points())
