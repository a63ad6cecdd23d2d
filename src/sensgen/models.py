"""Fully-connected networks, as in the paper's experiments (Novak et al. 2018, §4).

An `MLP` maps a flattened input x ∈ R^d through `depth` hidden layers of `width` units:

    h_1 = W_1 x + b_1,   a_l = φ(h_l),   h_{l+1} = W_{l+1} a_l + b_{l+1},   z = h_L

and returns the logits z ∈ R^C (L = depth + 1 weight layers). Weights are drawn as
W_l ~ N(0, σ_w² / fan_in) with σ_w² = `init_scale`, and biases start at 0.

Example:
    >>> import torch
    >>> net = MLP(784, 10, width=256, depth=2, nonlinearity="relu",
    ...           generator=torch.Generator().manual_seed(0))
    >>> net(torch.zeros(5, 784)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from sensgen.errors import parse_choice


class Nonlinearity(StrEnum):
    """The elementwise nonlinearities φ a sensgen MLP can use."""

    RELU = "relu"
    RELU6 = "relu6"
    HARD_TANH = "hard_tanh"
    HARD_SIGMOID = "hard_sigmoid"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    ELU = "elu"

    @classmethod
    def parse(cls, value: str | Nonlinearity) -> Nonlinearity:
        """Turn a user string into a member, or raise a UserError listing the choices."""
        return parse_choice(cls, value, "nonlinearity")


def _hard_sigmoid_derivative(h: torch.Tensor) -> torch.Tensor:
    # hard_sigmoid(h) = clip(h/6 + 1/2, 0, 1): slope 1/6 strictly inside (-3, 3).
    return ((h > -3) & (h < 3)).to(h.dtype) / 6.0


# φ and φ' for each nonlinearity. At a breakpoint the derivative takes the value that
# autograd gives (for ReLU φ'(0) := 0), so the closed-form Jacobian and jacrev agree.
ACTIVATIONS: dict[Nonlinearity, Callable[[torch.Tensor], torch.Tensor]] = {
    Nonlinearity.RELU: F.relu,
    Nonlinearity.RELU6: F.relu6,
    Nonlinearity.HARD_TANH: F.hardtanh,
    Nonlinearity.HARD_SIGMOID: F.hardsigmoid,
    Nonlinearity.TANH: torch.tanh,
    Nonlinearity.SIGMOID: torch.sigmoid,
    Nonlinearity.ELU: F.elu,
}

DERIVATIVES: dict[Nonlinearity, Callable[[torch.Tensor], torch.Tensor]] = {
    Nonlinearity.RELU: lambda h: (h > 0).to(h.dtype),
    Nonlinearity.RELU6: lambda h: ((h > 0) & (h < 6)).to(h.dtype),
    Nonlinearity.HARD_TANH: lambda h: ((h > -1) & (h < 1)).to(h.dtype),
    Nonlinearity.HARD_SIGMOID: _hard_sigmoid_derivative,
    Nonlinearity.TANH: lambda h: 1.0 - torch.tanh(h) ** 2,
    Nonlinearity.SIGMOID: lambda h: torch.sigmoid(h) * (1.0 - torch.sigmoid(h)),
    Nonlinearity.ELU: lambda h: torch.where(h > 0, torch.ones_like(h), torch.exp(h)),
}


class MLP(nn.Module):
    """A fully-connected network returning logits.

    Args:
        in_dim: input size d (784 for (Fashion-)MNIST, 3072 for CIFAR).
        n_classes: number of outputs C.
        width: units per hidden layer.
        depth: number of hidden layers (so there are depth + 1 weight layers).
        nonlinearity: a `Nonlinearity` or its string name.
        init_scale: σ_w²; weights are N(0, σ_w² / fan_in), biases 0.
        generator: keyword-only source of randomness for the initial weights.

    Shapes: input [B, d] → logits [B, C]. The layers are `self.layers` (nn.Linear),
    hidden ones first, the readout last.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        width: int,
        depth: int,
        nonlinearity: str | Nonlinearity = Nonlinearity.RELU,
        init_scale: float = 2.0,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if min(in_dim, n_classes, width, depth) < 1:
            raise ValueError("in_dim, n_classes, width and depth must all be >= 1")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.nonlinearity = Nonlinearity.parse(nonlinearity)
        self.init_scale = float(init_scale)
        sizes = [in_dim] + [width] * depth + [n_classes]
        # skip_init: nn.Linear's own initialisation would draw every weight once more, from
        # the global generator, only to be overwritten (half of a pack's set-up; issue 8).
        self.layers = nn.ModuleList(
            skip_init(nn.Linear, fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(sizes)
        )
        self.reset_parameters(generator=generator)

    @torch.no_grad()
    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """Draw W_l ~ N(0, σ_w²/fan_in) and set b_l = 0 (paper §4, 'init')."""
        weights = [layer.weight for layer in self.layers]
        draw_initial_(weights, [layer.bias for layer in self.layers], self.init_scale, generator)

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return ACTIVATIONS[self.nonlinearity]

    def preactivations(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Hidden pre-activations [h_1, ..., h_{L-1}] (each [B, width]) and logits [B, C]."""
        hidden = []
        a = x
        for layer in self.layers[:-1]:
            h = layer(a)
            hidden.append(h)
            a = self.activation(h)
        return hidden, self.layers[-1](a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x
        for layer in self.layers[:-1]:
            a = self.activation(layer(a))
        return self.layers[-1](a)


@torch.no_grad()
def draw_initial_(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    init_scale: float,
    generator: torch.Generator | None,
) -> None:
    """An MLP's initial parameters, in place: W_l ~ N(0, σ_w²/fan_in) for W_l [n_l, n_{l−1}]
    (contiguous) drawn from ``generator`` layer after layer, b_l = 0 (paper §4, 'init').

    The one definition of `MLP`'s initial weights: `sensgen.pack.init_pack` draws a pack's
    models into their slices of its stacked tensors with it, so a model's weights depend
    only on its seed and init scale, whichever tensor they are drawn into.
    """
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    for weight, bias in zip(weights, biases, strict=True):
        weight.normal_(0.0, math.sqrt(init_scale / weight.shape[1]), generator=generator)
        bias.zero_()


def count_parameters(in_dim: int, n_classes: int, width: int, depth: int) -> int:
    """n_params = Σ_l n_l (n_{l-1} + 1): weights plus biases of every layer."""
    sizes = [in_dim] + [width] * depth + [n_classes]
    return sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(sizes))
