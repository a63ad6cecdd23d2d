"""Ray execution: one Ray task per pack, on a local Ray instance or on an existing cluster.

Where it runs (`ray_session`): with the ``RAY_ADDRESS`` environment variable set, sensgen
joins that cluster, as ``ray.init(address=RAY_ADDRESS)`` does (``auto`` on the head node,
or the ``HOST:PORT`` that ``ray start --head`` prints). Otherwise it starts a private local
Ray instance with ``--workers`` CPUs (default: Ray's, all of this machine's) and shuts it
down at the end. A Ray session the caller already opened with ``ray.init`` is used as it
is and left open.

The driver (the ``sensgen run`` process) alone writes the store, exactly as with the local
executor (`sensgen.parallel`): each task runs `execute_or_fail` with one CPU and one PyTorch
thread (one GPU with ``--device cuda``) and *returns* the `PackResult`; the driver stores it
as it arrives. At most one pack per slot (``--workers``, else the cluster's CPUs) is in
flight, and a pack is marked ``running`` when it is submitted, so ``sensgen status`` counts
as running exactly the packs being trained.

Failures: an exception inside a pack is that pack's ``failed`` status (`execute_or_fail`).
A worker process that dies mid-pack (killed for memory, its node lost) is retried by Ray up
to `MAX_RETRIES` times (on a local instance, kills by Ray's memory monitor too); if every
attempt dies, the pack's runs are recorded ``failed`` with a message that says so, and the
sweep goes on. A killed or interrupted driver leaves its packs in flight ``running``; the
next ``sensgen run`` re-queues them (`Store.reset_stale`), as with the local executor.

Every node of a cluster needs sensgen (the driver's version) and the study's datasets: a
probe task checks that one worker imports the same sensgen before any pack is submitted.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

import torch
from rich.progress import Progress, TaskID

from sensgen.errors import UserError
from sensgen.execute import PackResult, execute_or_fail, failed_pack
from sensgen.store import Store
from sensgen.study import Measurements

MAX_RETRIES = 2  # Ray re-runs a pack whose worker died this many times, then it is failed
INSTALL_HINT = "pip install 'sensgen[ray]'"


class WorkerLost(RuntimeError):
    """Every attempt at a pack ended with its Ray worker (or node) dead."""


def import_ray() -> ModuleType:
    """The `ray` module, or a `UserError` saying how to install it.

    Raises:
        UserError: Ray is not installed (or cannot be imported) in this environment.
    """
    try:
        import ray
    except ImportError as error:
        raise UserError(
            f"--executor ray needs Ray, which is not installed here ({error}). Install it "
            f"with `{INSTALL_HINT}`, or run with --executor local (the default)."
        ) from None
    return ray


@contextmanager
def ray_session(workers: int | None, device: str = "cpu") -> Iterator[int]:
    """Connect to Ray (see module docstring) and yield the number of pack slots.

    Slots are ``workers`` when given, else the cluster's CPUs (GPUs with ``device="cuda"``).
    A session started here is shut down on exit, whatever happens; one the caller opened
    stays open.

    Raises:
        UserError: ``RAY_ADDRESS`` names no reachable cluster.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _init(ray, workers)
    try:
        yield workers or _cluster_slots(ray, device)
    finally:
        if started:
            ray.shutdown()


def _init(ray: ModuleType, workers: int | None) -> None:
    """``ray.init``: the cluster at ``RAY_ADDRESS`` if set, else a new local instance."""
    address = os.environ.get("RAY_ADDRESS") or None
    options = {"logging_level": logging.WARNING}
    if address is None:  # "local" starts a private instance, even beside a `ray start` one
        options |= {"address": "local", "num_cpus": workers, "include_dashboard": False}
        # Ray retries tasks its memory monitor kills forever by default: a pack too large
        # for this machine would never end. A cluster's operator sets this for the cluster.
        options["_system_config"] = {"task_oom_retries": MAX_RETRIES}
    else:
        _check_reachable(address)
        options |= {"address": address}  # a cluster's CPUs are its own: no num_cpus
    try:
        ray.init(**options)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as error:
        if address is None:
            raise
        raise _unreachable(address, error) from error


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on: ``ray.init`` retries it for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://...": left to ray.init
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise _unreachable(address, error) from error


