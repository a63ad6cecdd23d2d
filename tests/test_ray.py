"""`sensgen run --executor ray` (issue 6): one Ray task per pack, the driver alone stores.

The Ray tests start a local 2-CPU Ray instance (sensgen's own, or one opened by a fixture
that sensgen then reuses) and always shut it down. Worker deaths are real: a task replaced
through `sensgen.ray_executor._pack_task` calls ``os._exit`` inside the worker process
mid-training. Ray pickles that replacement by value (a closure), so the workers need not
import this test module. Without Ray installed, only the missing-Ray test runs.
"""

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sensgen import study as study_module
from sensgen.cli import main
from sensgen.errors import UserError
from sensgen.ray_executor import MAX_RETRIES
from sensgen.runner import run
from sensgen.store import Store, open_results

requires_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (sensgen[ray])"
)

N_TEST = 360  # digits test points
SMALL = """
name = "small"
[base]
dataset = "digits"
optimizer = "sgd"
lr = 0.1
batch_size = 32
width = 32
depth = 1
max_steps = 200
eval_every = 100
stop_at_fit = false
[grid]
seed = [0, 1, 2, 3, 4, 5]
[measure]
jacobian_train_points = 0
[execution]
pack_size = 2
"""
N_SMALL = 6  # 3 packs of 2
METRICS = [
    "steps",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "gap",
    "loss_gap",
    "jacobian_norm",
    "jacobian_norm_logits",
    "jacobian_norm_train",
]


def _cli(*args) -> int:
    """Run the CLI in-process; return its exit code."""
    with pytest.raises(SystemExit) as info:
        main([*args])
        raise SystemExit(0)
    return info.value.code


@pytest.fixture(autouse=True)
def no_ray_left_running():
    """Whatever a test does, no Ray instance outlives it."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_instance():
    """A local 2-CPU Ray instance opened by the caller: sensgen uses it and leaves it open."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    return study_module.load(path)


def _runs(out: Path) -> pd.DataFrame:
    with open_results(out) as results:
        return results.runs().sort_values("run_id").reset_index(drop=True)


def _points(out: Path) -> pd.DataFrame:
    with open_results(out) as results:
        return results.points().sort_values(["run_id", "index"]).reset_index(drop=True)


def _assert_same_results(out: Path, reference: Path) -> None:
    """The same run ids, statuses, metrics (rtol 1e-6) and per-point rows as `reference`."""
    a, b = _runs(out), _runs(reference)
    assert a["run_id"].tolist() == b["run_id"].tolist()
    assert a["status"].tolist() == b["status"].tolist()
    np.testing.assert_allclose(
        a[METRICS].to_numpy(float), b[METRICS].to_numpy(float), rtol=1e-6, equal_nan=True
    )
    pa, pb = _points(out), _points(reference)
    assert len(pa) == len(pb) and not pa.duplicated(["run_id", "index"]).any()
    columns = ["loss", "jacobian_norm", "jacobian_norm_logits", "margin"]
    np.testing.assert_allclose(pa[columns].to_numpy(), pb[columns].to_numpy(), rtol=1e-6)


def _dying_task(marker_dir: str, seed: int, deaths: int):
    """A `_pack_task` whose worker dies mid-training on the first `deaths` attempts at the
    pack holding `seed`; every attempt at that pack appends a line to marker_dir/attempts.

    A closure, so that Ray pickles it by value: it must not name this module's globals.
    """

    def task(specs, device, measure):
        import os
        from pathlib import Path

        import torch

        from sensgen.execute import execute_or_fail

        torch.set_num_threads(1)
        steps = []

        def on_step(_):
            steps.append(1)
            if len(steps) == 50 and 0 < attempt <= deaths:
                os._exit(1)  # the worker process dies as if killed, mid-pack

        attempt = 0
        if any(s.seed == seed for s in specs):
            with (Path(marker_dir) / "attempts").open("a") as log:
                log.write(f"pid {os.getpid()}\n")
            attempt = len((Path(marker_dir) / "attempts").read_text().splitlines())
        return execute_or_fail(specs, device=device, measure=measure, on_step=on_step)

    return task


def _attempts(marker_dir: Path) -> list[str]:
    return (marker_dir / "attempts").read_text().splitlines()


