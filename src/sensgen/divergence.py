"""Divergence of a pack updated in place: who stopped being finite, and their last finite θ.

A model diverges at a step when its loss, or any of its next parameters

    θ' = θ − s·u        (s [M] the optimiser's per-model scale, u its direction; `optim`)

is not finite (NaN or ±inf); it then keeps θ, its last finite parameters (paper §4 trains
thousands of models, some with learning rates that blow up). The update runs in place, so θ
must be copied aside *before* it for any model that may diverge, and no pass over the new
parameters may be spent to find out afterwards (a step of the reference pack is a few
memory passes besides its products; issue 8). `DivergenceGuard` decides from a bound:

    b_m ≥ max |θ_m|  kept per model,   r_m = max over tensors of ‖u_m‖₂ ≥ max |u_m|,

with s_m taken as the update applies it (rounded to the parameters' dtype) and in absolute
value. If 2·s_m·r_m and b_m + 2·s_m·r_m are finite and below the safe bound, a quarter of
the dtype's largest value (FLT_MAX / 4 = 8.5e37 for float32), every |θ'| ≤ |θ| + s|u| is
far from overflow: θ' is finite, with no check at all. Then b_m ← b_m + 2·s_m·r_m; the
factor 2 is slack for rounding (the norm, the product s·u and the subtraction, each
within a relative 2⁻²⁴), and the 4× margin of the safe bound is what keeps θ' finite even
where rounding makes b short of max |θ'| by a fraction of one step's growth. (‖u‖₂ may
also fall short of max |u| when the squares underflow, |u| ≲ 1e-23: a shortfall of
s·1e-23 per step, equally covered.) ‖u‖₂ is one fast pass over u (the squares overflow to
inf for |u| > 1.8e19, NaN propagates): the cost of the sum screen it replaces, and the
in-place update saves the write of a second copy of the pack. Otherwise the model is *at
risk*: its θ is copied, the update runs, and an exact check of its θ' settles it.
Training models stay far below the bound (b grows by 2·s·r per step, 10³–10⁴ over a whole
run in practice), so copies are made only at a blow-up (or, at every step, for a model
whose values are beyond 1.8e19, where a float32 norm's squares overflow: it is checked
exactly, never missed).

`b` starts as twice the largest per-tensor ‖θ_m‖₂ (≥ max |θ_m|), and is reset that way
after every at-risk step that stays finite.

**Tracked directions.** Where u is the optimiser's gradient target itself, u ← β·u + g
(momentum SGD's scaled accumulator z, β = 1 and g its gain times the gradient,
`sensgen.optim.ScaledAccumulator`; plain SGD's gradient, β = 0), the caller may give,
instead of u's pass, a bound G ≥ max |g| for some of its tensors (`Backprop`'s
‖δ_0‖_F‖x‖_F for the first layer, the largest tensor of an MLP on images): the guard keeps
V ← β·V + G ≥ max |u| for them (V starts at G, u at zero) and uses V in r; when the caller
rescales u in place (z's renormalisation), `rescale` rescales V alike. Rounding (of the
norms, the product and β·u + g, each within a relative ~10⁻⁵) is covered by the same
factor 2 and margin; the norm of δ_0 is raised by what underflowing squares may lose
(`underflow_slack`: its entries are multiplied by ‖x‖, so the loss is not negligible as
for u's own norm), and a V beyond half the dtype's largest value counts as inf, since u
may have overflowed there.
V is reset from u itself after an at-risk step that stays finite.

**Bounded steps.** Adam's and RMSprop's steps are bounded a priori, |u| ≤ C(t) for any
finite gradients (`sensgen.fused_update`, which updates θ in place and never writes u):
`update_in_place` takes r = C(t) for the models whose gradient is finite and below a
limit, and r = inf (at risk) for the others.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sensgen.optim import per_model

Params = dict[str, torch.Tensor]


def safe_bound(dtype: torch.dtype) -> float:
    """A quarter of the largest finite value of `dtype` (8.5e37 for float32): |θ| + s|u|
    below it cannot overflow, even after the rounding of each term."""
    return torch.finfo(dtype).max / 4


def norms(tensors: Params) -> torch.Tensor:
    """[M] float64: per model, the largest ‖·‖₂ of its slices of `tensors` ([M, ...] each).

    ≥ the largest |value| up to rounding (and to squares that underflow, |value| ≲ 1e-23
    in float32); inf or NaN if any value is not finite (or its square overflows)."""
    # Over the trailing dims, not a flattened view: that would copy a tensor stored
    # transposed (the first layer's weights; `sensgen.train`).
    per_tensor = [
        torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim))) for t in tensors.values()
    ]
    return torch.stack(per_tensor).amax(dim=0).to(torch.float64)  # amax keeps NaN


def underflow_slack(norm: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A ‖·‖₂ per model [M] of values [M, ...], raised by what the squares below the
    dtype's smallest normal number may have lost (underflow, flush-to-zero), so that it
    stays ≥ the exact norm up to the norm's own rounding (a relative ~10⁻⁵ in float32,
    which the guard's factor 2 covers): each of the n entries loses less than that tiny
    number."""
    return norm + (2 * values[0].numel() * torch.finfo(values.dtype).tiny) ** 0.5


