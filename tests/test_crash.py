"""Crash safety of `sensgen run` (issue 4, items 6 and 7): kill -9, resume, compare.

A real `sensgen run` subprocess is SIGKILLed at several points (after its first pack, at a
seeded random moment, and once in `--workers 2` mode), then run again to completion. The
study directory must then hold every run exactly once, no temporary file, a sound database,
one per-point row per (run, test point), and the very numbers of an uninterrupted run.

The subprocesses run with OMP_NUM_THREADS=1: on a loaded 2-core machine a multi-threaded
PyTorch slows to a crawl, and 1 thread gives the same numbers for these small models (the
reference run uses 1 thread too, so the comparison is exact either way).
"""

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sensgen import study as study_module
from sensgen.cli import main
from sensgen.execute import execute_pack
from sensgen.runner import run
from sensgen.store import PlannedRun, RunResult, Store, open_results
from sensgen.study_dir import study_status

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL and /proc")

N_TEST = 360  # digits test points
# Runs of the crash study: 12 packs of 2, about 0.5 s each on one thread. Packs must take
# long enough that the kill moments below (up to 1 s after a pack) leave packs to run.
SEEDS = 24
CRASH = f"""
name = "crash"
[base]
dataset = "digits"
optimizer = "sgd"
lr = 0.1
batch_size = 32
width = 32
depth = 1
max_steps = 2000
eval_every = 1000
stop_at_fit = false
[grid]
seed = {list(range(SEEDS))}
[measure]
jacobian_train_points = 0
[execution]
pack_size = 2
"""
METRICS = [
    "steps",
    "n_params",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "gap",
    "loss_gap",
    "jacobian_norm",
    "jacobian_norm_logits",
]


@pytest.fixture
def crash_study(tmp_path):
    path = tmp_path / "crash.toml"
    path.write_text(CRASH, encoding="utf-8")
    return path


@pytest.fixture
def one_thread():
    """Run in-process training with one torch thread, as the subprocesses do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _start(study: Path, out: Path, *args: str) -> subprocess.Popen:
    """`sensgen run STUDY --out OUT --no-progress ARGS` as a subprocess, logging to OUT.log."""
    log = open(out.with_suffix(".log"), "ab")  # noqa: SIM115 (closed by _finish)
    command = [sys.executable, "-m", "sensgen.cli", "run", str(study), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "--no-progress", *args], stdout=log, stderr=log, env=env)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, *, kill: bool) -> int:
    if kill:
        proc.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=600)
    proc.log.close()
    return code


def _kill_while_running(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run ended before the kill: make the study longer"
    _finish(proc, kill=True)


def _done(out: Path) -> int:
    """Done rows, read through a read-only connection (0 before the table exists)."""
    db = out / "results.db"
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for_done(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 300) -> bool:
    """Poll until `at_least` runs are done; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while _done(out) < at_least:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no progress: {out.with_suffix('.log').read_text()}"
        time.sleep(0.02)
    return True


