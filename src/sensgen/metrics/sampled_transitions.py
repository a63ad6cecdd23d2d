"""Sampled transitions t_k: the paper's count over samples of a path (paper §2.2).

With samples z_0, ..., z_{k−1} on a path and codes c(z) from `sensgen.metrics.codes`
(integer piece indices of all hidden units):

    t_k = Σ_{i=0}^{k−1} ‖c(z_i) − c(z_{(i+1) mod k})‖_1

(the last term only for closed paths). Hamming distance is an option (identical for relu,
same k → ∞ limit). It is never "the number of consecutive pairs that differ".

`sampled_count` takes the samples in chunks and carries the last code of each chunk into
the next, so memory stays bounded for any k and the count does not depend on the chunking.
The conventions both counts (this one and `sensgen.metrics.exact_transitions`) share for
feeding a path to a model live here too: `check_path`, `like_model`, `default_chunk_size`.

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(2, 3, width=8, depth=2, generator=torch.Generator().manual_seed(0))
    >>> path = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    >>> sampled_count(net, torch.split(path, 7), True, None) == sampled_count(
    ...     net, [path], True, None
    ... )
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import torch
from torch import nn

from sensgen.errors import UserError, parse_choice
from sensgen.metrics._inputs import as_tensor, check_mlp_width
from sensgen.metrics.codes import activation_codes, checked_once

# Elements allowed in one chunk's largest intermediate (points × features or × units).
_CHUNK_ELEMENTS = 2**22


class CodeDistance(StrEnum):
    """Distance between the codes of consecutive samples (method="sampled")."""

    L1 = "l1"  # Σ_n |c_n − c'_n|: breakpoints crossed, the paper's count
    HAMMING = "hamming"  # Σ_n 1[c_n ≠ c'_n]


def sampled_count(
    model: nn.Module, chunks: Iterable[torch.Tensor], closed: bool, distance: str | None
) -> int:
    """t_k over the samples in `chunks`, carrying the last code across chunk boundaries.

    Args:
        model: as for `sensgen.metrics.transitions`; run in its own dtype.
        chunks: consecutive pieces [b, ...] of the path, in order along it.
        closed: whether the path returns from the last sample to the first.
        distance: "l1" (None means "l1") or "hamming".

    Raises:
        UserError: unknown distance.
    """
    metric = parse_choice(CodeDistance, distance or CodeDistance.L1, "distance")
    total, first, last = 0, None, None
    with checked_once():  # (a user module's activation functions: on the first chunk)
        for chunk in chunks:
            # [b, U] in int16: int8 differences could overflow
            codes = activation_codes(model, like_model(model, chunk)).to(torch.int16)
            if last is not None:
                codes = torch.cat([last, codes])
            total += _code_distance(codes[:-1], codes[1:], metric)
            first = codes[:1] if first is None else first
            last = codes[-1:]
    if closed and first is not None:
        total += _code_distance(last, first, metric)
    return total


def check_path(path: object) -> torch.Tensor:
    """``path`` as a tensor (from a NumPy array too), or a UserError unless it holds at least
    2 finite points as [k, ...] (a NaN point would be counted as a region of its own)."""
    path = as_tensor(path, "path must be a tensor of points [k, ...]")
    if path.ndim < 2 or len(path) < 2:
        raise UserError(
            f"path must hold at least 2 points as [k, ...], got shape {tuple(path.shape)}."
        )
    if path.is_floating_point() and not bool(torch.isfinite(path).all()):
        raise UserError("path holds NaN or infinite values: every point must be finite.")
    return path


def like_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the dtype and on the device of the model's parameters (if it has any).

    Raises:
        UserError: a sensgen `MLP` given points that are not flat [k, d] with its d.
    """
    check_mlp_width(model, x, "path")
    param = next(model.parameters(), None)
    return x if param is None else x.to(dtype=param.dtype, device=param.device)


def default_chunk_size(model: nn.Module, path: torch.Tensor) -> int:
    """Points per forward pass so the widest [points, width] intermediate stays ~2^22."""
    widths = [p.shape[0] for p in model.parameters() if p.ndim >= 2]
    widest = max([*widths, path[0].numel() if len(path) else 1, 1])
    return max(1, _CHUNK_ELEMENTS // widest)


def _code_distance(a: torch.Tensor, b: torch.Tensor, metric: CodeDistance) -> int:
    if metric is CodeDistance.L1:
        return int((a - b).abs().sum().item())
    return int((a != b).sum().item())
