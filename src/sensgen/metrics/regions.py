"""Linear-region maps on a 2-D slice of input space (paper §3, Study 3, Fig. 3).

`region_map` gives each pixel of a grid (e.g. the plane through three training points) the id
of its activation pattern in one hidden layer (by default the last, as in the paper's
figure). Ids are exact: they come from `torch.unique(codes, dim=0, return_inverse=True)`, so
two pixels share an id **iff** their codes are equal, and ids are 0, ..., n_regions − 1 in
the lexicographic order of the codes. Ids are therefore comparable within one map, not
between maps (colour each map by its own ids).

`boundary_density` quantifies the figure: the fraction of neighbouring pixel pairs (right and
down neighbours) whose ids differ, optionally inside a mask such as `disc_mask` around an
anchor ("discs around anchors vs elsewhere").

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(2, 3, width=8, depth=1, generator=torch.Generator().manual_seed(0))
    >>> axis = torch.linspace(-1, 1, 32)
    >>> grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    >>> ids = region_map(net, grid, resolution=32)
    >>> ids.shape, 0.0 <= boundary_density(ids) <= 1.0
    (torch.Size([32, 32]), True)
"""

from __future__ import annotations

import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics._inputs import check_chunk_size, check_mlp_width
from sensgen.metrics.codes import checked_once, layer_activation_codes
from sensgen.metrics.trajectories import PlaneGrid, check_count

# Grid points per forward pass when region_map is not given a chunk size.
_CHUNK_POINTS = 4096


def region_map(
    model: nn.Module,
    points: torch.Tensor,
    *,
    resolution: int,
    layer: int = -1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Activation-pattern id of one hidden layer at each grid point.

    Args:
        model: a sensgen `MLP` or any module with activation modules.
        points: grid points [R*R, ...] in row-major order (row r, column c at r*R + c).
        resolution: R.
        layer: which hidden layer's code (Python indexing; -1 = last hidden layer).
        chunk_size: grid points per forward pass; does not change the result.

    Returns:
        int64 [R, R]: equal ids ⇔ equal codes (torch.unique inverse indices).
    """
    if isinstance(points, PlaneGrid):  # (its grid points, as the caller meant)
        points = points.points
    resolution = check_count(resolution, "resolution", 1)
    chunk_size = check_chunk_size(chunk_size)
    if points.shape[0] != resolution * resolution:
        raise UserError(
            f"points must hold resolution² = {resolution * resolution} grid points, "
            f"got {points.shape[0]}."
        )
    check_mlp_width(model, points, "points")
    param = next(model.parameters(), None)
    if param is not None:  # a float64 grid on a float32 model, and vice versa
        points = points.to(dtype=param.dtype, device=param.device)
    chunks = points.split(chunk_size or _CHUNK_POINTS)
    with checked_once():  # (a user module's activation functions: on the first chunk)
        codes = torch.cat([_layer_codes(model, c, layer) for c in chunks])  # [R*R, n]
    _, ids = torch.unique(codes, dim=0, return_inverse=True)
    return ids.reshape(resolution, resolution).to(torch.int64)


def boundary_density(ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of neighbouring pixel pairs (right, down) whose ids differ.

    Args:
        ids: [R, C] region ids, e.g. from `region_map`.
        mask: optional bool [R, C]; only pairs with *both* pixels inside count.

    Returns:
        #(differing pairs) / #(pairs) ∈ [0, 1].

    Raises:
        UserError: if no pair of neighbouring pixels lies inside the mask.
    """
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    if mask.shape != ids.shape:
        raise UserError(f"mask shape {tuple(mask.shape)} differs from ids {tuple(ids.shape)}.")
    right_pairs = mask[:, :-1] & mask[:, 1:]  # [R, C-1]
    down_pairs = mask[:-1, :] & mask[1:, :]  # [R-1, C]
    n_pairs = int(right_pairs.sum() + down_pairs.sum())
    if n_pairs == 0:
        raise UserError("The mask holds no pair of neighbouring pixels.")
    differ = (ids[:, :-1] != ids[:, 1:]) & right_pairs
    differ_down = (ids[:-1, :] != ids[1:, :]) & down_pairs
    return float(differ.sum() + differ_down.sum()) / n_pairs


def disc_mask(resolution: int, centre_rc: tuple[float, float], radius_px: float) -> torch.Tensor:
    """bool [R, R]: pixels (r, c) with (r − r₀)² + (c − c₀)² ≤ radius²."""
    index = torch.arange(resolution, dtype=torch.float64)
    rows, cols = index.unsqueeze(1), index.unsqueeze(0)
    r0, c0 = centre_rc
    return (rows - r0) ** 2 + (cols - c0) ** 2 <= radius_px**2


def _layer_codes(model: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    per_layer = layer_activation_codes(model, x)
    if not -len(per_layer) <= layer < len(per_layer):
        raise UserError(
            f"layer={layer} is out of range: the model has {len(per_layer)} hidden layers "
            f"(use 0..{len(per_layer) - 1} or negative indices)."
        )
    return per_layer[layer]
