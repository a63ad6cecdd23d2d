"""Random-projection estimate of the Jacobian norm, for very many outputs (paper §2.1).

For v ~ N(0, I_C), E‖vᵀJ‖² = ‖J‖_F², and vᵀJ is one vector–Jacobian product whatever C
is; `jacobian_norm` (`sensgen.metrics.jacobian`) is exact but forms C rows per point.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp

from sensgen.errors import parse_choice
from sensgen.metrics._inputs import as_batch, unwrap_parallel
from sensgen.metrics._mode import require_eval_mode
from sensgen.metrics.jacobian import Output, check_logits, check_output, probabilities
from sensgen.metrics.trajectories import check_count


def jacobian_norm_estimate(
    model: nn.Module,
    x: torch.Tensor,
    *,
    n_projections: int,
    generator: torch.Generator,
    output: str = "softmax",
) -> torch.Tensor:
    """Unbiased random-projection estimate of ‖J(x)‖_F², for very many outputs.

    For v ~ N(0, I_C), E‖vᵀJ‖² = tr(JᵀJ) = ‖J‖_F², and vᵀJ is one vector–Jacobian product
    (one backward pass) however large C is. With k independent draws,

        est = (1/k) Σ_i ‖v_iᵀ J‖²,     Var(est) = 2‖J Jᵀ‖_F² / k ≤ 2‖J‖_F⁴ / k,

    so the relative standard deviation is at most √(2/k) (k = 200: ≤ 10%). For the softmax
    output vᵀJ = (S v)ᵀ J_z with S = diag(p) − ppᵀ formed in float64, as in `jacobian_norm`.
    Use it when C is so large that the exact C×C Gram matrix is too costly; otherwise prefer
    the exact `jacobian_norm`.

    Args:
        model: module mapping [B, ...] to logits [B, C]; points must not interact (no batch
            statistics), since one batched backward pass gives every point's product.
        x: inputs [B, ...].
        n_projections: k >= 1.
        generator: keyword-only source of the Gaussian projections.
        output: "softmax" or "logits".

    Returns:
        float64 [B]: estimates of ‖J‖_F² (squared: the unbiased quantity).

    Example:
        >>> from sensgen.models import MLP
        >>> net = MLP(20, 1000, width=32, depth=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> jacobian_norm_estimate(net, torch.randn(4, 20), n_projections=64, generator=g).shape
        torch.Size([4])
    """
    how = parse_choice(Output, output, "output")
    n_projections = check_count(n_projections, "n_projections", 1)
    model = unwrap_parallel(model)
    # (detached: a result on the caller's autograd graph could not even become a NumPy array)
    x = as_batch(model, x).detach()
    require_eval_mode(model, "jacobian_norm_estimate")
    if x.shape[0] == 0:  # (no logits to check: an empty row is "all >= 0, summing to 1")
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    logits, pullback = vjp(lambda v: functional_call(model, (params, buffers), (v,)), x)
    check_output(model, logits)
    if how is Output.SOFTMAX:
        check_logits(model, logits.detach())
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _ in range(n_projections):
        v = torch.randn(logits.shape, generator=generator, dtype=torch.float64)
        v = v.to(x.device)
        if how is Output.SOFTMAX:
            v = softmax_jacobian_times(logits, v)  # S v  [B, C]
        (row,) = pullback(v.to(logits.dtype))  # vᵀ J_z per point  [B, ...]
        total += row.flatten(start_dim=1).to(torch.float64).pow(2).sum(dim=1)
    return total / n_projections


def softmax_jacobian_times(logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """S v for S = diag(p) − p pᵀ (`softmax_jacobian_factor`), float64 [B, C], in O(B·C)
    memory: the estimator is for many classes, where S [B, C, C] would not fit.

    (S v)_i = p_i (v_i o_i − r_i) with o_i = Σ_{j≠i} p_j and r_i = Σ_{j≠i} p_j v_j. For the
    most probable class both sums are taken over the other classes directly; for every
    other class (p_i ≤ ½) as the total less its own term, which then cancels nothing
    large. So S v keeps its accuracy at confident points, as S itself does.
    """
    p = probabilities(logits)  # [B, C]
    v = v.to(torch.float64)
    pv = p * v
    others = p.sum(dim=-1, keepdim=True) - p  # o_i, accurate for p_i ≤ ½
    rest = pv.sum(dim=-1, keepdim=True) - pv  # r_i, likewise
    top = p.argmax(dim=-1, keepdim=True)  # [B, 1]
    not_top = torch.ones_like(p).scatter_(-1, top, 0.0)
    others.scatter_(-1, top, (p * not_top).sum(dim=-1, keepdim=True))
    rest.scatter_(-1, top, (pv * not_top).sum(dim=-1, keepdim=True))
    return p * (v * others - rest)
