"""Sensitivity along a trajectory, in angle bins (paper §2.2; Study 2, Fig. 2).

Fig. 2 plots, against the angle φ of an ellipse z(φ) = c + a cos φ + b sin φ through three
points, the mean Jacobian norm ‖J(z(φ))‖_F and the transition density. Both are binned into
B equal-angle bins (default 60) arranged so the anchors' angles π/3, π, 5π/3 are bin
centres. Densities divide a bin's count by its arc length

    L_k = ∫_{bin k} ‖z'(φ)‖ dφ,   z'(φ) = −a sin φ + b cos φ,

which removes the ellipse's varying speed; `bin_arc_length` computes it by Gauss–Legendre
quadrature. Every result is an array (float64 [B]), one value per bin.

Example:
    >>> from sensgen.models import MLP
    >>> net = MLP(784, 10, width=64, depth=2).double()
    >>> x1, x2, x3 = torch.randn(3, 784, dtype=torch.float64)
    >>> jacobian_profile(net, x1, x2, x3, n_points=600).values.shape
    torch.Size([60])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import nn

from sensgen.errors import UserError, parse_choice
from sensgen.metrics.ellipse_transitions import crossing_angles
from sensgen.metrics.jacobian import jacobian_norm
from sensgen.metrics.trajectories import (
    as_vectors,
    check_count,
    ellipse,
    ellipse_angles,
    ellipse_axes,
    ellipse_speed,
)

_F64 = torch.float64
_TWO_PI = 2 * math.pi
# An angle within this fraction of a bin width below an edge counts as on the edge, so the
# ellipse's sample angles 2πi/n, which often land on edges, bin the same way on every machine.
_EDGE_SNAP = 1e-9


class Reduce(StrEnum):
    """How `bin_by_angle` combines the values that fall in one bin."""

    MEAN = "mean"
    SUM = "sum"


def angle_bins(n_bins: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """B equal-angle bins around the circle with π/3, π, 5π/3 at bin centres (paper §2.2).

    Width w = 2π/B. The anchors are multiples of π/3 = (B/6)·w, so the centres must sit on
    the grid (k + s)·w with s = 0 when 6 | B and s = ½ when B ≡ 3 (mod 6); B must be a
    multiple of 3. For the default B = 60 the centres are 0, w, ..., 2π − w (π/3 is centre
    10, π centre 30, 5π/3 centre 50) and the edges carry a half-bin offset: they run from
    −w/2 = −π/60 to 2π − w/2, so bin 0 straddles φ = 0. (Edges starting at 0 would put the
    anchors on edges.) For B ≡ 3 (mod 6) the edges run from 0 to 2π.

    Args:
        n_bins: B, a positive multiple of 3.

    Returns:
        edges float64 [B + 1] (increasing, spanning exactly 2π) and centres float64 [B].

    Example:
        >>> edges, centres = angle_bins(60)
        >>> round(float(centres[10] * 3 / math.pi), 12), round(float(edges[0]), 6)
        (1.0, -0.05236)
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 3 or n_bins % 3:
        raise UserError(
            f"n_bins must be a positive multiple of 3 (so π/3, π, 5π/3 are bin centres), "
            f"got {n_bins!r}; the paper uses 60."
        )
    shift = 0.0 if n_bins % 6 == 0 else 0.5
    width = _TWO_PI / n_bins
    k = torch.arange(n_bins + 1, dtype=_F64)
    return (k - 0.5 + shift) * width, (k[:-1] + shift) * width


def bin_by_angle(
    angles: torch.Tensor, values: torch.Tensor, edges: torch.Tensor, *, reduce: str = "mean"
) -> torch.Tensor:
    """Per-bin mean or sum of values indexed by angle.

    Angles are taken modulo 2π into [edges[0], edges[0] + 2π) and bin k holds
    edges[k] <= φ < edges[k + 1]. An angle on an edge (to within 1e-9 of a bin width, to
    absorb rounding) belongs to the bin above it. If the edges span less than 2π, angles
    outside them are dropped. A bin with no values has mean NaN and sum 0.

    For a transition density, pass the crossing angles with values 1, reduce="sum", and
    divide by `bin_arc_length`.

    Args:
        angles: [N], radians.
        values: [N].
        edges: [B + 1], strictly increasing, spanning at most 2π (as from `angle_bins`).
        reduce: "mean" or "sum".

    Returns:
        float64 [B].

    Example:
        >>> edges = torch.tensor([0.0, 1.0, 2.0])
        >>> bin_by_angle(torch.tensor([0.5, 0.7, 1.5]), torch.tensor([1.0, 3.0, 5.0]), edges)
        tensor([2., 5.], dtype=torch.float64)
    """
    how = parse_choice(Reduce, reduce, "reduce")
    edges = _check_edges(edges)
    if angles.ndim != 1 or values.shape != angles.shape:
        raise UserError(
            f"angles and values must be 1-D of one length, got {tuple(angles.shape)} and "
            f"{tuple(values.shape)}."
        )
    n_bins = edges.shape[0] - 1
    start, span = edges[0].item(), (edges[-1] - edges[0]).item()
    snap = _EDGE_SNAP * (edges[1:] - edges[:-1]).min().item()
    phi = angles.to(_F64, copy=True).cpu()
    phi = start + torch.remainder(phi - start + snap, _TWO_PI)  # [N] in [start, start + 2π)
    index = torch.bucketize(phi, edges, right=True) - 1  # [N]
    if math.isclose(span, _TWO_PI, rel_tol=1e-12):
        index = index.clamp(0, n_bins - 1)  # φ ≥ edges[-1] only by rounding: the last bin
    keep = (index >= 0) & (index < n_bins)
    index, vals = index[keep], values.detach().to(_F64).cpu()[keep]
    sums = torch.zeros(n_bins, dtype=_F64).index_add_(0, index, vals)
    if how is Reduce.SUM:
        return sums.to(values.device)
    counts = torch.bincount(index, minlength=n_bins).to(_F64)
    return (sums / counts).to(values.device)  # 0/0 = NaN for an empty bin


