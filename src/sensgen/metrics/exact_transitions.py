"""Exact transitions t_exact: boundary crossings along a polygon (paper §2.2, §6).

sensgen's extension of the paper's sampled count (`sensgen.metrics.sampled_transitions`),
for piecewise-linear φ only. The path is the polygon through the given points. Knots start
at the vertices; for each hidden layer l = 1..L−1 we evaluate h_l at all knots. Between
adjacent knots the path is affine and every earlier layer's code is constant (its crossings
are already knots), so h_l is affine there and unit n crosses breakpoint β inside
(t_j, t_{j+1}) iff (h_j − β)(h_{j+1} − β) < 0, at

    t* = t_j + (t_{j+1} − t_j) (h_j − β) / (h_j − h_{j+1}).

The crossings become knots and we go to layer l+1; t_exact counts them all. Ties (a knot
exactly on β, measure zero) follow the code convention c = #{β < h}: β counts on an interval
iff it lies in the half-open range [min, max) of the end values, so per unit and interval
the count is |c_n(t_{j+1}) − c_n(t_j)|. Work is in float64 on a copy of the model.

**Why t_exact is the limit of t_k.** A unit's code moves by ±1 per crossing, so
|c_n(z_i) − c_n(z_{i+1})| ≤ its crossings in between: t_k ≤ t_exact on the same polygon,
refinement never lowers t_k (triangle inequality), and equality holds once no sampling
interval holds two crossings of one unit, true for large k since crossings are isolated.

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(2, 3, width=16, depth=2, generator=torch.Generator().manual_seed(0))
    >>> square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    >>> found = transition_details(net, square)
    >>> found.count == sum(found.per_layer) == len(found.edge)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics._inputs import (
    check_chunk_size,
    check_flag,
    is_plain_mlp,
    unwrap_parallel,
)
from sensgen.metrics._mode import require_eval_mode
from sensgen.metrics.codes import (
    BREAKPOINTS,
    HiddenLayer,
    checked_once,
    hidden_preactivations,
    is_piecewise_linear,
)
from sensgen.metrics.sampled_transitions import check_path, default_chunk_size, like_model
from sensgen.models import MLP


@dataclass(frozen=True)
class TransitionResult:
    """Exact crossings along a polygon, sorted by position along the path.

    Attributes:
        count: t_exact, the number of (unit, breakpoint) crossings.
        per_layer: crossings per hidden layer, first hidden layer first.
        edge: int64 [count], edge j runs from vertex j to vertex j+1 (mod k if closed).
        fraction: float64 [count] in [0, 1], position along that edge.
        layer: int64 [count], hidden layer (0-based) of the crossing unit.
        unit: int64 [count], the unit's index within its layer.
        n_edges: k if closed else k − 1.
        closed: whether the polygon was closed.
    """

    count: int
    per_layer: tuple[int, ...]
    edge: torch.Tensor
    fraction: torch.Tensor
    layer: torch.Tensor
    unit: torch.Tensor
    n_edges: int
    closed: bool


def transition_details(
    model: nn.Module, path: torch.Tensor, *, closed: bool = True, chunk_size: int | None = None
) -> TransitionResult:
    """Exact crossings along the polygon through `path` [k, ...], with their locations.

    See the module docstring for the method; arguments as in `sensgen.metrics.transitions`.
    """
    path = check_path(path)
    chunk_size = check_chunk_size(chunk_size)
    closed = check_flag(closed, "closed")
    model = unwrap_parallel(model)
    require_eval_mode(model, "transitions")
    net = _float64(model)
    polygon = _Polygon(like_model(net, path), closed)
    size = chunk_size or default_chunk_size(model, path)
    edge, frac = polygon.vertex_knots()
    found = []
    with torch.no_grad(), checked_once():  # (a user module's functions: on the first pass)
        n_layers = len(hidden_preactivations(net, polygon.points(edge[:1], frac[:1])))
        for layer in range(n_layers):
            crossings = _layer_crossings(net, polygon, edge, frac, layer, size)
            found.append(crossings)
            edge, frac = _merge(edge, frac, crossings[0], crossings[1])
        if not is_plain_mlp(net):
            _check_piecewise_affine(net, polygon, edge, frac, size)
    return _result(found, polygon)


class _Polygon:
    """Vertices [k, F] (flattened, float64) and the points at (edge, fraction) knots."""

    def __init__(self, path: torch.Tensor, closed: bool) -> None:
        self.shape = path.shape[1:]
        self.vertices = path.detach().to(torch.float64).flatten(start_dim=1)  # [k, F]
        self.closed = closed
        following = torch.roll(self.vertices, -1, dims=0) if closed else self.vertices[1:]
        self.n_edges = len(following)
        self.direction = following - self.vertices[: self.n_edges]  # [n_edges, F]
        # (h_1 at the vertices [k, n_1], its change along each edge [n_edges, n_1]) for MLPs
        self.first_layer: tuple[torch.Tensor, torch.Tensor] | None = None

    def vertex_knots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Knots (edge, fraction) at the vertices; an open path ends at (last edge, 1)."""
        device = self.vertices.device
        edge = torch.arange(self.n_edges, device=device)
        frac = torch.zeros(self.n_edges, dtype=torch.float64, device=device)
        if not self.closed:
            edge = torch.cat([edge, edge[-1:]])
            frac = torch.cat([frac, torch.ones_like(frac[:1])])
        return edge, frac

    def points(self, edge: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        flat = self.vertices[edge] + frac.unsqueeze(1) * self.direction[edge]  # [m, F]
        return flat.reshape(-1, *self.shape)


def _layer_crossings(
    net: nn.Module, polygon: _Polygon, edge: torch.Tensor, frac: torch.Tensor, layer: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crossings of hidden layer `layer` between the knots: (edge, fraction, unit) each [m]."""
    end, chunks = _intervals(polygon, edge, frac, size)
    parts = []
    for rows, knots in chunks:
        h = _preactivation(net, polygon, edge[knots], frac[knots], layer)  # [m + 1, n_l]
        for beta in h.breakpoints:
            parts.append(_crossings_of(h.preactivation, beta, rows, edge, frac, end))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def _crossings_of(h, beta, rows, edge, frac, end) -> tuple[torch.Tensor, ...]:
    """Where h [m + 1, n] (affine between knots m = rows) crosses β: (edge, fraction, unit)."""
    h0, h1 = h[:-1], h[1:]  # [m, n]: values at the start and end of each interval
    hit = ((h0 <= beta) & (beta < h1)) | ((h1 <= beta) & (beta < h0))
    interval, unit = hit.nonzero(as_tuple=True)
    a, b = h0[interval, unit], h1[interval, unit]
    t = (a - beta) / (a - b)  # [hits] in [0, 1]
    knot = rows[interval]
    return edge[knot], frac[knot] + (end[knot] - frac[knot]) * t, unit


def _intervals(polygon: _Polygon, edge, frac, size: int) -> tuple[torch.Tensor, Iterator]:
    """Interval j runs from knot j to the next knot (cyclically if closed).

    Returns its end fraction on edge j, `end` [n_knots], and chunks of at most `size`
    intervals as (rows: the intervals, knots: their start knots plus the next one).
    """
    n_knots = len(edge)
    n_intervals = n_knots if polygon.closed else n_knots - 1
    following = torch.arange(1, n_knots + 1, device=edge.device) % n_knots  # [n_knots]
    # The next knot lies on the same edge, or it is the next vertex (fraction 1 on this edge).
    end = torch.where(edge[following] == edge, frac[following], torch.ones_like(frac))
    rows = torch.arange(n_intervals, device=edge.device).split(size)
    return end, ((r, torch.cat([r, following[r[-1:]]])) for r in rows)


def _preactivation(net, polygon, edge, frac, layer) -> HiddenLayer:
    if is_plain_mlp(net):
        h = _mlp_preactivation(net, polygon, edge, frac, layer)
    else:
        h = hidden_preactivations(net, polygon.points(edge, frac), n_layers=layer + 1)[layer]
    if not h.piecewise_linear:
        raise UserError(
            "method='exact' needs a piecewise-linear nonlinearity (relu, relu6, hard_tanh, "
            "hard_sigmoid); this model has a smooth one. Use method='sampled', whose sign "
            "code is sensgen's extension for smooth nets."
        )
    return h


def _mlp_preactivation(net: MLP, polygon, edge, frac, layer) -> HiddenLayer:
    # h_1 is affine along each edge, so it is interpolated from its values at the vertices:
    # this skips the widest matmul (input dimension d) at every knot.
    if polygon.first_layer is None:
        h1 = net.layers[0](polygon.vertices.reshape(-1, *polygon.shape))  # [k, n_1]
        following = torch.roll(h1, -1, dims=0) if polygon.closed else h1[1:]
        polygon.first_layer = h1, following - h1[: polygon.n_edges]
    start, slope = polygon.first_layer
    h = start[edge] + frac.unsqueeze(1) * slope[edge]  # [m, n_1]
    for linear in net.layers[1 : layer + 1]:
        h = linear(net.activation(h))  # [m, n_l]
    return HiddenLayer(h, BREAKPOINTS[net.nonlinearity], is_piecewise_linear(net.nonlinearity))


def _merge(edge, frac, new_edge, new_frac) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots ∪ crossings, sorted by (edge, fraction), coincident knots kept once."""
    edge, frac = torch.cat([edge, new_edge]), torch.cat([frac, new_frac])
    order = _position_order(edge, frac)
    edge, frac = edge[order], frac[order]
    keep = torch.ones_like(edge, dtype=torch.bool)
    keep[1:] = (edge[1:] != edge[:-1]) | (frac[1:] != frac[:-1])
    return edge[keep], frac[keep]


def _position_order(edge: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    # Two stable sorts give the lexicographic (edge, fraction) order without mixing the
    # integer edge into the float fraction, which would cost precision.
    by_frac = torch.sort(frac, stable=True).indices
    return by_frac[torch.sort(edge[by_frac], stable=True).indices]


def _check_piecewise_affine(net, polygon, edge, frac, size) -> None:
    """Every pre-activation at each interval's midpoint must be the mean of its values at
    the ends: between crossings of the recorded layers they are affine. This catches what
    the codes' own check of activation functions (`sensgen.metrics._functional`) does not
    name, before an activation module: max-pooling, a ReLU written as a clamp, a
    normalisation. (After the last activation module it shows in no recorded
    pre-activation; the logits cannot be checked instead, as a smooth readout —
    log-softmax, a normalisation — is not affine either, and adds no region.)"""
    end, chunks = _intervals(polygon, edge, frac, size)
    for rows, knots in chunks:
        knot_points = polygon.points(edge[knots], frac[knots])
        mid_points = polygon.points(edge[rows], (frac + end)[rows] / 2)
        at_knots = [k.preactivation for k in hidden_preactivations(net, knot_points)]
        at_mids = [m.preactivation for m in hidden_preactivations(net, mid_points)]
        for h, mid in zip(at_knots, at_mids, strict=True):
            scale = 1.0 + h.abs().max().item()
            if ((h[:-1] + h[1:]) / 2 - mid).abs().max().item() > 1e-7 * scale:
                raise UserError(
                    f"{type(net).__name__} is not affine between its activation modules "
                    "(functional activations, max-pooling, ...?), so method='exact' does not "
                    "apply. Wrap activations in nn modules or use method='sampled'."
                )


def _result(found, polygon: _Polygon) -> TransitionResult:
    layer = torch.cat([torch.full_like(unit, i) for i, (_, _, unit) in enumerate(found)])
    edge, frac, unit = (torch.cat(p) for p in zip(*found, strict=True))
    order = _position_order(edge, frac)
    per_layer = tuple(len(unit) for _, _, unit in found)
    edge, frac, layer, unit = (v[order].cpu() for v in (edge, frac, layer, unit))
    return TransitionResult(
        len(edge), per_layer, edge, frac, layer, unit, polygon.n_edges, polygon.closed
    )


def _float64(model: nn.Module) -> nn.Module:
    """The model in float64; a copy unless it already is, so the user's model is untouched."""
    if all(p.dtype == torch.float64 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(torch.float64)
