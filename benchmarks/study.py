"""End-to-end study benchmark: models per hour, peak memory and scaling (issue 8).

Run from the repository root:

    python benchmarks/study.py              # full run, about 1.5 hours on 2 CPU cores
    python benchmarks/study.py --quick      # smoke run, about 2 minutes on 2 busy cores
    python benchmarks/study.py --models 16,32,64 --workers 1,2   # choose the runs

The reference study: 64 MLPs on a fixed 10,000-image Fashion-MNIST subset, widths 256 and
512 × depths 2 and 3 × optimisers adam and rmsprop × 8 random draws of learning rate and
init scale (8 packs of 8 models), each trained to 100% training accuracy (checked every 250
steps) or 6,000 steps, with every per-model metric of the fig5-correlation preset (Jbar on
1,000 training points, exact transitions on 4 ellipses of a 1,200-gon, all generalization
measures). Each measurement builds the study with `sensgen.study.Study`, runs it with
`sensgen.runner.run` into a fresh temporary directory, in a fresh child process (so its
wall time and peak memory are its own), and reads the models back with
`sensgen.open_results`. One run prints:

1. The reference study at each worker count: wall seconds, models per hour, how many models
   reached 100% training accuracy, peak RSS (the driver, the largest worker process, and
   all of them together, sampled every 0.2 s) and the size of the study directory.
2. Time against the number of models at one worker (16, 32, 64: the first draws of the
   same random search, so the 8 packs grow with the count): seconds per model and its ratio
   to the smallest run's.
3. Time against the number of workers (1, 2 and the CPU count if larger): speed-up over
   the fewest workers, and that speed-up per worker.

There are no absolute targets: the ratios are against baselines measured in the same run.
A run of the largest study is shared by tables 1 to 3. One worker trains in the driver
process with all of PyTorch's threads, more workers with one thread each (README, "Command
line"), so set OMP_NUM_THREADS=1 to compare worker counts at one thread per process.
Training stops per model at 100% training accuracy, so times depend on how fast the drawn
configurations fit, not only on their number. Everything is seeded; each configuration is
timed once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

import sensgen
from _report import cpu_model, table
from sensgen.study import Study

SEED = 0
# Log-uniform. The fig5 preset's draws near 1e-4 left 10,000 images unfitted at 6,000 steps;
# at 5e-4 to 7e-4 its width-512 depth-2 MLPs fitted in 5,000 steps (width 128: mostly not).
LR_RANGE = (4e-4, 1.5e-3)
OPTIMIZERS = ("adam", "rmsprop")  # a grid axis: every shape × optimizer is one pack
TRANSITION_SIDES = 1200  # paper §3 Study 4
SAMPLE_INTERVAL_S = 0.2  # how often the child sums the RSS of its process tree
_CHILD_FLAG = "--study-child"


class Config(NamedTuple):
    """Sizes of one benchmark run."""

    train_subset: int  # Fashion-MNIST training images (a fixed subset)
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    models: tuple[int, ...]  # study sizes at one worker; the largest is the reference study
    workers: tuple[int, ...]  # worker counts for the reference study (cpu_count is added)
    max_steps: int
    eval_every: int
    jacobian_train_points: int
    transition_ellipses: int
    generalization_measures: bool


FULL = Config(10_000, (256, 512), (2, 3), (16, 32, 64), (1, 2), 6000, 250, 1000, 4, True)
QUICK = Config(1_000, (64, 128), (1, 2), (8, 16), (1, 2), 500, 100, 200, 1, False)


class Measurement(NamedTuple):
    """What the child reports about one study run (bytes and seconds)."""

    models: int
    workers: int
    wall_s: float  # sensgen.runner.run, start to end
    pack_s: float  # sum of the packs' own wall times (training + measuring)
    packs: int
    done: int
    fit: int  # models at 100% training accuracy
    mean_steps: float
    driver_rss: int  # peak RSS of the driver process
    worker_rss: int  # peak RSS of the largest worker process (0: none)
    tree_rss: int  # peak of the summed RSS of the driver and its workers (sampled)
    disk: int  # size of the study directory
    work: str  # digest of every run's id and step count: equal digests, equal training work


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, about 2 minutes")
    parser.add_argument("--models", type=_counts, metavar="N,N,...", help="study sizes")
    parser.add_argument("--workers", type=_counts, metavar="W,W,...", help="worker counts")
    parser.add_argument(_CHILD_FLAG, metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.study_child is not None:
        request = json.loads(args.study_child)
        config = Config(**{k: _tuple(v) for k, v in request["config"].items()})
        print(json.dumps(_study_child(config, request["models"], request["workers"])._asdict()))
        return
    config = QUICK if args.quick else FULL
    workers = args.workers or tuple(sorted({*config.workers, os.cpu_count() or 1}))
    config = config._replace(models=args.models or config.models, workers=workers)
    cells = len(config.widths) * len(config.depths) * len(OPTIMIZERS)
    if any(n % cells for n in config.models):
        parser.error(f"--models: each count must be a multiple of {cells} (one pack per shape)")
    run(config)


def run(config: Config) -> None:
    """Run every measurement in its own child process and print the tables."""
    start = time.perf_counter()
    reference, single = max(config.models), min(config.workers)
    print(
        f"sensgen study benchmark: torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads (one worker; more workers: 1 thread each)\n"
        f"CPU: {cpu_model()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)\n"
        f"study: {_describe(config)}"
    )
    wanted = [(n, single) for n in sorted(config.models)]
    wanted += [(reference, w) for w in config.workers if (reference, w) not in wanted]
    results: dict[tuple[int, int], Measurement] = {}
    for i, (models, workers) in enumerate(wanted):
        print(f"  [{i + 1}/{len(wanted)}] {models} models, {workers} worker(s) ...", end=" ")
        sys.stdout.flush()
        m = results[models, workers] = measure(config, models, workers)
        print(  # as it comes, so that a run stopped early still tells something
            f"{m.wall_s:.1f} s, {m.models / m.wall_s * 3600:.1f} models/h, {m.fit} fit, "
            f"{m.mean_steps:.0f} steps per model, peak RSS {_mib(m.tree_rss)} MiB"
        )
    by_workers = [results[reference, w] for w in config.workers]
    table(f"1. Reference study: {reference} models, end to end", table_reference(by_workers))
    by_models = [results[n, single] for n in sorted(config.models)]
    table(f"2. Time against the number of models ({single} worker(s))", table_models(by_models))
    table(f"3. Time against the number of workers ({reference} models)", table_workers(by_workers))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


def build_study(config: Config, models: int) -> Study:
    """The benchmark's study with `models` runs: width × depth × optimizer, each with the
    first `models / 8` draws of one seeded random search over lr and init scale."""
    cells = len(config.widths) * len(config.depths) * len(OPTIMIZERS)
    study = Study(
        name=f"benchmark-study-{models}",
        description="benchmarks/study.py: end-to-end time and memory of a reference study.",
        base={
            "dataset": "fashion_mnist",
            "train_subset": config.train_subset,
            "nonlinearity": "relu",
            "batch_size": 128,
            "max_steps": config.max_steps,
            "eval_every": config.eval_every,
            "stop_at_fit": True,
            "seed": SEED,
        },
        grid={
            "width": list(config.widths),
            "depth": list(config.depths),
            "optimizer": list(OPTIMIZERS),
        },
        sample={
            "n": models // cells,
            "seed": SEED,
            "lr": {"log_uniform": list(LR_RANGE)},
            "init_scale": [1.0, 2.0],
        },
        measure={
            "jacobian_train_points": config.jacobian_train_points,
            "transition_ellipses": config.transition_ellipses,
            "transition_sides": TRANSITION_SIDES,
            "generalization_measures": config.generalization_measures,
        },
    )
    if len(study.specs()) != models:
        raise ValueError(f"the study has {len(study.specs())} runs, not {models}")
    return study


def measure(config: Config, models: int, workers: int) -> Measurement:
    """Run `_study_child` in a fresh interpreter, so its time and memory are its own."""
    request = json.dumps({"config": config._asdict(), "models": models, "workers": workers})
    command = [sys.executable, __file__, _CHILD_FLAG, request]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"study child failed ({done.returncode}):\n{done.stderr}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def _study_child(config: Config, models: int, workers: int) -> Measurement:
    """In the child: run the study into a fresh temporary directory and read it back."""
    torch.manual_seed(SEED)
    study = build_study(config, models)
    out = Path(tempfile.mkdtemp(prefix="sensgen-bench-study-"))
    sampler = _TreeSampler(os.getpid())
    try:
        sampler.start()
        result = sensgen.run(study, out, workers=workers, progress=False, report=False)
        sampler.stop()
        if not result.complete:
            raise RuntimeError(f"the study did not finish: {result.counts}")
        with sensgen.open_results(out) as store:
            runs = store.runs()
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    finally:
        sampler.stop()
        shutil.rmtree(out, ignore_errors=True)
    kib = 1024  # ru_maxrss is in KiB on Linux
    steps = [int(s) for s in runs["steps"].fillna(0)]
    return Measurement(
        models=len(runs),
        workers=workers,
        wall_s=result.wall_s,
        pack_s=float(runs["wall_s"].sum()),  # per-run wall_s is its pack's time / pack size
        packs=int(runs["pack_id"].nunique()),
        done=int((runs["status"] == "done").sum()),
        fit=int((runs["train_acc"] >= 1.0).sum()),
        mean_steps=float(sum(steps) / len(steps)),
        driver_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        worker_rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
        tree_rss=sampler.peak,
        disk=disk,
        work=_digest(sorted(zip(runs["run_id"], steps, strict=True))),
    )


class _TreeSampler:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, root: int) -> None:
        self.root, self.peak = root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, _tree_rss(self.root))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return


def _tree_rss(root: int) -> int:
    """Summed resident set size of `root` and its descendants now, in bytes (Linux /proc)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # the process ended meanwhile
        pid = int(entry.name)
        parent[pid], rss[pid] = int(fields[1]), int(fields[21])  # ppid, rss in pages
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid not in tree:
            tree.add(pid)
            frontier += children.get(pid, [])
    total = sum(rss.get(p, 0) for p in tree)
    return total * resource.getpagesize()


