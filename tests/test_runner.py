"""End to end: a real study through the CLI into a study directory, resumed and reported."""

import gzip
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from safetensors.torch import load_file

from sensgen import data
from sensgen import study as study_module
from sensgen.cli import main
from sensgen.errors import UserError
from sensgen.execute import execute_pack
from sensgen.metrics import jacobian_norm
from sensgen.models import MLP
from sensgen.runner import run
from sensgen.store import open_results
from sensgen.study_dir import study_status

TINY = """
name = "tiny"
[base]
dataset = "digits"
optimizer = "sgd"
lr = 0.1
batch_size = 32
max_steps = 40
eval_every = 20
[grid]
width = [8, 16]
depth = [1, 2]
random_labels = [0.0, 1.0]
"""
N_RUNS, N_TEST = 8, 360


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    return path


def _cli(*args):
    """Run the CLI in-process; return its exit code."""
    with pytest.raises(SystemExit) as info:
        main([*args])
        raise SystemExit(0)
    return info.value.code


def test_run_fills_the_study_directory(tiny, tmp_path):
    out = tmp_path / "out"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    runs = open_results(out).runs()
    assert len(runs) == N_RUNS and (runs["status"] == "done").all()
    metrics = ["train_acc", "test_acc", "gap", "loss_gap", "jacobian_norm", "train_loss"]
    assert np.isfinite(runs[metrics].to_numpy()).all()
    np.testing.assert_allclose(runs["gap"], runs["train_acc"] - runs["test_acc"])
    # Random labels: test accuracy near chance, so the gap is large.
    random = runs[runs["random_labels"] == 1.0]
    assert (random["test_acc"] < 0.3).all()
    points = open_results(out).points()
    assert len(points) == N_RUNS * N_TEST
    per_run = points.groupby("run_id")["jacobian_norm"].mean()
    np.testing.assert_allclose(per_run[runs["run_id"]].to_numpy(), runs["jacobian_norm"])
    assert (out / "study.toml").exists() and (out / "report" / "index.html").exists()
    # The directory is readable without sensgen: sqlite3, pandas and safetensors alone.
    with sqlite3.connect(out / "results.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 8
    conn.close()
    assert len(pd.read_parquet(next((out / "points").glob("*.parquet")))) > 0


def test_stored_weights_reproduce_the_stored_jacobian_norm(tiny, tmp_path):
    from sensgen import data

    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False, report=False)
    row = open_results(out).runs().iloc[0]
    weights = load_file(next((out / "weights").glob(f"{row['pack_id']}.safetensors")))
    mine = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(row["run_id"])}
    net = MLP(64, 10, int(row["width"]), int(row["depth"]), row["nonlinearity"])
    net.load_state_dict(mine)
    test = data.load("digits", split="test")
    assert jacobian_norm(net, test.x).mean().item() == pytest.approx(row["jacobian_norm"])


