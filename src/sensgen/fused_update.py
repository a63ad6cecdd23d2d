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
holds in exact arithmetic; the kernel must also not overflow on the way, and
`FusedUpdate.within_bound` checks per model that it cannot: every gradient finite and
below a limit (a bound on |g|: the first layer's from the backward pass,
`Backprop.first_grad_bound`, the others' by their float32 norms, a pass over the small
tensors only, which overflow to inf, so at risk, already beyond about 1.8e19), m kept
below it too (a bound on |m| carried from step to step, since m holds past
gradients), and the kernel's intermediate product (η/(1−β₁ᵗ))·m finite. A model outside
is at risk: checked exactly, as any other (its bound on |m| then restarts from m itself).
A g² that overflows makes v = inf and u = 0: still within the bound. Float rounding of m
and v (a relative ~u/(1−β₂) in steady state) is covered by the guard's factor 2.
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
    fused_kernel_takes,
    in_memory_order,
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
        each parameter's θ, g, m and v are laid out alike, the model axis outermost and
        each model's slice dense (`per_model` passes the slices)."""
        moments = self.moments(grads, state)
        groups = [[p, grads[k], moments[k], state["v"][k]] for k, p in params.items()]
        outermost = all(p.shape[0] == 1 or p.stride(0) == p[0].numel() for p in params.values())
        return outermost and fused_kernel_takes(groups)

    def moments(self, grads: Params, state: State) -> Params:
        """The tensors the kernel keeps m in: the state's, or the gradient's (RMSprop)."""
        return grads if self.first_moment is None else state[self.first_moment]

    def per_model(self, params: Params, grads: Params, state: State) -> PerModel:
        """Each model's (θ, g, m, v) lists: views of its slices, each in its memory order
        (the kernel walks memory; a transposed slice would be copied), made once per pack."""
        groups = [params, grads, self.moments(grads, state), state["v"]]
        n_models = next(iter(params.values())).shape[0]
        return [
            tuple([in_memory_order(d[k][i]) for k in params] for d in groups)
            for i in range(n_models)
        ]

    def step_count(self, taken: int) -> float:
        """The kernel's t: the pack's steps so far + 1 (the models still training have all
        taken every one; stopped models are left out), or the fixed count."""
        return float(taken + 1) if self.fixed_step is None else self.fixed_step

    def apply(
        self, per_model: PerModel, lr: list[float], t: float | torch.Tensor, models: list[int]
    ):
        """θ ← θ − lr_m·m̂/(√v̂ + ε) for each model m in ``models``, m and v advanced; t the
        step count, or a float32 0-dim tensor on the tensors' device holding it."""
        by_lr: dict[float, list[int]] = {}
        for m in models:
            by_lr.setdefault(lr[m], []).append(m)
        count = t
        if not isinstance(t, torch.Tensor):  # (float32 holds it exactly up to 2²⁴)
            count = torch.tensor(t, dtype=torch.float32, device=per_model[0][0][0].device)
        for rate, group in by_lr.items():
            lists = [[x for m in group for x in per_model[m][i]] for i in range(4)]
            torch._fused_adamw_(
                *lists,
                [],
                [count] * len(lists[0]),
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

    def within_bound(
        self,
        grad_bound: torch.Tensor,
        moment_bound: torch.Tensor,
        lr: torch.Tensor,
        t: float,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which models' step is bounded by `step_bound` with nothing overflowing on the
        way, [M] bool, and the next bound on |m| [M] (float64).

        Given G ≥ max |g| (``grad_bound``) and Mb ≥ max |m| before the step
        (``moment_bound``), per model [M] float64: m ← m + (1−β₁)(g − m) stays finite,
        |m'| ≤ Mb' = β₁·Mb + (1−β₁)·G (G for RMSprop, whose m is g), if G and Mb are at
        most L (a quarter of the dtype's largest value; then |g − m| ≤ 2L). The kernel
        forms (η/(1−β₁ᵗ))·m' before dividing by √v̂ + ε, so that product must stay below L
        too, and the step size itself be finite. NaN or inf anywhere: not within.
        """
        limit = safe_bound(dtype)  # L: m, a running average of the gradients, stays finite
        if self.first_moment is None:  # m is this step's g: no history to keep
            next_moment = grad_bound
            within = grad_bound <= limit
        else:
            next_moment = self.beta1 * moment_bound + (1 - self.beta1) * grad_bound
            within = (grad_bound <= limit) & (moment_bound <= limit) & (next_moment <= limit)
        size = lr.abs() / (1 - self.beta1**t)  # |η|/(1−β₁ᵗ), the kernel's step size
        within &= (size <= limit) & (size * next_moment <= limit)
        return within, next_moment


def step_bound(beta1: float, beta2: float, t: float) -> float:
    """(1−β₁)/(1−β₁ᵗ) · √((1−β₂ᵗ)/(1−β₂)) · √((1−ρᵗ)/(1−ρ)), ρ = β₁²/β₂ (module docstring)."""
    rho = beta1**2 / beta2
    if not 0 <= rho < 1:
        raise ValueError(f"no step bound for β₁ = {beta1}, β₂ = {beta2}: needs β₁² < β₂")
    first = (1 - beta1) / (1 - beta1**t)
    return first * math.sqrt((1 - beta2**t) / (1 - beta2)) * math.sqrt((1 - rho**t) / (1 - rho))


# The optimisers whose step the trainer takes this way where the kernel can (`available`).
FUSED_UPDATES: dict[OptimizerName, FusedUpdate] = {
    OptimizerName.ADAM: FusedUpdate(*ADAM_BETAS, ADAM_EPS, "m"),
    OptimizerName.RMSPROP: FusedUpdate(
        0.0, RMSPROP_ALPHA, RMSPROP_EPS, None, fixed_step=NO_BIAS_CORRECTION_STEP
    ),
}
