"""Per-model measurements beyond losses, accuracies and the test Jbar (paper §2, §3, §6).

`measure_model` returns, for one trained MLP, what `sensgen.study.Measurements` asks for:

    jacobian_norm_train   mean over k training points of ‖∂softmax/∂x‖_F (paper §2.1),
                          k = `jacobian_train_points`
    transitions           mean over `transition_ellipses` ellipses of t_exact on the
                          n-gon inscribed in each, n = `transition_sides` (paper §2.2,
                          Study 4: 32 ellipses, 1,200-gon)
    transitions_sampled   mean of the paper's t_n on the *same* n vertices, so
                          transitions_sampled ≤ transitions on every ellipse (§6)
    transitions_sign      smooth φ only, instead of the two above: mean t_n of the sign
                          code 1[h > 0] on the same vertices, sensgen's labelled
                          extension, never to be pooled with piecewise-linear counts

A key is left out when its count in the config is 0. Each ellipse goes through three test
points of three different classes, z(φ) = c + a cos φ + b sin φ with the anchors at
φ = π/3, π, 5π/3 (`sensgen.metrics.ellipse`); the vertices are z(2πi/n), i = 0..n−1.

**Same points for every model.** The training points and the ellipses are drawn from
generators seeded by ``derive_seed(seed, purpose)`` with the *measurement* seed — pass
`MEASURE_SEED`, never a run's seed. So every model trained on the same inputs (one dataset
and training subset) is measured on the same training points and every model of a dataset
on the same ellipses, whatever its own seed: the two members of a pair (Study 4) and all
models of a correlation plot (Study 5) are compared like for like. The draws depend only
on (seed, number of training inputs or test labels, count), and more ellipses or points
extend the list without changing its start.

Example:
    >>> import torch
    >>> from sensgen.data import Dataset
    >>> from sensgen.models import MLP
    >>> from sensgen.study import Measurements
    >>> g = torch.Generator().manual_seed(0)
    >>> test = Dataset("toy", "test", torch.randn(30, 4, generator=g),
    ...                torch.arange(30) % 3, 3, (1, 2, 2))
    >>> net = MLP(4, 3, width=8, depth=2, generator=g)
    >>> config = Measurements(jacobian_train_points=10, transition_ellipses=2,
    ...                       transition_sides=60)
    >>> out = measure_model(net, x_train=torch.randn(50, 4, generator=g), test=test,
    ...                     config=config, seed=MEASURE_SEED)
    >>> sorted(out), out["transitions_sampled"] <= out["transitions"]
    (['jacobian_norm_train', 'transitions', 'transitions_sampled'], True)
"""

from __future__ import annotations

import copy
import math

import torch

from sensgen.data import Dataset
from sensgen.errors import UserError
from sensgen.metrics import ellipse, is_piecewise_linear, jacobian_norm, transitions
from sensgen.models import MLP
from sensgen.study import Measurements
from sensgen.train import derive_seed

MEASURE_SEED = 0  # the one measurement seed of a study: same points for every model


