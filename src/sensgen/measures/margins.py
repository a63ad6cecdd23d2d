"""Output margins of an MLP on its training points (JNMKB "margin", "1/margin")."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def logits64(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a float64 CPU copy of ``net``, in eval mode, on x (``net`` itself is
    untouched)."""
    net64 = copy.deepcopy(net).to("cpu", torch.float64).eval()  # no dropout noise
    with torch.no_grad():
        return net64(x.to("cpu", torch.float64))


def margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point output margins z_y − max_{j≠y} z_j, float64 [B] (negative if misclassified)."""
    z = logits64(net, x)
    y = y.to("cpu", torch.long)
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return true - others.max(dim=1).values


def margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """γ = 10th percentile over the given training points of z_y − max_{j≠y} z_j.

    The percentile is ``torch.quantile(·, 0.1)`` with linear interpolation between order
    statistics (numpy's default), as in JNMKB.
    """
    return float(torch.quantile(margins(net, x, y), 0.1))


def inverse_margin(gamma: float) -> float:
    """1/γ² (JNMKB, "1/margin"); γ from `margin`."""
    return 1.0 / gamma**2 if gamma != 0 else math.inf


def normalised(measure_value: float, gamma: float) -> float:
    """measure / γ², the margin-normalised version of a norm measure (JNMKB)."""
    return measure_value * inverse_margin(gamma)
