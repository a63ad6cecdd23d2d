"""Would a compiler's fused kernels beat sensgen's packed step? (issue 8)

Run from the repository root (needs a C++ compiler for `torch.compile` on the CPU):

    python benchmarks/compiled_step.py                 # default mode, a few minutes
    python benchmarks/compiled_step.py --max-autotune  # also inductor's own GEMM kernels
    python benchmarks/compiled_step.py --quick         # smoke run

On the reference pack of `benchmarks/train.py` (32 × 784-256-256-10, ReLU, momentum SGD,
batch 128, 10,000 Fashion-MNIST images), times per step, in one run:

* sensgen's packed trainer (`train_pack`), and its models' seeded initialisation alone
  (`init_pack`, part of that time: the plain step below starts from ready weights);
* the same step written plainly with torch ops (forward, the chain rule by hand, momentum
  and update in place; each model its own minibatch), run eagerly;
* that plain step under `torch.compile` (TorchInductor: elementwise work fused into
  generated C++ loops, matrix products left to the BLAS; with ``--max-autotune`` it also
  tries its own C++ GEMM templates, which can fuse bias and ReLU into the product).

Printed: milliseconds per step, each ÷ sensgen's (the median over rounds of the times of
one round; sensgen's with its initialisation taken out), and the compile time. The plain
step keeps no divergence check (sensgen's is one pass over the momenta, about 1.7 ms per
step here), so it is an upper bound on what fusion alone would buy.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _report import cpu_model, table
from sensgen import data
from sensgen.models import Nonlinearity
from sensgen.optim import MOMENTUM, OptimizerName
from sensgen.train import Member, PackShape, init_pack, train_pack

SEED = 0
LR = 0.01
M, B, SIZES = 32, 128, (784, 256, 256, 10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 round")
    parser.add_argument("--max-autotune", action="store_true", help="also mode=max-autotune")
    args = parser.parse_args(argv)
    steps, rounds = (10, 1) if args.quick else (60, 5)
    train = data.load("fashion_mnist", split="train")
    x, y = train.x[:10_000], train.y[:10_000]
    print(
        f"compiled-step benchmark: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_model()}"
    )
    packed, init = _sensgen(x, y, steps)
    fns = {"sensgen packed": packed, "sensgen init": init}
    fns["plain step, eager"] = _plain(x, y, steps, None)
    compile_s = {}
    modes = ["default"] + (["max-autotune-no-cudagraphs"] if args.max_autotune else [])
    for mode in modes:
        start = time.perf_counter()
        try:
            fns[f"plain step, compiled ({mode})"] = _plain(x, y, steps, mode)
        except Exception as error:  # no C++ compiler, or inductor unsupported here
            print(f"torch.compile(mode={mode!r}) failed: {type(error).__name__}: {error}")
            continue
        compile_s[mode] = time.perf_counter() - start
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    init = times.pop("sensgen init")
    times["sensgen packed"] = [t - i for t, i in zip(times["sensgen packed"], init, strict=True)]
    base = times["sensgen packed"]
    rows = [("sensgen init (taken out)", f"{statistics.median(init):6.1f} ms/step (median)")]
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, base, strict=True))
        rows.append((name, f"{min(t):6.1f} ms/step (best round)   {ratio:.2f}x sensgen's time"))
    rows += [(f"compile time ({mode})", f"{s:.1f} s") for mode, s in compile_s.items()]
    table(
        f"reference pack: {M} × {'-'.join(map(str, SIZES))}, batch {B}, "
        f"{steps} steps, {rounds} rounds",
        rows,
    )


def _sensgen(
    x: torch.Tensor, y: torch.Tensor, steps: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """sensgen's training of the pack for `steps` steps, and its initialisation alone."""
    shape = PackShape(
        in_dim=x.shape[1], n_classes=SIZES[-1], width=SIZES[1], depth=len(SIZES) - 2,
        nonlinearity=Nonlinearity.RELU, optimizer=OptimizerName.MOMENTUM, batch_size=B,
        max_steps=steps, eval_every=steps, stop_at_fit=False,
    )  # fmt: skip
    members = [Member(seed=SEED + m, lr=LR, init_scale=1.0) for m in range(M)]
    labels = y.expand(M, -1)
    return lambda: train_pack(shape, members, x, labels), lambda: init_pack(shape, members)


def plain_step(w, b, vw, vb, x, y):
    """One momentum-SGD step of every model, in place; returns the losses [M].

    w[l] [M, n_out, n_in], b[l] [M, n_out], vw/vb their momenta; x [M, B, d], y [M, B].
    """
    acts, pre = [x], []
    for k in range(len(w)):
        h = torch.baddbmm(b[k].unsqueeze(1), acts[-1], w[k].transpose(1, 2))
        if k < len(w) - 1:
            pre.append(h)
            acts.append(torch.relu(h))
    log_p = torch.log_softmax(h, -1)
    losses = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
    delta = (log_p.exp() - F.one_hot(y, SIZES[-1]).to(h.dtype)) / x.shape[1]
    for k in reversed(range(len(w))):
        grad_w, grad_b = torch.bmm(delta.transpose(1, 2), acts[k]), delta.sum(1)
        if k > 0:
            delta = torch.bmm(delta, w[k]) * (pre[k - 1] > 0)
        vw[k].mul_(MOMENTUM).add_(grad_w)
        vb[k].mul_(MOMENTUM).add_(grad_b)
        w[k].sub_(LR * vw[k])
        b[k].sub_(LR * vb[k])
    return losses


def _plain(x: torch.Tensor, y: torch.Tensor, steps: int, mode: str | None) -> Callable[[], None]:
    """`plain_step` over `steps` minibatches (each model its own random examples)."""
    gen = torch.Generator().manual_seed(SEED)
    pairs = list(itertools.pairwise(SIZES))
    w = [torch.randn(M, o, i, generator=gen) * i**-0.5 for i, o in pairs]
    b = [torch.zeros(M, o) for _, o in pairs]
    vw, vb = [torch.zeros_like(t) for t in w], [torch.zeros_like(t) for t in b]
    step = plain_step if mode is None else torch.compile(plain_step, mode=mode, dynamic=False)
    idx = torch.randint(len(y), (M, B), generator=gen)
    step(w, b, vw, vb, x[idx], y[idx])  # compiles (and autotunes) now, not in the timings

    def run() -> None:
        for _ in range(steps):
            idx = torch.randint(len(y), (M, B), generator=gen)
            step(w, b, vw, vb, x[idx], y[idx])

    return run


if __name__ == "__main__":
    main()
