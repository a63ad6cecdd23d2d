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

Each model stops on its own (masked updates) when it reaches 100% training accuracy (checked
every `eval_every` steps, if `stop_at_fit`), when its step budget runs out, or when its loss
or its next parameters stop being finite (diverged; it keeps its last finite parameters).

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

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import stack_module_state

from sensgen.backprop import Backprop, logits
from sensgen.data import Augmentation, apply_augmentation, draw_augmentation
from sensgen.models import MLP, Nonlinearity
from sensgen.optim import OPTIMIZERS, OptimizerName

# Examples per chunk of a full-batch step (see the module docstring). Fixed, not sized to
# the pack or the free memory: the chunks set the order of the floating-point sums, and a
# run's result must depend only on its spec, not on its pack-mates or the machine it ran on.
# `planner.model_memory_bytes` sizes a full-batch run's activations by it.
FULL_BATCH_CHUNK = 4096


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose ("order", "labels", ...) derived from a run's seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class PackShape:
    """What every model in a pack shares."""

    in_dim: int
    n_classes: int
    width: int
    depth: int
    nonlinearity: Nonlinearity
    optimizer: OptimizerName
    batch_size: int | None  # None: full batch
    max_steps: int
    eval_every: int
    stop_at_fit: bool
    augmentation: Augmentation | None = None  # how augmenting members augment; None: none do


@dataclass(frozen=True)
class Member:
    """What one model in a pack has of its own."""

    seed: int
    lr: float
    init_scale: float
    augment: bool = False  # augment each training batch with `PackShape.augmentation`


@dataclass(frozen=True)
class PackOutcome:
    """The end of a pack's training.

    Attributes:
        params: stacked parameters, each [M, ...], as `stack_module_state` names them.
        steps: [M] int64, updates applied to each model.
        diverged: [M] bool, whose loss or update became non-finite (their params are the
            last finite ones).
    """

    params: dict[str, torch.Tensor]
    steps: torch.Tensor
    diverged: torch.Tensor


def init_pack(shape: PackShape, members: Sequence[Member]) -> tuple[MLP, dict[str, torch.Tensor]]:
    """Build each member's MLP from its own seed and stack them.

    Returns a template MLP (for `functional_call`) and the stacked parameters [M, ...].
    """
    nets = [
        MLP(
            shape.in_dim,
            shape.n_classes,
            shape.width,
            shape.depth,
            shape.nonlinearity,
            m.init_scale,
            generator=torch.Generator().manual_seed(m.seed),
        )
        for m in members
    ]
    params, _ = stack_module_state(nets)
    return nets[0], {k: v.detach().clone() for k, v in params.items()}


