"""Input standardisation and label noise.

Standardisation (what the networks see, and what the Jacobian is taken with respect to):
pixels are first scaled to [0, 1] by the format's largest value M (255, or 16 for
``digits``), u = p / M; then, for each channel c, with mean and standard deviation taken
over every pixel of channel c in the TRAINING split (population std, ddof = 0),

    mu_c = mean(u[:, c, :, :]),   sigma_c = std(u[:, c, :, :]),   x = (u - mu_c) / sigma_c.

The same training statistics standardise the test split. Because pixels are integers, the
statistics are computed exactly in float64 from a per-channel histogram of pixel values.
"""

from __future__ import annotations

import numpy as np
import torch

from sensgen.errors import UserError


def channel_stats(
    x: np.ndarray, image_shape: tuple[int, int, int], max_value: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``x / max_value`` over all images and pixels.

    Args:
        x: uint8 [N, C*H*W], pixels in (C, H, W) order.
        image_shape: (C, H, W).
        max_value: the largest possible pixel value M.

    Returns:
        (mean, std), each float64 [C]. A constant channel gets std 1 (avoids dividing by 0).
    """
    c = image_shape[0]
    per_channel = x.reshape(x.shape[0], c, -1)  # [N, C, H*W]
    values = np.arange(max_value + 1, dtype=np.float64) / max_value  # [M+1]
    mean, std = np.empty(c), np.empty(c)
    for k in range(c):
        hist = np.bincount(per_channel[:, k].ravel(), minlength=max_value + 1)[: max_value + 1]
        n = hist.sum()
        mean[k] = hist @ values / n
        std[k] = np.sqrt(hist @ (values - mean[k]) ** 2 / n)
    std[std == 0] = 1.0
    return mean, std


def standardise(
    x: np.ndarray,
    image_shape: tuple[int, int, int],
    max_value: int,
    mean: np.ndarray,
    std: np.ndarray,
) -> torch.Tensor:
    """``(x / max_value - mean_c) / std_c`` per channel, as a new float32 tensor [N, C*H*W].

    Args:
        x: uint8 [N, C*H*W]; left untouched.
        image_shape: (C, H, W).
        max_value: the largest possible pixel value M.
        mean, std: float64 [C], from `channel_stats` on the training split.
    """
    # One lookup table per channel maps each pixel value straight to its standardised value.
    levels = np.arange(max_value + 1, dtype=np.float64) / max_value  # [M+1]
    table = ((levels[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)  # [C, M+1]
    channel = np.repeat(np.arange(image_shape[0]), x.shape[1] // image_shape[0])  # [D]
    return torch.from_numpy(table[channel, x])  # [N, D]: table[channel of column j, pixel]


def randomize_labels(
    y: torch.Tensor, fraction: float, n_classes: int, *, generator: torch.Generator
) -> torch.Tensor:
    """Replace a `fraction` of the labels by labels drawn uniformly from all classes.

    Exactly ``round(fraction * N)`` positions are chosen uniformly without replacement; each
    gets a label drawn uniformly from ``{0, …, n_classes - 1}`` (so about 1/n_classes of them
    keep their old label by chance). This is the paper's random-label corruption (§4.1).

    Args:
        y: int64 [N] labels; not modified.
        fraction: in [0, 1].
        n_classes: number of classes (>= 1).
        generator: the only source of randomness; the same seed gives the same result.

    Returns:
        A new int64 tensor [N] on y's device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.zeros(10, dtype=torch.int64)
        >>> randomize_labels(y, 0.0, 10, generator=g).equal(y)
        True
    """
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"label randomisation fraction must be in [0, 1], got {fraction}.")
    if n_classes < 1:
        raise UserError(f"n_classes must be at least 1, got {n_classes}.")
    if y.ndim != 1 or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 [N], got {y.dtype} {tuple(y.shape)}")
    n = y.shape[0]
    count = round(fraction * n)
    device = generator.device
    positions = torch.randperm(n, generator=generator, device=device)[:count]  # [count]
    labels = torch.randint(0, n_classes, (count,), generator=generator, device=device)
    out = y.clone()
    out[positions.to(y.device)] = labels.to(y.device)
    return out
