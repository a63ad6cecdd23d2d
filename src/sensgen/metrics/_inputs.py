"""Checks of what a user passes to the metrics, so a mistake gets a message naming the
argument and the fix instead of an error from deep inside torch (or a wrong number)."""

from __future__ import annotations

import itertools
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
            point (integer pixels need the model's own scaling), of the wrong width, or on
            another device than the model.
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
    check_mlp_width(model, x, name)
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) == 1 and x.device not in devices:
        (device,) = devices
        raise UserError(
            f"{name} is on {x.device} but {type(model).__name__} is on {device}: pass "
            f"{name}.to({str(device)!r}) (the metrics leave devices to the caller)."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return x.to(dtype=dtypes.pop()) if len(dtypes) == 1 else x  # (mixed: the model's call)


def check_mlp_width(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """UserError naming ``name`` unless a sensgen `MLP` gets flat points [B, d] of its d."""
    if is_plain_mlp(model) and list(x.shape[1:]) != [model.layers[0].in_features]:
        d = model.layers[0].in_features
        raise UserError(
            f"{name} has points of shape {list(x.shape[1:])}, but this MLP takes flat inputs "
            f"of {d} values: pass {name}.flatten(1)."
        )


def is_plain_mlp(model: nn.Module) -> bool:
    """True for a sensgen `MLP` that computes what `MLP` does.

    The closed forms (Jacobian, codes, exact transitions) read an MLP's layers instead of
    calling it, so a subclass that changes ``forward`` (an input scaling, a temperature)
    must take the general path that calls the module.
    """
    cls = type(model)
    return (
        isinstance(model, MLP)
        and cls.forward is MLP.forward
        and cls.preactivations is MLP.preactivations
        and cls.activation is MLP.activation
    )


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside `nn.DataParallel` / `DistributedDataParallel` wrappers (the same
    function; torch.func's `functional_call` refuses the wrappers themselves)."""
    while isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        model = model.module
    return model


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


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is a boolean (Python's or NumPy's), else a UserError naming ``name``:
    any object is truthy, so closed="no" would have closed the path."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise UserError(f"{name} must be True or False, got {value!r}.")
    return bool(value)