def train_pack(
    shape: PackShape,
    members: Sequence[Member],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    on_step: Callable[[int], None] | None = None,
) -> PackOutcome:
    """Train a pack of models until each fits, diverges or exhausts `max_steps`.

    Args:
        shape: what the models share.
        members: one entry per model (M of them).
        x: training inputs [N, d], shared by all models; training runs on x's device.
        y: training labels [M, N] (each model may have its own, e.g. random labels).
        on_step: called after every step with the step index (for progress bars).

    Returns:
        A `PackOutcome`.
    """
    n_models, n = len(members), x.shape[0]
    if y.shape != (n_models, n):
        raise ValueError(f"y must be [M, N] = [{n_models}, {n}], got {tuple(y.shape)}")
    augmenter = _Augmenter.for_pack(shape, members, x)
    device = x.device
    template, params = init_pack(shape, members)  # drawn on the CPU: same weights anywhere
    params = {k: v.to(device) for k, v in params.items()}
    optimizer = OPTIMIZERS[shape.optimizer]
    state = optimizer.init(params)
    spare = {k: torch.empty_like(v) for k, v in params.items()}  # the next step's params
    lr = torch.tensor([m.lr for m in members], dtype=torch.float64, device=device)
    lr_active = lr.clone()  # 0 for stopped models: their updates leave θ exactly as it is
    steps = torch.zeros(n_models, dtype=torch.int64, device=device)
    active = torch.ones(n_models, dtype=torch.bool, device=device)
    diverged = torch.zeros(n_models, dtype=torch.bool, device=device)
    last_finite: dict[int, dict[str, torch.Tensor]] = {}  # diverged model -> its params

    backprop = Backprop(shape.nonlinearity)
    grads = None if optimizer.accumulator else {k: torch.empty_like(v) for k, v in params.items()}
    target, beta = optimizer.gradient_target(state, grads)  # the gradient goes: β·target + g
    batches = None if shape.batch_size is None else _Minibatches(members, shape.batch_size, x)
    for step in range(shape.max_steps):
        if batches is None:
            losses = _full_batch_step(backprop, params, x, y, augmenter, target, beta)
        else:
            xb, yb = batches.next(x, y)
            if augmenter is not None:
                augmenter(xb)
            scale = 1 / shape.batch_size
            losses = backprop.loss_and_grad(params, xb, yb, target, scale=scale, beta=beta)
        optimizer.update(params, grads, state, lr_active, steps, spare)
        newly = _newly_diverged(losses, params, spare, active, last_finite)
        if newly is not None:
            diverged |= newly
            active &= ~newly
            lr_active = torch.where(active, lr, 0.0)
        params, spare = spare, params
        steps += active.long()
        if on_step is not None:
            on_step(step)
        if (step + 1) % shape.eval_every == 0 or step + 1 == shape.max_steps:
            if shape.stop_at_fit:
                active &= ~fits_training_set(template, params, x, y)
                lr_active = torch.where(active, lr, 0.0)
            if not active.any():
                break
    for i, values in last_finite.items():  # a diverged model ends with its last finite θ
        for k, v in values.items():
            params[k][i] = v
    return PackOutcome(params=params, steps=steps, diverged=diverged)


def _full_batch_step(
    backprop: Backprop,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    augmenter: _Augmenter | None,
    target: dict[str, torch.Tensor],
    beta: float,
) -> torch.Tensor:
    """Each model's mean loss over all of x [M]; target ← β·target + its gradient, chunk by
    chunk (the first chunk with β, the rest added).

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
        losses += backprop.loss_and_grad(params, xb, yc, target, scale=1 / n, beta=chunk_beta)
    return losses


class _Minibatches:
    """Each model's next minibatch, gathered into one buffer [M, B, d] kept across steps.

    Model m walks its own permutation of the N examples, drawn from its own generator and
    redrawn every epoch; an epoch is ⌊N / B⌋ batches (the remainder of each is dropped).
    """

    def __init__(self, members: Sequence[Member], batch_size: int, x: torch.Tensor) -> None:
        self.generators = [
            torch.Generator().manual_seed(derive_seed(m.seed, "order")) for m in members
        ]
        self.b, self.n = batch_size, x.shape[0]
        self.orders = torch.empty(0, 0, dtype=torch.int64)  # [M, N], one permutation per row
        self.cursor = self.n  # forces a fresh permutation at the first step
        self.x = torch.empty(len(members), batch_size, x.shape[1], dtype=x.dtype, device=x.device)

    def next(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [M, B, d], labels [M, B]) of the next step, from x [N, d], y [M, N]."""
        if self.cursor + self.b > self.n:
            perms = [torch.randperm(self.n, generator=g) for g in self.generators]
            self.orders, self.cursor = torch.stack(perms).to(x.device), 0
        idx = self.orders[:, self.cursor : self.cursor + self.b]
        self.cursor += self.b
        torch.index_select(x, 0, idx.flatten(), out=self.x.view(-1, x.shape[1]))
        return self.x, torch.gather(y, 1, idx)


