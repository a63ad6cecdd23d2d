"""How the reference pack's speed depends on its cache blocks (issue 8; `sensgen.cache_blocks`).

Run from the repository root:

    python benchmarks/block_sizes.py            # the reference pack, 4 rounds, ~2 min
    python benchmarks/block_sizes.py --quick    # smoke run on a short pack, seconds

The reference pack of `benchmarks/train.py` (32 models of 784-256-256-10, momentum SGD,
batch 128, 156 steps over 10,000 Fashion-MNIST images) is trained whole and cut into
blocks of 16, 8, 4 and 2 models (every block through all its steps before the next:
`sensgen.train.train_pack(blocks=...)`), in turn within each round. Printed per layout:
the median time over rounds, its speed against the layout `cache_blocks` chooses on this
machine (the median over rounds of the two times of the same round, with the range), and
its share of the float32 matmul peak probed in the same round (FLOPs as in
`benchmarks/train.py`). Smaller blocks keep a smaller working set in the cache from step
to step, but batch fewer models into each product and call every operation once per block.
"""

from __future__ import annotations

import argparse
import statistics

import train as bench
from _report import cpu_model, table


def layouts(n_models: int) -> dict[str, list[int]]:
    """The block layouts timed: whole, then blocks of n/2, n/4, ... down to 2 models."""
    found, size = {}, n_models
    while size >= 2:
        found[f"{n_models // size} × {size}"] = [size] * (n_models // size)
        size //= 2
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short pack, one round")
    args = parser.parse_args(argv)
    config = bench.QUICK if args.quick else bench.FULL
    case = config.cases[0]  # the reference pack
    rounds = 1 if args.quick else 4
    ((x, y),) = bench._training_subsets([case])
    members = bench._members(case)
    chosen = bench._blocks(case, members, x)
    candidates = layouts(case.n_models)
    if chosen not in candidates.values():  # (blocks of unequal sizes)
        candidates[f"{chosen}"] = chosen
    peak = bench.MatmulPeak(config.peak_size)
    flops = bench.flops_per_example(x.shape[1], case.width, case.depth)
    flops *= case.batch_size * case.steps * case.n_models
    bench.train_packed(case, members, x, y)  # warm-up: first-touch of the data, MKL's set-up
    times: dict[str, list[float]] = {name: [] for name in candidates}
    shares: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, blocks in candidates.items():
            seconds = bench._time(lambda b=blocks: bench.train_packed(case, members, x, y, b))
            peak.probe()
            times[name].append(seconds)
            shares[name].append(flops / seconds / 1e9 / peak.rates[-1])
    base = next(name for name, blocks in candidates.items() if blocks == chosen)
    rows = [
        (
            f"{name}{'  (chosen)' if name == base else ''}",
            f"{statistics.median(times[name]):.3f} s  {_spread(times[base], times[name])} "
            f"against the chosen  {bench._percent_spread(shares[name])} of the peak",
        )
        for name in candidates
    ]
    print(f"CPU: {cpu_model()}; float32 matmul peak {peak.best:,.1f} GFLOP/s")
    table(f"{case.name} pack in cache blocks: {bench._describe(case)}", rows)


def _spread(base: list[float], other: list[float]) -> str:
    """Speed of `other` against `base`: the median (range) of their per-round time ratios."""
    return bench._spread(bench._paired(base, other))


if __name__ == "__main__":
    main()