def test_second_run_does_nothing_and_says_so(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    before = open_results(out).runs()
    capsys.readouterr()
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    assert "Nothing to do" in capsys.readouterr().out
    pd.testing.assert_frame_equal(open_results(out).runs(), before)


def test_status_and_open_results_read_a_read_only_study_directory(tiny, tmp_path):
    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False, report=False)
    # The directory mounted read-only (an archive, another user's share), where SQLite
    # cannot create the write-ahead log's files: in a user and mount namespace of its own.
    read = "from sensgen import open_results as o; print(len(o(sys.argv[1]).runs()))"
    script = (
        'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" || exit 77; '
        '"$2" -m sensgen.cli status "$1"; echo "status $?"; "$2" -c "import sys; $3" "$1"; '
        '"$2" -m sensgen.cli report "$1"; echo "report $?"'
    )
    command = ["unshare", "-rm", "sh", "-c", script, "sh", str(out), sys.executable, read]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if done.returncode == 77 or "unshare" in done.stderr.split(":", 1)[0]:
        pytest.skip(f"no read-only mount here: {done.stderr.strip()}")
    said = done.stdout + done.stderr
    assert "status 0" in said and f"{N_RUNS} runs: 0 pending, 0 running, {N_RUNS} done" in said
    assert f"\n{N_RUNS}\n" in done.stdout  # open_results(DIR).runs()
    # The report cannot be written there: exit 2, naming the report's folder.
    assert "report 2" in said and f"{out / 'report'}" in said and "Read-only" in said
    assert not list(out.glob("results.db-*"))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny, tmp_path):
    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False, report=False)
    full = open_results(out).runs().set_index("run_id")
    pack = full["pack_id"].iloc[0]
    # What a kill -9 mid-pack leaves: rows `running`, no metrics, maybe a stray temp file.
    with sqlite3.connect(out / "results.db") as conn:
        conn.execute(
            "UPDATE runs SET status='running', gap=NULL, jacobian_norm=NULL, finished_at=NULL"
            " WHERE pack_id=?",
            (pack,),
        )
    conn.close()
    (out / "points" / f"{pack}.parquet").unlink()
    result = run(study_module.load(tiny), out, progress=False, report=False)
    assert result.n_trained == (full["pack_id"] == pack).sum()
    again = open_results(out).runs().set_index("run_id")
    assert (again["status"] == "done").all()
    for column in ("train_acc", "test_acc", "gap", "jacobian_norm", "steps"):
        pd.testing.assert_series_equal(again[column], full[column], check_exact=False)


def test_a_failing_pack_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, monkeypatch):
    def flaky(specs, **kwargs):
        if specs[0].width == 16:
            raise RuntimeError("simulated worker crash")
        return execute_pack(specs, **kwargs)

    monkeypatch.setattr("sensgen.execute.execute_pack", flaky)
    out = tmp_path / "out"
    result = run(study_module.load(tiny), out, progress=False, report=True)
    runs = open_results(out).runs()
    failed = runs[runs["status"] == "failed"]
    assert len(failed) == 4 and (failed["width"] == 16).all()
    assert failed["error"].str.contains("simulated worker crash").all()
    assert result.counts == {"done": 4, "failed": 4}
    summary = study_status(out)
    assert summary.counts["failed"] == 4 and summary.counts["done"] == 4
    # Each new run tries failed packs again (the failure may have been the machine's),
    # saying why they failed; the done ones stay as they are.
    monkeypatch.setattr("sensgen.execute.execute_pack", execute_pack)
    done_before = runs[runs["status"] == "done"].set_index("run_id")["finished_at"]
    console = Console(record=True, width=200)
    result = run(study_module.load(tiny), out, progress=False, report=False, console=console)
    assert "failed in an earlier run (RuntimeError: simulated worker crash)" in (
        console.export_text()
    )
    assert result.counts == {"done": 8} and result.n_trained == 4
    after = open_results(out).runs().set_index("run_id")["finished_at"]
    assert after[done_before.index].equals(done_before)


def _output_when_every_pack_fails(tiny, tmp_path, monkeypatch, error: Exception) -> str:
    """What `run` prints when every pack of the tiny study raises `error`."""

    def failing(specs, **kwargs):
        raise error

    monkeypatch.setattr("sensgen.execute.execute_pack", failing)
    console = Console(record=True, width=200)
    run(study_module.load(tiny), tmp_path / "o", progress=False, report=False, console=console)
    return console.export_text()


def test_a_failure_is_named_at_the_end_of_the_run(tiny, tmp_path, monkeypatch):
    error = RuntimeError("can't allocate memory")
    text = _output_when_every_pack_fails(tiny, tmp_path, monkeypatch, error)
    assert "8 runs failed: RuntimeError: can't allocate memory" in text
    assert "`sensgen run` again trains them again" in text


def test_a_failure_that_ends_in_a_full_stop_is_not_given_a_second(tiny, tmp_path, monkeypatch):
    error = UserError("set measure.profile_ellipses = 0.")
    text = " ".join(_output_when_every_pack_fails(tiny, tmp_path, monkeypatch, error).split())
    assert "measure.profile_ellipses = 0. `sensgen run` again trains them again." in text
    assert ".." not in text


