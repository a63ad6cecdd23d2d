"""Figures and tables of the trajectory profiles (Fig. 2) and region maps (Fig. 3).

* `profile_summary` / `manifold_profiles` (paper §3 Study 2, Fig. 2): per path kind (random,
  different-class, same-class ellipse) and angle bin, the mean ‖J‖_F (log y) and the
  transition density, averaged over each model's ellipses; the line is the mean over
  models and the band spans the models' minimum to maximum. Guides mark the anchors at
  φ = π/3, π, 5π/3. The paper's claim: far more sensitive off the manifold (random
  ellipse) than on it, with dips at the training points.
* `boundary_table` / `region_maps_figure` (§3 Study 3, Fig. 3): the fraction of neighbouring
  pixel pairs in different regions of the last hidden layer, in discs of radius R/16 around
  the three training points vs elsewhere, before and after training. The paper's claim:
  after training, the training points sit in regions of low boundary density.

All functions are pure; the report saves the figures.

Example:
    >>> import numpy as np, pandas as pd
    >>> frame = pd.DataFrame({"run_id": "a", "path": "random", "ellipse": 0,
    ...                       "bin": np.arange(6), "angle": np.arange(6) * np.pi / 3,
    ...                       "jacobian_norm": 1.0, "transition_density": 2.0})
    >>> profile_summary(frame)["models"].tolist()
    [1, 1, 1, 1, 1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from sensgen.metrics import boundary_density, disc_mask

PATH_STYLE = {
    # path kind: (legend label, Okabe-Ito colour)
    "random": ("random ellipse (off the data)", "#D55E00"),
    "different_class": ("through 3 training points, different classes", "#0072B2"),
    "same_class": ("through 3 training points, same class", "#009E73"),
}
ANCHOR_ANGLES = (math.pi / 3, math.pi, 5 * math.pi / 3)
_DISC_FRACTION = 1 / 16  # disc radius around each anchor, as a fraction of the side R


def profile_summary(profiles: pd.DataFrame) -> pd.DataFrame:
    """Per (path, bin): mean, min and max over models of each model's mean over ellipses.

    Returns:
        Columns path, bin, angle, models, and jacobian_{mean,min,max},
        density_{mean,min,max}.
    """
    per_model = profiles.groupby(["path", "bin", "run_id"], sort=True).agg(
        angle=("angle", "first"),
        jacobian=("jacobian_norm", "mean"),
        density=("transition_density", "mean"),
    )
    grouped = per_model.groupby(level=["path", "bin"], sort=True)
    summary = grouped.agg(
        angle=("angle", "first"),
        models=("jacobian", "size"),
        jacobian_mean=("jacobian", "mean"),
        jacobian_min=("jacobian", "min"),
        jacobian_max=("jacobian", "max"),
        density_mean=("density", "mean"),
        density_min=("density", "min"),
        density_max=("density", "max"),
    )
    return summary.reset_index()


def manifold_profiles(profiles: pd.DataFrame) -> Figure:
    """Paper Fig. 2: ‖J‖_F (log) and transition density against the ellipse angle φ.

    Args:
        profiles: the store's profiles frame (`Results.profiles`).

    Returns:
        A Figure with two stacked Axes (a note instead of lines when the frame is empty).
    """
    fig = Figure(figsize=(8.0, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    summary = profile_summary(profiles) if len(profiles) else pd.DataFrame()
    n_models = profiles["run_id"].nunique() if len(profiles) else 0
    for path, (label, colour) in PATH_STYLE.items():
        rows = summary[summary["path"] == path] if len(summary) else summary
        if rows.empty:
            continue
        for ax, name in ((top, "jacobian"), (bottom, "density")):
            if rows[f"{name}_mean"].notna().any():
                ax.plot(rows["angle"], rows[f"{name}_mean"], color=colour, lw=2, label=label)
                ax.fill_between(
                    rows["angle"], rows[f"{name}_min"], rows[f"{name}_max"], color=colour, alpha=0.2
                )
    top.set_yscale("log")
    top.set_ylabel(r"mean $\|J\|_F$ (softmax output)", fontsize=11)
    bottom.set_ylabel("transitions per unit arc length", fontsize=11)
    bottom.set_xlabel("angle φ along the ellipse (anchors at π/3, π, 5π/3)", fontsize=11)
    for ax in (top, bottom):
        for angle in ANCHOR_ANGLES:
            ax.axvline(angle, color="0.5", ls="--", lw=1, zorder=0)
        ax.grid(True, color="0.9")
        ax.set_xlim(0, 2 * math.pi)
        ax.tick_params(labelsize=10)
    bottom.set_xticks([k * math.pi / 3 for k in range(7)])
    bottom.set_xticklabels(["0", "π/3", "2π/3", "π", "4π/3", "5π/3", "2π"])
    if n_models:
        top.legend(fontsize=9, loc="best")
        fig.suptitle(f"Sensitivity along ellipses (line: mean of {n_models} models; band: range)")
    else:
        top.text(0.5, 0.5, "no profiles measured", transform=top.transAxes, ha="center")
    if len(profiles) and profiles["transition_density"].isna().all():
        bottom.text(
            0.5, 0.5, "smooth nonlinearity: no linear regions", transform=bottom.transAxes,
            ha="center",
        )  # fmt: skip
    return fig


def boundary_table(maps_by_run: Mapping[str, Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """Boundary density near the anchors and elsewhere, per run, plane and stage.

    Args:
        maps_by_run: {run_id: `Results.region_maps(run_id)`}.

    Returns:
        Columns run_id, plane, stage (init | trained), near_points, elsewhere, ratio
        (near_points / elsewhere).
    """
    rows = []
    for run_id, maps in maps_by_run.items():
        for plane in range(maps["trained"].shape[0]):
            near = _anchor_discs(maps["anchors"][plane], maps["trained"].shape[-1])
            for stage in ("init", "trained"):
                ids = maps[stage][plane]
                inside, outside = boundary_density(ids, near), boundary_density(ids, ~near)
                ratio = inside / outside if outside > 0 else math.nan
                rows.append((run_id, plane, stage, inside, outside, ratio))
    columns = ["run_id", "plane", "stage", "near_points", "elsewhere", "ratio"]
    return pd.DataFrame(rows, columns=columns)


def region_maps_figure(maps: Mapping[str, torch.Tensor], title: str = "") -> Figure:
    """Paper Fig. 3: region maps at init (left) and after training (right), per plane.

    Each region of the last hidden layer gets a colour from a fixed random palette (ids
    are comparable within one map only); the three training points are marked.
    """
    n_planes = maps["trained"].shape[0]
    if n_planes == 0:
        fig = Figure(figsize=(6, 3))
        fig.text(0.5, 0.5, "no region maps measured", ha="center")
        return fig
    shown = min(n_planes, 3)
    fig = Figure(figsize=(8.0, 4.0 * shown + 0.5), layout="constrained")
    axes = fig.subplots(shown, 2, squeeze=False)
    table = boundary_table({"run": maps})
    for plane in range(shown):
        for col, stage in enumerate(("init", "trained")):
            ax = axes[plane, col]
            ax.imshow(_colour(maps[stage][plane].numpy()), interpolation="nearest")
            rows, cols = maps["anchors"][plane].numpy().T
            ax.scatter(cols, rows, s=60, c="white", edgecolors="black", linewidths=1.2, zorder=3)
            cell = table[(table["plane"] == plane) & (table["stage"] == stage)].iloc[0]
            ax.set_title(
                f"{'at initialisation' if stage == 'init' else 'after training'}, plane "
                f"{plane + 1}\nboundary density {cell.near_points:.3f} near points, "
                f"{cell.elsewhere:.3f} elsewhere",
                fontsize=10,
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or "Linear regions (last hidden layer) on planes through 3 points")
    return fig


def _anchor_discs(anchors: torch.Tensor, resolution: int) -> torch.Tensor:
    """bool [R, R]: pixels within R/16 of any of the three anchors (row, column)."""
    radius = max(resolution * _DISC_FRACTION, 1.5)
    masks = [disc_mask(resolution, (float(r), float(c)), radius) for r, c in anchors]
    return masks[0] | masks[1] | masks[2]


def _colour(ids: np.ndarray) -> np.ndarray:
    """RGB image [R, R, 3]: a fixed random colour per region id, light enough for marks."""
    palette = np.random.default_rng(0).uniform(0.25, 0.95, size=(int(ids.max()) + 1, 3))
    return palette[ids]