def _unreachable(address: str, error: BaseException) -> UserError:
    return UserError(
        f"Cannot connect to the Ray cluster at RAY_ADDRESS={address!r} ({error}). Start one "
        "with `ray start --head` and set RAY_ADDRESS to the address it prints (or 'auto' on "
        "the head node), or unset RAY_ADDRESS to run on a local Ray instance."
    )


def _cluster_slots(ray: ModuleType, device: str) -> int:
    resource = "GPU" if device == "cuda" else "CPU"
    return max(1, int(ray.cluster_resources().get(resource, 1)))


def _pack_task(specs, device: str, measure: Measurements) -> PackResult:
    """What a Ray worker runs: one pack, with one PyTorch thread (see `sensgen.parallel`)."""
    torch.set_num_threads(1)
    return execute_or_fail(specs, device=device, measure=measure)


def _probe() -> str:
    """A Ray worker's sensgen version (importing sensgen and torch on the way)."""
    import sensgen

    return sensgen.__version__


def check_workers(ray: ModuleType) -> None:
    """Run `_probe` in a Ray worker: sensgen must import there, in this driver's version.

    Raises:
        UserError: the workers cannot import sensgen, or run another version of it.
    """
    from sensgen import __version__

    try:
        version = ray.get(ray.remote(num_cpus=0, max_retries=MAX_RETRIES)(_probe).remote())
    except ray.exceptions.RayError as error:
        raise UserError(
            f"The Ray workers cannot run sensgen ({_first_line(error)}). Install sensgen "
            f"{__version__} on every node of the cluster (`{INSTALL_HINT}`), then run again."
        ) from error
    if version != __version__:
        raise UserError(
            f"The Ray workers run sensgen {version}, this driver {__version__}; install the "
            "same version everywhere, or results would differ under the same run ids."
        )


def train_on_ray(
    store: Store,
    packs: Sequence,
    *,
    workers: int | None,
    device: str,
    measure: Measurements,
    bar: Progress,
    task: TaskID,
    on_slots: Callable[[int], None] | None = None,
) -> None:
    """Train `packs` as Ray tasks, at most one per slot in flight; store each as it finishes.

    `on_slots` is told the number of slots once Ray is up (the driver records it for
    ``sensgen status``). Packs still in flight when this is interrupted are cancelled and
    stay ``running`` in the store, for the next ``sensgen run`` to re-queue.
    """
    ray = import_ray()
    with ray_session(workers, device) as slots:
        if on_slots is not None:
            on_slots(slots)
        check_workers(ray)
        remote = ray.remote(
            num_cpus=1, num_gpus=1 if device == "cuda" else 0, max_retries=MAX_RETRIES
        )(_pack_task)
        waiting, in_flight = deque(packs), {}
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < slots:
                    pack = waiting.popleft()
                    store.mark_running(s.run_id for s in pack.specs)
                    in_flight[remote.remote(pack.specs, device, measure)] = pack
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    pack = in_flight.pop(ref)
                    result = _result(ray, ref, pack.specs)
                    store.finish_pack(pack.pack_id, result.results, **result.files())
                    bar.advance(task, pack.specs[0].max_steps)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)


def _result(ray: ModuleType, ref, specs) -> PackResult:
    """A finished task's `PackResult`, or a failed pack saying why there is none."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:  # raised outside execute_or_fail
        return failed_pack(specs, getattr(error, "cause", None) or error)
    except ray.exceptions.RayError as error:  # the worker or its node died, every attempt
        lost = WorkerLost(
            f"the Ray worker training this pack died on each of its {MAX_RETRIES + 1} "
            f"attempts (killed for memory, or its node was lost?): {_first_line(error)}"
        )
        return failed_pack(specs, lost)


def _first_line(error: BaseException) -> str:
    """'Type: first line of the message', of the cause of a `RayTaskError`."""
    error = getattr(error, "cause", None) or error
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"
