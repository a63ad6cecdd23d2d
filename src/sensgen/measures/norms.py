"""Norm-, path- and distance-based measures of an MLP's weights (JNMKB: Jiang et al. 2020).

W_l is the weight matrix of the l-th `nn.Linear` of ``net`` in module order (l = 1..L,
readout last). Products of norms are formed as exp(Σ log), so they overflow to ``inf``
without a warning; the geometric means never overflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from sensgen.errors import UserError

# Layers with weights of their own that the products over the nn.Linear matrices W_l would
# silently leave out. (A PReLU's slopes, a norm layer's scale and a parametrized Linear's
# factors are no such layers: the measures stand for those MLPs, as JNMKB define them.)
_OTHER_WEIGHT_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Bilinear,
    nn.RNNBase,
    nn.MultiheadAttention,
)


def _linear_names(net: nn.Module) -> list[str]:
    """Qualified names of the `nn.Linear` modules of ``net``, in module order (W_1..W_L).

    Raises:
        UserError: if ``net`` has none, or has another layer with weights (a convolution,
            an embedding, ...), which the products over W_l would silently leave out.
    """
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    others = [
        (name, type(m).__name__)
        for name, m in net.named_modules()
        if isinstance(m, _OTHER_WEIGHT_LAYERS)
    ]
    if others:
        found = ", ".join(f"{kind} ({name!r})" for name, kind in others)
        raise UserError(
            f"{type(net).__name__} has layers with weights other than nn.Linear: {found}. "
            "The norm and distance measures are defined on the weight matrices of an MLP's "
            "nn.Linear layers and would leave these out; measure an MLP (or the margin, "
            "flatness and sharpness groups, which take any module)."
        )
    if not names:
        raise UserError(f"{type(net).__name__} has no nn.Linear layers to measure")
    return names


def _weights(net: nn.Module) -> list[torch.Tensor]:
    """[W_1, ..., W_L] as detached float64 CPU tensors (each [n_l, n_{l-1}])."""
    modules = dict(net.named_modules())
    return [modules[n].weight.detach().to("cpu", torch.float64) for n in _linear_names(net)]


def _params(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All parameters of a module, or a state dict, as float64 CPU tensors by name."""
    items = obj.named_parameters() if isinstance(obj, nn.Module) else obj.items()
    return {name: p.detach().to("cpu", torch.float64) for name, p in items}


def _fro_sq(w: torch.Tensor) -> float:
    return float((w * w).sum())


def _spec(w: torch.Tensor) -> float:
    """‖w‖_2, the largest singular value: NaN if w holds a NaN, ∞ if it holds an ∞ (the
    SVD would raise on the one and return NaN for the other)."""
    if not bool(torch.isfinite(w).all()):
        return math.nan if bool(torch.isnan(w).any()) else math.inf
    return float(torch.linalg.matrix_norm(w, ord=2))


def _spec_sq(w: torch.Tensor) -> float:
    s = _spec(w)
    return s * s  # (a float product rounds to ∞ where s**2 would raise OverflowError)


def _exp(log_value: float) -> float:
    """exp that returns inf instead of raising OverflowError (and NaN for NaN)."""
    return math.exp(log_value) if not log_value >= 709.78 else math.inf


def _log_product(values: list[float]) -> float:
    """Σ log v; a zero factor gives −∞, a NaN factor (a diverged net) NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return sum(math.log(v) if v > 0 else -math.inf for v in values)


def n_params(net: nn.Module) -> int:
    """The number of parameters: Σ_l n_l (n_{l−1} + 1) for an MLP with biases (weights
    plus biases, JNMKB, "params"), whether or not they require gradients now."""
    return sum(p.numel() for p in net.parameters())


def frobenius_product(net: nn.Module) -> float:
    """Π_l ‖W_l‖_F² (JNMKB, "prod.fro"), formed as exp(Σ_l log ‖W_l‖_F²)."""
    return _exp(_log_product([_fro_sq(w) for w in _weights(net)]))


def frobenius_sum(net: nn.Module) -> float:
    """Σ_l ‖W_l‖_F²; Jiang et al.'s "sum.fro" is `frobenius_geometric`."""
    return sum(_fro_sq(w) for w in _weights(net))


def frobenius_geometric(net: nn.Module) -> float:
    """L · (Π_l ‖W_l‖_F²)^{1/L} = L · exp((1/L) Σ_l log ‖W_l‖_F²) (JNMKB, "sum.fro").

    The mean is taken in log space, so it stays finite however deep or large the net.
    """
    fro = [_fro_sq(w) for w in _weights(net)]
    return len(fro) * _exp(_log_product(fro) / len(fro))


