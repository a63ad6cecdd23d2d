"""Activation codes: which linear piece of φ holds each hidden pre-activation (paper §2.2).

For a piecewise-linear φ with sorted breakpoints β_1 < ... < β_m the code of hidden unit n
at input x is the index of the linear piece holding its pre-activation h_n(x):

    c_n(x) = #{ j : β_j < h_n(x) } ∈ {0, ..., m}

| φ            | breakpoints | pieces |
|--------------|-------------|--------|
| relu         | {0}         | 0, 1   |
| relu6        | {0, 6}      | 0, 1, 2|
| hard_tanh    | {−1, 1}     | 0, 1, 2|
| hard_sigmoid | {−3, 3}     | 0, 1, 2|  (torch's clip(h/6 + ½, 0, 1))

A value exactly at a breakpoint belongs to the piece *below* it. For relu this is the piece
autograd picks (φ'(0) = 0); at the other kinks sensgen's φ' is 0 on both sides, which names
no single piece, so the lower one is used throughout.

The code c(x) concatenates **all hidden units of all layers**, so it identifies the linear
region of x. Smooth φ (tanh, sigmoid, elu) have no pieces; as a labelled sensgen
*extension* they get the sign code 1[h_n > 0] (ELU switches formula at 0). Counts from sign
codes must never be pooled with piecewise-linear counts: check `is_piecewise_linear`.

Models: a sensgen `MLP` is read directly; any other `nn.Module` is read through forward
pre-hooks on its activation modules (nn.ReLU, nn.ReLU6, nn.Hardtanh with its own
min_val/max_val, nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.RReLU in eval mode, all
piecewise linear — the last three with the one breakpoint 0 — and the sign-coded nn.Tanh,
nn.Sigmoid, nn.ELU): the *input* of each call is a hidden layer's pre-activation, in call
order. Any other activation module of torch (nn.GELU, nn.SiLU, nn.Softplus, ...) is
refused by name: its layer would be left out of the code without a word. (A softmax-family
module is the readout, not a hidden layer.) So is a hidden layer made by an activation
*function* (``F.relu``, ``torch.tanh``, ...) while no activation module runs: on something
that depends on the input, its result then used (`sensgen.metrics._functional`).

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(2, 3, width=5, depth=2, generator=torch.Generator().manual_seed(0))
    >>> activation_codes(net, torch.randn(4, 2)).shape  # 2 hidden layers × 5 units
    torch.Size([4, 10])
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics._functional import UnhookedActivations
from sensgen.metrics._inputs import check_mlp_width, is_plain_mlp, unwrap_parallel
from sensgen.metrics._mode import require_eval_mode
from sensgen.models import MLP, Nonlinearity

# Sorted breakpoints of each φ. Smooth φ map to (0.0,): their sign code (sensgen's extension).
BREAKPOINTS: dict[Nonlinearity, tuple[float, ...]] = {
    Nonlinearity.RELU: (0.0,),
    Nonlinearity.RELU6: (0.0, 6.0),
    Nonlinearity.HARD_TANH: (-1.0, 1.0),
    Nonlinearity.HARD_SIGMOID: (-3.0, 3.0),
    Nonlinearity.TANH: (0.0,),
    Nonlinearity.SIGMOID: (0.0,),
    Nonlinearity.ELU: (0.0,),
}

_PIECEWISE_LINEAR = frozenset(
    {Nonlinearity.RELU, Nonlinearity.RELU6, Nonlinearity.HARD_TANH, Nonlinearity.HARD_SIGMOID}
)

# Activation modules whose inputs are recorded on a user's own module (nn.ReLU6 is a
# Hardtanh). The leaky ReLUs are piecewise linear with their kink at 0 (RReLU's slope is
# fixed in eval mode; in train mode `require_eval_mode` refuses it).
_KINK_AT_ZERO = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU)
_PIECEWISE_MODULES = (*_KINK_AT_ZERO, nn.Hardtanh, nn.Hardsigmoid)
_ACTIVATION_MODULES = (*_PIECEWISE_MODULES, nn.Tanh, nn.Sigmoid, nn.ELU)
_SUPPORTED = ", ".join(f"nn.{cls.__name__}" for cls in (nn.ReLU6, *_ACTIVATION_MODULES))
# Normalisers of the output: their input is the logits, not a hidden layer.
_OUTPUT_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
# Every module torch defines as an activation; those not above cannot be coded.
_TORCH_ACTIVATIONS = tuple(
    cls
    for cls in vars(nn.modules.activation).values()
    if isinstance(cls, type)
    and issubclass(cls, nn.Module)
    and cls.__module__ == nn.modules.activation.__name__
    and cls is not nn.MultiheadAttention
)


class HiddenLayer(NamedTuple):
    """One hidden layer's pre-activations and how to code them.

    Attributes:
        preactivation: h_l, [B, n_l] (trailing dimensions of conv layers flattened).
        breakpoints: sorted β of its φ; (0.0,) for the sign code of a smooth φ.
        piecewise_linear: False when the code is the sign code of a smooth φ.
    """

    preactivation: torch.Tensor
    breakpoints: tuple[float, ...]
    piecewise_linear: bool


def is_piecewise_linear(nonlinearity: str | Nonlinearity) -> bool:
    """True for relu, relu6, hard_tanh, hard_sigmoid; False for the sign-coded smooth φ."""
    return Nonlinearity.parse(nonlinearity) in _PIECEWISE_LINEAR


def piece_index(h: torch.Tensor, breakpoints: tuple[float, ...]) -> torch.Tensor:
    """c = #{β_j < h} elementwise: int8, same shape as h.

    Example:
        >>> piece_index(torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0]), (0.0, 6.0))
        tensor([0, 0, 1, 1, 2], dtype=torch.int8)
    """
    code = torch.zeros(h.shape, dtype=torch.int8, device=h.device)
    for beta in breakpoints:
        code += h > beta
    return code


def hidden_preactivations(
    model: nn.Module, x: torch.Tensor, *, n_layers: int | None = None
) -> list[HiddenLayer]:
    """The hidden pre-activations h_1, ..., h_{L−1} of `model` at x, with their breakpoints.

    Args:
        model: a sensgen `MLP`, or any module whose nonlinearities are activation modules
            (see the module docstring); its inputs are what the module consumes.
        x: inputs [B, ...].
        n_layers: stop after this many hidden layers (the rest of the forward is skipped).

    Returns:
        One `HiddenLayer` per hidden layer (per activation-module call), first layer first;
        each preactivation is [B, n_l] in x's dtype.

    Raises:
        UserError: if a non-MLP module has no activation module, calls an activation
            function outside one, or has dropout or batch norm in train mode.
    """
    model = unwrap_parallel(model)  # (DataParallel's own forward would hide the hooks)
    if is_plain_mlp(model):
        check_mlp_width(model, x, "x")
        return _mlp_preactivations(model, x, n_layers)
    require_eval_mode(model, "activation codes")
    return _hooked_preactivations(model, x, n_layers)


def layer_activation_codes(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer codes: a list of int8 [B, n_l], first hidden layer first."""
    with torch.no_grad():
        layers = hidden_preactivations(model, x)
    return [piece_index(layer.preactivation, layer.breakpoints) for layer in layers]