def bin_arc_length(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, edges: torch.Tensor, *, n_quad: int = 64
) -> torch.Tensor:
    """Arc length L_k = ∫_{edges[k]}^{edges[k+1]} ‖z'(φ)‖ dφ of each angle bin of an ellipse.

    z(φ) = c + a cos φ + b sin φ, so ‖z'(φ)‖ = ‖−a sin φ + b cos φ‖ (`ellipse_speed`). Each
    bin is integrated by n_quad-point Gauss–Legendre quadrature: the speed is smooth and
    2π-periodic, so 64 points per bin are exact to rounding for any ellipse short of a
    nearly degenerate one. On a circle (a ⟂ b, ‖a‖ = ‖b‖ = r) L_k = r·(edges[k+1] − edges[k]),
    and over a full circle of bins Σ_k L_k is the perimeter.

    Args:
        c, a, b: [D] each, e.g. ``ellipse_axes(x1, x2, x3)``.
        edges: [B + 1], strictly increasing.
        n_quad: quadrature nodes per bin, >= 1.

    Returns:
        float64 [B].

    Example:
        >>> edges, _ = angle_bins(60)
        >>> L = bin_arc_length(torch.zeros(2), torch.tensor([1.0, 0]), torch.tensor([0, 1.0]),
        ...                    edges)
        >>> round(float(L.sum()), 12) == round(2 * math.pi, 12)
        True
    """
    (_, a64, _), _ = as_vectors("c a b", c, a, b)
    edges = _check_edges(edges, max_span=None).to(a64.device)
    nodes, weights = np.polynomial.legendre.leggauss(check_count(n_quad, "n_quad", 1))
    x = torch.as_tensor(nodes, dtype=_F64, device=a64.device)  # [Q] in (−1, 1)
    w = torch.as_tensor(weights, dtype=_F64, device=a64.device)  # [Q]
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2  # [B] each
    phi = mid[:, None] + half[:, None] * x  # [B, Q]
    return half * (ellipse_speed(c, a, b, phi) @ w)


@dataclass(frozen=True, eq=False)
class Profile:
    """A quantity along a closed trajectory, binned by angle (paper Study 2, Fig. 2).

    Attributes:
        bin_centres: float64 [B], the angle of each bin's centre.
        values: float64 [B], the per-bin value (for `jacobian_profile`, the mean ‖J‖_F).
        angles: float64 [n], the angle of each sample on the trajectory.
        per_point: float64 [n] raw per-sample values, or None where they do not apply.
    """

    bin_centres: torch.Tensor
    values: torch.Tensor
    angles: torch.Tensor
    per_point: torch.Tensor | None = None


