"""Transitions: linear-region boundaries crossed along a path (paper §2.2, §6).

`transitions` is the entry point; it counts in one of two ways along the path through the
given points z_0, ..., z_{k−1}, with codes c(z) from `sensgen.metrics.codes`:

* **sampled** (the paper's count, `sensgen.metrics.sampled_transitions`):
  t_k = Σ_i ‖c(z_i) − c(z_{(i+1) mod k})‖_1 over the points themselves (the last term only
  for closed paths), optionally with Hamming distance;
* **exact** (sensgen's extension, piecewise-linear φ only,
  `sensgen.metrics.exact_transitions`): t_exact, every breakpoint crossing of every hidden
  unit along the polygon through the points, found layer by layer in closed form.

t_k ≤ t_exact on the same polygon, with equality once the sampling is fine enough, so
t_exact is the k → ∞ limit of t_k. Counts on the ellipse through three points (polygon
doubling, chunked samples, crossing angles) are in `sensgen.metrics.ellipse_transitions`.
This module re-exports the public names of all three, so they can be imported from here.

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(2, 3, width=16, depth=2, generator=torch.Generator().manual_seed(0))
    >>> square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    >>> transitions(net, square) >= transitions(net, square, method="sampled")
    True
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import nn

from sensgen.errors import UserError, parse_choice
from sensgen.metrics._inputs import check_chunk_size, check_flag
from sensgen.metrics.ellipse_transitions import (
    PolygonCount,
    crossing_angles,
    ellipse_transitions_exact,
    ellipse_transitions_sampled,
)
from sensgen.metrics.exact_transitions import TransitionResult, transition_details
from sensgen.metrics.sampled_transitions import (
    CodeDistance,
    check_path,
    default_chunk_size,
    sampled_count,
)

__all__ = [
    "CodeDistance",
    "PolygonCount",
    "TransitionMethod",
    "TransitionResult",
    "crossing_angles",
    "ellipse_transitions_exact",
    "ellipse_transitions_sampled",
    "transition_details",
    "transitions",
]


class TransitionMethod(StrEnum):
    """How transitions are counted."""

    EXACT = "exact"  # breakpoint method on the polygon, piecewise-linear φ only
    SAMPLED = "sampled"  # the paper's t_k over the given samples


def transitions(
    model: nn.Module,
    path: torch.Tensor,
    *,
    method: str = "exact",
    closed: bool = True,
    distance: str | None = None,
    chunk_size: int | None = None,
) -> int:
    """Number of linear-region transitions along a path (paper §2.2).

    Args:
        model: a sensgen `MLP` or any module with activation modules (see
            `sensgen.metrics.codes`); call ``model.eval()`` first if it has dropout.
        path: points [k, ...] in the model's input shape, in order along the path.
        method: "exact" (crossings of the polygon through the points; piecewise-linear φ
            only) or "sampled" (the paper's t_k over the points themselves).
        closed: whether the path returns from the last point to the first.
        distance: "l1" (default) or "hamming"; only for method="sampled".
        chunk_size: points per forward pass; None bounds memory. Results do not depend on it.

    Returns:
        The count as a Python int. "sampled" runs the model in its own dtype, "exact" in
        float64; on a module other than a sensgen MLP, "exact" also checks at every interval
        midpoint that the recorded pre-activations are affine (activation functions called
        outside activation modules are refused by both methods: `sensgen.metrics.codes`).

    Raises:
        UserError: unknown method or distance, a smooth φ with method="exact", a path
            with fewer than 2 points, or a module whose pre-activations cannot all be read
            (`sensgen.metrics.codes.hidden_preactivations`).
    """
    method = parse_choice(TransitionMethod, method, "method")
    closed = check_flag(closed, "closed")
    if method is TransitionMethod.EXACT:
        if distance is not None:
            raise UserError("distance applies to method='sampled' only; leave it unset.")
        return transition_details(model, path, closed=closed, chunk_size=chunk_size).count
    path = check_path(path)
    chunk_size = check_chunk_size(chunk_size)
    size = chunk_size or default_chunk_size(model, path)
    return sampled_count(model, torch.split(path, size), closed, distance)
