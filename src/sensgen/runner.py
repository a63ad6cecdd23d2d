"""Run a study into a study directory: plan, train pack by pack, store, report. Resumable.

`run` is idempotent. It registers every run of the study in DIR/results.db (existing rows
are kept), re-queues runs a crashed earlier process left `running`, and trains only the
packs still pending. A pack is stored atomically once finished, so an interruption loses
at most the packs in flight; running the same command again picks up where it stopped.
Failures are recorded per pack (status `failed`, with the error) and never stop the sweep.

The driver (this process) is the only writer of the store; workers (local processes,
`sensgen.parallel`, or Ray tasks, `sensgen.ray_executor`) return results. It holds DIR/.lock
while it writes (`sensgen.driver`), so a second `sensgen run` on the same DIR is refused
(exit 2).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sensgen import catalogue_damage, data
from sensgen import study as study_module
from sensgen.artifacts import FOLDERS
from sensgen.driver import driver_lock, remove_dead_temporaries
from sensgen.errors import UserError
from sensgen.execute import execute_or_fail, training_subset
from sensgen.geometry import anchor_problem
from sensgen.measure import MEASURE_SEED, ellipse_anchor_indices
from sensgen.repair import (
    check_same_measurements,
    damaged_packs,
    failed_packs,
    requeue_damaged,
    retry_failed,
    say_why_failed,
    warn,
)
from sensgen.store import DB_NAME, PlannedRun, Status, Store
from sensgen.study import Execution, Measurements, RunSpec, Study, plan_packs
from sensgen.study_dir import (
    STUDY_FILE,
    check_same_study,
    check_spec_schema,
    finished_ids,
    note_unplanned_open_runs,
    note_unplanned_runs,
    report_outdated,
    write_study_file,
)

GPU_MEMORY_SHARE = 0.8  # of the free GPU memory a pack may fill (the rest: CUDA context, eval)


class Executor(StrEnum):
    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class StudyResult:
    """What a call to `run` did and where things stand now."""

    out_dir: Path
    n_runs: int  # runs in this study
    n_trained: int  # runs finished by this call
    counts: dict[str, int]  # status -> runs of this study
    report: Path | None
    wall_s: float

    @property
    def complete(self) -> bool:
        return self.counts.get(Status.PENDING, 0) + self.counts.get(Status.RUNNING, 0) == 0


@dataclass(frozen=True)
class _PendingPack:
    pack_id: str
    specs: tuple[RunSpec, ...]


def run(
    study: Study | str | Path,
    out_dir: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    report: bool = True,
    console: Console | None = None,
) -> StudyResult:
    """Run (or resume) a study into `out_dir` and write its report.

    Args:
        study: a `Study`, a study TOML path or a preset name.
        out_dir: the study directory (created if needed).
        executor: "local" (this machine) or "ray" (one Ray task per pack: a local Ray
            instance, or the cluster at $RAY_ADDRESS; needs `sensgen[ray]`).
        workers: packs trained at once. Local: processes (default 1: in this process);
            Ray: CPUs of the local instance and packs in flight (default: all CPUs).
        device: "cpu" or "cuda".
        progress: show a progress bar with an ETA.
        report: write DIR/report/ at the end.

    Returns:
        A `StudyResult`. Per-run failures are recorded, not raised.

    Raises:
        UserError: bad study, options or datasets; nothing already stored is touched.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    study = study if isinstance(study, Study) else study_module.load(study)
    executor = _check_options(executor, workers, device)
    if executor is Executor.LOCAL:
        _note_more_workers_than_cpus(workers or 1, console)
    out = Path(out_dir)
    previous = check_same_study(out, study)  # the stored study, before this run writes its own
    planned = study.planned()
    specs = [p.spec for p in planned]
    run_ids = {s.run_id for s in specs}
    new = not (out / DB_NAME).exists()
    if new and out.is_dir() and catalogue_damage.holds_study_files(out):
        raise catalogue_damage.missing(out)  # its catalogue moved away or lost
    if new and out.is_dir() and not _only_sensgens(out):
        raise UserError(
            f"{out} exists and holds files, but no study ({DB_NAME} is missing): sensgen "
            "writes its folders there and removes its own temporary files from them. Choose "
            "a new or empty --out directory."
        )
    if new:  # a missing dataset leaves no empty study directory behind
        _check_anchors(specs, study.measure, _preflight({s.dataset for s in specs}))
    with Store.open(out) as store, driver_lock(out, workers or 1) as record_workers:
        remove_dead_temporaries(out)
        stored = store.runs()  # as found: read once for the checks below
        check_spec_schema(stored, out)
        check_same_measurements(stored, study, previous, out)
        damaged = damaged_packs(store, stored, run_ids, console)
        failed = failed_packs(stored, run_ids)
        again = set(damaged) | set(failed)
        redo = set(stored.loc[stored["pack_id"].isin(again), "run_id"]) if again else set()
        finished = finished_ids(stored) - redo
        note_unplanned_runs(finished - run_ids, out, console)
        note_unplanned_open_runs(stored, run_ids, out, console)
        # Fail fast on a missing or corrupt dataset, before any run is registered or trained;
        # only the runs not yet in a final status (or to train again) will need their data.
        if not new:
            todo = [s for s in specs if s.run_id not in finished]
            _check_anchors(todo, study.measure, _preflight({s.dataset for s in todo}))
        requeue_damaged(store, damaged, console)
        retry_failed(store, failed, console)
        write_study_file(out, study)
        memory = pack_memory_budget(study.execution, device)
        packs = plan_packs(specs, study.execution.pack_size, memory)
        pairs = {p.spec.run_id: p for p in planned}
        store.add_runs(
            PlannedRun(
                s.run_id,
                pack.pack_id,
                s.canonical_json(),
                pair_id=pairs[s.run_id].pair_id,
                pair_role=pairs[s.run_id].pair_role,
            )
            for pack in packs
            for s in pack.specs
        )
        store.reset_stale()
        pending = _pending_packs(store, run_ids)
        unfinished_before = _unfinished(_counts(store, run_ids))
        if pending:
            _train(
                store,
                pending,
                executor=executor,
                workers=workers,
                device=device,
                measure=study.measure,
                show=progress,
                console=console,
                record_workers=record_workers,
            )
        counts = _counts(store, run_ids)
        say_why_failed(store.runs(), run_ids, console)
        stale_report = report_outdated(out / "report" / "index.html", store)
    report_path = None
    index = out / "report" / "index.html"
    if report and (pending or stale_report):
        from sensgen.analysis import write_report

        report_path = write_report(out)
    elif index.exists() and not stale_report:  # (never a stale report's path)
        report_path = index
    # Runs this call finished: an interrupted call leaves some of its packs pending.
    n_trained = unfinished_before - _unfinished(counts)
    return StudyResult(
        out, len(specs), n_trained, counts, report_path, time.perf_counter() - started
    )


