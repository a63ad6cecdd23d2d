"""Adam and RMSprop applied to θ itself by torch's fused kernel, with an a-priori step bound.

`sensgen.optim` gives Adam's and RMSprop's steps as a direction u and a scale, which the
trainer applies, θ ← θ − s·u, after `sensgen.divergence.DivergenceGuard` has bounded
‖u‖. Here torch's fused AdamW kernel updates θ in the same pass that advances m and v:

    θ ← θ − η·m̂/(√v̂ + ε)        (the `torch.optim.Adam` step; RMSprop as in `optim`)

one pass over θ, g, m and v instead of the kernel's pass into a buffer, the update's pass
and the guard's pass over the buffer (reference pack with Adam: 5.2 → 3.6 ms of a ~20 ms
step; issue 8). The kernel takes one learning rate per call, so the models still training
are grouped by learning rate (one call in a benchmark pack, one per model in a study's
random search), each model's tensors passed as slices of its own (its result does not
depend on its pack-mates); stopped models are left out, so their θ is not touched at all.

The guard needs a bound on |u| before the update, and u is never written: it comes a
priori. With m_t = (1−β₁) Σ_k β₁^(t−k) g_k and v_t = (1−β₂) Σ_k β₂^(t−k) g_k²,
Cauchy–Schwarz over the weights (β₁/√β₂)^j · (√β₂)^j gives, for any gradients,

    |m_t| ≤ (1−β₁) √((1−ρᵗ)/(1−ρ)) · √(v_t/(1−β₂)),     ρ = β₁²/β₂ < 1,

so |u| ≤ |m̂|/√v̂ ≤ (1−β₁)/(1−β₁ᵗ) · √((1−β₂ᵗ)/(1−β₂)) · √((1−ρᵗ)/(1−ρ))  (`step_bound`):
1 at t = 1 (u = g/(|g| + ε)), growing to 7.27 for Adam's (0.9, 0.999), and 1/√(1−α) = 10
for RMSprop (the bound is attained: gradients growing as (β₂/β₁)ᵏ, or zeros then one). This
holds as long as every gradient is finite and m cannot overflow, which the trainer checks
per model from a bound on |g| (`gradient_limit`; the first layer's from the backward pass,
`Backprop.first_grad_bound`, the others' by their norms, a pass over the small tensors
only). A g² that overflows makes v = inf and u = 0: still within the bound. Float rounding
of m and v (a relative ~u/(1−β₂) in steady state) is covered by the guard's factor 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sensgen.divergence import safe_bound
from sensgen.optim import (
    ADAM_BETAS,
    ADAM_EPS,
    NO_BIAS_CORRECTION_STEP,
    RMSPROP_ALPHA,
    RMSPROP_EPS,
    OptimizerName,
    in_memory_order,
    is_dense,
)

Params = dict[str, torch.Tensor]
State = dict[str, Params]

# The four tensor lists the kernel takes, per model: θ, g, m and v (RMSprop: m is g).
PerModel = list[tuple[list[torch.Tensor], ...]]


@dataclass(frozen=True)
class FusedUpdate:
    """An optimiser's step θ ← θ − η·m̂/(√v̂ + ε) by the fused kernel, θ updated in place.

    Args:
        beta1, beta2, eps: the kernel's β₁, β₂ and ε.
        first_moment: the state holding m; None: m is the gradient itself (RMSprop,
            `optim._fused_rmsprop_direction`: β₁ = 0 makes m + (1 − β₁)(g − m) = g).
        fixed_step: the kernel's step count t if it is fixed (RMSprop: 2²⁴, where the bias
            corrections are exactly 1); None: the pack's step, as Adam counts it.
    """

    beta1: float
    beta2: float
    eps: float
    first_moment: str | None
    fixed_step: float | None = None

    def available(self, params: Params, grads: Params, state: State) -> bool:
        """Whether the kernel can take these tensors: it exists, runs on their device, and
        each parameter's θ, g, m and v are dense and laid out alike."""
        if not hasattr(torch, "_fused_adamw_"):
            return False
        for k, p in params.items():
            group = [p, grads[k], self._moment(grads, state)[k], state["v"][k]]
            if p.device.type not in ("cpu", "cuda") or not is_dense(p):
                return False
            if any(t.stride() != p.stride() or t.device != p.device for t in group):
                return False
        return True

    def _moment(self, grads: Params, state: State) -> Params:
        return grads if self.first_moment is None else state[self.first_moment]

    def per_model(self, params: Params, grads: Params, state: State) -> PerModel:
        """Each model's (θ, g, m, v) lists: its slices, in memory order (the kernel walks
        memory; a transposed layout would be copied), made once per pack."""
        moment = self._moment(grads, state)
        groups = [params, grads, moment, state["v"]]
        whole = [[in_memory_order(d[k]) for k in params] for d in groups]
        n_models = next(iter(params.values())).shape[0]
        return [tuple([t[i] for t in tensors] for tensors in whole) for i in range(n_models)]

    def step_count(self, steps: torch.Tensor) -> torch.Tensor:
        """The kernel's t (float32, 0-dim): the models still training have all taken every
        step, so t = (the largest count) + 1 (stopped models are left out)."""
        if self.fixed_step is not None:
            return torch.tensor(self.fixed_step, dtype=torch.float32, device=steps.device)
        return (steps.max() + 1).to(torch.float32)

    def apply(self, per_model: PerModel, lr: list[float], t: torch.Tensor, models: list[int]):
        """θ ← θ − lr_m·m̂/(√v̂ + ε) for each model m in ``models``, m and v advanced."""
        by_lr: dict[float, list[int]] = {}
        for m in models:
            by_lr.setdefault(lr[m], []).append(m)
        for rate, group in by_lr.items():
            lists = [[t for m in group for t in per_model[m][i]] for i in range(4)]
            torch._fused_adamw_(
                *lists,
                [],
                [t] * len(lists[0]),
                lr=rate,
                beta1=self.beta1,
                beta2=self.beta2,
                weight_decay=0.0,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )

    def step_bound(self, t: float) -> float:
        """An a-priori bound on |m̂/(√v̂ + ε)| at step t for any finite gradients (module
        docstring)."""
        return step_bound(self.beta1, self.beta2, t)


def step_bound(beta1: float, beta2: float, t: float) -> float:
    """(1−β₁)/(1−β₁ᵗ) · √((1−β₂ᵗ)/(1−β₂)) · √((1−ρᵗ)/(1−ρ)), ρ = β₁²/β₂ (module docstring)."""
    rho = beta1**2 / beta2
    if not 0 <= rho < 1:
        raise ValueError(f"no step bound for β₁ = {beta1}, β₂ = {beta2}: needs β₁² < β₂")
    first = (1 - beta1) / (1 - beta1**t)
    return first * math.sqrt((1 - beta2**t) / (1 - beta2)) * math.sqrt((1 - rho**t) / (1 - rho))


def gradient_limit(dtype: torch.dtype) -> float:
    """The largest bound on |g| under which `step_bound` holds: m, a running average of
    the gradients, then stays finite (a quarter of the dtype's largest value)."""
    return safe_bound(dtype)


# The optimisers whose step the trainer takes this way where the kernel can (`available`).
FUSED_UPDATES: dict[OptimizerName, FusedUpdate] = {
    OptimizerName.ADAM: FusedUpdate(*ADAM_BETAS, ADAM_EPS, "m"),
    OptimizerName.RMSPROP: FusedUpdate(
        0.0, RMSPROP_ALPHA, RMSPROP_EPS, None, fixed_step=NO_BIAS_CORRECTION_STEP
    ),
}