def activation_codes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full code c(x): int8 [B, Σ_l n_l], all hidden units of all layers (paper §2.2).

    Two inputs share a code iff they lie in the same linear region (for piecewise-linear φ).
    """
    return torch.cat(layer_activation_codes(model, x), dim=1)


def _mlp_preactivations(model: MLP, x: torch.Tensor, n_layers: int | None) -> list[HiddenLayer]:
    breakpoints = BREAKPOINTS[model.nonlinearity]
    piecewise = model.nonlinearity in _PIECEWISE_LINEAR
    out = []
    a = x
    for layer in list(model.layers[:-1])[:n_layers]:
        h = layer(a)  # [B, width]
        out.append(HiddenLayer(h, breakpoints, piecewise))
        a = model.activation(h)
    return out


class _EnoughLayers(Exception):
    """Raised inside a hook to skip the rest of a forward pass."""


def _module_breakpoints(module: nn.Module) -> tuple[tuple[float, ...], bool]:
    if isinstance(module, _KINK_AT_ZERO):
        return (0.0,), True
    if isinstance(module, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
        return (float(module.min_val), float(module.max_val)), True
    if isinstance(module, nn.Hardsigmoid):
        return BREAKPOINTS[Nonlinearity.HARD_SIGMOID], True
    return (0.0,), False  # Tanh, Sigmoid, ELU: sign code


def _hooked_preactivations(
    model: nn.Module, x: torch.Tensor, n_layers: int | None
) -> list[HiddenLayer]:
    records: list[HiddenLayer] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # Clone: an in-place activation would overwrite its input after this hook.
        h = args[0].detach().flatten(start_dim=1).clone()  # [B, n_l]
        records.append(HiddenLayer(h, *_module_breakpoints(module)))
        if n_layers is not None and len(records) >= n_layers:
            raise _EnoughLayers

    _refuse_uncoded_activations(model)
    activations = [m for m in model.modules() if isinstance(m, _ACTIVATION_MODULES)]
    if not activations:
        raise UserError(
            f"{type(model).__name__} has no activation module, so its pre-activations cannot "
            f"be read. Does it use functional activations (F.relu, torch.tanh)? Wrap them in "
            f"nn modules: one of {_SUPPORTED}."
        )
    checked = _CHECKED_IN_CALL.get()
    spy = None if checked is not None and id(model) in checked else UnhookedActivations(x)

    def enter(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        spy.inside += 1
        record(module, args)

    def leave(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        spy.inside -= 1

    if spy is None:
        handles = [m.register_forward_pre_hook(record) for m in activations]
    else:
        handles = [m.register_forward_pre_hook(enter) for m in activations]
        handles += [m.register_forward_hook(leave) for m in activations]
    complete = False
    try:
        with spy or contextlib.nullcontext():
            model(x)
        complete = True
    except _EnoughLayers:
        pass  # (what the layers not asked for call does not matter: they did not run)
    finally:
        for handle in handles:
            handle.remove()
    if spy is not None:
        spy.refuse(model, _SUPPORTED)
        if complete and checked is not None:  # the rest of this call's passes skip the spy
            checked.add(id(model))
    return records


# The modules whose whole forward pass the spy found clean in the current `checked_once`
# block (their ids: the block holds them alive). The spy costs a third of a small
# module's forward, and exact transitions, sampled counts and region maps make one pass per
# layer or chunk: one public call checks a module once. Outside such a block every pass is
# checked.
_CHECKED_IN_CALL: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "sensgen_checked_in_call", default=None
)


@contextlib.contextmanager
def checked_once() -> Iterator[None]:
    """Within the block, a module's activation functions are checked on its first whole
    forward pass only (`_functional`); blocks nest into the outermost one."""
    if _CHECKED_IN_CALL.get() is not None:
        yield
        return
    token = _CHECKED_IN_CALL.set(set())
    try:
        yield
    finally:
        _CHECKED_IN_CALL.reset(token)


def _refuse_uncoded_activations(model: nn.Module) -> None:
    """UserError naming any torch activation module whose pieces sensgen cannot code."""
    uncoded = [
        (name, type(module).__name__)
        for name, module in model.named_modules()
        if isinstance(module, _TORCH_ACTIVATIONS)
        and not isinstance(module, (*_ACTIVATION_MODULES, *_OUTPUT_MODULES))
    ]
    if uncoded:
        found = ", ".join(f"nn.{kind} ({name!r})" for name, kind in uncoded)
        raise UserError(
            f"{type(model).__name__} has {found}: sensgen cannot code its pre-activations, "
            "and activation codes and transitions would leave that layer out. Use one of "
            f"{_SUPPORTED} (piecewise linear but for the last three, which only "
            "method='sampled' codes, by sign)."
        )