def spectral_product(net: nn.Module) -> float:
    """Π_l ‖W_l‖_2² with ‖·‖_2 the largest singular value (JNMKB, "prod.spec")."""
    return _exp(_log_product([_spec_sq(w) for w in _weights(net)]))


def spectral_geometric(net: nn.Module) -> float:
    """L · (Π_l ‖W_l‖_2²)^{1/L}, in log space (JNMKB, "sum.spec")."""
    spec = [_spec_sq(w) for w in _weights(net)]
    return len(spec) * _exp(_log_product(spec) / len(spec))


def spectral_frobenius(net: nn.Module) -> float:
    """Π_l ‖W_l‖_2² · Σ_l ‖W_l‖_F² / ‖W_l‖_2²: JNMKB's "spec.orig" before its division by
    γ² (Bartlett et al. 2017); JNMKB's "fro/spec" is the sum alone.

    The sum is the total stable rank; the product is as in `spectral_product`. A zero
    layer gives 0 (the product's limit, the stable ranks lying in [1, rank]); a NaN, NaN.
    """
    ws = _weights(net)
    spec = [_spec_sq(w) for w in ws]
    if any(math.isnan(s) for s in spec):
        return math.nan
    if min(spec) == 0:
        return 0.0
    stable_rank = sum(_stable_rank(w, s) for w, s in zip(ws, spec, strict=True))
    return _exp(_log_product(spec) + math.log(stable_rank))


def _stable_rank(w: torch.Tensor, spec_sq: float) -> float:
    """‖w‖_F²/‖w‖_2² given ‖w‖_2² ≠ 0; where the squares overflow (entries beyond ~1e154),
    the same ratio of w/max|w_ij| (∞ for an infinite entry, which makes the product ∞)."""
    fro_sq = _fro_sq(w)
    if math.isfinite(fro_sq) and math.isfinite(spec_sq):
        return fro_sq / spec_sq
    if not bool(torch.isfinite(w).all()):
        return math.inf
    v = w / w.abs().max()
    return _fro_sq(v) / _spec_sq(v)


def path_norm(net: nn.Module) -> float:
    """Σ_i f_{W∘W}(𝟙)_i (JNMKB, "path.norm").

    The all-ones input is passed through the element-wise squared weights W_l ∘ W_l with
    the identity activation and no biases: v_0 = 𝟙, v_l = (W_l ∘ W_l) v_{l−1}; the measure
    is Σ_i (v_L)_i, i.e. the sum over input-output paths of the product of squared weights.
    """
    ws = _weights(net)
    v = torch.ones(ws[0].shape[1], dtype=torch.float64)
    for w in ws:
        v = (w * w) @ v
    return float(v.sum())


def distance_from_init(
    net: nn.Module, init: nn.Module | Mapping[str, torch.Tensor]
) -> dict[str, float | list[float]]:
    """Distances between θ and θ_0 (JNMKB, "dist.l2", "dist.fro", "dist.spec").

    Args:
        net: the trained network.
        init: the same architecture at initialisation, as a module or its state dict.

    Returns:
        ``l2``: ‖θ − θ_0‖_2 over all parameters (weights and biases);
        ``frobenius``: [‖W_l − W_l⁰‖_F for l = 1..L];
        ``spectral``: [‖W_l − W_l⁰‖_2 for l = 1..L].

    Raises:
        UserError: ``init`` does not hold net's parameters by name and shape.
    """
    theta, theta0 = _params(net), _params(init)
    if isinstance(init, Mapping):  # a state dict also holds buffers (batch-norm statistics)
        theta0 = {k: v for k, v in theta0.items() if k in theta}
    if theta.keys() != theta0.keys():
        missing = sorted(theta.keys() - theta0.keys())
        extra = sorted(theta0.keys() - theta.keys())
        raise UserError(
            f"init does not match net's parameters (missing: {missing[:5]}, not in net: "
            f"{extra[:5]}): pass the same architecture at initialisation, as a module or "
            "its state dict."
        )
    reshaped = [k for k in theta if theta[k].shape != theta0[k].shape]
    if reshaped:  # (the differences would broadcast into a number of no meaning)
        found = ", ".join(
            f"{k}: {list(theta0[k].shape)} in init, {list(theta[k].shape)} in net"
            for k in reshaped[:5]
        )
        raise UserError(
            f"init's parameters do not have net's shapes ({found}): pass the same "
            "architecture at initialisation, as a module or its state dict."
        )
    l2 = math.sqrt(sum(float(((theta[k] - theta0[k]) ** 2).sum()) for k in theta))
    diffs = [theta[f"{n}.weight"] - theta0[f"{n}.weight"] for n in _linear_names(net)]
    return {
        "l2": l2,
        "frobenius": [float(torch.linalg.matrix_norm(d)) for d in diffs],
        "spectral": [_spec(d) for d in diffs],
    }
