"""Optimisers over a pack's stacked parameters (one leading model axis), updated in place.

Each optimiser is a pair ``init(params) -> state`` and
``direction(grads, state, lr, step) -> (u, s)``: it advances ``state`` in place and returns
the step θ ← θ − s·u as a direction u (same names and shapes as the parameters) and a
per-model scale s [M] (float64). The caller applies it in place
(`sensgen.divergence.apply_update`), after deciding which models' θ to copy aside in case
they stop being finite (`sensgen.divergence.DivergenceGuard`).
Momentum SGD names an ``accumulator``: its state takes the step v ← μv + g from whoever
computes the gradient (the backward pass adds its products into it, one pass fewer over the
pack and no gradient buffer), and its direction is that state itself. It keeps v scaled,
as z = v / c with c a power of μ that shrinks by μ each step (`ScaledAccumulator`), so that
the gradient is *added* to z (β = 1), not added to a scaled z (β = μ): MKL's product
C ← βC + AB runs a separate pass over C for β ∉ {0, 1} (0.4 ms of the reference pack's
17 ms step; issue 8).
Every tensor carries a leading model axis M; ``lr`` [M] and ``step`` [M] are per model, so
models in one pack have their own learning rate and step count. A model with lr = 0 keeps
its parameters exactly (θ − 0·u = θ for finite u). In-place updates into preallocated
buffers make a step a few memory passes over the pack (the update is memory-bound: it
touches every parameter of every model; issue 8).

Adam's and RMSprop's directions come from torch's fused AdamW kernel where it can (one
pass over g, m, v and the direction instead of five to eight; `_fused_step`), otherwise
from the same formulas in separate in-place ops; the two agree to float rounding (tests
check this). The trainer takes those two steps on θ itself where the kernel can, with no
direction written at all (`sensgen.fused_update`); the directions here are its fallback.

The update rules are those of `torch.optim` (tests check this):

* sgd:       θ ← θ − η g
* momentum:  v ← μ v + g,  θ ← θ − η v            (μ = 0.9; v starts at g, as in torch;
             stored as z = v/c, `ScaledAccumulator`: the same to rounding)
* adam:      m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
             θ ← θ − η m̂ / (√v̂ + ε),  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
* rmsprop:   v ← αv + (1−α)g²,  θ ← θ − η g / (√v + ε)   (α = 0.99, ε = 1e-8)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import torch

Params = dict[str, torch.Tensor]
State = dict[str, Params]

MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
RMSPROP_ALPHA = 0.99
RMSPROP_EPS = 1e-8


# Steps between two renormalisations of momentum's scaled state (`ScaledAccumulator`): the
# gradient's gain 1/c stays in [μ¹⁵, 1] = [0.21, 1], and the pass z ← μ¹⁶z costs 1/16 of
# one per step.
RESCALE_PERIOD = 16


class OptimizerName(StrEnum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"
    RMSPROP = "rmsprop"


@dataclass(frozen=True)
class ScaledAccumulator:
    """An accumulator v ← μv + g kept as z = v / c_k, c_k = μ^(k mod K + 1 − K) after a
    model's step k (0, 1, ...; K = ``period``): c runs from μ^(1−K) down to 1.

    Step k adds the gradient with a gain, z ← z + g / c_k (β = 1), and the direction is
    v = c_k·z (the update scales it: θ ← θ − (η c_k)·z); c_k = μ·c_{k−1} makes
    c_k·z = μ·(c_{k−1}·z_prev) + g. When k mod K + 1 = K (c_k = 1, z = v), z is
    renormalised, z ← μᴷ·z, so that c can start again at μ^(1−K). Exact in exact
    arithmetic; in floating point it differs from v ← μv + g by rounding only (a few units
    of the last place per step, like any reordering). As c ≥ 1, |z| ≤ |v| and the gain
    1/c ≤ 1: z and the backward pass's products overflow no sooner than v would. Everything
    is per model, from its own step count [M], so a model's result does not depend on its
    pack-mates.
    """

    decay: float
    period: int

    def scale(self, steps: torch.Tensor) -> torch.Tensor:
        """c_k [M] (float64) for models at steps k [M]."""
        return self._table(steps.device, inverse=False)[steps % self.period]

    def gain(self, steps: torch.Tensor) -> torch.Tensor:
        """1 / c_k [M] (float64), in [μ^(K−1), 1]: what step k multiplies its gradient by."""
        return self._table(steps.device, inverse=True)[steps % self.period]

    def _table(self, device: torch.device, *, inverse: bool) -> torch.Tensor:
        """c_k (or 1/c_k) for k mod K = 0 .. K−1, [K] float64 on `device`: a step looks its
        models' values up (two operations) instead of computing powers (five; a small
        pack's step is mostly such per-operation costs; issue 8)."""
        return _scale_table(self.decay, self.period, str(device), inverse)

    def renormalise(
        self, z: Params, steps: torch.Tensor, active: torch.Tensor, pack_step: int
    ) -> torch.Tensor | None:
        """After the update of the pack's step ``pack_step`` (its models still training,
        ``active`` [M] bool, have taken every step: ``steps`` [M], the counts before it, is
        ``pack_step`` for them), z ← μᴷ·z in place for the models due. Returns the factor
        per model [M] (float64; 1 for the others), or None if no model was due: the caller's
        bounds on z must follow. Only models still training are touched: a stopped
        model's z no longer matters."""
        if pack_step % self.period + 1 != self.period:
            return None
        due = active & (steps % self.period + 1 == self.period)
        factor = torch.ones(due.shape, dtype=torch.float64, device=due.device)
        factor.masked_fill_(due, self.decay**self.period)  # (a bare where() is float32)
        for tensor in z.values():
            tensor.mul_(per_model(factor, tensor))
        return factor