def jacobian_profile(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    x3: torch.Tensor,
    *,
    n_points: int,
    n_bins: int = 60,
    output: str = "softmax",
) -> Profile:
    """Mean ‖J‖_F per angle bin along the ellipse through x1, x2, x3 (paper Study 2, Fig. 2).

    Samples z(φ_i), φ_i = 2πi/n (`ellipse`), takes ‖J(z(φ_i))‖_F at each (`jacobian_norm`),
    and averages them within each of `angle_bins(n_bins)`: values[k] = mean over
    {i : φ_i in bin k}. The anchors sit at φ = π/3, π, 5π/3, the centres of bins B/6, B/2,
    5B/6. Use n a multiple of B (600 for B = 60) so each bin averages equally many samples,
    and a multiple of 6 so the anchors are samples.

    Args:
        model: logits model, as for `jacobian_norm`, in the anchors' dtype (float64
            recommended: norms at training anchors can be ~1e-8 below those between them).
        x1, x2, x3: anchors [D].
        n_points: samples n >= n_bins, so no bin is empty.
        n_bins: B, a positive multiple of 3.
        output: "softmax" (the paper's metric) or "logits".

    Returns:
        A `Profile` with bin_centres [B], values [B], angles [n] and per_point [n].

    Example:
        >>> from sensgen.models import MLP
        >>> net = MLP(3, 2, width=8, depth=1).double()
        >>> p = jacobian_profile(net, *torch.eye(3, dtype=torch.float64), n_points=120)
        >>> p.values.shape, p.per_point.shape
        (torch.Size([60]), torch.Size([120]))
    """
    edges, centres = angle_bins(n_bins)
    if check_count(n_points, "n_points", 3) < n_bins:
        raise UserError(
            f"n_points ({n_points}) must be >= n_bins ({n_bins}) so every bin holds a "
            f"sample; use a multiple of n_bins, e.g. {10 * n_bins}."
        )
    path = ellipse(x1, x2, x3, n_points=n_points)  # [n, D]
    norms = jacobian_norm(model, path, output=output)  # float64 [n]
    angles = ellipse_angles(n_points, device=norms.device)  # [n]
    values = bin_by_angle(angles, norms, edges.to(norms.device), reduce=Reduce.MEAN)
    return Profile(
        bin_centres=centres.to(norms.device), values=values, angles=angles, per_point=norms
    )


class Density(StrEnum):
    """How `transition_profile` normalises a bin's crossing count (paper §2.2)."""

    ARC_LENGTH = "arc_length"  # crossings per unit arc length ∫‖z'(φ)‖dφ (the default)
    PER_RADIAN = "per_radian"  # crossings per radian of φ
    PER_BIN = "per_bin"  # raw crossings per bin


def transition_profile(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    x3: torch.Tensor,
    *,
    sides: int = 1200,
    n_bins: int = 60,
    density: str = "arc_length",
) -> Profile:
    """Transition density per angle bin along the ellipse through x1, x2, x3 (Fig. 2).

    Every crossing of a linear-region boundary is found exactly on the inscribed polygon with
    `sides` sides (`crossing_angles`), counted in `angle_bins(n_bins)`, and divided by the
    bin's arc length L_k = ∫_bin ‖z'(φ)‖ dφ (``density="arc_length"``), by its width in
    radians (``"per_radian"``) or not at all (``"per_bin"``). Levels depend on this choice
    and on input scaling; compare profiles only under one of them.

    Args:
        model: a piecewise-linear network (sensgen MLP or a module with nn activations).
        x1, x2, x3: anchors [D].
        sides: polygon sides (a multiple of 6 puts the anchors on vertices).
        n_bins: B, a positive multiple of 3.
        density: "arc_length", "per_radian" or "per_bin".

    Returns:
        A `Profile`: bin_centres [B], values [B] (densities), angles [n_crossings] (the
        crossing angles), per_point None.

    Example:
        >>> from sensgen.models import MLP
        >>> net = MLP(3, 2, width=8, depth=1).double()
        >>> transition_profile(net, *torch.eye(3, dtype=torch.float64)).values.shape
        torch.Size([60])
    """
    how = parse_choice(Density, density, "density")
    edges, centres = angle_bins(n_bins)
    angles = crossing_angles(model, x1, x2, x3, sides=check_count(sides, "sides", 3)).cpu()
    counts = bin_by_angle(angles, torch.ones_like(angles), edges, reduce=Reduce.SUM)
    if how is Density.ARC_LENGTH:
        arc = bin_arc_length(*ellipse_axes(x1, x2, x3), edges).cpu()
        if not bool((arc > 0).any()):  # (0/0 in every bin: NaN densities, without a word)
            raise UserError(
                "x1, x2 and x3 coincide: the ellipse through them is one point, with no arc "
                "length to divide the counts by. Pass distinct anchors, or "
                "density='per_bin'."
            )
        counts = counts / arc
    elif how is Density.PER_RADIAN:
        counts = counts / (edges[1:] - edges[:-1])
    return Profile(bin_centres=centres, values=counts, angles=angles, per_point=None)


def _check_edges(edges: torch.Tensor, max_span: float | None = _TWO_PI) -> torch.Tensor:
    """float64 CPU copy of edges [B + 1], checked increasing and spanning at most 2π."""
    if not isinstance(edges, torch.Tensor) or edges.ndim != 1 or edges.shape[0] < 2:
        raise UserError("edges must be a 1-D tensor of B + 1 >= 2 bin edges (see angle_bins).")
    edges = edges.detach().to(_F64).cpu()
    if not bool((edges[1:] > edges[:-1]).all()):
        raise UserError("edges must be strictly increasing.")
    span = (edges[-1] - edges[0]).item()
    if max_span is not None and span > max_span * (1 + 1e-12):
        raise UserError(f"edges must span at most 2π (one turn), got a span of {span:.6g}.")
    return edges
