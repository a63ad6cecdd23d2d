"""Cache blocks: a minibatch pack on the CPU trained as consecutive blocks of its models.

A step of a pack reads and writes every model's parameters and optimiser state and the
batch's activations; the next step reads them again. When that working set outgrows the
processor's cache, every step brings it back from memory: the matrix products start cold
and the memory-bound passes between them (the update, the gather, φ and φ′) run at DRAM
speed. Training the pack's models in blocks, each block through all of its steps before
the next starts, keeps one block's working set in the cache from step to step.

The models of a pack do not interact, and a batched product computes each model's slice
alike in any batch of two or more models, so a block's models end bit for bit as in the
whole pack while every block keeps two or more models training (tests check it). A block
whose other models have stopped (fitted or diverged: `train._PackRun.compact`) trains its
last one alone, and MKL's product over a single matrix may round differently from its slice
in a batch, as it does for a whole pack down to its last model: that model can then end a
few float32 units apart from its result in one block (as a run retrained in a pack of
another size can; README, "How training works").

Measured on a 2-core Xeon guest (issue 8, `docs/benchmarks.md`, "Cache blocks"): the
reference pack (32 models of 784-256-256-10, momentum, batch 128) trained as two blocks of
16 ran 1.04× as fast (1.03–1.11 over 5 paired rounds, run 49) as in one block, and
0.98–1.15× in other paired runs depending on the hour; its Adam twin, as blocks of 12 + 10
+ 10, 1.10× (1.07–1.14). The 8-model packs of width 512 of the reference study, cut in two
blocks of 4, ran 0.97–1.04× as fast as whole: no gain there. On a GPU the whole pack is one
block: its memory is not a cache to fit, and larger batched products fill it better.
"""

from __future__ import annotations

import itertools
import math

import torch

from sensgen.optim import OPTIMIZERS, OptimizerName
from sensgen.pack import PackShape

# The working set one thread's share of the cache holds well from step to step. Measured,
# not derived: the 2-core guest of issue 8 reports a 480 MiB L3 that it shares with its
# host's other guests, and copies ran at cache speed up to a 64 MiB working set.
BYTES_PER_THREAD = 32 * 2**20


def model_step_bytes(
    in_dim: int,
    n_classes: int,
    width: int,
    depth: int,
    optimizer: OptimizerName,
    batch_size: int,
) -> int:
    """Bytes (float32) one model of a minibatch pack touches at every step.

    Its parameters (n_params of them), its gradient unless the optimiser takes it into its
    own state, and the optimiser's carried state (`optim.OPTIMIZERS`); then its batch: the
    inputs [B, d], and per hidden unit and layer 4 values (pre-activation, activation, the
    upstream gradient and its product with φ′), 2 per class (logits, probabilities).
    """
    sizes = [in_dim] + [width] * depth + [n_classes]
    n_params = sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(sizes))
    spec = OPTIMIZERS[optimizer]
    copies = 1 + (spec.accumulator is None) + len(spec.carried)
    per_example = in_dim + 4 * width * depth + 2 * n_classes
    return 4 * (copies * n_params + batch_size * per_example)


def block_sizes(n_models: int, model_bytes: int, threads: int, budget: int) -> list[int]:
    """How many models each block trains, in order (they sum to `n_models`).

    Blocks hold about `budget` bytes of working set: budget / model_bytes models, rounded
    to the nearest multiple of `threads` (a batched product spreads its models over the
    threads: an odd block leaves one idle at its end), at least `threads` and at least 2.
    The pack is then cut into as few blocks as that allows, their sizes as equal as
    multiples of `threads` make them; never a block of one model (module docstring).
    """
    if min(n_models, model_bytes, threads) < 1:
        raise ValueError(
            f"need n_models, model_bytes, threads ≥ 1, got {n_models, model_bytes, threads}"
        )
    per_block = max(2, threads, threads * round(budget / model_bytes / threads))
    n_blocks = math.ceil(n_models / per_block)
    if n_blocks == 1:
        return [n_models]
    # Whole multiples of `threads` shared out as evenly as can be; the remainder (fewer
    # than `threads` models) goes to the last block, which is never left with one model.
    units, rest = divmod(n_models, threads)
    base, extra = divmod(units, n_blocks)
    sizes = [threads * (base + (i < extra)) for i in range(n_blocks)]
    sizes[-1] += rest
    sizes = [s for s in sizes if s > 0]
    if sizes[-1] == 1:  # a last block of one joins the block before it
        sizes.pop()
        sizes[-1] += 1
    return sizes


def cache_blocks(shape: PackShape, n_models: int, device: torch.device) -> list[int]:
    """The block sizes a pack of `n_models` models of `shape` trains in on `device`
    (`block_sizes`): one block on a GPU and for full batch (whose step reads the whole
    training set anyway, and shares the first layer's product across the pack)."""
    if device.type != "cpu" or shape.batch_size is None:
        return [n_models]
    model_bytes = model_step_bytes(
        shape.in_dim, shape.n_classes, shape.width, shape.depth, shape.optimizer,
        shape.batch_size,
    )  # fmt: skip
    threads = torch.get_num_threads()
    return block_sizes(n_models, model_bytes, threads, BYTES_PER_THREAD * threads)
