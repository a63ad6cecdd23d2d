"""Packed training: M same-shape MLPs trained together, one batched step for all (paper §4).

A *pack* is M models that share an architecture, optimiser and batch size but may differ in
seed (initial weights and data order), learning rate, init scale and labels. Their
parameters are stacked along a leading model axis (`stack_module_state`) and one step is

    losses_m = mean_b CE(f(θ_m; x_mb), y_mb)        x_batch [M, B, d], y_batch [M, B]
    grads_m  = ∂ losses_m / ∂θ_m

computed for every model at once by `sensgen.backprop.Backprop` (batched matrix products,
the chain rule written out; the same values as `vmap(grad(loss))`): the models do not
interact.

Full batch (`batch_size=None`) accumulates over the training set's consecutive chunks
c = 1..C of at most `FULL_BATCH_CHUNK` examples (Σ n_c = N):

    grad_m = Σ_c (1/N) · Σ_{b ∈ c} ∂ CE_mb / ∂θ_m,     loss_m = Σ_c (1/N) · Σ_{b ∈ c} CE_mb

which is the gradient (and value) of model m's mean loss over all N examples, while only
one chunk's activations [M, n_c, width] are alive at a time. The models share each chunk
(unless they augment), so the first layer is one matrix product for the whole pack.

Each model stops on its own when it reaches 100% training accuracy (checked every
`eval_every` steps, if `stop_at_fit`), when its step budget runs out, or when its loss or
its next parameters stop being finite (diverged; it keeps its last finite parameters). A
stopped model takes no more updates (learning rate 0 leaves θ exactly as it is) and, at
the next check, leaves the pack: the models still training go on as a smaller pack, so a
study's slowest-fitting models do not carry the cost of those that fitted early.

Randomness: model m's initial weights come from `torch.Generator().manual_seed(seed_m)`;
its data order from a generator seeded by `derive_seed(seed_m, "order")`; if it augments
(`Member.augment`), its translations and flips from one seeded by
`derive_seed(seed_m, "augment")`, drawn afresh for every minibatch (in full batch: for
each chunk in turn, so for the whole training set at every step). A model trained alone and
the same model trained in a pack therefore see the same batches and end with the same
parameters (tests check this); models that do not augment see their batches untouched,
whatever their pack-mates do. The training-accuracy check behind `stop_at_fit`
uses the unaugmented training set (paper §2.3).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from sensgen.backprop import Backprop, minibatch_layout
from sensgen.batches import Augmenter, Minibatches
from sensgen.batches import derive_seed as derive_seed  # re-exported: seeds of every purpose
from sensgen.cache_blocks import cache_blocks
from sensgen.divergence import DivergenceGuard, norms, underflow_slack
from sensgen.fused_update import FUSED_UPDATES
from sensgen.optim import OPTIMIZERS

# What a pack is, re-exported: `sensgen.train` has always been where callers find it.
from sensgen.pack import Member as Member
from sensgen.pack import PackOutcome as PackOutcome
from sensgen.pack import PackShape as PackShape
from sensgen.pack import fits_training_set as fits_training_set
from sensgen.pack import init_pack as init_pack
from sensgen.pack import predict_pack as predict_pack
from sensgen.pack import unstack as unstack

# Examples per chunk of a full-batch step (see the module docstring). Fixed, not sized to
# the pack or the free memory: the chunks set the order of the floating-point sums, and a
# run's result must depend only on its spec, not on its pack-mates or the machine it ran on.
# `planner.model_memory_bytes` sizes a full-batch run's activations by it.
FULL_BATCH_CHUNK = 4096


def train_pack(
    shape: PackShape,
    members: Sequence[Member],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    on_step: Callable[[int], None] | None = None,
    blocks: Sequence[int] | None = None,
) -> PackOutcome:
    """Train a pack of models until each fits, diverges or exhausts `max_steps`.

    Args:
        shape: what the models share.
        members: one entry per model (M of them).
        x: training inputs [N, d], shared by all models; training runs on x's device.
        y: training labels [M, N] (each model may have its own, e.g. random labels).
        on_step: called after every step with the step index (for progress bars).
        blocks: how many models each cache block trains, in order (summing to M); None:
            `sensgen.cache_blocks.cache_blocks` chooses (benchmarks compare the two).

    Returns:
        A `PackOutcome`.

    On the CPU a minibatch pack whose working set outgrows the cache trains as blocks of
    its models, one block after the other (`sensgen.cache_blocks`): the same results, bit
    for bit while every block keeps two or more models training (that module says when
    not). `on_step` is then called once for every n_blocks steps the blocks take together:
    once per step of the pack, spread over the blocks, when no model stops early, fewer
    when blocks stop at different steps.
    """
    n_models, n = len(members), x.shape[0]
    if y.shape != (n_models, n):
        raise ValueError(f"y must be [M, N] = [{n_models}, {n}], got {tuple(y.shape)}")
    if shape.batch_size is not None and shape.batch_size > n:  # (a batch would be garbage)
        raise ValueError(f"batch_size {shape.batch_size} exceeds the {n} training examples")
    if blocks is None:
        sizes = cache_blocks(shape, n_models, x.device)
    elif sum(blocks) != n_models or min(blocks) < 1:
        raise ValueError(f"blocks must be positive and sum to {n_models}, got {list(blocks)}")
    else:
        sizes = list(blocks)
    if len(sizes) == 1:
        return _train_block(shape, members, x, y, on_step)
    ticks = _BlockTicks(on_step, len(sizes))
    outcome = None
    for start, size in zip(itertools.accumulate([0, *sizes]), sizes, strict=False):
        block = _train_block(
            shape, members[start : start + size], x, y[start : start + size], ticks
        )
        if outcome is None:  # the pack's results, filled block by block
            outcome = _empty_outcome(block, n_models)
        for name, value in block.params.items():
            outcome.params[name][start : start + size] = value
        outcome.steps[start : start + size] = block.steps
        outcome.diverged[start : start + size] = block.diverged
    return outcome


def _empty_outcome(like: PackOutcome, n_models: int) -> PackOutcome:
    """An outcome of `n_models` models, its tensors as `like`'s but uninitialised."""
    params = {k: v.new_empty((n_models, *v.shape[1:])) for k, v in like.params.items()}
    steps = like.steps.new_empty(n_models)
    return PackOutcome(params, steps, like.diverged.new_empty(n_models))