@dataclass(frozen=True)
class Optimizer:
    """``init(params) -> state``; ``direction(grads, state, lr, step) -> (u, s)``.

    The state holds, per name, a zero tensor like each parameter: those ``carried`` from
    step to step (momenta) and the direction's ``scratch`` (rewritten at every step before
    it is read). A trainer that takes the step without `direction` (`sensgen.fused_update`)
    leaves the scratch out (``init(params, scratch=False)``): one copy of the pack fewer.

    With an ``accumulator`` (a state name), the gradient g is not passed to ``direction``
    (``grads`` is None): the caller adds it into that state as s ← ``decay``·s + g first,
    times ``scaled.gain`` per model if the accumulator is ``scaled`` (and renormalises it
    after the update, `ScaledAccumulator`).
    ``steps_along_target``: the direction is the gradient target itself (`gradient_target`),
    u ← β·u + g, so a bound on g bounds u (`sensgen.divergence`).
    `gradient_target` says where the gradient goes and with which β.
    """

    carried: tuple[str, ...]
    direction: Callable[
        [Params | None, State, torch.Tensor, torch.Tensor], tuple[Params, torch.Tensor]
    ]
    accumulator: str | None = None
    decay: float = 0.0
    steps_along_target: bool = False
    scaled: ScaledAccumulator | None = None
    scratch: tuple[str, ...] = ()

    def init(self, params: Params, *, scratch: bool = True) -> State:
        """Zeros like ``params`` for each carried state and, with ``scratch``, the scratch."""
        names = self.carried + (self.scratch if scratch else ())
        return {name: _zeros_like(params) for name in names}

    def init_scratch(self, params: Params) -> State:
        """The scratch alone, for a state made with ``init(params, scratch=False)``."""
        return {name: _zeros_like(params) for name in self.scratch}

    def gradient_target(self, state: State, grads: Params | None) -> tuple[Params, float]:
        """(buffers, β) such that the step's gradient g must be written as buf ← β·buf + g
        (times `gain`)."""
        if self.accumulator is None:
            if grads is None:
                raise ValueError("this optimiser needs a gradient buffer")
            return grads, 0.0
        return state[self.accumulator], self.decay

    def gain(self, steps: torch.Tensor) -> torch.Tensor | None:
        """Per model [M] (float64), what the gradient of a model at step ``steps`` [M] is
        multiplied by before it joins the target; None: by 1."""
        return None if self.scaled is None else self.scaled.gain(steps)

    def renormalise(
        self, state: State, steps: torch.Tensor, active: torch.Tensor, pack_step: int
    ) -> torch.Tensor | None:
        """After each step's update: a scaled accumulator's renormalisation, when due
        (`ScaledAccumulator.renormalise`: the factor [M] its values were multiplied by, or
        None). Whoever takes steps with this optimiser must call it after each of them."""
        if self.scaled is None:
            return None
        return self.scaled.renormalise(state[self.accumulator], steps, active, pack_step)