@requires_ray
@pytest.mark.slow
def test_ray_matches_the_local_executor_on_the_quickstart(tmp_path):
    """The quickstart preset, shrunk to 200 steps per model (not 3,000) and one learning rate
    (0.001; 16 models in 8 packs of 2), run with the local executor (--workers 2: one-thread
    processes) and with --executor ray on sensgen's own local 2-CPU Ray instance: the same
    run ids, statuses, metrics and per-point rows; Ray is shut down afterwards."""
    import ray

    sets = ["--set", "base.max_steps=200", "--set", "grid.lr=[0.001]"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    study = study_module.load("quickstart", {"base.max_steps": "200", "grid.lr": "[0.001]"})
    reference = run(study, local, workers=2, progress=False, report=False)
    assert reference.counts == {"done": 16}
    args = ["run", "quickstart", "--out", str(on_ray), "--executor", "ray", "--workers", "2"]
    assert _cli(*args, *sets, "--no-progress") == 0
    assert not ray.is_initialized()  # the instance sensgen started is gone
    _assert_same_results(on_ray, local)
    assert (on_ray / "report" / "index.html").is_file()
    packs = sorted(p.name for p in (local / "weights").glob("*.safetensors"))
    assert sorted(p.name for p in (on_ray / "weights").glob("*.safetensors")) == packs
    assert _cli(*args, *sets, "--no-progress") == 0  # resume: nothing left to do
    assert len(_runs(on_ray)) == 16


@requires_ray
@pytest.mark.slow
def test_a_worker_killed_mid_pack_is_retried_and_nothing_is_lost(
    small, tmp_path, ray_instance, monkeypatch
):
    reference = tmp_path / "reference"
    run(small, reference, workers=2, progress=False, report=False)
    marker = tmp_path / "marker"
    marker.mkdir()
    monkeypatch.setattr("sensgen.ray_executor._pack_task", _dying_task(str(marker), 0, 1))
    out = tmp_path / "out"
    result = run(small, out, executor="ray", workers=2, progress=False, report=False)
    assert len(_attempts(marker)) == 2  # killed once, then finished by Ray's retry
    assert len(set(_attempts(marker))) == 2  # in two different worker processes
    assert result.n_trained == N_SMALL and result.counts == {"done": N_SMALL}
    _assert_same_results(out, reference)
    assert len(_points(out)) == N_SMALL * N_TEST
    assert ray_instance.is_initialized()  # the caller's session is left open


@requires_ray
@pytest.mark.slow
def test_a_pack_whose_worker_always_dies_fails_and_the_others_finish(
    small, tmp_path, ray_instance, monkeypatch
):
    marker = tmp_path / "marker"
    marker.mkdir()
    task = _dying_task(str(marker), 0, deaths=MAX_RETRIES + 1)
    monkeypatch.setattr("sensgen.ray_executor._pack_task", task)
    out = tmp_path / "out"
    result = run(small, out, executor="ray", workers=2, progress=False, report=False)
    assert len(_attempts(marker)) == MAX_RETRIES + 1
    assert result.counts == {"done": N_SMALL - 2, "failed": 2} and result.complete
    runs = _runs(out)
    failed = runs[runs["status"] == "failed"]
    assert sorted(failed["seed"]) == [0, 1]  # the pack holding seed 0: seeds 0 and 1
    for message in failed["error"]:
        assert message.startswith("WorkerLost: the Ray worker training this pack died")
        assert f"each of its {MAX_RETRIES + 1} attempts" in message
    assert failed["test_acc"].isna().all()
    done = runs[runs["status"] == "done"]
    measured = [m for m in METRICS if m != "jacobian_norm_train"]  # 0 train points: NaN
    assert np.isfinite(done[measured].to_numpy(float)).all()
    assert set(_points(out)["run_id"]) == set(done["run_id"])


@requires_ray
@pytest.mark.slow
def test_an_interrupted_ray_run_resumes_to_the_same_results(
    small, tmp_path, ray_instance, monkeypatch
):
    """Ctrl-C right after the first pack is stored: the pack in flight is cancelled and left
    `running`, the next run re-queues it (as after a crash) and the results are complete."""
    reference = tmp_path / "reference"
    run(small, reference, workers=2, progress=False, report=False)
    finish_pack = Store.finish_pack

    def finish_then_interrupt(self, *args, **kwargs):
        finish_pack(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "finish_pack", finish_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(small, out, executor="ray", workers=2, progress=False, report=False)
    monkeypatch.setattr(Store, "finish_pack", finish_pack)
    statuses = _runs(out)["status"].value_counts().to_dict()
    assert statuses == {"done": 2, "running": 2, "pending": 2}  # 2 slots, 3 packs of 2
    result = run(small, out, executor="ray", workers=2, progress=False, report=False)
    assert result.n_trained == N_SMALL - 2 and result.counts == {"done": N_SMALL}
    _assert_same_results(out, reference)


def _probe_that(outcome: str):
    """A `_probe` for the workers: 'missing' fails to import sensgen, else reports `outcome`."""

    def probe():
        if outcome == "missing":
            raise ModuleNotFoundError("No module named 'sensgen'")
        return outcome

    return probe


@requires_ray
@pytest.mark.slow
def test_workers_without_sensgen_or_with_another_version_are_refused(
    small, tmp_path, ray_instance, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.setattr("sensgen.ray_executor._probe", _probe_that("missing"))
    with pytest.raises(UserError, match=r"cannot run sensgen \(ModuleNotFoundError: No module"):
        run(small, out, executor="ray", progress=False, report=False)
    monkeypatch.setattr("sensgen.ray_executor._probe", _probe_that("0.0.0"))
    with pytest.raises(UserError, match=r"workers run sensgen 0\.0\.0, this driver"):
        run(small, out, executor="ray", progress=False, report=False)
    assert set(_runs(out)["status"]) == {"pending"}  # no pack was handed out


@requires_ray
def test_an_unreachable_ray_address_exits_2_without_starting_ray(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens on port 1
    study = tmp_path / "small.toml"
    study.write_text(SMALL, encoding="utf-8")
    assert _cli("run", str(study), "--out", str(tmp_path / "out"), "--executor", "ray") == 2
    err = capsys.readouterr().err
    assert "RAY_ADDRESS='127.0.0.1:1'" in err and "ray start --head" in err
    assert not ray.is_initialized()
    assert set(_runs(tmp_path / "out")["status"]) == {"pending"}


def test_missing_ray_exits_2_with_the_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    assert _cli("run", "quickstart", "--out", str(out), "--executor", "ray") == 2
    err = capsys.readouterr().err
    assert "pip install 'sensgen[ray]'" in err and "--executor local" in err
    assert not out.exists()  # refused before anything is written