def _only_sensgens(out: Path) -> bool:
    """Whether a folder without a study database holds nothing but what sensgen makes
    first (a driver starting this moment, or one that stopped before its database): its
    lock, the study file, and its empty folders."""
    folders = {*FOLDERS, "report"}
    return all(
        p.name in (".lock", STUDY_FILE) or (p.name in folders and not any(p.iterdir()))
        for p in out.iterdir()
    )


def _check_options(executor: str, workers: int | None, device: str) -> Executor:
    try:
        executor = Executor(executor)
    except ValueError:
        raise UserError(f"--executor {executor!r} is unknown; use 'local' or 'ray'.") from None
    if executor is Executor.RAY:
        from sensgen.ray_executor import import_ray

        import_ray()  # a UserError with the install hint when Ray is missing
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}.")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is unknown; use 'cpu' or 'cuda'.")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU here "
            f"(torch {torch.__version__}); run with --device cpu or on a GPU machine."
        )
    return executor


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS, Windows)
        return os.cpu_count() or 1


def _note_more_workers_than_cpus(workers: int, console: Console) -> None:
    """A warning for local workers beyond the CPUs: each is a 1-thread process holding its
    own PyTorch and data, so the extra ones only share the CPUs and add memory."""
    cpus = usable_cpus()
    if workers > cpus:
        warn(
            console,
            f"--workers {workers} is more than the {cpus} CPU(s) this process may use: each "
            "worker needs a CPU of its own, so the extra ones slow the others down and each "
            f"holds its own copy of PyTorch and the data. Use --workers {cpus} or fewer.",
        )


def pack_memory_budget(execution: Execution, device: str) -> int:
    """Bytes of estimated training memory a pack may use (`planner.model_memory_bytes`).

    On the CPU: ``execution.pack_memory_gb``. On a GPU, unless the study sets
    ``pack_memory_gb`` itself: 80% of the GPU memory free now, so packs grow to fill the
    device. Packs are fixed when a run is first planned; a resumed study keeps its packs.
    """
    if device == "cuda" and "pack_memory_gb" not in execution.model_fields_set:
        free, _total = torch.cuda.mem_get_info()
        return int(GPU_MEMORY_SHARE * free)
    return int(execution.pack_memory_gb * 2**30)