@functools.cache
def _scale_table(decay: float, period: int, device: str, inverse: bool) -> torch.Tensor:
    """`ScaledAccumulator._table`: μ^(k + 1 − K) for k = 0 .. K−1 (or its inverse),
    computed as the powers were per step, so that the values are the same."""
    exponent = torch.arange(period, dtype=torch.float64) + (1 - period)
    table = torch.pow(decay, exponent)
    return (1 / table if inverse else table).to(device)


def _zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def per_model(scalars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-model vector [M] as [M, 1, ...] in the stacked tensor's dtype (scales, bias
    corrections), to broadcast against a stacked [M, ...]."""
    return scalars.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _sgd_direction(grads, state, lr, step):
    return grads, lr


_MOMENTUM_ACCUMULATOR = ScaledAccumulator(MOMENTUM, RESCALE_PERIOD)


def _momentum_direction(grads, state, lr, step):
    # z ← z + g/c is already done (the accumulator), so v = c·z. torch.optim.SGD starts
    # the buffer at the first gradient; with z = 0, c·(0 + g/c) is g up to rounding.
    # (η·c in float32 overflows only for η > 7e37: such a model is caught as diverged.)
    return state["v"], lr * _MOMENTUM_ACCUMULATOR.scale(step)


def _adam_direction(grads, state, lr, step):
    if fused_adam_available(grads, state):
        return _fused_adam_direction(grads, state, lr, step)
    return _adam_direction_unfused(grads, state, lr, step)


def fused_adam_available(grads: Params, state: State) -> bool:
    """Whether torch's fused Adam(W) kernel can take this step: it exists, runs on their
    device (CPU, CUDA), and each gradient and its m, v and buffer are laid out alike in
    dense memory (the kernel walks their memory in one order, whatever their strides)."""
    first_moments = state.get("m", grads)  # RMSprop's m is its gradient (below)
    return fused_kernel_takes(
        [g, first_moments[k], state["v"][k], state["buf"][k]] for k, g in grads.items()
    )


def fused_kernel_takes(groups: Iterable[list[torch.Tensor]]) -> bool:
    """Whether torch's fused Adam(W) kernel exists and can take these groups of tensors
    (one group per parameter, the tensors it updates together): each group on one device
    it runs on (CPU, CUDA) and laid out alike in dense memory."""
    if not hasattr(torch, "_fused_adamw_"):
        return False
    for first, *rest in groups:
        if first.device.type not in ("cpu", "cuda") or not is_dense(first):
            return False
        if any(t.stride() != first.stride() or t.device != first.device for t in rest):
            return False
    return True


def is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its memory without gaps or overlaps, in any dim order."""
    return in_memory_order(t).is_contiguous()


def in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """t's dims permuted by decreasing stride: a contiguous view if t is dense. (The fused
    kernel copies a non-contiguous tensor to a contiguous one and back, 6 ms for the
    reference pack's first layer stored transposed; the same elements in memory order
    cost nothing, and the kernel is elementwise.)"""
    order = sorted(range(t.ndim), key=lambda d: -t.stride(d))
    return t.permute(order)


# The fused kernel runs each tensor it is given in vectors of up to 16 (float32, AVX-512)
# elements and the last numel % 16 apart, with other rounding. A model's slice of a
# stacked [M, ...] tensor is passed whole only if its size is a multiple of this, so that
# no model has a tail; otherwise each model's slice is passed as a tensor of its own, so
# that a model's tail is the same in any pack, and alone: a model's result must not depend
# on its pack-mates (`sensgen.train`).
_FUSED_VECTOR_MULTIPLE = 64


def _fused_adam_direction(grads, state, lr, step):
    # (The reference pack's Adam direction, guard pass and update: 10 → 4.8 ms; its whole
    # step 36.5 → 23 ms; issue 8.) One step count t for the pack: the models still
    # training have all taken every step (those that stopped have fewer, and lr 0: their
    # direction does not matter).
    t = (step.max() + 1).to(torch.float32)
    _fused_step(grads, state["m"], state["v"], state["buf"], t, *ADAM_BETAS, ADAM_EPS)
    return state["buf"], -lr