def table_reference(rows: list[Measurement]) -> list[tuple[str, str]]:
    """Table 1: the reference study at each worker count."""
    header = (
        f"{'models':>6} {'wall s':>8} {'models/h':>9} {'fit 100%':>9} {'driver':>7} "
        f"{'worker':>7} {'all':>7} {'disk':>7}"
    )
    lines = [("workers", header)]
    for m in rows:
        worker = _mib(m.worker_rss) if m.workers > 1 else "-"
        lines.append(
            (
                f"{m.workers}",
                f"{m.models:>6} {m.wall_s:>8.1f} {m.models / m.wall_s * 3600:>9.1f} "
                f"{f'{m.fit}/{m.models}':>9} {_mib(m.driver_rss):>7} {worker:>7} "
                f"{_mib(m.tree_rss):>7} {_mib(m.disk):>7}",
            )
        )
    first = rows[0]
    lines += [
        ("", "peak RSS and disk in MiB; 'all' sums the processes (sampled every 0.2 s)"),
        ("packs, mean steps", f"{first.packs} packs, {first.mean_steps:.0f} steps per model"),
        (
            "time in packs",
            ", ".join(
                f"{m.pack_s:.1f} s at {m.workers} worker(s) ({m.pack_s / m.wall_s:.2f}x wall)"
                for m in rows
            ),
        ),
        ("models done (not diverged)", ", ".join(f"{m.done}/{m.models}" for m in rows)),
        (
            "same steps per model",
            "yes, at every worker count"
            if len({m.work for m in rows}) == 1
            else "NO: the worker counts did different work (threads change the arithmetic)",
        ),
    ]
    return lines