def test_parallel_workers_match_a_serial_run(tiny, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run(study_module.load(tiny), serial, progress=False, report=False)
    run(study_module.load(tiny), parallel, workers=2, progress=False, report=False)
    a = open_results(serial).runs().set_index("run_id")
    b = open_results(parallel).runs().set_index("run_id")
    for column in ("test_acc", "gap", "jacobian_norm"):
        np.testing.assert_allclose(b.loc[a.index, column], a[column], rtol=1e-5)


@pytest.mark.parametrize(("workers", "warned"), [(None, False), (2, False), (3, True)])
def test_more_local_workers_than_cpus_are_warned_of(tiny, tmp_path, monkeypatch, workers, warned):
    # Stopped early by a refused --out (a folder of someone else's files), after the check.
    monkeypatch.setattr("sensgen.runner.usable_cpus", lambda: 2)
    (tmp_path / "notes.txt").write_text("mine")
    console = Console(record=True, width=300)
    with pytest.raises(UserError, match="holds files"):
        run(study_module.load(tiny), tmp_path, workers=workers, progress=False, console=console)
    text = console.export_text()
    assert ("--workers 3 is more than the 2 CPU(s)" in text) is warned
    assert ("Use --workers 2 or fewer" in text) is warned


def test_status_and_report_commands(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    (out / "report" / "index.html").unlink()
    capsys.readouterr()
    assert _cli("status", str(out)) == 0
    assert "8 done" in capsys.readouterr().out
    assert _cli("report", str(out)) == 0
    assert (out / "report" / "index.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nosuchpreset"], "nosuchpreset"),
        (["run", "quickstart", "--set", "widht=3"], "widht"),
        (["run", "quickstart", "--set", "novalue"], "KEY=VALUE"),
        (["run", "quickstart", "--executor", "slurm"], "--executor"),
        (["run", "quickstart", "--device", "tpu"], "--device"),
        (["run", "quickstart", "--workers", "0"], "--workers"),
        (["status", "/nonexistent/dir"], "not a sensgen study directory"),
        (["report", "/nonexistent/dir"], "not a sensgen study directory"),
        (["datasets", "fetch", "imagenet"], "imagenet"),
        # Review fix: rich markup used to swallow the TOML table names in these messages.
        (["run", "quickstart", "--set", "scale=huge"], "add a [scales.NAME] table"),
        (
            ["run", "quickstart", "--set", "sample.n=2", "--set", "sample.lr={uniform=[1,0]}"],
            "{log_uniform|uniform = [lo, hi]}",
        ),
    ],
)
def test_user_errors_exit_2_with_a_message(args, message, capsys):
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ") and "Traceback" not in err


def test_unknown_key_in_a_study_file_exits_2(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("batch_size", "batchsize"), encoding="utf-8")
    assert _cli("run", str(bad), "--out", str(tmp_path / "o")) == 2
    assert "'batchsize'" in capsys.readouterr().err