# RMSprop is Adam with β₁ = 0 (m = g) and no bias correction: v ← αv + (1−α)g²,
# u = g/(√v + ε). The kernel divides by 1 − β₁ᵗ and √(1 − αᵗ); at t = 2²⁴ both are exactly
# 1 in floating point (0ᵗ = 0, and 0.99^(2²⁴) underflows to 0), so its step is RMSprop's.
# Its m is the gradient buffer itself: the kernel computes m + (1 − β₁)(g − m), which is g
# exactly when m is g (a separate m would make g − m overflow for opposite gradients near
# FLT_MAX, and stay non-finite after one non-finite gradient, unlike torch's RMSprop); it
# writes g back over g, element by element, and nothing reads the gradient afterwards.
NO_BIAS_CORRECTION_STEP = float(2**24)


def _fused_rmsprop_direction(grads, state, lr, step):
    # float32: the CUDA kernel reads the step count as a float, whatever its dtype.
    t = torch.tensor(NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=step.device)
    _fused_step(grads, grads, state["v"], state["buf"], t, 0.0, RMSPROP_ALPHA, RMSPROP_EPS)
    return state["buf"], -lr


def _fused_step(grads, m, v, buf, t, beta1, beta2, eps) -> None:
    """buf ← −m̂/(√v̂ + ε), with m and v advanced by g, by torch's fused AdamW kernel (that
    of torch.optim.AdamW(fused=True)): one pass over g, m, v and the buffer instead of the
    five (RMSprop) to eight (Adam) of the unfused forms. The kernel updates a parameter
    p ← p·(1 − η·λ) − η·m̂/(√v̂ + ε); with η = λ = 1 and p the buffer, that is
    −m̂/(√v̂ + ε), whatever the buffer held (if finite); the caller applies it as
    θ ← θ − (−η)·buf. m, v, buf: dicts like grads; t: the step count, a 0-dim tensor."""
    lists = [[], [], [], []]  # buffers, gradients, m, v
    for k, g in grads.items():
        group = (buf[k], g, m[k], v[k])
        for into, tensor in zip(lists, group, strict=True):
            # laid out alike (fused_adam_available): the same permutation for each
            whole = in_memory_order(tensor)
            if (tensor[0].numel() % _FUSED_VECTOR_MULTIPLE) == 0:
                into.append(whole)
            else:
                into.extend(whole.unbind(0))  # the model axis has the largest stride
    torch._fused_adamw_(
        *lists,
        [],
        [t] * len(lists[0]),
        lr=1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=1.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


def _adam_direction_unfused(grads, state, lr, step):
    b1, b2 = ADAM_BETAS
    t = (step + 1).to(torch.float64)
    for k, g in grads.items():
        buf = state["buf"][k]
        m = state["m"][k].mul_(b1).add_(g, alpha=1 - b1)
        v = state["v"][k].mul_(b2).addcmul_(g, g, value=1 - b2)
        torch.div(v, per_model(1 - b2**t, g), out=buf).sqrt_().add_(ADAM_EPS)  # √v̂ + ε
        torch.div(m, buf, out=buf)
    return state["buf"], lr / (1 - b1**t)  # m / (√v̂ + ε), η / (1 − β₁ᵗ) per model


def _rmsprop_direction(grads, state, lr, step):
    if fused_adam_available(grads, state):
        return _fused_rmsprop_direction(grads, state, lr, step)
    return _rmsprop_direction_unfused(grads, state, lr, step)


def _rmsprop_direction_unfused(grads, state, lr, step):
    for k, g in grads.items():
        buf = state["buf"][k]
        v = state["v"][k].mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
        torch.sqrt(v, out=buf).add_(RMSPROP_EPS)
        torch.div(g, buf, out=buf)
    return state["buf"], lr


OPTIMIZERS: dict[OptimizerName, Optimizer] = {
    OptimizerName.SGD: Optimizer((), _sgd_direction, steps_along_target=True),
    OptimizerName.MOMENTUM: Optimizer(
        ("v",),
        _momentum_direction,
        "v",
        1.0,
        steps_along_target=True,
        scaled=_MOMENTUM_ACCUMULATOR,
    ),
    OptimizerName.ADAM: Optimizer(("m", "v"), _adam_direction, scratch=("buf",)),
    OptimizerName.RMSPROP: Optimizer(("v",), _rmsprop_direction, scratch=("buf",)),
}