def train_point_indices(n_train: int, k: int, *, seed: int) -> torch.Tensor:
    """The first min(k, n_train) entries of a permutation of range(n_train) seeded by `seed`.

    Returns:
        int64 [min(k, n_train)], distinct indices in [0, n_train).

    Example:
        >>> train_point_indices(5, 10, seed=0).sort().values
        tensor([0, 1, 2, 3, 4])
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "measure:train-points"))
    return torch.randperm(n_train, generator=g)[: min(k, n_train)]


def ellipse_anchor_indices(
    test_labels: torch.Tensor, n_ellipses: int, *, seed: int
) -> torch.Tensor:
    """Indices of three test points of three different classes per ellipse, deterministic.

    Row i draws three distinct classes uniformly among the classes present, then one point
    uniformly within each class (so every class is equally likely, however imbalanced).
    One uniform draw per row from a generator seeded by `seed`: rows do not depend on
    `n_ellipses` (a longer list extends a shorter one) nor on the labels' device.

    Args:
        test_labels: int [N] labels of the test points.
        n_ellipses: number of rows n >= 0.
        seed: the measurement seed (`MEASURE_SEED`), not a run's seed.

    Returns:
        int64 [n, 3] on the CPU, row i = the anchors (x1, x2, x3) of ellipse i.

    Raises:
        UserError: fewer than three classes among the labels (n > 0; n = 0 gives an
            empty [0, 3]).

    Example:
        >>> idx = ellipse_anchor_indices(torch.tensor([0, 1, 2, 0, 1, 2]), 4, seed=0)
        >>> idx.shape, bool((idx % 3).sort(dim=1).values.eq(torch.arange(3)).all())
        (torch.Size([4, 3]), True)
    """
    if n_ellipses == 0:
        return torch.empty(0, 3, dtype=torch.int64)
    labels = test_labels.detach().cpu().reshape(-1)
    classes, counts = labels.unique(return_counts=True)  # [K], [K], classes sorted
    if len(classes) < 3:
        raise UserError(
            f"ellipses through three test points of different classes need three classes, "
            f"but the test labels hold {len(classes)}; set measure.transition_ellipses = 0."
        )
    by_class = torch.argsort(labels, stable=True)  # [N], indices grouped by class
    starts = counts.cumsum(0) - counts  # [K]
    g = torch.Generator().manual_seed(derive_seed(seed, "measure:ellipses"))
    draws = torch.rand(n_ellipses, len(classes) + 3, generator=g, dtype=torch.float64)
    chosen = draws[:, : len(classes)].argsort(dim=1)[:, :3]  # [n, 3] distinct classes
    size = counts[chosen]  # [n, 3]
    offset = torch.minimum((draws[:, len(classes) :] * size).long(), size - 1)  # [n, 3]
    return by_class[starts[chosen] + offset]


def ellipse_transition_counts(
    net: MLP, anchors: torch.Tensor, *, sides: int
) -> dict[str, torch.Tensor]:
    """Per-ellipse counts on the `sides`-gon inscribed in each ellipse through anchors.

    Args:
        net: a sensgen MLP; it is not modified (counts run on one float64 copy).
        anchors: [n, 3, d], the anchors x1, x2, x3 of each ellipse.
        sides: vertices per polygon, z(2πi/sides).

    Returns:
        int64 [n] tensors: {"transitions": t_exact, "transitions_sampled": t_sides} for a
        piecewise-linear φ; {"transitions_sign": sign-code t_sides} for a smooth one.
    """
    net64 = copy.deepcopy(net).to(torch.float64)  # once, not once per ellipse and method
    anchors = anchors.detach().to(device=_device(net), dtype=torch.float64)
    methods = (
        {"transitions": "exact", "transitions_sampled": "sampled"}
        if is_piecewise_linear(net.nonlinearity)
        else {"transitions_sign": "sampled"}
    )
    counts: dict[str, list[int]] = {key: [] for key in methods}
    for x1, x2, x3 in anchors:
        vertices = ellipse(x1, x2, x3, n_points=sides)  # [sides, d] float64
        for key, method in methods.items():
            counts[key].append(transitions(net64, vertices, method=method))
    return {key: torch.tensor(values, dtype=torch.int64) for key, values in counts.items()}


def measure_model(
    net: MLP,
    *,
    x_train: torch.Tensor,
    test: Dataset,
    config: Measurements,
    seed: int,
) -> dict[str, float]:
    """The measurements of one trained model (see the module docstring for the keys).

    Args:
        net: the trained MLP (any device; not modified).
        x_train: [N, d] the run's unaugmented training inputs (its training subset).
        test: the test split; anchors are its points, classes its labels.
        config: the study's ``[measure]`` table.
        seed: the measurement seed, `MEASURE_SEED` (the same for every model compared).

    Returns:
        {key: float}; keys whose count in `config` is 0 are absent. A model with
        non-finite parameters gets NaN for every key that applies (stored as NULL).
    """
    if x_train.ndim != 2 or x_train.shape[1] != test.x.shape[1]:
        raise ValueError(f"x_train must be [N, {test.x.shape[1]}], got {tuple(x_train.shape)}")
    finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    out: dict[str, float] = {}
    k = min(config.jacobian_train_points, len(x_train))
    if k > 0:
        idx = train_point_indices(len(x_train), k, seed=seed).to(x_train.device)
        x = x_train[idx].to(_device(net))  # [k, d]
        out["jacobian_norm_train"] = jacobian_norm(net, x).mean().item() if finite else math.nan
    if config.transition_ellipses > 0:
        rows = ellipse_anchor_indices(test.y, config.transition_ellipses, seed=seed)
        if finite:
            anchors = test.x[rows.to(test.x.device)]  # [n, 3, d]
            counts = ellipse_transition_counts(net, anchors, sides=config.transition_sides)
            out |= {key: t.double().mean().item() for key, t in counts.items()}
        else:
            keys = ("transitions", "transitions_sampled")
            keys = keys if is_piecewise_linear(net.nonlinearity) else ("transitions_sign",)
            out |= dict.fromkeys(keys, math.nan)
    return out


def _device(net: MLP) -> torch.device:
    return next(net.parameters()).device
