"""Local multi-process execution: several packs at once on one machine.

Workers are spawned processes that each run `execute_pack` and return its result; the
driver alone writes to the store, as packs complete. It keeps at most `workers` packs in
flight and marks a pack `running` only when it hands it to a worker, so `sensgen status`
counts as running exactly the packs being trained.

Threads: each worker runs PyTorch with one intra-op thread. N workers × 1 thread fills N
cores without oversubscription; several multi-threaded processes on the same cores spin
against each other and can run many times slower than one. `--workers 1` (the default)
trains in the driver process instead, with all of PyTorch's threads.

A terminal's Ctrl-C signals the whole process group, workers included. The workers are
spawned with SIGINT blocked (`_spawned_deaf_to_sigint`): the driver alone answers it, by
stopping them (`_stop`), where a worker still importing torch printed a traceback of its
own, or a fatal "Failed to import the site module", beside the driver's resume message.

An exception inside a pack is that pack's `failed` status. A worker process that dies (killed
for memory, say) breaks the whole pool, and no pack can be blamed for it: the packs it had
not finished go back to `pending`, for the next `sensgen run` to retry. A worker whose
driver dies (kill -9) exits on its own within `_ORPHAN_POLL_S`, instead of finishing its pack
for nobody and then waiting forever for work.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch
from rich.progress import Progress, TaskID

from sensgen.execute import PackResult, execute_or_fail, failed_pack
from sensgen.store import Store
from sensgen.study import Measurements

_ORPHAN_POLL_S = 0.5  # how often a worker checks that its driver is still alive


def _init_worker(driver_pid: int) -> None:
    """Set up a worker process: one torch thread, and exit when the driver is gone."""
    torch.set_num_threads(1)

    def exit_when_orphaned() -> None:
        while os.getppid() == driver_pid:  # a dead parent's children are re-parented
            time.sleep(_ORPHAN_POLL_S)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="sensgen-orphan-watch", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes set up by `_init_worker`."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )


@contextlib.contextmanager
def _spawned_deaf_to_sigint() -> Iterator[None]:
    """Block SIGINT in this thread while the pool spawns workers (it does in `submit`).

    A spawned process keeps the signal mask of the thread that started it, across exec, and
    Python leaves it as it is: the workers never see SIGINT. A SIGINT sent to the driver
    meanwhile is not lost: it waits until the mask is restored, or another of the driver's
    threads takes it, and the main thread raises KeyboardInterrupt either way.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):  # (only the caller's mask matters: `submit` spawns from it; Windows has no masks)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, their packs unfinished: on an interrupt of the driver alone
    (``kill -INT``, a scheduler), leaving the pool's context would wait for every pack in
    flight and then drop its result. Those packs stay `running`, and the next `sensgen
    run` re-queues them (`Store.reset_stale`)."""
    processes = list(pool._processes.values())  # (no public handle on them before 3.14)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _worker(specs, device: str, measure: Measurements) -> PackResult:
    return execute_or_fail(specs, device=device, measure=measure)


def train_in_processes(
    store: Store,
    packs: Sequence,
    *,
    workers: int,
    device: str,
    measure: Measurements,
    bar: Progress,
    task: TaskID,
) -> int:
    """Train `packs` in `workers` processes; store each as it finishes.

    Returns:
        How many packs were left pending because a worker process died.
    """
    waiting = deque(packs)
    in_flight: dict[Future, object] = {}
    broken = False  # a dead worker breaks the pool: nothing more can be submitted
    lost = 0
    pool = worker_pool(workers)
    try:
        while in_flight or (waiting and not broken):
            while waiting and not broken and len(in_flight) < workers:
                pack = waiting[0]
                try:
                    with _spawned_deaf_to_sigint():
                        future = pool.submit(_worker, pack.specs, device, measure)
                except BrokenProcessPool:
                    broken = True
                    break
                waiting.popleft()
                store.mark_running(s.run_id for s in pack.specs)
                in_flight[future] = pack
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                pack = in_flight.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:  # every unfinished pack in flight lands here
                    broken, lost = True, lost + 1
                    continue
                except Exception as error:  # e.g. a result that could not be sent back
                    result = failed_pack(pack.specs, error)
                store.finish_pack(pack.pack_id, result.results, **result.files())
                bar.advance(task, pack.specs[0].max_steps)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    if lost:
        store.reset_stale()  # the pool is gone: nothing of this driver is running any more
    return lost + len(waiting)