def _pending_packs(store: Store, run_ids: set[str]) -> list[_PendingPack]:
    """Pending packs holding a run of this study, each with all its pending runs.

    A pack is finished as a whole (`Store.finish_pack`), so a pack planned by an earlier,
    larger version of the study is trained with all its runs, not only this study's.
    """
    runs = store.runs()
    if runs.empty:
        return []
    pending = runs[runs["status"] == Status.PENDING]
    mine = set(pending.loc[pending["run_id"].isin(run_ids), "pack_id"])
    rows = pending[pending["pack_id"].isin(mine)]
    packs = []
    for pack_id, group in rows.groupby("pack_id", sort=False):
        specs = tuple(RunSpec.from_json(text) for text in group.sort_values("run_id")["spec"])
        packs.append(_PendingPack(str(pack_id), specs))
    return packs


def _preflight(datasets: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load every dataset once before training, so a missing file fails fast (exit 2).
    Returns each one's (train, test) labels, for `_check_anchors`."""
    return {
        name: (data.load(name, split="train").y, data.load(name, split="test").y)
        for name in sorted(datasets)
    }


def _check_anchors(
    specs: Sequence[RunSpec],
    measure: Measurements,
    labels: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Refuse profile ellipses or region planes that a run's training subset cannot anchor
    (too few classes, or no class with three points), and transition ellipses that a
    dataset's test labels cannot (fewer than three classes: a registered two-class
    dataset), before anything is trained: measured after training, each such run failed
    with its model lost, and every `run` retried it. `labels`: `_preflight`'s."""
    if measure.transition_ellipses:
        for name in sorted({s.dataset for s in specs}):
            try:  # (the draw itself: its rule, not a copy of it)
                ellipse_anchor_indices(labels[name][1], 1, seed=MEASURE_SEED)
            except UserError as err:
                raise UserError(f"Runs on {name!r}: {err} Nothing was trained.") from None
    if not (measure.profile_ellipses or measure.region_planes):
        return
    for name, size in sorted({(s.dataset, s.train_subset) for s in specs}, key=str):
        y = labels[name][0]
        subset = training_subset(name, len(y), size)
        problem = anchor_problem(y if subset is None else y[subset], measure)
        if problem is not None:
            subset_text = "full" if size is None else size
            raise UserError(
                f"Runs on {name!r} with train_subset = {subset_text}: {problem}. Fix: use a "
                "larger train_subset, or set those [measure] fields to 0. Nothing was trained."
            )


def _counts(store: Store, run_ids: set[str]) -> dict[str, int]:
    runs = store.runs()
    if runs.empty:
        return {}
    mine = runs[runs["run_id"].isin(run_ids)]
    return {str(k): int(v) for k, v in mine["status"].value_counts().items()}


def _unfinished(counts: dict[str, int]) -> int:
    """Runs still pending or running."""
    return counts.get("pending", 0) + counts.get("running", 0)


def _train(
    store: Store,
    packs: Sequence[_PendingPack],
    *,
    executor: Executor,
    workers: int | None,
    device: str,
    measure: Measurements,
    show: bool,
    console: Console,
    record_workers: Callable[[int], None],
) -> None:
    total = sum(p.specs[0].max_steps for p in packs)
    with _progress_bar(show, console) as bar:
        task = bar.add_task(f"{len(packs)} packs", total=total)
        if executor is Executor.RAY:
            from sensgen.ray_executor import train_on_ray

            train_on_ray(
                store,
                packs,
                workers=workers,
                device=device,
                measure=measure,
                bar=bar,
                task=task,
                on_slots=record_workers,
            )
        elif (workers or 1) == 1:
            for i, pack in enumerate(packs):
                bar.update(task, description=f"pack {i + 1}/{len(packs)}")
                store.mark_running(s.run_id for s in pack.specs)
                result = execute_or_fail(
                    pack.specs, device=device, measure=measure, on_step=lambda _: bar.advance(task)
                )
                store.finish_pack(pack.pack_id, result.results, **result.files())
                bar.update(task, completed=sum(p.specs[0].max_steps for p in packs[: i + 1]))
                if show and not console.is_terminal:  # logs and CI: one line per pack
                    console.print(_pack_line(i + 1, len(packs), bar.tasks[task]), highlight=False)
        else:
            from sensgen.parallel import train_in_processes

            lost = train_in_processes(
                store, packs, workers=workers, device=device, measure=measure, bar=bar, task=task
            )
            if lost:
                console.print(
                    f"[bold yellow]warning:[/] a worker process died (killed for memory?), so "
                    f"{lost} pack(s) did not finish; they stay pending. Run the same command "
                    "again to train them, with fewer --workers if memory is short.",
                    highlight=False,
                )


def _pack_line(done: int, total: int, task) -> str:
    """'pack 3/8 done, 0:42 elapsed, ETA 1:30' for output that is not a terminal."""
    remaining = task.time_remaining
    eta = "" if remaining is None else f", ETA {_clock(remaining)}"
    return f"pack {done}/{total} done, {_clock(task.elapsed or 0.0)} elapsed{eta}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


@contextmanager
def _progress_bar(show: bool, console: Console) -> Iterator[Progress]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        yield bar
