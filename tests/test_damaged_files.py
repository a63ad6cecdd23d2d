"""A study directory's pack files damaged after they were written: a clear user error
(exit 2, the file and the fix), and `sensgen run` trains only the damaged packs again."""

import contextlib
import errno
import re
import shlex
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from sensgen import artifacts
from sensgen import study as study_module
from sensgen.errors import UserError
from sensgen.runner import run
from sensgen.store import PlannedRun, RunResult, Status, Store, open_results
from test_runner import TINY, _cli  # the end-to-end tests' study and CLI call


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study (test_runner's 8 runs) and its results, made once; tests copy it."""
    root = tmp_path_factory.mktemp("study")
    path = root / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    out = root / "out"
    run(study_module.load(path), out, progress=False, report=False)
    with open_results(out) as results:
        return path, out, results.runs().set_index("run_id"), results.points()


@pytest.fixture
def study(finished, tmp_path):
    import shutil

    path, out, runs, points = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return path, copy, runs, points


def _a_pack(runs):
    return sorted(set(runs["pack_id"]))[0]


def _truncate(path, keep=500):
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_table_is_a_user_error_then_run_trains_its_pack_again(study, capsys):
    path, out, runs, points = study
    pack = _a_pack(runs)
    damaged = out / "points" / f"{pack}.parquet"
    _truncate(damaged)
    assert _cli("report", str(out)) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert damaged.name in err and "is damaged" in err and "sensgen run" in err
    with pytest.raises(UserError, match="Parquet magic bytes"):
        open_results(out).points()
    assert _cli("status", str(out)) == 0
    out_text = " ".join(capsys.readouterr().out.split())
    assert f"{damaged} is damaged" in out_text and "trains such packs again" in out_text
    result = run(study_module.load(path), out, progress=False, report=False)
    assert result.n_trained == (runs["pack_id"] == pack).sum()  # that pack only
    err = capsys.readouterr().err.replace("\n", " ")
    assert damaged.name in err and "trained again" in err
    again = open_results(out).runs().set_index("run_id")
    assert (again["status"] == "done").all()
    for column in ("train_acc", "test_acc", "gap", "jacobian_norm", "steps"):
        pd.testing.assert_series_equal(again[column], runs[column])  # seeded: the same
    order = ["run_id", "split", "index"]
    pd.testing.assert_frame_equal(
        open_results(out).points().sort_values(order).reset_index(drop=True),
        points.sort_values(order).reset_index(drop=True),
    )


def test_a_truncated_weights_file_is_a_user_error_and_is_found_by_run(study):
    path, out, runs, _ = study
    pack = _a_pack(runs)
    # (Copies: the tensors read may map the file, which the truncation changes in place.)
    weights = {k: v.clone() for k, v in open_results(out).load_weights(pack).items()}
    _truncate(out / "weights" / f"{pack}.safetensors", keep=200)
    with pytest.raises(UserError, match=f"{pack}.safetensors is damaged"):
        open_results(out).load_weights(pack)
    n_runs = (runs["pack_id"] == pack).sum()
    assert run(study_module.load(path), out, progress=False, report=False).n_trained == n_runs
    again = open_results(out).load_weights(pack)
    assert set(again) == set(weights)
    assert all(torch.equal(again[k], v) for k, v in weights.items())  # seeded: the same


def test_damage_inside_the_data_is_marked_by_the_user_then_trained_again(study, capsys):
    path, out, runs, points = study
    pack = _a_pack(runs)
    damaged = out / "points" / f"{pack}.parquet"
    data = bytearray(damaged.read_bytes())
    data[100:140] = b"\xff" * 40  # inside the first column's pages; the footer is whole
    damaged.write_bytes(bytes(data))
    assert artifacts.frame_damage(damaged) is None
    with pytest.raises(UserError, match=f"Rename it to {damaged.name}.damaged"):
        open_results(out).points()
    # Unmarked, a whole frame is not redone (the check at each run reads no data) ...
    assert run(study_module.load(path), out, progress=False, report=False).n_trained == 0
    damaged.rename(damaged.with_name(damaged.name + ".damaged"))
    # ... marked, it is, and the mark goes with the old file.
    n_runs = (runs["pack_id"] == pack).sum()
    assert run(study_module.load(path), out, progress=False, report=False).n_trained == n_runs
    assert not list((out / "points").glob("*.damaged"))
    assert len(open_results(out).points()) == len(points)


def test_requeue_pack_sends_a_finished_pack_back_to_pending(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_runs([PlannedRun("a", "p", '{"w": 1}'), PlannedRun("b", "q", '{"w": 2}')])
        frame = pd.DataFrame({"run_id": ["a"], "split": ["test"], "index": [0], "label": [1]})
        frame = frame.assign(loss=0.5, correct=True, p_y=0.6, margin=0.1)
        frame = frame.assign(jacobian_norm=1.0, jacobian_norm_logits=2.0)
        store.finish_pack("p", [RunResult("a", Status.DONE, {"test_acc": 0.9})], points=frame)
        store.finish_pack("q", [RunResult("b", Status.DONE, {"test_acc": 0.8})])
        (tmp_path / "points" / "p.parquet.damaged").write_bytes(b"old")
        assert store.requeue_pack("p") == 1
        runs = store.runs().set_index("run_id")
        assert runs.loc["a", "status"] == "pending" and pd.isna(runs.loc["a", "test_acc"])
        assert runs.loc["b", "status"] == "done" and runs.loc["b", "test_acc"] == 0.8
        assert not list((tmp_path / "points").iterdir())  # its file and the mark: gone
        store.finish_pack("p", [RunResult("a", Status.DONE, {"test_acc": 0.9})], points=frame)
        assert len(store.points()) == 1
    with sqlite3.connect(tmp_path / "results.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 2
    conn.close()


@pytest.mark.parametrize(
    "text, names",
    [
        ("garbage [[", ["study.toml", "cannot be read as TOML"]),
        ('name = "tiny"\n[inclusion]\nmin_train_acc = 5\n', ["inclusion", "min_train_acc"]),
        ('name = "tiny"\ninclusion = 3\n', ["inclusion", "must be a table"]),
    ],
)
def test_a_damaged_study_file_in_the_directory_is_a_user_error_for_report(
    study, capsys, text, names
):
    path, out, _, _ = study
    (out / "study.toml").write_text(text, encoding="utf-8")
    assert _cli("report", str(out)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert all(name in err for name in names) and "sensgen run" in err
    # The fix the message gives: run the study again, which writes the file anew.
    assert run(study_module.load(path), out, progress=False, report=False).n_trained == 0
    assert _cli("report", str(out)) == 0


def test_an_io_error_is_not_damage_and_changes_nothing(study, monkeypatch):
    path, out, _, _ = study

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(artifacts.pq, "read_schema", failing)
    files = sorted(p.name for p in out.rglob("*.parquet"))
    with pytest.raises(UserError, match=r"cannot be read .*Input/output error.*Nothing was"):
        run(study_module.load(path), out, progress=False, report=False)
    assert (open_results(out).runs()["status"] == "done").all()
    assert sorted(p.name for p in out.rglob("*.parquet")) == files


def test_a_table_without_its_columns_is_damaged(study):
    path, out, runs, _ = study
    pack = _a_pack(runs)
    damaged = out / "points" / f"{pack}.parquet"
    pd.DataFrame({"other": [1, 2]}).to_parquet(damaged)  # a whole Parquet file, not ours
    assert artifacts.frame_damage(damaged) == "no column 'run_id'"
    with pytest.raises(artifacts.DamagedFileError, match=damaged.name):
        open_results(out).points()
    n_runs = (runs["pack_id"] == pack).sum()
    assert run(study_module.load(path), out, progress=False, report=False).n_trained == n_runs


def test_a_damaged_pack_is_trained_again_only_as_it_was_measured(study, tmp_path):
    _, out, runs, _ = study
    _truncate(out / "points" / f"{_a_pack(runs)}.parquet")
    other = tmp_path / "other.toml"
    other.write_text(TINY + "[measure]\njacobian_train_points = 10\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"\[measure\] differs.*Nothing was changed"):
        run(study_module.load(other), out, progress=False, report=False)
    assert (open_results(out).runs()["status"] == "done").all()
    # The fix it gives: the stored study first.
    stored = study_module.load(out / "study.toml")
    assert run(stored, out, progress=False, report=False).n_trained >= 1


def test_a_damaged_pack_this_study_does_not_plan_is_left_alone(study, tmp_path, capsys):
    _, out, runs, _ = study
    pack = runs.loc[runs["width"] == 16, "pack_id"].iloc[0]
    _truncate(out / "points" / f"{pack}.parquet")
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(TINY.replace("width = [8, 16]", "width = [8]"), encoding="utf-8")
    assert run(study_module.load(smaller), out, progress=False, report=False).n_trained == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "does not plan" in err and pack in err
    assert (open_results(out).runs()["status"] == "done").all()  # not left pending


def test_no_damaged_pack_is_touched_when_the_run_stops_on_a_user_error(study, monkeypatch):
    path, out, runs, _ = study
    damaged = out / "points" / f"{_a_pack(runs)}.parquet"
    _truncate(damaged)
    before = damaged.read_bytes()

    def missing(datasets):
        raise UserError("dataset missing")

    monkeypatch.setattr("sensgen.runner._preflight", missing)
    with pytest.raises(UserError, match="dataset missing"):
        run(study_module.load(path), out, progress=False, report=False)
    assert (open_results(out).runs()["status"] == "done").all()
    assert damaged.read_bytes() == before


def test_damaged_region_maps_stop_the_report(study):
    # (Not left out as a run measured without maps would be.)
    from sensgen.analysis import write_report

    _, out, runs, _ = study
    pack = _a_pack(runs)
    (out / "regions" / f"{pack}.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(artifacts.DamagedFileError, match=f"{pack}.safetensors is damaged"):
        write_report(out, inclusion={"apply": False})


def test_marks_of_a_pack_go_when_it_is_finished_and_requeue_needs_a_finished_pack(tmp_path):
    with Store.open(tmp_path) as store:
        store.add_runs([PlannedRun("a", "p", '{"w": 1}')])
        with pytest.raises(ValueError, match="not finished"):
            store.requeue_pack("p")
        mark = tmp_path / "weights" / "p.safetensors.damaged"
        mark.write_bytes(b"left by a crash")
        store.finish_pack("p", [RunResult("a", Status.DONE, {"test_acc": 0.9})])
        assert not mark.exists()
        assert artifacts.damaged_files(tmp_path, ["p"]) == {}


# DIR/results.db, the catalogue, damaged: a user error naming it with a fix that works.


def _scramble_page(db, name):
    """Scramble the data of the first page of table or index ``name`` in ``db`` (its
    header intact), as a bad sector or a torn copy would."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT rootpage FROM sqlite_master WHERE name = ?"
        (page,) = conn.execute(query, (name,)).fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    data = bytearray(db.read_bytes())
    start = (page - 1) * size
    data[start + 100 : start + size] = bytes(
        (b * 7 + 13) % 256 for b in data[start + 100 : start + size]
    )
    db.write_bytes(bytes(data))


def _follow(err):
    """Do what a message's `mv A B && sensgen run ...` says: the move, then the run
    (in-process). Returns the run's exit code and the two directories."""
    (command,) = re.findall(r"`(mv [^`]*)`", " ".join(err.split()))
    move, run_command = (shlex.split(part) for part in command.split(" && "))
    subprocess.run(move, check=True)
    assert run_command[:2] == ["sensgen", "run"]
    return _cli(*run_command[1:], "--no-progress"), Path(move[1]), Path(move[2])


def _same_files(a, b):
    """Whether two study directories hold byte-equal pack files."""
    names = sorted(p.relative_to(a) for kind in artifacts.FOLDERS for p in (a / kind).iterdir())
    others = sorted(p.relative_to(b) for kind in artifacts.FOLDERS for p in (b / kind).iterdir())
    return names == others and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_a_damaged_catalogue_is_a_user_error_whose_fix_trains_the_study_again(study, capsys):
    _, out, runs, points = study
    original = out.with_name("original")
    shutil.copytree(out, original)
    db = out / "results.db"
    _scramble_page(db, "runs")  # the rows themselves: read by report, status and run
    damaged = db.read_bytes()
    for command in (["report", str(out)], ["status", str(out)]):
        assert _cli(*command) == 2  # (was a traceback, exit 1)
        err = " ".join(capsys.readouterr().err.split())
        assert f"{db} is damaged" in err and "Every model is trained again" in err
    assert _cli("run", str(out / "study.toml"), "--out", str(out), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "Nothing was changed" in " ".join(err.split())
    assert db.read_bytes() == damaged and _same_files(out, original)
    # The fix it gives: the directory moved aside whole, the study trained again into DIR.
    code, moved_from, aside = _follow(err)
    assert code == 0 and moved_from == out and aside == out.with_name("out.damaged")
    again = open_results(out).runs().set_index("run_id")
    assert (again["status"] == "done").all() and set(again.index) == set(runs.index)
    for column in ("train_acc", "test_acc", "jacobian_norm"):
        pd.testing.assert_series_equal(again.loc[runs.index, column], runs[column])
    assert len(open_results(out).points()) == len(points)
    # Nothing was deleted: the old directory is whole, its damaged catalogue included.
    assert (aside / "results.db").read_bytes() == damaged and _same_files(aside, original)


def test_a_damaged_catalogue_can_be_put_back_from_a_copy(finished, study, capsys):
    _, out, runs, _ = study
    _scramble_page(out / "results.db", "runs")
    assert _cli("report", str(out)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"If you have a copy of {out / 'results.db'} from before the damage, put it" in err
    shutil.copyfile(finished[1] / "results.db", out / "results.db")  # the copy
    assert _cli("status", str(out)) == 0
    assert f"{len(runs)} done" in capsys.readouterr().out


def test_damage_in_an_index_of_the_catalogue_stops_run_before_it_writes(study, capsys):
    # `runs` reads the rows whole, so report and status worked; run's first insert met the
    # damaged index half-way through, with a traceback.
    path, out, _, _ = study
    db = out / "results.db"
    _scramble_page(db, "sqlite_autoindex_runs_1")
    damaged, study_file = db.read_bytes(), (out / "study.toml").read_bytes()
    more = ["--set", "grid.seed=[0, 1]"]  # new runs to insert
    assert _cli("run", str(path), "--out", str(out), "--no-progress", *more) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{db} is damaged (integrity check" in err and "Nothing was changed" in err
    assert db.read_bytes() == damaged and (out / "study.toml").read_bytes() == study_file
    assert _cli("report", str(out)) == 2


def test_a_catalogue_cut_to_nothing_is_damage_not_a_new_study(study, capsys):
    # An empty results.db beside a study's files: run planned the study anew and trained
    # it over the old files, report said to run it.
    path, out, _, _ = study
    original = out.with_name("original")
    shutil.copytree(out, original)
    (out / "results.db").write_bytes(b"")
    assert _cli("run", str(path), "--out", str(out), "--no-progress") == 2
    assert "results.db is damaged (it holds no tables)" in " ".join(capsys.readouterr().err.split())
    assert (out / "results.db").read_bytes() == b"" and _same_files(out, original)
    assert _cli("report", str(out)) == 2
    assert "Every model is trained again" in " ".join(capsys.readouterr().err.split())


def test_a_catalogue_moved_away_leads_to_a_fix_that_works(study, capsys):
    # The old message said "move it away"; then report said to run the study into DIR and
    # run refused DIR ("holds files, but no study").
    _, out, runs, _ = study
    (out / "results.db").rename(out / "results.db.damaged")
    for command in (["report", str(out)], ["status", str(out)]):
        assert _cli(*command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{out} holds a study's files but no study" in err
    assert _cli("run", str(out / "study.toml"), "--out", str(out), "--no-progress") == 2
    code, _, aside = _follow(capsys.readouterr().err)
    assert code == 0 and (aside / "results.db.damaged").is_file()
    assert (open_results(out).runs()["status"] == "done").sum() == len(runs)


def test_the_fix_names_a_free_folder_and_quotes_paths(tmp_path):
    out = tmp_path / "my study"
    (out / "points").mkdir(parents=True)
    (out / "points" / "p.parquet").write_bytes(b"x")
    (tmp_path / "my study.damaged").mkdir()  # taken: mv would move DIR into it
    with pytest.raises(UserError) as info:
        open_results(out)
    text = str(info.value)
    aside = shlex.quote(str(tmp_path / "my study.damaged-2"))
    assert f"`mv {shlex.quote(str(out))} {aside} && sensgen run STUDY --out" in text
    assert "STUDY: the study file that trained it" in text


def test_damage_met_after_the_catalogue_was_opened_is_a_user_error(study):
    _, out, _, _ = study

    class Damaged:
        """A connection whose disk went bad after the catalogue was opened and checked."""

        def execute(self, *args):
            raise sqlite3.DatabaseError("database disk image is malformed")

        def close(self):
            pass

    results = open_results(out)
    results._conn.close()
    results._conn = Damaged()
    for read in (results.runs, results.pack_status, results.points):
        with pytest.raises(UserError, match=r"results\.db is damaged.*trained again"):
            read()