def test_corrupt_dataset_exits_2_and_keeps_finished_work(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False, report=False)
    before = open_results(out).runs()
    cache = tmp_path / "cache"
    (cache / "mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (cache / "mnist" / f"{name}.gz").write_bytes(gzip.compress(b"not an idx file"))
    monkeypatch.setenv("SENSGEN_DATA", str(cache))
    monkeypatch.setenv("SENSGEN_MIRROR", "http://127.0.0.1:9/")  # never reached
    code = _cli("run", str(tiny), "--out", str(out), "--set", "dataset=mnist", "--no-progress")
    assert code == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "train-images-idx3-ubyte.gz" in err
    # Nothing registered, nothing lost: the directory is exactly as before.
    pd.testing.assert_frame_equal(open_results(out).runs(), before)


def test_a_missing_dataset_leaves_no_study_directory_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SENSGEN_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("SENSGEN_MIRROR", "http://127.0.0.1:9/")  # refused at once
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('"digits"', '"mnist"'), encoding="utf-8")
    out = tmp_path / "out"
    assert _cli("run", str(path), "--out", str(out), "--no-progress") == 2
    assert "mnist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["train_subset=2", "measure.region_planes=1"],
            "measure.region_planes = 1 needs three training points of different classes, "
            "but the training points hold 2 classes",
        ),
        (
            ["train_subset=3", "measure.profile_ellipses=2"],
            "(for its same-class ellipses) a class with three training points, but no class "
            "has more than 1",
        ),
    ],
    ids=["planes", "same-class"],
)
def test_anchors_a_training_subset_cannot_give_exit_2_before_training(
    tiny, tmp_path, capsys, sets, message
):
    # Measured after training, each run failed (its model lost) with a message about test
    # points and transition_ellipses, exit 0, and every new `run` trained it again.
    out = tmp_path / "out"
    args = [x for s in [*sets, "grid.width=[8]", "grid.depth=[1]", "batch_size=1"]
            for x in ("--set", s)]  # fmt: skip
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress", *args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and f"Runs on 'digits' with {sets[0].replace('=', ' = ')}" in err
    assert "Fix: use a larger train_subset" in err and "Traceback" not in err
    assert not out.exists()


