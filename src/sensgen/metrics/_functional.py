"""Activation functions a model applies outside activation modules (paper §2.2).

Activation codes of a user's module are read through hooks on its activation modules
(`sensgen.metrics.codes`). A nonlinearity called as a function in a ``forward``
(``F.relu(h)``, ``torch.tanh(h)``, ``h.relu()``) or inside a module that is not an
activation module (a transformer layer's feed-forward block) has no module to hook: its
units would be missing from the code, and every transition count would leave their
crossings out without a word. The exact method's affinity check
(`sensgen.metrics.exact_transitions`) sees such a function before an activation module,
never after the last one, and the sampled method sees none. So the forward pass that
reads the codes runs under a `TorchFunctionMode` that notes every activation *function*
called while no activation module is running.

What counts: the functions torch itself names as activations (the functional forms of
its activation modules, and ``torch.relu``, ``torch.tanh``, ``torch.sigmoid`` and their
tensor methods). Generic elementwise functions that can also be written as an activation
(``clamp``, ``abs``, ``maximum``) and max-pooling are not flagged: they are as often
something else (a clamp that keeps a norm away from 0); their switches are not coded
either, which the docstrings of the transition methods say.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sensgen.errors import UserError

_ACTIVATION_NAMES = (
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "prelu",
    "rrelu", "rrelu_", "hardsigmoid", "hardswish", "threshold", "threshold_", "hardshrink",
    "softshrink", "elu", "elu_", "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish",
    "softplus", "softsign", "logsigmoid", "tanhshrink", "glu", "tanh", "tanh_", "sigmoid",
    "sigmoid_",
)  # fmt: skip


def _named(func: Callable) -> str:
    """How the user wrote it: F.relu, torch.relu or Tensor.relu."""
    name = getattr(func, "__name__", repr(func))
    if any(getattr(F, n, None) is func for n in _ACTIVATION_NAMES):
        return f"F.{name}"
    if getattr(torch.Tensor, name, None) is func:
        return f"Tensor.{name}"
    return f"torch.{name}"


def _activation_functions() -> frozenset:
    """Every callable of F, torch, torch.special and torch.Tensor named as an activation."""
    found = set()
    for space in (F, torch, torch.Tensor):
        for name in _ACTIVATION_NAMES:
            func = getattr(space, name, None)
            if callable(func):
                found.add(func)
    found.add(torch.special.expit)  # torch's other name for the sigmoid
    return frozenset(found)


ACTIVATION_FUNCTIONS = _activation_functions()


class UnhookedActivations(TorchFunctionMode):
    """Notes the activation functions called while no activation module runs.

    ``inside`` counts the activation modules running (their hooks move it); ``found`` holds
    the names of the functions called outside all of them, in call order, once each.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.inside == 0 and func in ACTIVATION_FUNCTIONS:
            name = _named(func)
            if name not in self.found:
                self.found.append(name)
        return func(*args, **(kwargs or {}))

    def refuse(self, model: torch.nn.Module, supported: str) -> None:
        """UserError naming the functions found, if any."""
        if not self.found:
            return
        raise UserError(
            f"{type(model).__name__} calls {', '.join(self.found)} outside an activation "
            "module (in a forward, or inside a module that is not an activation), so "
            "sensgen cannot read that layer's pre-activations: its units would be missing "
            "from the activation code and its crossings from every transition count. Wrap "
            f"each hidden nonlinearity in a module: one of {supported}. (A sigmoid over the "
            "output is no hidden layer: return the logits.)"
        )