class _Augmenter:
    """Augments the batches of a pack's augmenting members, each with its own generator."""

    def __init__(self, aug: Augmentation, which: torch.Tensor, seeds: list[int]) -> None:
        self.aug = aug
        self.which = which  # [K] indices of the augmenting members
        self.generators = [torch.Generator().manual_seed(derive_seed(s, "augment")) for s in seeds]

    @classmethod
    def for_pack(
        cls, shape: PackShape, members: Sequence[Member], x: torch.Tensor
    ) -> _Augmenter | None:
        """None when no member augments (the pack then trains exactly as without this)."""
        which = [i for i, m in enumerate(members) if m.augment]
        if not which:
            return None
        aug = shape.augmentation
        if aug is None:
            raise ValueError("members augment, but the PackShape has no augmentation")
        if aug.dim != x.shape[1]:
            raise ValueError(
                f"augmentation is for images of {aug.image_shape}, x is [N, {x.shape[1]}]"
            )
        index = torch.tensor(which, dtype=torch.int64, device=x.device)
        return cls(aug, index, [members[i].seed for i in which])

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        """Augment members `which` of the batches xb [M, B, D] in place; returns xb.

        Every augmenting member draws B translations (and flips) from its own generator,
        so its draws do not depend on its pack-mates; all are applied in one batched call.
        """
        b, d = xb.shape[1:]
        draws = [draw_augmentation(self.aug, b, generator=g) for g in self.generators]
        shifts = torch.cat([s for s, _ in draws])  # [K*B, 2], member-major
        flips = torch.cat([f for _, f in draws])  # [K*B]
        moved = apply_augmentation(xb[self.which].reshape(-1, d), self.aug, shifts, flips)
        xb[self.which] = moved.view(-1, b, d)
        return xb


def _newly_diverged(
    losses: torch.Tensor,
    params: dict[str, torch.Tensor],
    spare: dict[str, torch.Tensor],
    active: torch.Tensor,
    last_finite: dict[int, dict[str, torch.Tensor]],
) -> torch.Tensor | None:
    """[M] bool of the active models whose loss or next parameters (`spare`) are not finite,
    or None when there are none (one [M] flag read per step, no copy of the pack). Each one's
    current parameters, its last finite ones, are copied into `last_finite`.
    """
    finite = torch.isfinite(losses)
    newly = active & ~(finite & _sums_finite(spare))
    if not newly.any():
        return None
    for i in newly.nonzero().flatten().tolist():
        if finite[i] and _finite(spare, i):
            newly[i] = False  # a float32 sum overflowed; every value is finite
        else:
            last_finite[i] = {k: v[i].clone() for k, v in params.items()}
    return newly


def _sums_finite(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """[M] bool, a one-pass screen for non-finite parameters: whether each model's
    per-tensor sums are finite. An inf or NaN value makes its sum inf or NaN, so True means
    every value is finite; False may also be an overflowing sum of finite values, which the
    caller settles with `_finite`. (An exact ``isfinite(v).all()`` takes four passes and
    float64 sums a conversion: either costs more than the optimiser step itself.)
    """
    sums = [v.flatten(start_dim=1).sum(dim=1) for v in params.values()]
    return torch.isfinite(torch.stack(sums)).all(dim=0)


def _finite(params: dict[str, torch.Tensor], index: int) -> bool:
    """Whether every parameter of model `index` is finite (exact)."""
    return all(bool(torch.isfinite(v[index]).all()) for v in params.values())


@torch.no_grad()
def predict_pack(
    template: MLP, params: dict[str, torch.Tensor], x: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Logits of every model on shared inputs: [M, N, C]."""
    chunks = torch.split(x, chunk_size)
    return torch.cat([logits(template.nonlinearity, params, xc) for xc in chunks], dim=1)


def fits_training_set(
    template: MLP, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """[M] bool: whether each model classifies every training point correctly (own labels)."""
    predictions = predict_pack(template, params, x).argmax(dim=-1)  # [M, N]
    return (predictions == y).all(dim=1)


def unstack(template: MLP, params: dict[str, torch.Tensor], index: int) -> MLP:
    """Model `index` of a pack as a standalone MLP (a copy; the pack is not touched)."""
    net = MLP(
        template.layers[0].in_features,
        template.layers[-1].out_features,
        template.layers[0].out_features,
        len(template.layers) - 1,
        template.nonlinearity,
        template.init_scale,
    )
    net.load_state_dict({k: v[index].clone() for k, v in params.items()})
    return net
