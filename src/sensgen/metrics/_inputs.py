"""Checks of what a user passes to the metrics, so a mistake gets a message naming the
argument and the fix instead of an error from deep inside torch (or a wrong number)."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.models import MLP


def as_batch(model: nn.Module, x: object, name: str = "x") -> torch.Tensor:
    """``x`` as a float tensor batch [B, ...] in the dtype of the model's parameters.

    A NumPy array (or anything ``torch.as_tensor`` takes) becomes a tensor; a float tensor
    of another dtype is cast to the model's, if all its parameters share one (it computes
    in that dtype anyway). For a sensgen `MLP` the points must be flat, [B, d] with its d.

    Raises:
        UserError: x is not array-like, not a batch (fewer than 2 dimensions), not floating
            point (integer pixels need the model's own scaling), or of the wrong width.
    """
    x = as_tensor(x, f"{name} must be a tensor of points [B, ...]")
    if x.ndim < 2:
        raise UserError(
            f"{name} must be a batch of points [B, ...], got shape {list(x.shape)}; for one "
            f"point pass {name}.unsqueeze(0)."
        )
    if not x.is_floating_point():
        raise UserError(
            f"{name} is {x.dtype}: pass the inputs as the model was trained on them, as "
            f"floats (for 8-bit images, e.g. {name}.float() / 255)."
        )
    if type(model) is MLP and list(x.shape[1:]) != [model.layers[0].in_features]:
        d = model.layers[0].in_features
        raise UserError(
            f"{name} has points of shape {list(x.shape[1:])}, but this MLP takes flat inputs "
            f"of {d} values: pass {name}.flatten(1)."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return x.to(dtype=dtypes.pop()) if len(dtypes) == 1 else x  # (mixed: the model's call)


def as_tensor(value: object, requirement: str) -> torch.Tensor:
    """``value`` as a tensor (a NumPy array, a nested list ...), or a UserError saying
    ``requirement`` and what was given."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{requirement}, got {type(value).__name__}.") from None


def check_chunk_size(chunk_size: object) -> int | None:
    """None, or the chunk size as an int >= 1; else a UserError naming ``chunk_size``."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise UserError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    if chunk_size < 1:
        raise UserError(f"chunk_size must be a positive integer or None, got {chunk_size}.")
    return int(chunk_size)