def _workers_of(pid: int) -> list[int]:
    """Pids of the spawned pool workers whose parent is `pid`."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # an unreaped zombie has exited


def _integrity(out: Path) -> str:
    conn = sqlite3.connect(f"{(out / 'results.db').as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _check_consistent(out: Path) -> pd.DataFrame:
    """What must hold after any crash: a sound db and complete files for every done run."""
    assert _integrity(out) == "ok"
    with open_results(out) as results:
        runs, points = results.runs(), results.points()
    assert runs["run_id"].is_unique and len(runs) in (0, SEEDS)
    n_done = int((runs["status"] == "done").sum())
    assert len(points) == n_done * N_TEST
    assert not points.duplicated(["run_id", "index"]).any()
    return runs


def test_kill_9_at_several_points_then_resume_equals_an_uninterrupted_run(
    crash_study, tmp_path, one_thread
):
    rng = random.Random(1804)  # seeds the kill moments
    reference = tmp_path / "reference"
    run(study_module.load(crash_study), reference, progress=False, report=False)
    out = tmp_path / "out"

    # 0. At a seeded random moment of start-up: creating the store, registering the runs.
    proc = _start(crash_study, out)
    time.sleep(rng.uniform(0.5, 3.0))
    _finish(proc, kill=True)
    if (out / "results.db").exists():  # its schema and runs may or may not be there yet
        assert _integrity(out) == "ok"

    # 1. Right after the first pack is stored.
    proc = _start(crash_study, out)
    assert _wait_for_done(proc, out, 1)
    _kill_while_running(proc)
    done = len(_check_consistent(out).query("status == 'done'"))
    assert 0 < done < SEEDS

    # 2. At a seeded random moment after the next pack: mid-pack or mid-write.
    proc = _start(crash_study, out)
    assert _wait_for_done(proc, out, done + 1)
    time.sleep(rng.uniform(0.0, 1.0))
    _kill_while_running(proc)
    done = len(_check_consistent(out).query("status == 'done'"))

    # 3. With two worker processes: the driver dies, its orphaned workers must exit too.
    proc = _start(crash_study, out, "--workers", "2")
    assert _wait_for_done(proc, out, done + 1)
    summary = study_status(out)
    assert summary.workers == 2
    assert summary.counts["running"] <= 2 * 2  # at most one pack per worker in flight
    workers = _workers_of(proc.pid)
    assert workers, "the pool's worker processes were not found"
    time.sleep(rng.uniform(0.0, 0.3))
    _kill_while_running(proc)
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers), "orphaned workers kept running"
    _check_consistent(out)

    # 4. Resume to the end.
    assert _finish(_start(crash_study, out), kill=False) == 0, out.with_suffix(".log").read_text()
    runs = _check_consistent(out).set_index("run_id")
    assert len(runs) == SEEDS and (runs["status"] == "done").all()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert (out / "report" / "index.html").exists()
    raw = pd.concat(pd.read_parquet(p) for p in (out / "points").glob("*.parquet"))
    assert len(raw) == SEEDS * N_TEST and not raw.duplicated(["run_id", "index"]).any()

    expected = _runs(reference).set_index("run_id")
    assert sorted(runs.index) == sorted(expected.index)
    for column in METRICS:
        np.testing.assert_allclose(
            runs.loc[expected.index, column].astype(float),
            expected[column].astype(float),
            rtol=1e-12,
            atol=1e-12,
            err_msg=column,
        )
    _assert_same_points(out, reference)
    _assert_same_weights(out, reference)


def _runs(out: Path) -> pd.DataFrame:
    with open_results(out) as results:
        return results.runs()


def _points(out: Path) -> pd.DataFrame:
    with open_results(out) as results:
        return results.points()


def _assert_same_points(a: Path, b: Path) -> None:
    key = ["run_id", "index"]
    left = _points(a).sort_values(key, ignore_index=True)
    right = _points(b).sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=1e-12, atol=1e-12)


def _assert_same_weights(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (b / "weights").glob("*.safetensors"))
    assert names and names == sorted(p.name for p in (a / "weights").glob("*.safetensors"))
    for name in names:
        left, right = load_file(a / "weights" / name), load_file(b / "weights" / name)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), key


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main([*args])
        raise SystemExit(0)
    return info.value.code


def _status_counts(text: str) -> dict[str, int]:
    """The counts of `sensgen status`'s headline ('24 runs: 20 pending, 2 running, ...')."""
    headline = re.search(r"\d+ runs: ((?:\d+ [a-z]+(?:, )?)+)", " ".join(text.split()))
    assert headline, text
    return {s: int(n) for n, s in re.findall(r"(\d+) ([a-z]+)", headline.group(1))}


