"""Output margins of an MLP on its training points (JNMKB "margin", "1/margin")."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sensgen.errors import UserError


def logits64(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a float64 CPU copy of ``net``, in eval mode, on x (``net`` itself is
    untouched)."""
    net64 = copy.deepcopy(net).to("cpu", torch.float64).eval()  # no dropout noise
    with torch.no_grad():
        return net64(x.to("cpu", torch.float64))


def checked_labels(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The labels y [m] as int64 on the CPU, checked against the logits z [m, C].

    Raises:
        UserError: y is not one integer class index per point of x, in [0, C); there are
            no points; or the model has a single output (no rival class for a margin).
    """
    y = torch.as_tensor(y)
    if y.dim() != 1 or len(y) != len(z):
        raise UserError(
            f"y must hold one class index per point of x: shape [{len(z)}], got "
            f"{list(y.shape)} (one-hot labels: pass y.argmax(1))."
        )
    if len(z) == 0:
        raise UserError("x holds no points: the measures need at least one training point.")
    if z.dim() != 2 or z.shape[1] < 2:
        raise UserError(
            f"The model's output has shape {list(z.shape)}: it must return [m, C] logits "
            "with C >= 2 classes (a margin needs a rival class; for one logit z, return "
            "[0, z])."
        )
    labels = y.to("cpu", torch.long)
    if y.is_floating_point() and not torch.equal(labels.to(y.dtype), y.cpu()):
        raise UserError("y must hold integer class indices; got non-integer values.")
    if labels.min() < 0 or labels.max() >= z.shape[1]:
        raise UserError(
            f"y holds class indices in [{int(labels.min())}, {int(labels.max())}], but the "
            f"model has {z.shape[1]} outputs: labels must lie in [0, {z.shape[1] - 1}]."
        )
    return labels


def margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point output margins z_y − max_{j≠y} z_j, float64 [B] (negative if misclassified)."""
    z = logits64(net, x)
    y = checked_labels(y, z)
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
    """1/γ² (JNMKB, "1/margin"); γ from `margin`.

    ∞ for γ = 0 and where γ² rounds to 0, 0 where γ² overflows, NaN for NaN. For γ < 0
    (more than a tenth of the points misclassified) the value is that of |γ|.
    """
    square = gamma * gamma  # (a float product rounds where gamma**2 would raise)
    return 1.0 / square if square != 0 else math.inf


def normalised(measure_value: float, gamma: float, *, root: int = 1) -> float:
    """measure · (1/γ²)^{1/root}, the margin-normalised version of a norm measure (JNMKB).

    ``root`` = 1 gives measure/γ² (JNMKB's "prod.fro/margin", "prod.spec/margin",
    "path.norm/margin", "spec.orig"). For a geometric mean L·(Π_l ‖W_l‖²)^{1/L}, pass
    ``root`` = L: JNMKB normalise inside the mean, L·(Π_l ‖W_l‖²/γ²)^{1/L} ("sum.fro/margin",
    "sum.spec/margin"), which is measure · (1/γ²)^{1/L} and, like the product over γ², does
    not change when every layer of a bias-free ReLU net is scaled by the same c > 0.
    """
    if root == 1:
        return measure_value * inverse_margin(gamma)
    if gamma == 0:
        return measure_value * math.inf
    exponent = -2.0 * math.log(abs(gamma)) / root  # log of (1/γ²)^{1/root}; NaN for NaN
    return measure_value * (math.exp(exponent) if not exponent > 709.0 else math.inf)
