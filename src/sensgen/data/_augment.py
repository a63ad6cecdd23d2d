"""Data augmentation for flattened images: random translations, plus horizontal flips.

The paper's only regulariser (§4): for CIFAR, pad 4 pixels and take a random 32x32 crop,
then flip horizontally with probability 1/2; for (Fashion-)MNIST, random shifts of up to
±2 pixels. Padding then cropping is a translation by (dy, dx), each uniform in [−s, s], with
the vacated border filled by the padding value. We pad with black: a pixel of value 0, which
after standardisation is ``fill_c = −mu_c / sigma_c`` in channel c.

For image i, with optional flip f_i and shift (dy_i, dx_i), the output is

    flipped[c, h, w] = x[c, h, W−1−w] if f_i else x[c, h, w]
    out[c, h, w]     = flipped[c, h − dy_i, w − dx_i]   if that pixel is inside the image,
                       fill_c                           otherwise,

so dy > 0 moves the content down and dx > 0 moves it right. For a batch of n images the
draws are the n shift pairs (dy, dx) first, [n, 2] in one call, then (if flips are on) the n
flips: a model whose augmentation draws come from its own generator sees the same images
however many images its pack-mates draw.

Example:
    >>> import torch
    >>> aug = Augmentation((1, 4, 4), max_shift=1, flip=False, fill=(0.0,))
    >>> x = torch.arange(1.0, 17.0).reshape(1, 16)
    >>> apply_augmentation(x, aug, torch.tensor([[1, 0]]), torch.tensor([False])).view(4, 4)
    tensor([[ 0.,  0.,  0.,  0.],
            [ 1.,  2.,  3.,  4.],
            [ 5.,  6.,  7.,  8.],
            [ 9., 10., 11., 12.]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sensgen.data import Dataset


@dataclass(frozen=True)
class Augmentation:
    """How a dataset's training images are augmented.

    Attributes:
        image_shape: (C, H, W) of the flattened images, flattened in (C, H, W) order.
        max_shift: s; each image moves by (dy, dx), each uniform over the integers in [−s, s].
        flip: also flip horizontally with probability 1/2.
        fill: [C] value of a vacated pixel in each channel (black: −mu_c / sigma_c).
    """

    image_shape: tuple[int, int, int]
    max_shift: int
    flip: bool
    fill: tuple[float, ...]

    def __post_init__(self) -> None:
        c, h, w = self.image_shape
        if min(c, h, w) < 1:
            raise ValueError(f"image_shape must be positive (C, H, W), got {self.image_shape}")
        if not 0 <= self.max_shift < min(h, w):
            raise ValueError(f"max_shift must be in [0, {min(h, w)}), got {self.max_shift}")
        if len(self.fill) != c:
            raise ValueError(f"fill needs one value per channel ({c}), got {len(self.fill)}")

    @property
    def dim(self) -> int:
        """D = C·H·W, the length of a flattened image."""
        return math.prod(self.image_shape)


def augmentation_for(dataset: Dataset) -> Augmentation:
    """The paper's augmentation for a dataset's images (§4), padding with black.

    - 1 channel (MNIST, Fashion-MNIST): shifts of up to ±2 px on 28x28 images, no flips
      (a mirrored digit is another symbol or none). Smaller images get proportionally
      smaller shifts, at least 1 px (``digits``, 8x8: ±1 px).
    - 3 channels (CIFAR-10/100): 4-px pad and random 32x32 crop, i.e. shifts of up to
      ±4 px, plus horizontal flips (natural scenes are mirror-symmetric). Other sizes: ±H/8.

    The fill is the per-channel minimum of ``dataset.x``: standardisation is increasing in the
    pixel value, so this is the standardised value of the darkest pixel, which is black (0)
    in the training split of every registered dataset. Pass the full training split.

    Args:
        dataset: a `Dataset` (normally the training split).

    Returns:
        An `Augmentation` for `augment` and training.

    Raises:
        ValueError: the images have neither 1 nor 3 channels.
    """
    c, h, w = dataset.image_shape
    if c == 1:
        max_shift, flip = max(1, round(2 * min(h, w) / 28)), False
    elif c == 3:
        max_shift, flip = max(1, round(4 * min(h, w) / 32)), True
    else:
        raise ValueError(f"no augmentation defined for {c}-channel images ({dataset.name!r})")
    fill = dataset.x.view(len(dataset), c, h * w).amin(dim=(0, 2))  # [C]
    return Augmentation((c, h, w), max_shift, flip, tuple(fill.tolist()))


def draw_augmentation(
    aug: Augmentation, n: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n images' random translations and flips.

    Returns:
        shifts: int64 [n, 2], (dy, dx) per image, each uniform in [−s, s].
        flips: bool [n]; all False unless ``aug.flip``.

    Both on the generator's device.
    """
    s = aug.max_shift
    shifts = torch.randint(-s, s + 1, (n, 2), generator=generator, device=generator.device)
    if aug.flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=generator.device)
    return shifts, flips


def apply_augmentation(
    x: torch.Tensor, aug: Augmentation, shifts: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Translate and flip each image as drawn (see the module docstring); exact, no arithmetic.

    Args:
        x: [B, D] flattened images; not modified.
        aug: the augmentation (image shape and fill).
        shifts: int64 [B, 2], (dy, dx) per image.
        flips: bool [B].

    Returns:
        A new tensor [B, D] on x's device, with x's dtype.
    """
    c, h, w = aug.image_shape
    b = x.shape[0]
    if x.shape != (b, aug.dim) or shifts.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(
            f"need x [B, {aug.dim}], shifts [B, 2], flips [B]; got {tuple(x.shape)}, "
            f"{tuple(shifts.shape)}, {tuple(flips.shape)}"
        )
    shifts, flips = shifts.to(x.device), flips.to(x.device)
    dy, dx = shifts[:, 0, None], shifts[:, 1, None]  # [B, 1] each
    rows = torch.arange(h, device=x.device) - dy  # [B, H] source row of each output row
    cols = torch.arange(w, device=x.device) - dx  # [B, W] source column (before the flip)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    cols = torch.where(flips[:, None], w - 1 - cols, cols)
    source = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # [B, H, W]
    # One gather over each image's H*W plane; the index is shared by the C channels (expand).
    plane = source.view(b, 1, h * w).expand(b, c, h * w)
    moved = torch.gather(x.reshape(b, c, h * w), 2, plane)  # [B, C, H*W]
    fill = torch.tensor(aug.fill, dtype=x.dtype, device=x.device).view(1, c, 1)
    return torch.where(inside.view(b, 1, h * w), moved, fill).reshape(b, aug.dim)


def augment(x: torch.Tensor, aug: Augmentation, *, generator: torch.Generator) -> torch.Tensor:
    """Randomly translate (and flip) each image independently (paper §4).

    Args:
        x: [B, D] flattened images, D = C·H·W in (C, H, W) order; not modified.
        aug: what to draw (`augmentation_for` gives the paper's choice per dataset).
        generator: the only source of randomness; draws happen on its device, so a CPU
            generator gives the same images whatever x's device.

    Returns:
        A new tensor [B, D] on x's device.

    Example:
        >>> import torch
        >>> aug = Augmentation((3, 32, 32), max_shift=4, flip=True, fill=(-1.9, -1.9, -1.7))
        >>> x = torch.randn(5, 3 * 32 * 32)
        >>> augment(x, aug, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 3072])
    """
    shifts, flips = draw_augmentation(aug, x.shape[0], generator=generator)
    return apply_augmentation(x, aug, shifts, flips)