def test_status_while_a_run_is_in_progress_and_after_it_is_killed(crash_study, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start(crash_study, out)
    try:
        assert _wait_for_done(proc, out, 1)
        assert _cli("status", str(out)) == 0  # the WAL reader neither blocks nor errors
        during = capsys.readouterr().out
        assert proc.poll() is None, "the run ended before `status` could watch it"
    finally:
        _finish(proc, kill=True)
    counts = _status_counts(during)
    assert sum(counts.values()) == SEEDS and counts["done"] >= 2 and counts["pending"] > 0
    assert counts["running"] <= 2  # one pack of 2 at a time
    assert "ETA" in during and "No `sensgen run`" not in during

    assert _cli("status", str(out)) == 0
    after = " ".join(capsys.readouterr().out.split())
    assert "No `sensgen run` is working on this directory" in after
    assert sum(_status_counts(after).values()) == SEEDS


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_stops_the_run_as_ctrl_c_does_and_it_resumes(crash_study, tmp_path, workers):
    # A scheduler's stop (SIGTERM) killed the driver at once: no word, its workers left to
    # notice they were orphaned, and the resource tracker warning of leaked semaphores.
    out = tmp_path / "out"
    proc = _start(crash_study, out, "--workers", workers)
    assert _wait_for_done(proc, out, 2)
    pool = _workers_of(proc.pid)
    assert len(pool) == (2 if workers == "2" else 0)
    proc.send_signal(signal.SIGTERM)
    code = _finish(proc, kill=False)
    log = out.with_suffix(".log").read_text()
    assert code == 128 + signal.SIGTERM, log
    assert "terminated (SIGTERM): finished packs are kept" in log
    assert "leaked" not in log and "Traceback" not in log, log
    assert not any(_running(pid) for pid in pool)
    runs = _check_consistent(out)
    assert 2 <= (runs["status"] == "done").sum() < SEEDS
    assert _finish(_start(crash_study, out), kill=False) == 0  # resumes, re-queueing `running`
    assert (_check_consistent(out)["status"] == "done").all()


DIVERGING = """
name = "diverging"
[base]
dataset = "digits"
optimizer = "sgd"
batch_size = 32
width = 16
depth = 4
max_steps = 40
eval_every = 20
[grid]
lr = [0.1, 100.0]
[measure]
jacobian_train_points = 0
"""


def test_a_diverging_model_inside_a_pack_is_recorded_and_the_others_finish(tmp_path, capsys):
    path = tmp_path / "diverging.toml"
    path.write_text(DIVERGING, encoding="utf-8")
    out = tmp_path / "out"
    assert _cli("run", str(path), "--out", str(out), "--no-progress") == 0
    assert (out / "report" / "index.html").exists()
    runs = _runs(out).set_index("lr")
    assert runs["pack_id"].nunique() == 1  # both models trained together
    assert runs.loc[100.0, "status"] == "diverged"
    assert "non-finite" in runs.loc[100.0, "error"]
    assert runs.loc[0.1, "status"] == "done" and pd.isna(runs.loc[0.1, "error"])
    # The NaNs next door did not touch the healthy model: it ends as with a healthy
    # neighbour instead, to float rounding (the diverged model leaves the pack at the first
    # check, and the healthy one trains on in a pack of one, whose products round alike).
    spec = next(s for s in study_module.load(path).specs() if s.lr == 0.1)
    calm = execute_pack([spec, spec.model_copy(update={"lr": 0.01})]).results[0].metrics
    for column in METRICS:
        assert runs.loc[0.1, column] == pytest.approx(calm[column], rel=1e-6, abs=1e-9)


SMALL = """
name = "small"
[base]
dataset = "digits"
optimizer = "momentum"
lr = 0.05
batch_size = 64
width = 16
depth = 2
max_steps = 60
eval_every = 30
[grid]
seed = [0, 1]
random_labels = [0.0, 0.5]
[measure]
jacobian_train_points = 0
[execution]
pack_size = 2
"""


@pytest.fixture
def small_study(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    return path


def test_the_same_study_twice_gives_identical_results(small_study, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run(study_module.load(small_study), out, progress=False, report=False)
    left = _runs(a).set_index("run_id").sort_index()
    right = _runs(b).set_index("run_id").sort_index()
    assert len(left) == 4 and (left["status"] == "done").all()
    pd.testing.assert_frame_equal(left[METRICS], right[METRICS], check_exact=True)
    key = ["run_id", "index"]
    pd.testing.assert_frame_equal(
        _points(a).sort_values(key, ignore_index=True),
        _points(b).sort_values(key, ignore_index=True),
        check_exact=True,
    )
    _assert_same_weights(a, b)


def test_a_worker_process_runs_one_torch_thread():
    from sensgen.parallel import worker_pool

    with worker_pool(1) as pool:
        assert pool.submit(torch.get_num_threads).result(timeout=120) == 1


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_leftovers_of_a_killed_driver_are_cleaned_and_a_stale_report_rewritten(
    small_study, tmp_path
):
    out = tmp_path / "out"
    run(study_module.load(small_study), out, progress=False)
    index = out / "report" / "index.html"
    dead, alive = _dead_pid(), os.getpid()
    leftovers = [
        out / f".study.toml.tmp-{dead}",
        out / "points" / f"abc.parquet.tmp-{dead}",
        out / "weights" / f"abc.safetensors.tmp-{dead}",
        out / "report" / f".index.html.{dead}.0123abcd.tmp",
    ]
    in_use = out / "report" / f".summary.json.{alive}.0123abcd.tmp"  # a live writer's
    for path in [*leftovers, in_use]:
        path.write_text("partial", encoding="utf-8")
    # A driver killed while writing the report of newly finished runs: an older index.
    os.utime(index, (0, 0))
    result = run(study_module.load(small_study), out, progress=False)
    assert result.n_trained == 0
    assert not any(p.exists() for p in leftovers) and in_use.exists()
    assert index.stat().st_mtime > 0  # rewritten
    mtime = index.stat().st_mtime_ns
    run(study_module.load(small_study), out, progress=False)
    assert index.stat().st_mtime_ns == mtime  # an up-to-date report is left alone


def test_status_eta_ignores_failed_packs_and_counts_workers(tmp_path):
    with Store.open(tmp_path) as store:  # three packs of two runs
        store.add_runs(PlannedRun(f"r{i}", f"p{i // 2}", "{}") for i in range(6))
        store.finish_pack("p0", [RunResult(f"r{i}", "done", {"wall_s": 10.0}) for i in (0, 1)])
        store.finish_pack("p1", [RunResult(f"r{i}", "failed", {}, "boom") for i in (2, 3)])
    summary = study_status(tmp_path)
    assert summary.workers is None and summary.eta_s == pytest.approx(20.0)  # one open pack
    assert "No `sensgen run`" in summary.headline()
    (tmp_path / ".lock").write_text(f"{os.getpid()} 2\n", encoding="utf-8")  # a live driver
    summary = study_status(tmp_path)  # (one open pack: the second worker cannot help)
    assert summary.workers == 2 and summary.eta_s == pytest.approx(20.0)
    assert "ETA 0.3 min" in summary.headline()
    with Store.open(tmp_path) as store:  # two more open packs: two run at once
        store.add_runs(PlannedRun(f"r{i}", f"p{i // 2}", "{}") for i in range(6, 10))
    assert study_status(tmp_path).eta_s == pytest.approx(3 * 20.0 / 2)
    (tmp_path / ".lock").write_text(f"{os.getpid()} 1000000\n", encoding="utf-8")
    assert study_status(tmp_path).eta_s == pytest.approx(20.0)  # not 60 / 10⁶
    (tmp_path / ".lock").write_text(f"{_dead_pid()} 2\n", encoding="utf-8")  # a killed one
    assert study_status(tmp_path).workers is None


def _interrupt_long_run(tmp_path, monkeypatch, inspect) -> tuple[Path, float]:
    """Run a long study (2 packs of minutes each) with 2 workers, and interrupt its driver
    (KeyboardInterrupt) 3 s into training, after `inspect(processes)` looks at the pool's
    worker processes. Returns the study directory and the seconds the run took."""
    import sensgen.parallel as parallel

    pools = []

    def recording_pool(workers):
        pools.append(real_pool(workers))
        return pools[-1]

    def interrupted_wait(futures, return_when):
        time.sleep(3)  # the workers are training by now
        inspect(list(pools[0]._processes.values()))
        raise KeyboardInterrupt

    real_pool = parallel.worker_pool
    monkeypatch.setattr(parallel, "worker_pool", recording_pool)
    monkeypatch.setattr(parallel, "wait", interrupted_wait)
    path = tmp_path / "long.toml"
    path.write_text(
        'name = "long"\n[base]\ndataset = "digits"\nmax_steps = 1000000\neval_every = 1000000\n'
        "stop_at_fit = false\n[grid]\nwidth = [8, 16]\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run(study_module.load(path), out, workers=2, progress=False, report=False)
    return out, time.perf_counter() - start


def test_an_interrupted_driver_stops_its_workers_at_once(tmp_path, monkeypatch):
    # `kill -INT` to the driver alone: leaving the pool waited for every pack in flight
    # (here minutes of training) and then dropped their results. Now the workers stop at
    # once, and their packs stay `running` for the next run to re-queue.
    workers = []
    out, seconds = _interrupt_long_run(tmp_path, monkeypatch, workers.extend)
    assert seconds < 60  # (the packs alone would take many minutes)
    assert len(workers) == 2 and not any(w.is_alive() for w in workers)
    assert set(open_results(out).runs()["status"]) == {"running"}


def _blocked_signals(pid: int) -> int:
    """The SigBlk mask of process `pid` (bit n − 1 set: signal n blocked)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)


def test_workers_are_spawned_deaf_to_a_terminal_s_ctrl_c(tmp_path, monkeypatch):
    # A terminal's Ctrl-C signals the whole process group: a worker still importing torch
    # printed its own KeyboardInterrupt traceback (or "Fatal Python error: init_import_site")
    # beside the driver's resume message. The workers now start with SIGINT blocked, and
    # the driver, which stops them, keeps its own mask.
    seen = {}

    def signal_workers(processes):
        for process in processes:
            os.kill(process.pid, signal.SIGINT)  # a worker's share of a Ctrl-C
        time.sleep(1)
        seen["masks"] = [_blocked_signals(process.pid) for process in processes]
        seen["alive"] = [process.is_alive() for process in processes]
        seen["driver"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    _interrupt_long_run(tmp_path, monkeypatch, signal_workers)
    sigint = 1 << (signal.SIGINT - 1)
    assert len(seen["masks"]) == 2 and all(mask & sigint for mask in seen["masks"])
    assert seen["alive"] == [True, True]  # (SIGINT would have ended a pack with a traceback)
    assert signal.SIGINT not in seen["driver"]


def test_spawning_without_signal_masks_goes_ahead(monkeypatch):
    # Windows has no signal masks: the pool must still spawn there, deaf or not.
    import sensgen.parallel as parallel

    monkeypatch.delattr(signal, "pthread_sigmask")
    with parallel._spawned_deaf_to_sigint():
        spawned = True
    assert spawned