def table_models(rows: list[Measurement]) -> list[tuple[str, str]]:
    """Table 2: time against the number of models, per-model time against the smallest."""
    base = rows[0].wall_s / rows[0].models
    header = f"{'packs':>5} {'wall s':>8} {'s/model':>8} {'ratio':>6} {'steps':>6} {'fit 100%':>9}"
    lines = [("models", header)]
    for m in rows:
        per_model = m.wall_s / m.models
        lines.append(
            (
                f"{m.models}",
                f"{m.packs:>5} {m.wall_s:>8.1f} {per_model:>8.2f} {per_model / base:>5.2f}x "
                f"{m.mean_steps:>6.0f} {f'{m.fit}/{m.models}':>9}",
            )
        )
    lines.append(("", f"ratio: s/model over that of {rows[0].models} models (below 1: cheaper)"))
    return lines


def table_workers(rows: list[Measurement]) -> list[tuple[str, str]]:
    """Table 3: speed-up over the fewest workers."""
    base = rows[0]
    lines = [("workers", f"{'wall s':>8} {'speed-up':>9} {'per worker':>11}")]
    for m in rows:
        speedup = base.wall_s / m.wall_s
        per_worker = speedup * base.workers / m.workers
        lines.append((f"{m.workers}", f"{m.wall_s:>8.1f} {speedup:>8.2f}x {per_worker:>10.2f}x"))
    lines.append(("", f"speed-up: wall time at {base.workers} worker(s) over this wall time"))
    return lines


def _describe(config: Config) -> str:
    measures = "all" if config.generalization_measures else "no"
    return (
        f"fashion_mnist, {config.train_subset:,} training images, widths "
        f"{list(config.widths)} x depths {list(config.depths)} x adam|rmsprop x random (lr "
        f"{LR_RANGE[0]:g}..{LR_RANGE[1]:g}, init 1|2), batch 128, to 100% train accuracy or "
        f"{config.max_steps} steps (checked every {config.eval_every}); Jbar on "
        f"{config.jacobian_train_points} training points, transitions on "
        f"{config.transition_ellipses} ellipse(s) of a {TRANSITION_SIDES}-gon, {measures} "
        "generalization measures"
    )


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive counts")
    return values


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**2:.0f}"


if __name__ == "__main__":
    main()
