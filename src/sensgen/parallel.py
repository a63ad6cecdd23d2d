"""Local multi-process execution: several packs at once on one machine.

Workers are spawned processes that each run `execute_pack` and return its result; the
driver alone writes to the store, as packs complete. CPU threads are split evenly between
workers so that N workers do not oversubscribe the cores.

An exception inside a pack is that pack's `failed` status. A worker process that dies (killed
for memory, say) breaks the whole pool, and no pack can be blamed for it: the packs it had
not finished go back to `pending`, for the next `sensgen run` to retry.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import torch
from rich.progress import Progress, TaskID

from sensgen.execute import PackResult, execute_pack, failed_results
from sensgen.store import Store


def _worker(specs, device: str, threads: int) -> PackResult:
    torch.set_num_threads(threads)
    try:
        return execute_pack(specs, device=device)
    except Exception as error:  # recorded as `failed` by the driver, never raised
        return PackResult(failed_results(specs, error), None, None)


def train_in_processes(
    store: Store,
    packs: Sequence,
    *,
    workers: int,
    device: str,
    bar: Progress,
    task: TaskID,
) -> int:
    """Train `packs` in `workers` processes; store each as it finishes.

    Returns:
        How many packs were left pending because a worker process died.
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    interrupted = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {}
        for pack in packs:
            store.mark_running(s.run_id for s in pack.specs)
            futures[pool.submit(_worker, pack.specs, device, threads)] = pack
        for future in as_completed(futures):
            pack = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:  # a worker died: every unfinished pack lands here
                interrupted += 1
                continue
            except Exception as error:  # e.g. a result that could not be sent back
                result = PackResult(failed_results(pack.specs, error), None, None)
            store.finish_pack(
                pack.pack_id, result.results, points=result.points, weights=result.weights
            )
            bar.advance(task, pack.specs[0].max_steps)
    if interrupted:
        store.reset_stale()  # the pool is gone: nothing of this driver is running any more
    return interrupted