def test_transition_ellipses_a_dataset_s_test_labels_cannot_anchor_exit_2_before_training(
    tiny, tmp_path, capsys, monkeypatch
):
    # A registered two-class dataset: its ellipses need three test classes. Measured after
    # training, each run failed with its model lost, and every new `run` trained it again.
    load = data.load

    def two_test_classes(name, *, split, root=None):
        loaded = load(name, split=split, root=root)
        if split == "test":
            loaded.y.remainder_(2)
        return loaded

    monkeypatch.setattr(data, "load", two_test_classes)
    out = tmp_path / "out"
    args = ["--set", "measure.transition_ellipses=1", "--no-progress"]
    assert _cli("run", str(tiny), "--out", str(out), *args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Runs on 'digits': ellipses through three test points of different classes" in err
    assert "test labels hold 2; set measure.transition_ellipses = 0. Nothing was trained." in err
    assert not out.exists()


def test_console_script_exit_codes(tmp_path):
    """The installed `sensgen` entry point, as a user runs it."""
    script = [sys.executable, "-m", "sensgen.cli"]
    bad = subprocess.run([*script, "run", "nosuchpreset"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nosuchpreset" in bad.stderr
    usage = subprocess.run([*script, "run"], capture_output=True, text=True)
    assert usage.returncode == 2
    ok = subprocess.run([*script, "datasets", "list"], capture_output=True, text=True)
    assert ok.returncode == 0 and "mnist_sample" in ok.stdout


def test_out_that_cannot_be_a_directory_exits_2(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("", encoding="utf-8")
    assert _cli("run", str(tiny), "--out", str(afile / "sub"), "--no-progress") == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "--out" in err and "Traceback" not in err


def test_a_second_driver_on_the_same_directory_is_refused(tiny, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # what a live `sensgen run` on `out` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 2
        assert "in use by another" in capsys.readouterr().err.replace("\n", " ")
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0


def _interrupted_plan(study_file, out):
    """``out`` as an interrupted run of the study leaves it: every run planned, none done."""
    from sensgen.store import PlannedRun, Store
    from sensgen.study import plan_packs

    study = study_module.load(study_file)
    with Store.open(out) as store:
        packs = plan_packs(study.specs(), study.execution.pack_size)
        store.add_runs(
            PlannedRun(s.run_id, p.pack_id, s.canonical_json()) for p in packs for s in p.specs
        )
    return out


def test_packs_planned_by_a_larger_version_of_the_study_are_trained_whole(tiny, tmp_path):
    out = _interrupted_plan(tiny, tmp_path / "out")
    smaller = study_module.load(tiny, {"random_labels": "0.0"})  # half of every pack
    result = run(smaller, out, progress=False, report=False)
    assert result.complete and result.counts == {"done": N_RUNS // 2}
    assert (open_results(out).runs()["status"] == "done").all()


def test_a_dead_worker_leaves_its_packs_pending_for_the_next_run(
    tiny, tmp_path, monkeypatch, capsys
):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class DeadPool:  # every worker is killed (say, for memory) before it returns
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def shutdown(self, wait=True, cancel_futures=False):
            pass

        def submit(self, *args):
            future = Future()
            future.set_exception(BrokenProcessPool("a worker died"))
            return future

    monkeypatch.setattr("sensgen.parallel.ProcessPoolExecutor", DeadPool)
    out = tmp_path / "out"
    result = run(study_module.load(tiny), out, workers=2, progress=False, report=False)
    assert result.counts == {"pending": N_RUNS} and not result.complete
    assert result.n_trained == 0  # "Trained 0 models", not the number attempted
    capsys.readouterr()
    assert _cli("run", str(tiny), "--out", str(out), "--workers", "2", "--no-progress") == 0
    said = capsys.readouterr()
    assert "a worker process died" in said.err
    assert "Nothing to do" not in said.out and "already finished" not in said.out
    assert "Trained 0 models" in said.out and f"{N_RUNS} pending" in said.out
    monkeypatch.undo()
    again = run(study_module.load(tiny), out, progress=False, report=False)
    assert again.n_trained == N_RUNS and again.counts == {"done": N_RUNS}


PAIRED = """
name = "paired"
[base]
dataset = "digits"
optimizer = "sgd"
lr = 0.1
batch_size = 32
max_steps = 40
eval_every = 20
width = 16
[grid]
seed = [0, 1]
[pairs]
factor = "random_labels"
values = [0.0, 1.0]
[measure]
jacobian_train_points = 50
transition_ellipses = 2
transition_sides = 60
points = false
"""


def test_a_paired_study_stores_pairs_and_measurements(tmp_path):
    path = tmp_path / "paired.toml"
    path.write_text(PAIRED, encoding="utf-8")
    out = tmp_path / "out"
    run(study_module.load(path), out, progress=False, report=False)
    runs = open_results(out).runs()
    assert len(runs) == 4 and (runs["status"] == "done").all()
    for _, pair in runs.groupby("pair_id"):
        assert sorted(pair["pair_role"]) == ["0.0", "1.0"]
        assert pair["seed"].nunique() == 1
    assert runs["pair_id"].nunique() == 2
    assert (runs["transitions"] >= runs["transitions_sampled"]).all()
    assert (runs["transitions"] > 0).all() and runs["jacobian_norm_train"].notna().all()
    assert len(open_results(out).points()) == 0  # measure.points = false


def test_a_directory_from_another_spec_schema_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False, report=False)
    with sqlite3.connect(out / "results.db") as conn:
        conn.execute("UPDATE runs SET spec = replace(spec, '\"schema\":2', '\"schema\":1')")
    conn.close()
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 2
    assert "schema 1" in capsys.readouterr().err


def test_a_directory_with_runs_this_study_does_not_plan_says_so(tiny, tmp_path, capsys):
    # E.g. a sampled study run by a version that gave every draw seed 0: its draws now
    # have seeds of their own, so resuming trains all of them beside the old ones.
    out = tmp_path / "out"
    run(study_module.load(tiny, {"random_labels": "0.0"}), out, progress=False, report=False)
    capsys.readouterr()
    other = study_module.load(tiny, {"random_labels": "0.0", "lr": "0.2"})
    run(other, out, progress=False, report=False, console=Console(stderr=True, width=400))
    assert "holds 4 finished runs that this study does not plan" in capsys.readouterr().err
    assert len(open_results(out).runs()) == 8  # both studies' runs, nothing lost
    run(other, out, progress=False, report=False, console=Console(stderr=True, width=400))
    assert "holds 4 finished runs" in capsys.readouterr().err  # said at every run


def test_pack_memory_budget_fills_the_free_gpu_memory_unless_the_study_sets_one(monkeypatch):
    from sensgen.runner import GPU_MEMORY_SHARE, pack_memory_budget
    from sensgen.study import Execution

    free = 40 * 2**30
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda: (free, 80 * 2**30))
    assert pack_memory_budget(Execution(), "cpu") == 4 * 2**30
    assert pack_memory_budget(Execution(), "cuda") == int(GPU_MEMORY_SHARE * free)
    assert pack_memory_budget(Execution(pack_memory_gb=2.0), "cuda") == 2 * 2**30


def test_another_measure_table_over_finished_runs_is_refused(tiny, tmp_path, capsys):
    # A run is measured when it is trained: a changed [measure] would leave the finished
    # runs with their old measurements beside new ones, and DIR/study.toml rewritten.
    out = tmp_path / "out"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    stored = (out / "study.toml").read_text(encoding="utf-8")
    before = open_results(out).runs()
    capsys.readouterr()
    code = _cli(
        "run", str(tiny), "--out", str(out), "--no-progress",
        "--set", "measure.jacobian_train_points=10", "--set", "grid.seed=[0, 1]",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "[measure] differs (jacobian_train_points = " in err and "study.toml --out" in err
    assert (out / "study.toml").read_text(encoding="utf-8") == stored
    after = open_results(out).runs()
    assert len(after) == len(before) and after["finished_at"].equals(before["finished_at"])
    # The stored [measure] with new runs is fine.
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress",
                "--set", "grid.seed=[0, 1]") == 0  # fmt: skip
    assert len(open_results(out).runs()) == 2 * len(before)


def test_another_measure_table_beside_finished_runs_of_another_plan_is_refused(
    tiny, tmp_path, capsys
):
    # A study whose runs are all new (another width) with another [measure]: the finished
    # runs stay, measured otherwise, in the one report. Accepted, it rewrote DIR/study.toml,
    # and the first study, run again, was then refused as "measured as study.toml says".
    out = tmp_path / "out"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    stored = (out / "study.toml").read_text(encoding="utf-8")
    capsys.readouterr()
    code = _cli(
        "run", str(tiny), "--out", str(out), "--no-progress",
        "--set", "width=12", "--set", "measure.jacobian_train_points=10",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "[measure] differs (jacobian_train_points = " in err
    assert (out / "study.toml").read_text(encoding="utf-8") == stored
    assert len(open_results(out).runs()) == N_RUNS
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0


def test_a_machine_that_refuses_a_file_is_a_clear_error(tiny, tmp_path, monkeypatch, capsys):
    # Permissions, a full disk or a file where a folder should be: exit 2 with the file and
    # what to check, not a traceback (exit 1 is for sensgen's own bugs).
    import errno
    import sqlite3

    import sensgen.runner

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    monkeypatch.setenv("SENSGEN_DATA", str(a_file))
    assert _cli("datasets", "fetch", "mnist") == 2
    assert "Not a directory" in capsys.readouterr().err
    monkeypatch.delenv("SENSGEN_DATA")
    failures = [
        OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "w.tmp")),
        sqlite3.OperationalError("attempt to write a readonly database"),
        RuntimeError("Error while serializing: IoError(No space left on device)"),
    ]
    for failure in failures:

        def refuse(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(sensgen.runner, "run", refuse)
        assert _cli("run", str(tiny), "--out", str(tmp_path / "out"), "--no-progress") == 2
        err = capsys.readouterr().err
        assert "what was already computed is kept" in err and "Traceback" not in err
    monkeypatch.setattr(sensgen.runner, "run", lambda *a, **k: 1 / 0)  # a bug stays a bug
    with pytest.raises(ZeroDivisionError):
        main(["run", str(tiny), "--out", str(tmp_path / "out"), "--no-progress"])


def test_a_file_where_a_folder_should_be_and_the_reverse_are_clear_errors(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False, report=False)
    (out / "report").write_text("x")  # DIR/report a file: the report cannot be written
    capsys.readouterr()
    assert _cli("report", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{out / 'report'}" in err and "what was already computed is kept" in err
    (out / "report").unlink()
    (out / "study.toml").unlink()
    (out / "study.toml").mkdir()  # DIR/study.toml a folder: it cannot be written
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"{out / 'study.toml'}" in err and "what was already computed is kept" in err
    assert (open_results(out).runs()["status"] == "done").all()


def test_brackets_in_a_path_are_printed_as_they_are(tiny, tmp_path, capsys):
    out = tmp_path / "br[/red]" / "d [x]"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    assert str(out) in capsys.readouterr().out.replace("\n", "")
    assert _cli("status", str(out)) == 0
    assert "d [x]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("width=true", "width"),
        ("lr=true", "lr"),
        ("measure.transition_ellipses=true", "transition_ellipses"),
        ('inclusion.apply="no"', "apply"),
        ("augment=1", "augment"),
    ],
)
def test_booleans_and_numbers_are_not_mixed(tiny, tmp_path, capsys, setting, field):
    # pydantic read true as 1 and "no" as false: width-1 nets, lr = 1, without a word.
    assert _cli("run", str(tiny), "--out", str(tmp_path / "o"), "--set", setting) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_folder_that_is_not_a_study_is_left_alone(tiny, tmp_path, capsys):
    # Its files matching sensgen's temporary names were deleted, its report overwritten.
    out = tmp_path / "project"
    (out / "report").mkdir(parents=True)
    (out / "draft.tmp-99999").write_text("mine")
    (out / "report" / "index.html").write_text("mine")
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 2
    assert "no study (results.db is missing)" in capsys.readouterr().err
    assert (out / "draft.tmp-99999").read_text() == "mine"
    assert (out / "report" / "index.html").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("run", str(tiny), "--out", str(empty), "--no-progress") == 0


def test_open_runs_of_an_earlier_version_of_the_study_are_named(tiny, tmp_path):
    # An interrupted study, then changed: its open runs that the new one does not plan stay
    # pending, which `status` told the user to finish by running again ("Nothing to do").
    out = _interrupted_plan(tiny, tmp_path / "out")
    smaller = study_module.load(tiny, {"grid.width": "[8]"})
    console = Console(record=True, width=300)
    run(smaller, out, progress=False, report=False, console=console)
    open_runs = (open_results(out).runs()["status"] == "pending").sum()
    assert open_runs > 0
    assert f"holds {open_runs} unfinished runs that this study does not plan" in (
        console.export_text()
    )
    headline = study_status(out).headline()
    assert f"The {open_runs} open runs are not planned by study.toml" in headline
    assert "run it again" not in headline
    # No run of this study trains them: its report is complete, without a banner that a
    # resume could never clear, and says how many it leaves aside.
    from sensgen.analysis import write_report

    index = write_report(out)
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["complete"] and summary["unplanned_open_runs"] == open_runs
    assert "Study incomplete" not in index.read_text()


def test_every_file_of_a_study_gets_the_umasks_mode(tiny, tmp_path):
    out = tmp_path / "out"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    weights = list((out / "weights").glob("*.safetensors"))
    points = list((out / "points").glob("*.parquet"))
    assert weights and points  # (safetensors made its own 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.stat().st_mode & 0o777 for f in weights + points}
    assert modes == {0o666 & ~umask}


def test_an_interrupt_says_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    import sensgen.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sensgen.runner, "run", interrupted)
    assert _cli("run", str(tiny), "--out", str(tmp_path / "o"), "--no-progress") == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_a_failure_of_sensgen_itself_stays_a_traceback(tiny, tmp_path, monkeypatch):
    # A missing file sensgen expected is its own bug (exit 1, traceback), not the machine's.
    import errno

    import sensgen.runner

    def missing(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x.parquet")

    monkeypatch.setattr(sensgen.runner, "run", missing)
    with pytest.raises(FileNotFoundError):
        main(["run", str(tiny), "--out", str(tmp_path / "o"), "--no-progress"])


def test_a_new_folder_holding_only_its_study_file_is_a_study_directory(tiny, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "study.toml").write_text(tiny.read_text())
    assert _cli("run", str(out / "study.toml"), "--out", str(out), "--no-progress") == 0


def test_failed_runs_do_not_hold_the_measure_table(tiny, tmp_path, monkeypatch):
    # They were never measured: lowering what failed (say, for memory) must be allowed.
    def out_of_memory(specs, **kwargs):
        raise RuntimeError("can't allocate memory")

    monkeypatch.setattr("sensgen.execute.execute_pack", out_of_memory)
    out = tmp_path / "o"
    run(study_module.load(tiny), out, progress=False, report=False)
    monkeypatch.undo()
    fewer = study_module.load(tiny, {"measure.jacobian_train_points": "10"})
    assert run(fewer, out, progress=False, report=False).counts == {"done": N_RUNS}


def test_open_runs_sharing_a_pack_with_planned_ones_are_not_called_orphans(tiny, tmp_path):
    out = _interrupted_plan(tiny, tmp_path / "out")
    smaller = study_module.load(tiny, {"random_labels": "0.0"})  # half of every pack
    console = Console(record=True, width=300)
    assert run(smaller, out, progress=False, report=False, console=console).complete
    assert "does not plan" not in console.export_text()
    assert "not planned" not in study_status(out).headline()


def test_a_changed_inclusion_rule_rebuilds_the_report_of_a_finished_study(tiny, tmp_path, capsys):
    # The report reads [inclusion] from DIR/study.toml: `--set inclusion.apply=false` on a
    # finished study rewrote the file, left the report of the old rule and named it.
    out = tmp_path / "out"
    index, models = out / "report" / "index.html", out / "report" / "models.csv"
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress") == 0
    assert len(pd.read_csv(models)) == 0  # no model fits in 40 steps: none qualifies
    capsys.readouterr()
    everyone = ["--set", "inclusion.apply=false"]
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress", *everyone) == 0
    text = capsys.readouterr().out.replace("\n", "")  # (rich wraps long paths)
    assert "Nothing to do" in text and f"Report: {index}" in text
    assert set(pd.read_csv(models)["run_id"]) == set(open_results(out).runs()["run_id"])
    # The same study again: its file and the report are left alone.
    stamps = [p.stat().st_mtime_ns for p in (index, out / "study.toml")]
    assert _cli("run", str(tiny), "--out", str(out), "--no-progress", *everyone) == 0
    assert [p.stat().st_mtime_ns for p in (index, out / "study.toml")] == stamps
    assert f"Report: {index}" in capsys.readouterr().out.replace("\n", "")


def test_a_study_file_newer_than_the_report_makes_it_outdated(tiny, tmp_path):
    # Whatever wrote it (a run killed before its report, an edit): run rewrites the report.
    out = tmp_path / "out"
    run(study_module.load(tiny), out, progress=False)
    index = out / "report" / "index.html"
    os.utime(out / "study.toml", ns=(index.stat().st_mtime_ns + 1,) * 2)
    assert run(study_module.load(tiny), out, progress=False, report=False).report is None
    result = run(study_module.load(tiny), out, progress=False)
    assert (
        result.report == index
        and index.stat().st_mtime_ns > (out / "study.toml").stat().st_mtime_ns
    )


def test_a_run_diverged_after_training_says_which_numbers_broke():
    # A run that trained finite but whose metrics are not (logits beyond float32) was stored
    # with "became non-finite during training", which was untrue.
    import torch

    from sensgen.execute import _divergence
    from sensgen.models import MLP

    net = MLP(4, 3, 5, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.layers[0].weight.fill_(2e30)
    during = _divergence(True, ["train_loss"], net)
    assert during == "loss or parameters became non-finite during training"
    after = _divergence(False, ["train_loss", "jacobian_norm"], net)
    assert "trained with finite losses and parameters (the largest |θ| 2.0e+30)" in after
    assert "its train_loss, jacobian_norm came out non-finite" in after
