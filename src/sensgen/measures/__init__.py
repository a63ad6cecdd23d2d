"""Norm-, margin-, distance- and flatness-based generalization measures of a trained MLP.

"Other measures" of `paper.md` §6 "Beyond the paper", after Jiang et al. 2020,
"Fantastic generalization measures and where to find them" (ICLR 2020; JNMKB below).
W_l is the weight matrix of the l-th `nn.Linear` of ``net`` in module order (l = 1..L,
readout last): a sensgen `MLP`, or any user MLP such as an ``nn.Sequential`` of linear
layers and elementwise activations. θ is all parameters (weights and biases), θ_0 the same
at initialisation. Every function is pure, computes in float64 on the CPU and returns one
Python float per model (`distance_from_init` returns a dict).

Modules: `norms` (weights, paths, distance from init), `margins` (output margin γ),
`flatness` (PAC-Bayes flatness and sharpness searches), `suite` (`all_measures` by group).

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(4, 3, width=8, depth=2, generator=torch.Generator().manual_seed(0))
    >>> out = all_measures(net, net, torch.randn(20, 4), torch.arange(20) % 3, seed=0)
    >>> out["distance_l2"]
    0.0
"""

from sensgen.measures.flatness import (
    adversarial_accuracy,
    pacbayes_flatness,
    pacbayes_init,
    perturbed_accuracy,
    sharpness,
)
from sensgen.measures.margins import inverse_margin, logits64, margin, margins, normalised
from sensgen.measures.norms import (
    distance_from_init,
    frobenius_geometric,
    frobenius_product,
    frobenius_sum,
    n_params,
    path_norm,
    spectral_frobenius,
    spectral_geometric,
    spectral_product,
)
from sensgen.measures.suite import GEOMETRIC, GROUPS, NORMALISED, all_measures

__all__ = [
    "GEOMETRIC",
    "GROUPS",
    "NORMALISED",
    "adversarial_accuracy",
    "all_measures",
    "distance_from_init",
    "frobenius_geometric",
    "frobenius_product",
    "frobenius_sum",
    "inverse_margin",
    "logits64",
    "margin",
    "margins",
    "n_params",
    "normalised",
    "pacbayes_flatness",
    "pacbayes_init",
    "path_norm",
    "perturbed_accuracy",
    "sharpness",
    "spectral_frobenius",
    "spectral_geometric",
    "spectral_product",
]
