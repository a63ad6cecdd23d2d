"""A float64 sensgen `MLP` evaluated many times over with parameters of its shape.

The flatness searches evaluate a net at hundreds of perturbed parameter vectors, and the
sharpness ascent also takes the gradient at each (`sensgen.measures.flatness`). Run as a
module under autograd, every layer of every call makes fresh [n, width] float64 tensors,
whose page faults took a quarter of a forward pass, and the backward pass adds autograd's
graph and as many tensors again (issue 8). `BufferedMLP` computes the same values into
buffers kept from call to call, with the same kernels called on operands of the same
layouts, so the results are bit for bit the module's and autograd's (tests check every
nonlinearity). For parameters θ (W_l [n_l, n_{l−1}], b_l [n_l]) and points x [n, d]:

    h_l = a_{l−1} W_lᵀ + b_l  (``addmm``, as ``nn.Linear``),   a_l = φ(h_l),   z = h_{L−1}

and, for a given g_z = ∂ℓ/∂z [n, C], autograd's backward pass of ``addmm``:

    ∂ℓ/∂W_l = g_lᵀ a_{l−1},   ∂ℓ/∂b_l = Σ_rows g_l,   g_{l−1} = φ'(h_{l−1}) ⊙ (g_l W_l)

with g_{L−1} = g_z and a_{−1} = x. (`sensgen.backprop` computes the same for a pack of
float32 MLPs stacked along a model axis, in the training step's layouts.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules import module as _module

from sensgen.backprop import ACTIVATION_BACKWARDS, ACTIVATIONS_INTO, BACKWARD_FROM_ACTIVATION
from sensgen.models import MLP


class BufferedMLP:
    """Forward and backward passes of a float64 `MLP` at given parameters, into buffers.

    Args:
        net: the `MLP` (for its layer count and nonlinearity; its parameters are not read).

    The parameters are passed to each call by name (``layers.{l}.weight``,
    ``layers.{l}.bias``, as ``named_parameters`` names them). Outputs live in buffers
    until the next call. Call under ``torch.no_grad()`` (out= forms take no autograd).
    """

    def __init__(self, net: MLP) -> None:
        nonlinearity = net.nonlinearity
        self.activation = ACTIVATIONS_INTO[nonlinearity]
        self.activation_backward = ACTIVATION_BACKWARDS[nonlinearity]
        # φ' from a = φ(h) alone: a may be written over h (one buffer fewer per layer).
        self.in_place = nonlinearity in BACKWARD_FROM_ACTIVATION
        self.names = [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(len(net.layers))]
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._x = torch.empty(0)
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []  # [(h_l, a_l)], last call

    @staticmethod
    def applies_to(net: nn.Module) -> bool:
        """Whether ``net`` computes exactly what this class does: a sensgen `MLP` as built,
        its layers plain ``nn.Linear`` with biases, no parametrization (which renames the
        parameters) and no hook, on it, on a layer or global (a hook may change what the
        module returns or its gradients). Anything else the caller runs as a module."""
        if type(net) is not MLP or not all(
            type(layer) is nn.Linear and layer.bias is not None for layer in net.layers
        ):
            return False
        expected = {f"layers.{i}.{kind}" for i in range(len(net.layers)) for kind in _KINDS}
        return {name for name, _ in net.named_parameters()} == expected and not _hooked(net)

    @classmethod
    def of(cls, net: nn.Module) -> BufferedMLP | None:
        """One for ``net`` if `applies_to` it, else None."""
        return cls(net) if cls.applies_to(net) else None

    def _buffer(self, slot: str, like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        key = (slot, rows, cols, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = like.new_empty(rows, cols)
        return self._buffers[key]

    def logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """z [n, C] at parameters ``params`` on x [n, d]; keeps what `gradients` needs."""
        last = len(self.names) - 1
        n, a, hidden = x.shape[0], x, []
        for index, (w_name, b_name) in enumerate(self.names):
            weight = params[w_name]
            h = self._buffer(f"h{index}", x, n, weight.shape[0])
            torch.addmm(params[b_name], a, weight.t(), out=h)
            if index == last:
                self._x, self._hidden = x, hidden
                return h
            out = h if self.in_place else self._buffer(f"a{index}", x, n, weight.shape[0])
            a = self.activation(h, out)
            hidden.append((h, a))
        raise AssertionError("an MLP has a readout layer")

    def gradients(
        self,
        params: Mapping[str, torch.Tensor],
        grad_logits: torch.Tensor,
        out: Mapping[str, torch.Tensor],
    ) -> None:
        """out[name] ← ∂ℓ/∂name for the last `logits` call, given g_z = ∂ℓ/∂z [n, C].

        ``params`` must be the tensors of that call, unchanged since; ``out`` holds a
        buffer shaped like each parameter. g_z is left as it is.
        """
        grad = grad_logits
        for index in reversed(range(len(self.names))):
            w_name, b_name = self.names[index]
            a_in = self._x if index == 0 else self._hidden[index - 1][1]
            # autograd's addmm backward for W.t() stored transposed: (gᵀ a)ᵀᵀ = gᵀ a.
            torch.mm(grad.t(), a_in, out=out[w_name])
            torch.sum(grad, dim=0, out=out[b_name])  # the bias's broadcast, summed back
            if index > 0:
                width = params[w_name].shape[1]
                upstream = self._buffer(f"g{index}", grad, grad.shape[0], width)
                torch.mm(grad, params[w_name], out=upstream)
                grad = self.activation_backward(upstream, *self._hidden[index - 1])


_KINDS = ("weight", "bias")


def _hooked(net: nn.Module) -> bool:
    """Whether any forward or backward hook would run when ``net`` is called (its own, a
    submodule's, or one registered for every module)."""
    every_module = (
        _module._global_forward_pre_hooks,
        _module._global_forward_hooks,
        _module._global_backward_pre_hooks,
        _module._global_backward_hooks,
    )
    if any(every_module):
        return True
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    return any(getattr(m, kind) for m in net.modules() for kind in kinds)
