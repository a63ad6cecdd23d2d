"""Every generalization measure of one model, by group (`Measurements.generalization_measures`).

Groups, so a study can skip the expensive searches:

* ``norms``: ``n_params``, ``frobenius_{product,sum,geometric}``,
  ``spectral_{product,geometric}``, ``spectral_frobenius``, ``path_norm``.
* ``distance``: ``distance_l2`` (‖θ − θ_0‖_2), ``distance_frobenius`` (Σ_l ‖W_l − W_l⁰‖_F²),
  ``distance_spectral`` (Σ_l ‖W_l − W_l⁰‖_2²).
* ``margin``: ``margin`` (γ), ``inverse_margin`` and, with ``norms``, ``<name>_normalised``
  for each name in `NORMALISED`: value/γ², but L·(Π_l ‖W_l‖²/γ²)^{1/L} = value·(1/γ²)^{1/L}
  for the geometric means (`GEOMETRIC`), as JNMKB's "sum.fro/margin", "sum.spec/margin".
* ``flatness``: ``pacbayes_mag_flatness`` = 1/σ'² (magnitude-aware search) and
  ``pacbayes_init`` (plain search; m = ``n_train``, the training-set size). Two seeded
  bisection searches.
* ``sharpness``: ``sharpness_mag`` = 1/α'² (magnitude-aware worst-case search).

Cost: norms and distance are one SVD per layer; margin one forward pass. Each search tries
some 20 to 30 values (doubling, then 20 bisection steps), with 10 noisy forward passes per
value (flatness, twice: magnitude-aware and plain) or 10 gradient-ascent steps (sharpness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.measures.flatness import pacbayes_flatness, pacbayes_init, sharpness
from sensgen.measures.margins import inverse_margin, margin, normalised
from sensgen.measures.norms import (
    _linear_names,
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

GROUPS = ("norms", "distance", "margin", "flatness", "sharpness")
NORM_MEASURES = (
    frobenius_product,
    frobenius_sum,
    frobenius_geometric,
    spectral_product,
    spectral_geometric,
    spectral_frobenius,
    path_norm,
)
# Norm measures also stored margin-normalised, as JNMKB's "/margin" versions (frobenius_sum,
# which JNMKB do not normalise, over γ² too).
NORMALISED = tuple(fn.__name__ for fn in NORM_MEASURES)
# The geometric means L·(Π_l ‖W_l‖²)^{1/L}: JNMKB normalise them inside the mean.
GEOMETRIC = ("frobenius_geometric", "spectral_geometric")


def all_measures(
    net: nn.Module,
    init: nn.Module | Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    groups: str | Sequence[str] = GROUPS,
    n_train: int | None = None,
) -> dict[str, float]:
    """The measures of the given `GROUPS` for one model, as {name: float}.

    Args:
        net: the trained MLP (not modified).
        init: the same architecture at initialisation, as a module or its state dict.
        x, y: training points [m, ...] and the labels the model trained on [m] (margin,
            flatness and sharpness).
        seed: seeds the flatness and sharpness searches.
        groups: any of `GROUPS` (module docstring lists each group's keys).
        n_train: m of ``pacbayes_init``, the size of the training set the model was
            trained on (x may be a subset of it); default len(x).
    """
    groups = (groups,) if isinstance(groups, str) else tuple(groups)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise UserError(f"unknown measure groups {unknown}; choose from {list(GROUPS)}")
    out: dict[str, float] = {}
    if "norms" in groups:
        out["n_params"] = float(n_params(net))
        out |= {fn.__name__: fn(net) for fn in NORM_MEASURES}
    dist = distance_from_init(net, init) if {"distance", "flatness"} & set(groups) else None
    if "distance" in groups:
        out["distance_l2"] = dist["l2"]
        # (float products round to ∞ where d**2 would raise OverflowError)
        out["distance_frobenius"] = sum(d * d for d in dist["frobenius"])
        out["distance_spectral"] = sum(d * d for d in dist["spectral"])
    if "margin" in groups:
        gamma = margin(net, x, y)
        out["margin"] = gamma
        out["inverse_margin"] = inverse_margin(gamma)
        if "norms" in groups:
            depth = len(_linear_names(net))
            out |= {
                f"{name}_normalised": normalised(
                    out[name], gamma, root=depth if name in GEOMETRIC else 1
                )
                for name in NORMALISED
            }
    if "flatness" in groups:
        out["pacbayes_mag_flatness"] = pacbayes_flatness(net, x, y, seed=seed)["flatness"]
        sigma = pacbayes_flatness(net, x, y, seed=seed, magnitude_aware=False)["sigma"]
        out["pacbayes_init"] = pacbayes_init(dist["l2"], sigma, n_train or len(x))
    if "sharpness" in groups:
        out["sharpness_mag"] = sharpness(net, x, y, seed=seed)["sharpness"]
    return out
