"""Transitions on the ellipse through three points (paper §2.2, "Polygon vs ellipse"; Fig. 2).

The ellipse is z(φ) = c + a cos φ + b sin φ with c = (x1+x2+x3)/3, a = c − x2,
b = (x1 − x3)/√3, so the anchors sit at φ = π/3, π, 5π/3 (`sensgen.metrics.trajectories`).
Three counts on it, all built from the path counts:

* `ellipse_transitions_exact`: t_exact (`sensgen.metrics.exact_transitions`) on the
  inscribed n-gon with vertices z(2πi/n). The chord error is about Rπ²/(2n²), so n is
  doubled until the n-gon and the 2n-gon agree.
* `ellipse_transitions_sampled`: the paper's t_k (`sensgen.metrics.sampled_transitions`) on
  the samples z(2πi/k), generated chunk by chunk so memory stays bounded for any k.
* `crossing_angles`: the angle φ of every exact crossing. The ellipse is the image of the
  unit circle under the affine map (cos φ, sin φ) ↦ c + a cos φ + b sin φ, which keeps
  fractions along chords, so a crossing at fraction s of the chord from φ_j to φ_j + Δ lies
  at φ = φ_j + atan2(s sin Δ, 1 − s + s cos Δ). Binned by angle and divided by arc length it
  gives the transition density of Fig. 2 (`sensgen.metrics.profiles`).

Samples and vertices are computed in float64 whatever the anchors' dtype.

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(2, 3, width=16, depth=2, generator=torch.Generator().manual_seed(0))
    >>> x1, x2, x3 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    >>> count, sides = ellipse_transitions_exact(net, x1, x2, x3, start_sides=64)
    >>> len(crossing_angles(net, x1, x2, x3, sides=sides)) == count
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from sensgen.metrics.exact_transitions import transition_details
from sensgen.metrics.sampled_transitions import default_chunk_size, sampled_count
from sensgen.metrics.trajectories import check_count, ellipse_angles, ellipse_axes


class PolygonCount(NamedTuple):
    """t_exact on an inscribed polygon and its number of sides."""

    count: int
    sides: int


def ellipse_transitions_exact(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    x3: torch.Tensor,
    *,
    start_sides: int = 1200,
    max_sides: int = 76800,
    chunk_size: int | None = None,
) -> PolygonCount:
    """t_exact on the ellipse through x1, x2, x3: double the inscribed polygon until stable.

    The ellipse is z(φ) = c + a cos φ + b sin φ with c = (x1+x2+x3)/3, a = c − x2,
    b = (x1 − x3)/√3 (anchors at φ = π/3, π, 5π/3); the n-gon's vertices are z(2πi/n). The
    chord error is about Rπ²/(2n²), so n is doubled from `start_sides` until the count of the
    n-gon equals that of the 2n-gon (paper §2.2, "Polygon vs ellipse").

    Returns:
        (count, sides): the n-gon's count and n. ``sides == max_sides`` means the count was
        still changing; the count is then that of the max_sides-gon.
    """
    sides = check_count(start_sides, "start_sides", 3)
    check_count(max_sides, "max_sides", 3)
    count = transition_details(model, _ellipse(x1, x2, x3, sides), chunk_size=chunk_size).count
    while 2 * sides <= max_sides:
        doubled = transition_details(
            model, _ellipse(x1, x2, x3, 2 * sides), chunk_size=chunk_size
        ).count
        if doubled == count:
            return PolygonCount(count, sides)
        sides, count = 2 * sides, doubled
    return PolygonCount(count, sides)


def ellipse_transitions_sampled(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    x3: torch.Tensor,
    *,
    n_points: int,
    distance: str | None = None,
    chunk_size: int | None = None,
) -> int:
    """The paper's t_k on the ellipse through x1, x2, x3 with k = `n_points` samples.

    Samples z(2πi/k) are generated chunk by chunk, so memory stays bounded for any k.
    """
    n_points = check_count(n_points, "n_points", 2)
    size = chunk_size or default_chunk_size(model, x1.reshape(1, -1))
    chunks = (
        _ellipse(x1, x2, x3, n_points, start=i, stop=min(i + size, n_points))
        for i in range(0, n_points, size)
    )
    return sampled_count(model, chunks, True, distance)


def crossing_angles(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    x3: torch.Tensor,
    *,
    sides: int = 1200,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Ellipse angle φ ∈ [0, 2π) of every exact crossing: float64 [count], sorted.

    Counting these in angle bins and dividing by each bin's arc length gives the transition
    density of paper §2.2 / Fig. 2. A crossing at fraction s of the chord from φ_j to
    φ_j + Δ is mapped back through the ellipse's affine frame, where the chord joins two
    points of the unit circle: φ = φ_j + atan2(s sin Δ, 1 − s + s cos Δ).
    """
    found = transition_details(model, _ellipse(x1, x2, x3, sides), chunk_size=chunk_size)
    delta = 2 * math.pi / sides
    s = found.fraction
    offset = torch.atan2(s * math.sin(delta), 1 - s + s * math.cos(delta))
    return found.edge.to(torch.float64) * delta + offset


def _ellipse(x1, x2, x3, n: int, *, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """z(2πi/n) for i in [start, stop), in float64 whatever the anchors' dtype: [m, D]."""
    c, a, b = ellipse_axes(*(x.detach().to(torch.float64) for x in (x1, x2, x3)))
    phi = ellipse_angles(n, device=c.device)[start:stop]  # [m]
    return c + torch.outer(phi.cos(), a) + torch.outer(phi.sin(), b)
