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
x, whose result is then *used*. The rule fails closed: the result may pass through a short
list of operations that only move or combine values elementwise (views, reshapes,
indexing, concatenation, elementwise arithmetic, dropout, activations, softmax) and be
returned; any other operation that takes it (a linear map, a matrix product, a
convolution, a sum or mean over units, attention) is a use. Writes count too: a tensor
that a result is written into (``h[:, :3] = F.relu(...)``), or whose view an activation
overwrote in place, carries it. So an activation function over the output (a sigmoid over
the logits) is allowed, and so is one on a parameter alone (a learnt temperature, a gate,
a positivity constraint), which does not depend on x.

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

# Operations a function-made activation may pass through without being used: they move its
# values or combine them elementwise, so what they return still holds its units, one by one.
_PASS_NAMES = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "T", "mT", "contiguous", "clone", "detach", "to", "type",
    "float", "double", "half", "bfloat16", "expand", "expand_as", "narrow", "select",
    "__getitem__", "__setitem__", "chunk", "split", "unbind", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "add", "add_", "__add__", "__radd__",
    "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "mul", "mul_", "__mul__",
    "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__", "__itruediv__",
    "neg", "__neg__", "softmax", "log_softmax", "copy_", "fill_", "zero_", "size", "dim",
    "numel", "shape", "dtype", "device", "is_contiguous", "requires_grad_", "__len__",
    "__format__", "__repr__", "data_ptr", "stride", "storage_offset", "__get__",
)  # fmt: skip
# Functions whose result has only the shape, dtype or device of their tensor arguments.
_SHAPE_ONLY_NAMES = (
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
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


_SPACES = (F, torch.Tensor, torch)
ACTIVATION_FUNCTIONS = _callables(_ACTIVATION_NAMES, _SPACES)
ACTIVATION_FUNCTIONS.setdefault(torch.special.expit, "torch.special.expit")
PASS_FUNCTIONS = frozenset(_callables(_PASS_NAMES, _SPACES)) | frozenset(ACTIVATION_FUNCTIONS)
SHAPE_ONLY_FUNCTIONS = frozenset(_callables(_SHAPE_ONLY_NAMES, _SPACES))
FIRST_ARGUMENT_FUNCTIONS = frozenset(
    _callables(("expand_as", "view_as", "reshape_as", "type_as"), _SPACES)
)


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
    kept by weak reference, a view's base with it; ``found`` holds, in call order and once
    each, the names of the activation functions whose results were used.
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
        """t depends on x (and carries ``carried``); so does the base it is a view of."""
        while t is not None:
            _, before = self._lookup(t)
            self._depends[id(t)] = (weakref.ref(t), carried or before)
            t = t._base

    def _lookup(self, t: torch.Tensor) -> tuple[bool, str | None]:
        """(whether t, or the base it is a view of, depends on x; what either carries: an
        activation written in place into the base shows through its views)."""
        depends, carried = False, None
        for u in (t, t._base):
            entry = None if u is None else self._depends.get(id(u))
            if entry is not None and entry[0]() is u:  # (not an id reused by a newer one)
                depends, carried = True, carried or entry[1]
        return depends, carried

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # (x.expand_as(h) and the like take only their shape from h)
        values = args[:1] if func in FIRST_ARGUMENT_FUNCTIONS else (args, kwargs)
        looked_up = [self._lookup(t) for t in _tensors(values)]
        out = func(*args, **kwargs)
        if func in SHAPE_ONLY_FUNCTIONS or not any(depends for depends, _ in looked_up):
            return out  # (parameters, buffers, constants, shapes: no unit of the code)
        carried = [name for _, name in looked_up if name is not None]
        if carried and func not in PASS_FUNCTIONS and self.inside == 0:
            self.found += [name for name in dict.fromkeys(carried) if name not in self.found]
            carried = []  # used: what comes out is no longer that layer's units
        if self.inside == 0 and func in ACTIVATION_FUNCTIONS:
            carried = [ACTIVATION_FUNCTIONS[func]]
        written = [args[0]] if out is None and args and isinstance(args[0], torch.Tensor) else []
        for t in [*_tensors(out), *written]:  # (__setitem__ returns None: its target)
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