def is_finite(params: Params, index: int) -> bool:
    """Whether every parameter of model `index` is finite (exact)."""
    return all(bool(torch.isfinite(v[index]).all()) for v in params.values())


def apply_update(params: Params, direction: Params, scale: torch.Tensor) -> None:
    """θ ← θ − s·u in place, s [M] per model (a model with s = 0 and finite u keeps θ)."""
    # Converted once, not per tensor (per_model's own conversion is then a no-op).
    applied = scale.to(next(iter(params.values())).dtype)
    for k, p in params.items():
        p.addcmul_(per_model(applied, p), direction[k], value=-1)


class DivergenceGuard:
    """Applies a pack's updates in place and reports the models that diverge.

    Args:
        params: the stacked parameters [M, ...], finite (the models' initial weights).
    """

    def __init__(self, params: Params) -> None:
        self.bound = 2 * norms(params)  # [M] float64, ≥ max |θ_m|
        self.dtype = next(iter(params.values())).dtype
        # name -> V [M] float64 ≥ max |u| of a tracked direction, up to float32 rounding
        # (u is summed in float32, V in float64: the factor 2 of the growth covers it)
        self.tracked: Params = {}

    def select(self, index: torch.Tensor) -> None:
        """Keep the bounds of the models at `index` (the pack shrank to them)."""
        self.bound = self.bound[index]
        self.tracked = {k: v[index] for k, v in self.tracked.items()}

    def rescale(self, factor: torch.Tensor) -> None:
        """The tracked directions were multiplied in place by ``factor`` [M] (float64,
        finite, in [0, 1]; momentum's renormalisation, `sensgen.optim.ScaledAccumulator`):
        their bounds follow (the rounding of u·factor is covered by the factor 2)."""
        self.tracked = {k: v * factor for k, v in self.tracked.items()}

    def _direction_norms(self, direction: Params, grad_bounds: Params, decay: float):
        """r [M] ≥ max |u_m|: tracked tensors by V ← β·V + G, the others by their norms."""
        if self.tracked and set(grad_bounds) != set(self.tracked):
            raise ValueError(f"grad_bounds must name {sorted(self.tracked)} at every step")
        for k, g in grad_bounds.items():
            v = self.tracked.get(k)
            # (β = 0: V = G, also after a V of inf or NaN, which 0·V would keep.)
            if v is None or decay == 0:
                self.tracked[k] = g
            else:  # (1·V is V exactly: β = 1 skips the product)
                self.tracked[k] = v + g if decay == 1 else decay * v + g
        others = {k: u for k, u in direction.items() if k not in self.tracked}
        parts = [norms(others)] if others else []
        # V is float64: past the dtype's range u may already hold ±inf (or NaN) while V is
        # finite. Below half the largest value, no partial sum of the products or of β·u + g
        # overflows (each is at most V up to rounding); beyond it, V counts as inf (at risk).
        limit = torch.finfo(self.dtype).max / 2
        parts += [torch.where(v < limit, v, torch.inf) for v in self.tracked.values()]
        return torch.stack(parts).amax(dim=0)  # amax keeps NaN

    def update(
        self,
        params: Params,
        direction: Params,
        scale: torch.Tensor,
        losses: torch.Tensor,
        active: torch.Tensor,
        live: torch.Tensor,
        grad_bounds: Params | None = None,
        decay: float = 0.0,
    ) -> tuple[torch.Tensor | None, dict[int, Params]]:
        """θ ← θ − s·u for every model; which active models diverged, and their last θ.

        Args:
            params, direction: θ and u, [M, ...] each; θ is updated in place.
            scale: s [M], float64 (0 for stopped models, whose θ must not change); applied
                rounded to the parameters' dtype, as the bound takes it.
            losses: this step's losses [M] (from θ).
            active: [M] bool, the models still training: they may diverge.
            live: [M] bool, the models whose θ must stay finite (active, or stopped
                without diverging). A diverged model's slice may hold NaN.
            grad_bounds: for tracked directions (module docstring), per tensor name a
                bound G [M] (float64) ≥ max |g| of this step's gradient, where
                u ← ``decay``·u + g. Give the same names at every step, from the first.

        Returns:
            (newly [M] bool, or None when no model diverged; {position: its θ before this
            update} for each newly diverged model).
        """
        r = self._direction_norms(direction, grad_bounds or {}, decay)
        newly, last_finite, checked = self.update_in_place(
            params, lambda: apply_update(params, direction, scale), scale, r, losses, active, live
        )
        for i in checked:  # tracked bounds start again from u itself
            for k, v in self.tracked.items():
                v[i] = norms({k: direction[k][i : i + 1]})[0]
        return newly, last_finite

    def update_in_place(
        self,
        params: Params,
        apply: Callable[[], None],
        scale: torch.Tensor,
        bound: torch.Tensor,
        losses: torch.Tensor,
        active: torch.Tensor,
        live: torch.Tensor,
    ) -> tuple[torch.Tensor | None, dict[int, Params], list[int]]:
        """As `update`, for an update θ ← θ − s·u that ``apply()`` makes in place without
        writing u (`sensgen.fused_update`), given ``bound`` [M] (float64) ≥ max |u| per
        model, known a priori (inf where it is not known: the model is at risk). Models
        that ``apply`` leaves alone (stopped ones) need s = 0. Also returns the models that
        were at risk and stayed finite (the caller's own bounds may restart from them;
        `update` is this step with ``apply`` its own θ ← θ − s·u)."""
        # s as the update applies it (an lr beyond float32's range is inf there), and |s|:
        # a negative s must grow the bound too. 0·inf is NaN: at risk.
        applied = scale.to(self.dtype).to(torch.float64).abs()
        growth = 2 * applied * bound
        safe = safe_bound(self.dtype)
        # (A growth of inf or NaN fails the comparison itself: b + growth < safe is false.)
        risky = live & ~(self.bound + growth < safe)
        risky |= active & ~torch.isfinite(losses)
        at_risk = risky.nonzero().flatten().tolist()  # one [M] read per step
        before = {i: {k: v[i].clone() for k, v in params.items()} for i in at_risk}
        apply()
        self.bound += torch.where(risky, 0.0, growth)
        if not at_risk:
            return None, {}, []
        newly = torch.zeros_like(active)
        last_finite, checked = {}, []
        for i in at_risk:
            finite = is_finite(params, i)
            if bool(active[i]) and not (finite and bool(torch.isfinite(losses[i]))):
                newly[i] = True
                last_finite[i] = before[i]
                continue
            if not finite:  # a stopped model: s = 0 met a non-finite u; it keeps its θ
                for k, v in before[i].items():
                    params[k][i] = v
            self.bound[i] = 2 * norms({k: v[i : i + 1] for k, v in params.items()})[0]
            checked.append(i)
        return (newly if newly.any() else None), last_finite, checked
