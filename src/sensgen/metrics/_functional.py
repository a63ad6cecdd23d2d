"""Hidden layers made by activation functions outside activation modules (paper §2.2).

Activation codes of a user's module are read through hooks on its activation modules
(`sensgen.metrics.codes`). A nonlinearity called as a function in a ``forward``
(``F.relu(h)``, ``torch.tanh(h)``, ``h.relu()``) or inside a module that is not an
activation module (a transformer layer's feed-forward block) has no module to hook: its
units would be missing from the code, and every transition count would leave their
crossings out without a word. The exact method's affinity check
(`sensgen.metrics.exact_transitions`) sees such a function before an activation module,
never after the last one, and the sampled method sees none.

So the forward pass that reads the codes runs under a `TorchFunctionMode` that follows
which tensors depend on the input x and flags a *hidden layer made by a function*: an
activation function, called while no activation module runs, on a tensor that depends on
x, whose result (or anything computed from it) later enters a linear map (``F.linear``,
a matrix product, a convolution). That is what a hidden layer is; an activation function
whose result reaches the output without another linear map (a sigmoid over the logits, a
bounded output) makes no region of the code, and one on a parameter alone (a learnt
temperature, a gate, a positivity constraint) does not depend on x: neither is flagged.

What counts as an activation function: those torch itself names as activations (the
functional forms of its activation modules, and ``torch.relu``, ``torch.tanh``,
``torch.sigmoid`` and their tensor methods). Generic functions that can also be written
as an activation (``clamp``, ``abs``, ``maximum``) and max-pooling are not followed: they
are as often something else (a clamp that keeps a norm away from 0); their switches are
not coded either, which the docstrings of the transition methods say.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

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

# Linear maps a hidden layer's units feed: reaching one makes an activation a hidden layer.
_LINEAR_NAMES = (
    "linear", "bilinear", "matmul", "mm", "bmm", "addmm", "addmm_", "baddbmm", "baddbmm_",
    "addmv", "mv", "einsum", "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "__matmul__", "__rmatmul__",
)  # fmt: skip


def _callables(names: tuple[str, ...], spaces: tuple[Any, ...]) -> dict[Callable, str]:
    """Every callable of ``spaces`` named in ``names``, with the name a user writes it by."""
    found: dict[Callable, str] = {}
    for space, prefix in zip(spaces, ("F.", "Tensor.", "torch."), strict=True):
        for name in names:
            func = getattr(space, name, None)
            if callable(func) and func not in found:
                found[func] = prefix + name
    return found


ACTIVATION_FUNCTIONS = _callables(_ACTIVATION_NAMES, (F, torch.Tensor, torch))
ACTIVATION_FUNCTIONS.setdefault(torch.special.expit, "torch.special.expit")
LINEAR_FUNCTIONS = frozenset(_callables(_LINEAR_NAMES, (F, torch.Tensor, torch)))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a call's arguments or result (nested in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class UnhookedActivations(TorchFunctionMode):
    """Notes the hidden layers made by activation functions outside activation modules.

    Args:
        x: the input of the forward pass to watch.

    ``inside`` counts the activation modules running (their hooks move it). Tensors that
    depend on x, and those that carry a function-made activation (with its name), are
    kept by weak reference; ``found`` holds, in call order and once each, the names of the
    activation functions whose results entered a linear map.
    """

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.inside = 0
        self.found: list[str] = []
        # id(tensor) -> (a weak reference to it, the activation function it carries or None)
        # for the tensors that depend on x. (Not a WeakKeyDictionary: it compares keys with
        # ==, which on tensors is elementwise.)
        self._depends: dict[int, tuple[weakref.ref, str | None]] = {}
        self._note(x, None)

    def _note(self, t: torch.Tensor, carried: str | None) -> None:
        self._depends[id(t)] = (weakref.ref(t), carried)

    def _lookup(self, t: torch.Tensor) -> tuple[bool, str | None]:
        """(whether t depends on x, the activation function it carries)."""
        entry = self._depends.get(id(t))
        if entry is None or entry[0]() is not t:  # (an id reused by a newer tensor)
            return False, None
        return True, entry[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        looked_up = [self._lookup(t) for t in _tensors((args, kwargs))]
        out = func(*args, **kwargs)
        if not any(depends for depends, _ in looked_up):
            return out  # (parameters, buffers, constants: no unit of the code)
        carried = [name for _, name in looked_up if name is not None]
        if func in LINEAR_FUNCTIONS:
            self.found += [name for name in dict.fromkeys(carried) if name not in self.found]
            carried = []  # the linear map's output is a pre-activation, not a layer's units
        elif self.inside == 0 and func in ACTIVATION_FUNCTIONS:
            carried = [ACTIVATION_FUNCTIONS[func]]
        for t in _tensors(out):
            self._note(t, carried[0] if carried else None)
        return out

    def refuse(self, model: torch.nn.Module, supported: str) -> None:
        """UserError naming the functions found, if any."""
        if not self.found:
            return
        raise UserError(
            f"{type(model).__name__} makes a hidden layer with {', '.join(self.found)} "
            "outside an activation module (in a forward, or inside a module that is not an "
            "activation), so sensgen cannot read that layer's pre-activations: its units "
            "would be missing from the activation code and its crossings from every "
            f"transition count. Wrap each hidden nonlinearity in a module: one of "
            f"{supported}."
        )
