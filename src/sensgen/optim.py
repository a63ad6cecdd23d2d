"""Functional optimisers over a pack's stacked parameters (one leading model axis).

Each optimiser is a pair of pure functions in the style of optax: ``init(params) -> state``
and ``update(params, grads, state, lr, step) -> (params, state)``. Every tensor carries a
leading model axis M; ``lr`` [M] and ``step`` [M] are per model, so models in one pack can
have their own learning rate and their own step count (a stopped model's step stays put).

The update rules match `torch.optim` exactly (tests check this):

* sgd:       θ ← θ − η g
* momentum:  v ← μ v + g,  θ ← θ − η v            (μ = 0.9; v starts at g, as in torch)
* adam:      m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
             θ ← θ − η m̂ / (√v̂ + ε),  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
* rmsprop:   v ← αv + (1−α)g²,  θ ← θ − η g / (√v + ε)   (α = 0.99, ε = 1e-8)
"""

from __future__ import annotations

from collections.abc import Callable
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


class OptimizerName(StrEnum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"
    RMSPROP = "rmsprop"


@dataclass(frozen=True)
class Optimizer:
    """A functional optimiser: pure ``init`` and ``update`` over stacked parameters."""

    init: Callable[[Params], State]
    update: Callable[[Params, Params, State, torch.Tensor, torch.Tensor], tuple[Params, State]]


def per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-model vector [M] as [M, 1, ...] to broadcast against a stacked [M, ...]."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def _per_model(scalars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`per_model` in the stacked tensor's dtype (learning rates, bias corrections)."""
    return per_model(scalars.to(like.dtype), like)


def _zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def _sgd_update(params, grads, state, lr, step):
    return {k: p - _per_model(lr, p) * grads[k] for k, p in params.items()}, state


def _momentum_update(params, grads, state, lr, step):
    # torch.optim.SGD starts the buffer at the first gradient; with v = 0, μ·0 + g is exactly g.
    velocity = {k: MOMENTUM * state["v"][k] + g for k, g in grads.items()}
    new = {k: p - _per_model(lr, p) * velocity[k] for k, p in params.items()}
    return new, {"v": velocity}


def _adam_update(params, grads, state, lr, step):
    b1, b2 = ADAM_BETAS
    t = (step + 1).to(torch.float64)
    m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
    new = {}
    for k, p in params.items():
        correction1 = _per_model(1 - b1**t, p)
        correction2 = _per_model(1 - b2**t, p)
        denom = (v[k] / correction2).sqrt() + ADAM_EPS
        new[k] = p - _per_model(lr, p) * (m[k] / correction1) / denom
    return new, {"m": m, "v": v}


def _rmsprop_update(params, grads, state, lr, step):
    v = {k: RMSPROP_ALPHA * state["v"][k] + (1 - RMSPROP_ALPHA) * g * g for k, g in grads.items()}
    new = {
        k: p - _per_model(lr, p) * grads[k] / (v[k].sqrt() + RMSPROP_EPS) for k, p in params.items()
    }
    return new, {"v": v}


OPTIMIZERS: dict[OptimizerName, Optimizer] = {
    OptimizerName.SGD: Optimizer(lambda params: {}, _sgd_update),
    OptimizerName.MOMENTUM: Optimizer(lambda params: {"v": _zeros_like(params)}, _momentum_update),
    OptimizerName.ADAM: Optimizer(
        lambda params: {"m": _zeros_like(params), "v": _zeros_like(params)}, _adam_update
    ),
    OptimizerName.RMSPROP: Optimizer(lambda params: {"v": _zeros_like(params)}, _rmsprop_update),
}
