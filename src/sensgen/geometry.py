"""Per-model sensitivity along ellipses and region maps on planes through training points.

What the study's ``[measure]`` table asks for beyond per-model scalars (paper §3):

**Profiles (Study 2, Fig. 2).** For each of three path kinds, `profile_ellipses` ellipses
z(φ) = c + a cos φ + b sin φ through three anchors at φ = π/3, π, 5π/3:

    random            anchors drawn from N(μ, s²I), μ the per-feature training mean and
                      s² the mean per-feature training variance (`random_anchors`)
    different_class   three training points of three different (true) classes
    same_class        three distinct training points of one (true) class

and along each, in `profile_bins` equal-angle bins with the anchors at bin centres
(`angle_bins`): the mean ‖∂softmax/∂x‖_F over `profile_points` samples (float64, so the
norms at the anchors, up to 1e-8 below the rest, do not underflow) and, for
piecewise-linear φ, the exact transition density per unit arc length on the inscribed
`transition_sides`-gon (`transition_profile`). One row per (path, ellipse, bin).

**Region maps (Study 3, Fig. 3).** For `region_planes` planes, each through three training
points of different classes (Gram–Schmidt basis, `plane_grid`, square of `region_extent`
times the anchors' extent), the id of the last hidden layer's activation pattern at each of
`region_resolution`² pixels, for the model at initialisation and after training, with the
anchors' pixel coordinates. Ids are comparable within one map only (`region_map`).

**Same points for every model.** Anchors come from generators seeded by
``derive_seed(seed, purpose)`` with the measurement seed (`MEASURE_SEED`), and depend only on
the training labels: every model trained on one training subset is measured on the same
ellipses and planes, so bands over models (Fig. 2) compare like with like.

Example:
    >>> from sensgen.models import MLP
    >>> from sensgen.study import Measurements
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(60, 5, generator=g), torch.arange(60) % 3
    >>> net = MLP(5, 3, width=8, depth=2, generator=g)
    >>> config = Measurements(profile_ellipses=1, profile_points=120, profile_bins=12)
    >>> frame = measure_profiles(net, x, y, config=config, seed=0)
    >>> sorted(frame["path"].unique()), len(frame)
    (['different_class', 'random', 'same_class'], 36)
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch

from sensgen.artifacts import PROFILE_DTYPES
from sensgen.errors import UserError
from sensgen.measure import ellipse_anchor_indices
from sensgen.metrics import (
    is_piecewise_linear,
    jacobian_profile,
    plane_grid,
    random_anchors,
    region_map,
    transition_profile,
)
from sensgen.models import MLP
from sensgen.study import Measurements
from sensgen.train import derive_seed

PATH_KINDS = ("random", "different_class", "same_class")


def different_class_anchor_indices(labels: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """int64 [n, 3]: per row three points of three distinct classes (classes uniform).

    The same draw as the test-ellipse anchors of `sensgen.measure` (whose function this
    calls), with its own seed purpose so training and test ellipses are independent.
    """
    return ellipse_anchor_indices(labels, n, seed=derive_seed(seed, "geometry:different"))


def same_class_anchor_indices(labels: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """int64 [n, 3]: per row three distinct points of one class, uniform over classes.

    Only classes with at least three points are eligible. Row i depends only on (labels,
    seed, i), so a longer list extends a shorter one.

    Example:
        >>> rows = same_class_anchor_indices(torch.tensor([0, 1, 0, 1, 0, 1, 2]), 5, seed=0)
        >>> bool((torch.tensor([0, 1, 0, 1, 0, 1, 2])[rows].diff(dim=1) == 0).all())
        True
    """
    labels = labels.detach().cpu().reshape(-1)
    classes, counts = labels.unique(return_counts=True)
    eligible = classes[counts >= 3]
    if n > 0 and len(eligible) == 0:
        raise UserError(
            "same-class ellipses need a class with at least three training points; use a "
            "larger training subset or set measure.profile_ellipses = 0."
        )
    rows = []
    for i in range(n):
        g = torch.Generator().manual_seed(derive_seed(seed, f"geometry:same:{i}"))
        cls = eligible[torch.randint(len(eligible), (1,), generator=g)]
        members = (labels == cls).nonzero().squeeze(1)
        rows.append(members[torch.randperm(len(members), generator=g)[:3]])
    return torch.stack(rows) if rows else torch.empty(0, 3, dtype=torch.int64)


def anchor_problem(y_train: torch.Tensor, config: Measurements) -> str | None:
    """Why the true labels `y_train` of a training subset cannot give the anchors that
    `config` asks for (profile ellipses, region planes), naming the fields; None if they can.

    The same rules as `different_class_anchor_indices` and `same_class_anchor_indices`, so
    that `sensgen run` refuses such a study before training (a run measured after training
    failed, its model lost, and was trained again, to fail again, by every new `run`).
    """
    asks = {"profile_ellipses": config.profile_ellipses, "region_planes": config.region_planes}
    fields = " and ".join(f"measure.{k} = {v}" for k, v in asks.items() if v)
    if not fields:
        return None
    classes, counts = y_train.detach().cpu().unique(return_counts=True)
    if len(classes) < 3:
        return (
            f"{fields} need{'s' * (' and ' not in fields)} three training points of "
            f"different classes, but the training points hold {len(classes)} "
            f"class{'es' * (len(classes) != 1)}"
        )
    if config.profile_ellipses and int(counts.max()) < 3:
        return (
            f"measure.profile_ellipses = {config.profile_ellipses} needs (for its same-class "
            f"ellipses) a class with three training points, but no class has more than "
            f"{int(counts.max())}"
        )
    return None


def profile_anchors(
    x_train: torch.Tensor, y_train: torch.Tensor, n: int, *, seed: int
) -> dict[str, torch.Tensor]:
    """The anchors [n, 3, D] (float64, CPU) of each path kind, deterministic per seed."""
    x = x_train.detach().cpu().to(torch.float64)
    g = torch.Generator().manual_seed(derive_seed(seed, "geometry:random"))
    var = x.var(dim=0).mean()
    random = [random_anchors(x.mean(dim=0), var, generator=g) for _ in range(n)]
    return {
        "random": torch.stack(random) if random else x.new_empty(0, 3, x.shape[1]),
        "different_class": x[different_class_anchor_indices(y_train, n, seed=seed)],
        "same_class": x[same_class_anchor_indices(y_train, n, seed=seed)],
    }


def measure_profiles(
    net: MLP, x_train: torch.Tensor, y_train: torch.Tensor, *, config: Measurements, seed: int
) -> pd.DataFrame:
    """Jacobian-norm and transition-density profiles of one model (module docstring).

    Args:
        net: a trained MLP (not modified; profiles run on a float64 copy).
        x_train: [N, D] the run's unaugmented training inputs.
        y_train: [N] their true labels.
        config: the study's ``[measure]`` table.
        seed: the measurement seed (`MEASURE_SEED`).

    Returns:
        One row per (path, ellipse, bin), columns `PROFILE_DTYPES` less ``run_id``.
    """
    net64 = copy.deepcopy(net).to(torch.float64)
    device = next(net64.parameters()).device
    piecewise = is_piecewise_linear(net.nonlinearity)
    anchors = profile_anchors(x_train, y_train, config.profile_ellipses, seed=seed)
    frames = []
    for kind in PATH_KINDS:
        for i, (x1, x2, x3) in enumerate(anchors[kind].to(device)):
            jac = jacobian_profile(
                net64, x1, x2, x3, n_points=config.profile_points, n_bins=config.profile_bins
            )
            density = (
                transition_profile(
                    net64, x1, x2, x3, sides=config.transition_sides, n_bins=config.profile_bins
                ).values
                if piecewise
                else torch.full((config.profile_bins,), math.nan, dtype=torch.float64)
            )
            frames.append(_profile_frame(kind, i, jac.bin_centres, jac.values, density))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in PROFILE_DTYPES.items()})
    return pd.concat(frames, ignore_index=True)


def _profile_frame(kind, index, centres, jacobian, density) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": kind,
            "ellipse": index,
            "bin": np.arange(len(centres)),
            "angle": centres.cpu().numpy(),
            "jacobian_norm": jacobian.cpu().numpy(),
            "transition_density": density.cpu().numpy(),
        }
    )


def measure_regions(
    initial: MLP,
    trained: MLP,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    config: Measurements,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Region maps of one model before and after training on `region_planes` planes.

    Args:
        initial, trained: the model at initialisation and after training.
        x_train, y_train: the run's unaugmented training inputs [N, D] and true labels [N].
        config: the study's ``[measure]`` table.
        seed: the measurement seed (`MEASURE_SEED`).

    Returns:
        {"init": int32 [P, R, R], "trained": int32 [P, R, R], "anchors": float64 [P, 3, 2]
        (row, column) pixel coordinates of x1, x2, x3, "labels": int64 [P, 3] their true
        labels, "indices": int64 [P, 3] their rows in x_train}.
    """
    rows = different_class_anchor_indices(
        y_train, config.region_planes, seed=derive_seed(seed, "geometry:planes")
    )
    res = config.region_resolution
    dtype = next(trained.parameters()).dtype
    maps: dict[str, list[torch.Tensor]] = {"init": [], "trained": [], "anchors": []}
    for row in rows:
        x1, x2, x3 = x_train[row.to(x_train.device)].to(torch.float64)
        grid = plane_grid(x1, x2, x3, resolution=res, extent=config.region_extent)
        vv, uu = torch.meshgrid(grid.v_coords, grid.u_coords, indexing="ij")
        coords = torch.stack([uu, vv], dim=-1).reshape(-1, 2).to(dtype)  # [R², 2], row-major
        for key, net in (("init", initial), ("trained", trained)):
            plane = _restricted_to_plane(net, grid.origin, grid.basis)
            maps[key].append(region_map(plane, coords, resolution=res).to(torch.int32).cpu())
        maps["anchors"].append(_anchor_pixels(grid.anchor_coords, grid.u_coords))
    if not maps["init"]:
        empty = torch.empty(0, res, res, dtype=torch.int32)
        rows = torch.empty(0, 3, dtype=torch.int64)
        return {
            "init": empty,
            "trained": empty.clone(),
            "anchors": torch.empty(0, 3, 2, dtype=torch.float64),
            "labels": rows,
            "indices": rows.clone(),
        }
    out = {key: torch.stack(values) for key, values in maps.items()}
    return out | {"labels": y_train.detach().cpu()[rows].to(torch.int64), "indices": rows}


