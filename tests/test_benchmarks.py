"""The training benchmarks run, and what they compare did the same work.

Timings are printed, never asserted (issue 8: targets are read off the benchmark's
output). What is asserted: every table is printed, and after 3 steps the packed trainer's
parameters equal the plain loop's to float64 rounding, for each configuration; and the
plain step that `benchmarks/compiled_step.py` compiles is sensgen's step (float64).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sensgen import data
from sensgen.backprop import Backprop
from sensgen.cache_blocks import cache_blocks
from sensgen.divergence import apply_update
from sensgen.models import Nonlinearity
from sensgen.optim import OPTIMIZERS, OptimizerName
from sensgen.train import Member, PackShape, init_pack

ROOT = Path(__file__).resolve().parents[1]

needs_fashion_mnist = pytest.mark.skipif(
    data.locate("fashion_mnist") is None,
    reason="Fashion-MNIST is absent (install Debian's `dataset-fashion-mnist`)",
)


def _run_training_benchmark(flag: str) -> str:
    """The stdout of `python benchmarks/train.py FLAG`, which must succeed."""
    done = subprocess.run(
        [sys.executable, "benchmarks/train.py", flag],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@needs_fashion_mnist
def test_training_benchmark_quick_run_agrees_with_the_plain_loop():
    out = _run_training_benchmark("--quick")
    assert re.search(r"float32 matmul peak: [\d,.]+ GFLOP/s", out)
    for case in ("reference", "small", "full batch", "adam"):
        assert f"\n{case}: 32 × 784-" in out
    assert "relu, Adam, batch 128" in out
    assert out.count("products alone, GFLOP/s") == 4
    assert out.count("of which model init") == 4
    # Where the trainer cuts the reference pack into cache blocks, the same pack in one
    # block is timed beside it (on 2 threads: two blocks of 16).
    reference = PackShape(
        784, 10, 256, 2, Nonlinearity.RELU, OptimizerName.MOMENTUM, 128, 1, 1, False
    )
    blocks = cache_blocks(reference, 32, torch.device("cpu"))
    split = "+".join(map(str, blocks))
    assert (f"(packed in blocks of {split} against the 32" in out) is (len(blocks) > 1)
    # The reference pack's share of the peak, strict and per round, as percentages.
    paired = re.search(r"packed share of peak\s+([\d.]+)%.* of the peak probed in the same", out)
    strict = re.search(r"strict, for information\s+([\d.]+)% \(the best round", out)
    assert strict and paired and 0 < float(strict[1]) < 100 and 0 < float(paired[1]) < 100
    agreement = [float(v) for v in re.findall(r"([\d.e+-]+) after 3 steps in float64", out)]
    assert len(agreement) == 4
    # In float64 (3 steps move the weights by ~1e-3–1e-2): only rounding differs.
    assert max(agreement) < 1e-10


@pytest.mark.parametrize("optimizer", [OptimizerName.MOMENTUM, OptimizerName.ADAM])
@pytest.mark.parametrize("batch_size", [8, None])
def test_products_alone_replays_the_trainer_s_products_on_stand_ins(
    monkeypatch, optimizer, batch_size
):
    # "products alone" in benchmarks/train.py times the products one packed step calls,
    # recorded, on stand-ins: the same functions and arguments, each tensor of the same
    # shape, strides and offset, sharing memory exactly where the trainer's did (h is
    # written by one product and read by the next), and none of the trainer's own tensors.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train as bench

    case = bench.Case("t", 3, 6, 2, batch_size, 20, 2, optimizer)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 12, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    recorded, stand_ins = bench.stand_in_products(case, bench._members(case), x, y)
    names = sorted(fn.__name__ for fn, _, _ in recorded)
    if batch_size is None:  # the shared input's first layer: one product for the pack
        assert names == ["addmm", "baddbmm", "baddbmm", "baddbmm", "baddbmm", "bmm", "bmm", "mm"]
    else:  # 3 layers: forward and weight gradient each, and 2 upstream gradients
        assert names == ["baddbmm"] * 6 + ["bmm"] * 2
    flat = [
        (a, b)
        for (f, args, kw), (g, args2, kw2) in zip(recorded, stand_ins, strict=True)
        for a, b in zip([*args, *kw.values()], [*args2, *kw2.values()], strict=True)
        if f is g
    ]
    assert len(flat) == sum(len(args) + len(kw) for _, args, kw in recorded)
    tensors = [(a, b) for a, b in flat if isinstance(a, torch.Tensor)]
    assert all(a == b for a, b in flat if not isinstance(a, torch.Tensor))  # β, ...
    for a, b in tensors:
        assert _layout(a) == _layout(b)
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    for a1, b1 in tensors:
        for a2, b2 in tensors:
            same = a1.untyped_storage().data_ptr() == a2.untyped_storage().data_ptr()
            assert same == (b1.untyped_storage().data_ptr() == b2.untyped_storage().data_ptr())
    shared = {  # recorded tensors that are views of another's memory (h, a and δ buffers)
        (id(a1), id(a2))
        for a1, _ in tensors
        for a2, _ in tensors
        if a1 is not a2 and a1.untyped_storage().data_ptr() == a2.untyped_storage().data_ptr()
    }
    assert shared  # so the check above is not vacuous
    run = bench.products_alone(case, bench._members(case), x, y)
    run()  # replays without error, on the stand-ins


def test_products_alone_replays_a_pack_in_blocks_as_the_trainer_trains_it(monkeypatch):
    # The trainer cuts this pack into blocks of 2 and 3 (`sensgen.cache_blocks`) and trains
    # each through all its steps: the replay calls the products the same way.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train as bench
    from sensgen import cache_blocks

    case = bench.Case("t", 5, 6, 2, 8, 20, 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    per_model = cache_blocks.model_step_bytes(12, 10, 6, 2, case.optimizer, 8)
    monkeypatch.setattr(cache_blocks, "BYTES_PER_THREAD", 2 * per_model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 12, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    run = bench.products_alone(case, bench._members(case), x, y)
    with bench._ProductRecorder() as recorder:
        run()
    models = [call[1][-1].shape[0] for call in recorder.calls]  # the batch of products
    assert models == [2] * (8 * 3) + [3] * (8 * 3)


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset()


def test_the_compiled_step_benchmark_times_sensgen_s_step(monkeypatch):
    # benchmarks/compiled_step.py's plain step must do sensgen's work: the same losses and,
    # after 3 momentum steps, the same parameters (float64, so only rounding differs).
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import compiled_step

    m, b, n_classes = 3, 8, compiled_step.SIZES[-1]
    shape = PackShape(
        in_dim=12, n_classes=n_classes, width=6, depth=2, nonlinearity=Nonlinearity.RELU,
        optimizer=OptimizerName.MOMENTUM, batch_size=b, max_steps=3, eval_every=3,
        stop_at_fit=False,
    )  # fmt: skip
    _, params = init_pack(
        shape, [Member(seed=i, lr=compiled_step.LR, init_scale=1.0) for i in range(m)]
    )
    params = {k: v.double() for k, v in params.items()}
    w = [params[f"layers.{k}.weight"].clone() for k in range(3)]
    bias = [params[f"layers.{k}.bias"].clone() for k in range(3)]
    vw, vb = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in bias]
    momentum, backprop = OPTIMIZERS[OptimizerName.MOMENTUM], Backprop(Nonlinearity.RELU)
    state = momentum.init(params)
    lr = torch.full((m,), compiled_step.LR, dtype=torch.float64)
    steps = torch.zeros(m, dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(m, b, 12, generator=gen, dtype=torch.float64)
        y = torch.randint(n_classes, (m, b), generator=gen)
        target, beta = momentum.gradient_target(state, None)
        losses = backprop.loss_and_grad(
            params, x, y, target, scale=1 / b, beta=beta, gain=momentum.gain(steps)
        )
        apply_update(params, *momentum.direction(None, state, lr, steps))
        momentum.renormalise(state, steps, torch.ones(m, dtype=torch.bool), step)
        steps += 1
        plain = compiled_step.plain_step(w, bias, vw, vb, x, y)
        torch.testing.assert_close(plain, losses, rtol=1e-12, atol=1e-14)
    for k in range(3):
        torch.testing.assert_close(w[k], params[f"layers.{k}.weight"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bias[k], params[f"layers.{k}.bias"], rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@needs_fashion_mnist
def test_the_profile_shows_the_step_s_products():
    out = _run_training_benchmark("--profile")
    calls = dict(re.findall(r"(aten::\w+) +[\d.]+ ms/step +\((\d+) calls\)", out))
    blocks = re.search(r"blocks ([\d+]+)\)", out).group(1).split("+")
    assert sum(map(int, blocks)) == 32
    # the reference pack (2 hidden layers): 6 baddbmm (forward and weight gradients) and
    # 2 bmm (the input gradients of the two upper layers) per step of each cache block
    assert calls["aten::baddbmm"] == str(6 * len(blocks))
    assert calls["aten::bmm"] == str(2 * len(blocks))
    assert "wall time under the profiler" in out


def test_the_block_size_benchmark_times_halvings_down_to_two_models(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import block_sizes

    assert block_sizes.layouts(32) == {
        "1 × 32": [32], "2 × 16": [16] * 2, "4 × 8": [8] * 4, "8 × 4": [4] * 8, "16 × 2": [2] * 16
    }  # fmt: skip
    assert block_sizes.layouts(6) == {"1 × 6": [6], "2 × 3": [3, 3]}  # (3 // 2 = 1: stop)


@pytest.mark.slow
@needs_fashion_mnist
def test_the_block_size_benchmark_runs_and_marks_the_chosen_layout(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import block_sizes

    block_sizes.main(["--quick"])
    out = capsys.readouterr().out
    assert "reference pack in cache blocks: 32 × 784-256-256-10" in out
    rows = re.findall(r"^  (\d+ × \d+)(  \(chosen\))?\s+[\d.]+ s  ([\d.]+)x against", out, re.M)
    assert [r[0] for r in rows] == ["1 × 32", "2 × 16", "4 × 8", "8 × 4", "16 × 2"]
    chosen = cache_blocks(
        PackShape(784, 10, 256, 2, Nonlinearity.RELU, OptimizerName.MOMENTUM, 128, 1, 1, False),
        32,
        torch.device("cpu"),
    )
    marked = [name for name, mark, _ in rows if mark]
    assert marked == [f"{len(chosen)} × {chosen[0]}"]
    assert [ratio for _, mark, ratio in rows if mark] == ["1.00"]  # against itself
