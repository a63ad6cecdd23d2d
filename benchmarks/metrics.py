"""Benchmark of the sensitivity metrics (issue 3, item 8; paper §2.1–2.2).

Run from the repository root:

    python benchmarks/metrics.py            # full run, about 30 s on 2 CPU cores
    python benchmarks/metrics.py --quick    # smoke run, about 10 s

One run prints ratios against baselines timed in the same run (no absolute targets):

1. A 784-256-256-10 ReLU MLP trained on a Fashion-MNIST subset (adam 1e-3, batch 128).
2. `jacobian_norm` points/s on test points: sensgen's closed form (default) and its autodiff
   path against a plain `vmap(jacrev)` of the softmax output and against per-point
   `torch.autograd.functional.jacobian`; the issue's target is ≥ 2× `vmap(jacrev)`. Also the
   largest relative differences between the methods and against a float64 reference.
3. Exact transitions (`ellipse_transitions_exact`) against dense sampling at equal accuracy
   on the trained net's 784-256-256 ReLU part, along the ellipse through three test points
   of different classes; the issue's target is exact in under 1 s.
4. Peak memory of `jacobian_norm` on 10,000 CIFAR-100-shaped points (3072 inputs, 100
   classes) through MLP(3072, 100, width=512, depth=2), in a fresh child process, against
   the issue's 2 GiB bound.

Timings are the best of a few repeats after a warm-up; competing methods are timed in
interleaved rounds, so a busy machine slows them alike. Everything is seeded.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from _report import table
from sensgen import data
from sensgen.metrics import (
    ellipse_transitions_exact,
    ellipse_transitions_sampled,
    jacobian_norm,
)
from sensgen.models import MLP, Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.train import Member, PackShape, init_pack, train_pack, unstack

SEED = 0
JACOBIAN_TARGET = 2.0  # issue 3: closed form ≥ 2× the points/s of vmap(jacrev)
EXACT_TARGET_S = 1.0  # issue 3: exact transitions on the ellipse in under 1 s
MEMORY_BOUND = 2 * 1024**3  # issue 3: 10,000 CIFAR-100 points under 2 GiB
SMALL_CHUNK = 256  # a cache-sized chunk, against the library's default (~64 MiB intermediates)
MAX_SIDES = 76_800  # largest polygon the exact method may use (1200·2^6)
CONFIDENT = 1e-3  # ‖J‖_F below this: float32 softmax Jacobians lose digits (paper §2.1)
_CHILD_FLAG = "--memory-child"


class Config(NamedTuple):
    """Sizes of one benchmark run."""

    n_train: int  # Fashion-MNIST training subset
    epochs: int
    n_jacobian: int  # test points for the batched methods
    n_per_point: int  # test points for per-point autograd (slow)
    n_reference: int  # test points checked against float64
    repeats: int
    max_samples: int  # largest k tried for sampled transitions
    n_memory: int  # CIFAR-100-shaped points in the memory run


FULL = Config(10_000, 2, 4_000, 200, 500, 10, 1200 * 2**10, 10_000)
QUICK = Config(2_000, 1, 500, 30, 100, 2, 1200 * 2**3, 1_000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under 30 s")
    parser.add_argument(_CHILD_FLAG, type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(_memory_child(args.memory_child)))
        return
    run(QUICK if args.quick else FULL)


def run(config: Config) -> None:
    """Run every part of the benchmark and print its tables."""
    start = time.perf_counter()
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    print(f"sensgen metrics benchmark: torch {torch.__version__}, {threads} threads")
    train = data.load("fashion_mnist", split="train")
    test = data.load("fashion_mnist", split="test")
    net, rows = train_model(train, test, config)
    table("1. Model: 784-256-256-10 relu MLP on Fashion-MNIST", rows)
    rows = bench_jacobian(net, test.x, config)
    table("2. jacobian_norm (softmax output, float32 inputs)", rows)
    rows = bench_transitions(net, test, config)
    table("3. Transitions, ellipse through 3 test points (784-256-256 relu part)", rows)
    rows = bench_memory(config.n_memory)
    table("4. Memory: jacobian_norm on CIFAR-100-shaped points (child process)", rows)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


def train_model(
    train: data.Dataset, test: data.Dataset, config: Config
) -> tuple[MLP, list[tuple[str, str]]]:
    """Train the 784-256-256-10 relu MLP with sensgen's packed trainer (a pack of one)."""
    pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(SEED))
    x, y = train.x[pick[: config.n_train]], train.y[pick[: config.n_train]]
    steps = config.epochs * (config.n_train // 128)
    adam, relu = OptimizerName.ADAM, Nonlinearity.RELU
    shape = PackShape(784, 10, 256, 2, relu, adam, 128, steps, steps, stop_at_fit=False)
    member = Member(seed=SEED, lr=1e-3, init_scale=2.0)
    began = time.perf_counter()
    outcome = train_pack(shape, [member], x, y[None])
    seconds = time.perf_counter() - began
    net = unstack(init_pack(shape, [member])[0], outcome.params, 0).eval()
    return net, [
        ("training images", f"{config.n_train:,} ({config.epochs} epoch(s), {steps} adam steps)"),
        ("training time", f"{seconds:.1f} s"),
        ("train accuracy", f"{_accuracy(net, x, y):.4f}"),
        ("test accuracy", f"{_accuracy(net, test.x, test.y):.4f} (all {len(test.y):,})"),
    ]


def bench_jacobian(net: MLP, x_test: torch.Tensor, config: Config) -> list[tuple[str, str]]:
    """Points/s of the ways to get per-point ‖∂softmax/∂x‖_F, and how well they agree."""
    x = x_test[: config.n_jacobian]  # [N, 784] float32
    few = x_test[: config.n_per_point]
    methods = {
        "closed": lambda: jacobian_norm(net, x),
        "autodiff": lambda: jacobian_norm(net, x, method="autodiff"),
        "vmap": lambda: vmap_jacrev_norms(net, x),
        "closed_small": lambda: jacobian_norm(net, x, chunk_size=SMALL_CHUNK),
        "vmap_small": lambda: torch.cat([vmap_jacrev_norms(net, c) for c in x.split(SMALL_CHUNK)]),
    }
    best = _interleaved(methods, config.repeats)
    best["per_point"] = _interleaved({"pp": lambda: per_point_norms(net, few)}, 2)["pp"]
    rate = {k: (len(few) if k == "per_point" else len(x)) / t for k, t in best.items()}

    closed = jacobian_norm(net, x)  # float64 [N]
    baseline = vmap_jacrev_norms(net, x).double()
    autodiff = jacobian_norm(net, x, method="autodiff")
    ref_x = x[: config.n_reference]
    reference = vmap_jacrev_norms(_float64_copy(net), ref_x.double())  # float64 truth
    confident = closed > CONFIDENT
    speedup = rate["closed"] / rate["vmap"]
    verdict = "met" if speedup >= JACOBIAN_TARGET else "NOT met"
    return [
        ("points", f"{len(x):,} ({len(few)} for per-point autograd), best of {config.repeats}"),
        ("(a) sensgen closed form", f"{rate['closed']:>9,.0f} points/s"),
        ("(d) sensgen method='autodiff'", f"{rate['autodiff']:>9,.0f} points/s"),
        ("(b) vmap(jacrev) + matrix_norm", f"{rate['vmap']:>9,.0f} points/s"),
        ("(c) per-point autograd.functional", f"{rate['per_point']:>9,.0f} points/s"),
        ("ratio (a)/(b)", f"{speedup:.2f}x   target >= {JACOBIAN_TARGET:g}x: {verdict}"),
        ("ratio (a)/(c)", f"{rate['closed'] / rate['per_point']:.1f}x"),
        ("ratio (d)/(b)", f"{rate['autodiff'] / rate['vmap']:.2f}x"),
        (f"(a') closed form, chunk_size={SMALL_CHUNK}", f"{rate['closed_small']:>9,.0f} points/s"),
        (f"(b') (b) in {SMALL_CHUNK}-point chunks", f"{rate['vmap_small']:>9,.0f} points/s"),
        (
            "ratio (a')/(b), (a')/(b')",
            f"{rate['closed_small'] / rate['vmap']:.2f}x, "
            f"{rate['closed_small'] / rate['vmap_small']:.2f}x",
        ),
        ("‖J‖_F range over the points", f"{closed.min():.2e} .. {closed.max():.2e}"),
        ("max rel. diff (a) vs (b), all", f"{_max_rel(baseline, closed):.1e}"),
        (
            f"  … only ‖J‖_F > {CONFIDENT:g}",
            f"{_max_rel(baseline[confident], closed[confident]):.1e}"
            f" ({int(confident.sum()):,} of {len(x):,} points)",
        ),
        ("max rel. diff (a) vs (d)", f"{_max_rel(autodiff, closed):.1e}"),
        (
            f"vs float64 vmap(jacrev), {len(ref_x)} pts",
            f"(a) {_max_rel(closed[: len(ref_x)], reference):.1e}"
            f"   (b) {_max_rel(baseline[: len(ref_x)], reference):.1e}"
            f"   (min ‖J‖_F {reference.min():.1e})",
        ),
    ]


def vmap_jacrev_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Baseline (b), as a user would write it: vmap(jacrev) of one point's softmax."""

    def softmax_of_one(xi: torch.Tensor) -> torch.Tensor:  # [784] -> [10]
        return torch.softmax(model(xi), dim=-1)

    with torch.no_grad():  # torch.func differentiates anyway; no graph back to the weights
        jacobians = torch.func.vmap(torch.func.jacrev(softmax_of_one))(x)  # [N, 10, 784]
        return torch.linalg.matrix_norm(jacobians)  # [N], Frobenius


def per_point_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Baseline (c): torch.autograd.functional.jacobian one point at a time."""

    def softmax_of_one(xi: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(xi), dim=-1)

    norms = [
        torch.linalg.matrix_norm(torch.autograd.functional.jacobian(softmax_of_one, xi)) for xi in x
    ]
    return torch.stack(norms)


def bench_transitions(net: MLP, test: data.Dataset, config: Config) -> list[tuple[str, str]]:
    """Exact count (polygon doubling) against the paper's sampled t_k at equal accuracy.

    The codes are those of the trained net's hidden layers, i.e. of its 784-256-256 relu
    part; the readout does not enter. Sampling uses k = 1200·2^j, the exact method starts
    at a 1200-gon; both use the vertices z(2πi/k), so t_k ≤ t_exact (paper §2.2).
    """
    picked = _anchor_indices(test)
    x1, x2, x3 = (test.x[i] for i in picked)

    def sampled(k: int) -> tuple[int, float]:
        small = k <= 20_000  # a large k runs once, without warm-up, to bound the time
        return _time(
            lambda: ellipse_transitions_sampled(net, x1, x2, x3, n_points=k),
            config.repeats if small else 1,
            warm_up=small,
        )

    exact, exact_s = _time(
        lambda: ellipse_transitions_exact(net, x1, x2, x3, max_sides=MAX_SIDES), config.repeats
    )
    stable = "stable when doubled" if exact.sides < MAX_SIDES else "STILL CHANGING"
    verdict = "met" if exact_s < EXACT_TARGET_S else "NOT met"
    rows = [
        ("anchors (test index: class)", ", ".join(f"{i}: {int(test.y[i])}" for i in picked)),
        ("exact count", f"{exact.count} (polygon of {exact.sides:,} sides, {stable})"),
        ("exact time", f"{exact_s * 1e3:.1f} ms   target < {EXACT_TARGET_S:g} s: {verdict}"),
    ]
    k, seconds_at = 1200, {}
    while k <= config.max_samples:
        count, seconds = sampled(k)
        seconds_at[k] = seconds
        flag = "  (above t_exact!)" if count > exact.count else ""
        rows.append((f"  sampled k = {k:,}", f"t_k = {count:<6} {seconds * 1e3:8.1f} ms{flag}"))
        if count == exact.count:
            break
        k *= 2
    else:
        rows.append(("sampled at equal accuracy", f"never, up to k = {k // 2:,}"))
        return rows
    # Without the exact answer, a user must also sample 2k to see the count stop changing,
    # as the exact method does with its polygon.
    _, check = sampled(2 * k)
    seconds = seconds_at[k]
    return [
        *rows,
        ("sampled at equal accuracy", f"k = {k:,}: {seconds * 1e3:.1f} ms"),
        ("ratio sampled / exact time", f"{seconds / exact_s:.2f}x"),
        ("  … with the 2k check", f"{(seconds + check) / exact_s:.2f}x (k and 2k sampled)"),
    ]


def bench_memory(n_points: int) -> list[tuple[str, str]]:
    """Run `_memory_child` in a fresh interpreter, so its peak RSS is that call's alone."""
    command = [sys.executable, __file__, _CHILD_FLAG, str(n_points)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed ({done.returncode}):\n{done.stderr}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    increase = child["peak"] - child["before"]
    verdict = "met" if increase < MEMORY_BOUND else "NOT met"
    return [
        ("points, model", f"{n_points:,} x 3072 float32, MLP(3072, 100, width=512, depth=2)"),
        ("peak RSS increase in the call", f"{_gib(increase)}   bound < 2 GiB: {verdict}"),
        ("child peak RSS (whole process)", _gib(child["peak"])),
        ("throughput", f"{n_points / child['seconds']:,.0f} points/s ({child['seconds']:.1f} s)"),
    ]


def _memory_child(n_points: int) -> dict[str, float]:
    """In the child: RSS before, peak RSS after, and time of one jacobian_norm call."""
    generator = torch.Generator().manual_seed(SEED)
    net = MLP(3072, 100, width=512, depth=2, generator=generator).eval()
    x = torch.randn(n_points, 3072, generator=generator)  # [N, 3072]
    jacobian_norm(net, x[:4])  # warm-up: library initialisation is not the call's memory
    before = _current_rss()
    began = time.perf_counter()
    norms = jacobian_norm(net, x)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert norms.shape == (n_points,) and bool(torch.isfinite(norms).all())
    return {"before": before, "peak": peak, "seconds": seconds}


def _current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _anchor_indices(test: data.Dataset) -> list[int]:
    """Three test points of different classes, picked in a seeded random order."""
    order = torch.randperm(len(test.y), generator=torch.Generator().manual_seed(SEED + 1))
    picked: list[int] = []
    for i in order.tolist():
        if all(test.y[i] != test.y[j] for j in picked):
            picked.append(i)
        if len(picked) == 3:
            return picked
    raise ValueError("the test split has fewer than three classes")


def _interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each method over `repeats` rounds, after one warm-up round."""
    best = dict.fromkeys(methods, float("inf"))
    for round_ in range(repeats + 1):
        for name, fn in methods.items():
            began = time.perf_counter()
            fn()
            if round_ > 0:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - began)
    return best


def _time(fn: Callable[[], object], repeats: int, *, warm_up: bool = True) -> tuple[object, float]:
    """fn's result and its best wall time over `repeats` runs (after a warm-up run)."""
    result = fn() if warm_up else None
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - began)
    return result, best


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (net(x).argmax(dim=-1) == y).double().mean().item()


def _float64_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).double().eval()


def _max_rel(values: torch.Tensor, reference: torch.Tensor) -> float:
    return ((values.double() - reference.double()).abs() / reference.double()).max().item()


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.2f} GiB"


if __name__ == "__main__":
    main()