def _restricted_to_plane(net: MLP, origin: torch.Tensor, basis: torch.Tensor) -> MLP:
    """The net restricted to the plane x = origin + (u, v) @ basis, as a net of (u, v).

    The first layer W₁x + b₁ becomes (W₁ basisᵀ)(u, v) + (W₁ origin + b₁), composed in
    float64: the same function, so the same activation patterns, without forming the R²
    points in D dimensions (512² MNIST points are 1.6 GB in float64).
    """
    first = net.layers[0]
    weight = first.weight.detach().to(torch.float64)  # [n₁, D]
    plane = copy.deepcopy(net)
    plane.layers[0] = torch.nn.Linear(2, first.out_features, dtype=first.weight.dtype)
    with torch.no_grad():
        plane.layers[0].weight.copy_(weight @ basis.to(weight).T)
        plane.layers[0].bias.copy_(weight @ origin.to(weight) + first.bias.detach().double())
    return plane.to(first.weight.device)


def _anchor_pixels(anchor_coords: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """(row, column) pixel coordinates [3, 2] of plane coordinates (u, v) [3, 2].

    Column k holds u = axis[k] and row r holds v = axis[r] (`PlaneGrid.points` order).
    """
    lo, hi = axis[0].item(), axis[-1].item()
    pixels = (anchor_coords.cpu().to(torch.float64) - lo) / (hi - lo) * (len(axis) - 1)
    return pixels.flip(-1)  # (u, v) → (row = v, column = u)