class _BlockTicks:
    """`on_step` for a pack trained in `n_blocks` blocks: called once for every
    `n_blocks` steps of the blocks, so a pack's max_steps ticks at most, as unblocked."""

    def __init__(self, on_step: Callable[[int], None] | None, n_blocks: int) -> None:
        self.on_step, self.n_blocks, self.block_steps = on_step, n_blocks, 0

    def __call__(self, _: int) -> None:
        self.block_steps += 1
        if self.on_step is not None and self.block_steps % self.n_blocks == 0:
            self.on_step(self.block_steps // self.n_blocks - 1)


def _train_block(
    shape: PackShape,
    members: Sequence[Member],
    x: torch.Tensor,
    y: torch.Tensor,
    on_step: Callable[[int], None] | None,
) -> PackOutcome:
    """`train_pack` of one block of models (all of them trained together)."""
    augmenter = Augmenter.for_pack(
        shape.augmentation, [m.augment for m in members], [m.seed for m in members], x
    )
    template, params = init_pack(shape, members)  # drawn on the CPU: same weights anywhere
    params = {k: v.to(x.device) for k, v in params.items()}
    run = _PackRun(shape, members, params, x, y, augmenter)
    del params  # the run holds them, laid out for its steps (a copy of W₀ for minibatches)
    for step in range(shape.max_steps):
        run.step(x)
        if on_step is not None:
            on_step(step)
        if (step + 1) % shape.eval_every == 0 or step + 1 == shape.max_steps:
            if shape.stop_at_fit:
                run.stop(fits_training_set(template, run.params, x, run.y))
            if not run.active.any():
                break
            run.compact()
    return run.outcome()


class _PackRun:
    """The training state of the models of a pack still in it (all tensors [m, ...]).

    `ids` [m] are their positions in the pack as given (M models). Stopped models keep
    their place, with learning rate 0, until `compact` moves their results out into
    full-pack tensors (`outcome`): the first time, the parameters' own [M, ...] buffers
    become those results, and the models still training get fresh, smaller buffers.
    """

    def __init__(
        self,
        shape: PackShape,
        members: Sequence[Member],
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        augmenter: Augmenter | None,
    ) -> None:
        device = y.device
        n_models = len(members)
        self.shape, self.y, self.augmenter = shape, y, augmenter
        self.optimizer = OPTIMIZERS[shape.optimizer]
        self.params = params if shape.batch_size is None else minibatch_layout(params)
        # Without the directions' scratch: the fused update (`_buffers`) writes none.
        self.state = self.optimizer.init(self.params, scratch=False)
        self.ids = torch.arange(n_models, device=device)
        self.lr = torch.tensor([m.lr for m in members], dtype=torch.float64, device=device)
        self.lr_active = self.lr.clone()  # 0 for stopped models: θ stays exactly as it is
        self.steps = torch.zeros(n_models, dtype=torch.int64, device=device)
        self.taken = 0  # steps of the pack; the models still training have taken them all
        self.active = torch.ones(n_models, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(n_models, dtype=torch.bool, device=device)
        # ≥ max |m| per model for Adam's fused update (`FusedUpdate.within_bound`): m = 0.
        self.moment_bound = torch.zeros(n_models, dtype=torch.float64, device=device)
        self.last_finite: dict[int, dict[str, torch.Tensor]] = {}  # position -> its params
        self.guard = DivergenceGuard(self.params)
        self.results: tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self.batches = None
        if shape.batch_size is not None:
            self.batches = Minibatches([m.seed for m in members], shape.batch_size, x)
        self._buffers()

    def _buffers(self) -> None:
        """The gradient (if the optimiser needs one) and the backward pass's workspace."""
        self.grads = None
        if self.optimizer.accumulator is None:
            self.grads = {k: torch.empty_like(v) for k, v in self.params.items()}
        self.target, self.beta = self.optimizer.gradient_target(self.state, self.grads)
        self.backprop = Backprop(self.shape.nonlinearity)
        # Adam and RMSprop by the fused kernel on θ itself (`sensgen.fused_update`).
        self.fused = FUSED_UPDATES.get(self.shape.optimizer)
        if self.fused is not None and not self.fused.available(self.params, self.grads, self.state):
            self.fused = None
        # The directions' scratch ("buf", a copy of the pack's size): the fused update
        # writes no direction, so a pack has it only while it takes directions.
        if self.fused is not None:
            self.fused_slices = self.fused.per_model(self.params, self.grads, self.state)
            # The kernel's step count, filled in place at each step (no copy from the
            # host that a GPU would wait for).
            self.fused_count = torch.zeros((), dtype=torch.float32, device=self.lr.device)
            self._plan_fused()
            for name in self.optimizer.scratch:  # (a compacted pack's that fell back)
                self.state.pop(name, None)
        else:
            self.moment_bound.fill_(torch.inf)  # m unbounded along directions: unknown
            if any(name not in self.state for name in self.optimizer.scratch):
                self.state.update(self.optimizer.init_scratch(self.params))

    def _plan_fused(self) -> None:
        """The fused update's models (those still training) and learning rates, read once
        per change (`stop`), not at every step (each read waits for a GPU)."""
        if self.fused is not None:
            models = self.active.nonzero().flatten().tolist()
            self.fused_plan = (models, self.lr_active.tolist())

    def step(self, x: torch.Tensor) -> None:
        """One update of every model still in the pack (stopped ones with lr 0)."""
        gain = self.optimizer.gain(self.steps)
        if self.batches is None:
            losses = _full_batch_step(
                self.backprop, self.params, x, self.y, self.augmenter, self.target, self.beta,
                gain,
            )  # fmt: skip
        else:
            xb, yb = self.batches.next(x, self.y)
            if self.augmenter is not None:
                self.augmenter(xb)
            scale = 1 / self.shape.batch_size
            losses = self.backprop.loss_and_grad(
                self.params, xb, yb, self.target, scale=scale, beta=self.beta, gain=gain,
                input_norms=self._input_norms(x, xb),
            )  # fmt: skip
        if self.fused is not None:
            newly, last_finite = self._fused_update(losses)
        else:
            direction, scale = self.optimizer.direction(
                self.grads, self.state, self.lr_active, self.steps
            )
            bounds = None
            if self._tracks_first_layer():  # no pass over the first layer's direction
                bounds = {"layers.0.weight": self.backprop.first_grad_bound}
            newly, last_finite = self.guard.update(
                self.params, direction, scale, losses, self.active, ~self.diverged,
                grad_bounds=bounds, decay=self.beta,
            )  # fmt: skip
        if newly is not None:
            self.last_finite.update(last_finite)
            self.diverged |= newly
            self.stop(newly)
        # Momentum's scaled accumulator, when due (`sensgen.optim.ScaledAccumulator`):
        # z ← μᴷ·z for the models still training, and the guard's bounds on it alike.
        factor = self.optimizer.renormalise(self.state, self.steps, self.active, self.taken)
        if factor is not None:
            self.guard.rescale(factor)
        self.steps += self.active.long()
        self.taken += 1

    def _fused_update(self, losses: torch.Tensor):
        """Adam's or RMSprop's step on θ in place (`sensgen.fused_update`), guarded by the
        step's a-priori bound for the models where nothing can overflow on the way
        (`FusedUpdate.within_bound`); the others are at risk: copied, stepped and checked."""
        fused, t = self.fused, self.fused.step_count(self.taken)
        within, next_moment = fused.within_bound(
            self._gradient_bound(), self.moment_bound, self.lr_active, t, self.guard.dtype
        )
        r = torch.full_like(self.lr, fused.step_bound(t))  # float64 [M], as the guard's
        r.masked_fill_(~(within | ~self.active), torch.inf)  # stopped models: s = 0
        models, lr = self.fused_plan

        def apply() -> None:
            fused.apply(self.fused_slices, lr, self.fused_count.fill_(t), models)

        newly, last_finite, checked = self.guard.update_in_place(
            self.params, apply, self.lr_active, r, losses, self.active, ~self.diverged
        )
        self.moment_bound = next_moment
        moments = fused.moments(self.grads, self.state)
        for i in checked:  # at risk and still finite: |m| bounded from m itself again
            self.moment_bound[i] = norms({k: m[i : i + 1] for k, m in moments.items()})[0]
        return newly, last_finite

    def _gradient_bound(self) -> torch.Tensor:
        """[M] float64 ≥ max |g| over the step's gradient: the first layer's weights from
        the backward pass where it gives a bound (`_tracks_first_layer`), every other
        tensor by its norm (`sensgen.divergence.norms`)."""
        if not self._tracks_first_layer():
            return norms(self.grads)
        rest = norms({k: g for k, g in self.grads.items() if k != "layers.0.weight"})
        return torch.maximum(rest, self.backprop.first_grad_bound)  # (maximum keeps NaN)

    def _tracks_first_layer(self) -> bool:
        """Whether the first layer's gradient is bounded from the backward pass, not by a
        pass over it (`sensgen.divergence`): with minibatches, for a direction that is the
        gradient target (SGD, momentum) or a fused update (Adam, RMSprop: only the
        gradient's size matters). A full-batch step costs far more than that pass."""
        steps_along = self.optimizer.steps_along_target or self.fused is not None
        return self.batches is not None and steps_along

    def _input_norms(self, x: torch.Tensor, xb: torch.Tensor) -> torch.Tensor | None:
        """‖x_batch_m‖_F [M] for `_tracks_first_layer` (augmented batches: from xb)."""
        if not self._tracks_first_layer():
            return None
        if self.augmenter is not None:
            return underflow_slack(torch.linalg.vector_norm(xb, dim=(1, 2)).double(), xb)
        return self.batches.input_norms(x)

    def stop(self, which: torch.Tensor) -> None:
        """Stop models `which` ([m] bool): no more updates."""
        self.active &= ~which
        self.lr_active = torch.where(self.active, self.lr, 0.0)
        self._plan_fused()

    def compact(self) -> None:
        """Move the stopped models' results out; the rest go on as a smaller pack."""
        if bool(self.active.all()):
            return
        self._store((~self.active).nonzero().flatten().tolist())
        keep = self.active.nonzero().flatten().tolist()
        index = torch.tensor(keep, dtype=torch.int64, device=self.ids.device)
        self.params = {k: v[index] for k, v in self.params.items()}
        self.guard.select(index)
        self.state = {name: {k: v[index] for k, v in s.items()} for name, s in self.state.items()}
        names = ("ids", "lr", "lr_active", "steps", "active", "diverged", "y", "moment_bound")
        for name in names:
            setattr(self, name, getattr(self, name)[index])
        self.last_finite = {}  # only stopped models have some
        if self.batches is not None:
            self.batches.select(keep)
        if self.augmenter is not None:
            self.augmenter = self.augmenter.select(keep)
        self._buffers()

    def _store(self, positions: Sequence[int]) -> None:
        """Write the results of the models at `positions` into the full-pack results.

        The first time, the full pack's own buffers become the results: the parameters are
        already in place, but for the diverged models' last finite ones.
        """
        if self.results is None:
            self.results = (self.params, self.steps.clone(), self.diverged.clone())
        params, steps, diverged = self.results
        in_place = params is self.params
        ids = self.ids.tolist()
        for i in positions:
            values = self.last_finite.get(i)
            if values is None and not in_place:
                values = {k: v[i] for k, v in self.params.items()}
            for k, v in (values or {}).items():
                params[k][ids[i]] = v
        steps[self.ids], diverged[self.ids] = self.steps, self.diverged

    def outcome(self) -> PackOutcome:
        """Every model's final parameters, steps and divergence flag, in pack order."""
        self._store(range(len(self.ids)))
        params, steps, diverged = self.results
        # The training layout undone (a copy of W₀ for minibatch packs), once the optimiser
        # state and gradients are gone, so that the copy adds nothing to the pack's peak.
        self.state = self.grads = self.target = self.backprop = None
        params = {k: v.contiguous() for k, v in params.items()}
        return PackOutcome(params=params, steps=steps, diverged=diverged)


def _full_batch_step(
    backprop: Backprop,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    augmenter: Augmenter | None,
    target: dict[str, torch.Tensor],
    beta: float,
    gain: torch.Tensor | None,
) -> torch.Tensor:
    """Each model's mean loss over all of x [M]; target ← β·target + gain·its gradient,
    chunk by chunk (the first chunk with β, the rest added).

    Chunk c adds (1/N)·Σ_{b∈c} of the per-example losses and gradients (module docstring),
    in chunk order. Without augmentation the models share each chunk (one product for the
    pack's first layer); augmenting members augment their own copy of it, chunk after chunk.
    """
    n_models, n = y.shape
    losses = torch.zeros(n_models, dtype=x.dtype, device=x.device)
    splits = torch.split(x, FULL_BATCH_CHUNK), torch.split(y, FULL_BATCH_CHUNK, dim=1)
    for c, (xc, yc) in enumerate(zip(*splits, strict=True)):
        xb = xc if augmenter is None else augmenter(xc.repeat(n_models, 1, 1))
        chunk_beta = beta if c == 0 else 1.0
        losses += backprop.loss_and_grad(
            params, xb, yc, target, scale=1 / n, beta=chunk_beta, gain=gain
        )
    return losses
