"""The paper's model-level scatter figures, one pure function each.

Each function takes the store's runs frame and returns a ``matplotlib.figure.Figure`` built
with the object API (no pyplot state, so it is safe in threads and tests); saving it is the
caller's job (``sensgen.analysis.write_report`` does it). Only finished models are drawn.

* ``gap_vs_jacobian``: Fig. 5 of Novak et al. (2018), §3 Study 5: the generalization gap
  against the mean test-point Frobenius norm of the softmax-output input-output Jacobian
  (Jbar, §2.1). The paper's claim: per dataset, the gap rises monotonically with Jbar.
* ``gap_vs_params`` and ``gap_vs_train_loss``: the Fig. 1 panels (§3 Study 1), the two
  baselines that do *not* explain the gap.

One panel per dataset; models trained on (partly) random labels are drawn in a second
colour and marker. The x axis is logarithmic, so models with a non-positive or missing x
value cannot be drawn; each panel says how many it skipped. Each panel's title gives the
Spearman ρ over every model with both values finite (a Jbar of 0 included, drawn or not),
the same number and n as ``correlation_summary`` and the report's correlation table; where
it is undefined, the title says why.

Example:
    >>> import pandas as pd
    >>> runs = pd.DataFrame({
    ...     "run_id": ["a", "b", "c"], "dataset": "digits", "status": "done",
    ...     "gap": [0.1, 0.2, 0.4], "jacobian_norm": [1.0, 2.0, 8.0], "random_labels": 0.0,
    ... })
    >>> fig = gap_vs_jacobian(runs)
    >>> fig.axes[0].get_xscale()
    'log'
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sensgen.analysis.numbers import signed
from sensgen.analysis.plotting import bottom_legend, legend_handles, log_ticks, panel_figure
from sensgen.analysis.tables import (
    column,
    dataset_labels,
    done_runs,
    rank_correlation,
    undefined_parts,
)

GAP_LABEL = "generalization gap (train acc − test acc)"
# Two lines: on one, the label is wider than a single panel and is cut off at its edge.
JACOBIAN_LABEL = "mean test $\\|J\\|_F$\n(softmax output w.r.t. standardised input)"
PARAMS_LABEL = "number of weights (parameters)"
TRAIN_LOSS_LABEL = "final train loss (cross-entropy, nats)"
TRANSITIONS_LABEL = "mean transitions on test-point ellipses (exact)"
SHORT_NAMES = {"jacobian_norm": "Jbar", "transitions": "transitions", "n_params": "#weights",
               "train_loss": "train loss"}  # fmt: skip

_PANEL_SIZE = (5.0, 4.2)  # inches per dataset panel
_MAX_COLUMNS = 3
_GROUPS = (
    # (label, colour, marker): Okabe-Ito colours stay distinct under colour blindness.
    ("true labels", "#0072B2", "o"),
    ("random labels (fraction > 0)", "#D55E00", "^"),
)


def gap_vs_jacobian(runs: pd.DataFrame) -> Figure:
    """Generalization gap against mean test Jacobian norm Jbar, one panel per dataset.

    Paper Fig. 5 (§3 Study 5): x = Jbar = (1/N) Σ_test ‖∂softmax(f(x))/∂x‖_F on a log
    axis, y = train accuracy − test accuracy. Sensitivity near the data should track the
    gap: points rise from left to right, and random-label models sit to the upper right.

    Args:
        runs: the store's runs frame (columns dataset, status, gap, jacobian_norm,
            random_labels); non-done rows are ignored.

    Returns:
        A Figure with one Axes per dataset (one Axes saying so if no model is done).
    """
    return _gap_scatter(runs, "jacobian_norm", JACOBIAN_LABEL, "Gap vs input sensitivity")


def gap_vs_transitions(runs: pd.DataFrame) -> Figure:
    """Generalization gap against the mean exact transition count, one panel per dataset.

    Paper Fig. 5's companion (§3 Study 5): x = mean over ellipses through three test points
    of the number of linear-region boundaries crossed (exact count on the inscribed
    1,200-gon, `transitions`); the paper finds this relation less consistent than Jbar's.

    Args:
        runs: the store's runs frame (columns dataset, status, gap, transitions,
            random_labels).

    Returns:
        A Figure with one Axes per dataset, log x.
    """
    return _gap_scatter(runs, "transitions", TRANSITIONS_LABEL, "Gap vs transitions")


def gap_vs_params(runs: pd.DataFrame) -> Figure:
    """Generalization gap against the number of weights, one panel per dataset.

    Paper Fig. 1, left (§3 Study 1): capacity alone does not predict the gap; bigger
    models are not worse and the largest is among the best.

    Args:
        runs: the store's runs frame (columns dataset, status, gap, n_params, random_labels).

    Returns:
        A Figure with one Axes per dataset, log x.
    """
    return _gap_scatter(runs, "n_params", PARAMS_LABEL, "Gap vs number of weights")


def gap_vs_train_loss(runs: pd.DataFrame) -> Figure:
    """Generalization gap against the final train cross-entropy, one panel per dataset.

    Paper Fig. 1, right (§3 Study 1): the best models do not have the lowest train loss,
    so underfitting does not explain the gap. A train loss of exactly 0 (float underflow)
    cannot be drawn on the log axis and is counted as skipped.

    Args:
        runs: the store's runs frame (columns dataset, status, gap, train_loss,
            random_labels).

    Returns:
        A Figure with one Axes per dataset, log x.
    """
    return _gap_scatter(runs, "train_loss", TRAIN_LOSS_LABEL, "Gap vs train loss")


def _gap_scatter(runs: pd.DataFrame, x_name: str, x_label: str, title: str) -> Figure:
    """Builds the per-dataset scatter of gap against column ``x_name`` on a log x axis."""
    done = done_runs(runs)
    datasets = dataset_labels(done)
    names = sorted(datasets.unique())
    fig, axes = panel_figure(max(len(names), 1), n_columns=_MAX_COLUMNS, panel_size=_PANEL_SIZE)
    if not names:
        _draw_empty(axes[0], x_label, "no finished models yet")
    for ax, name in zip(axes, names, strict=False):
        _draw_panel(ax, done.loc[datasets == name], name, x_name, x_label)
    bottom_legend(fig, legend_handles(axes))
    fig.suptitle(title, fontsize=14)
    return fig


def _draw_panel(ax: Axes, group: pd.DataFrame, name: str, x_name: str, x_label: str) -> None:
    """Scatters one dataset's models, split into true- and random-label groups."""
    x = column(group, x_name)
    y = column(group, "gap")
    drawable = np.isfinite(x) & (x > 0) & np.isfinite(y)
    random = np.nan_to_num(column(group, "random_labels"), nan=0.0) > 0
    for (label, colour, marker), members in zip(_GROUPS, (~random, random), strict=True):
        keep = drawable & members
        if keep.any():
            ax.scatter(
                x[keep],
                y[keep],
                s=40,
                c=colour,
                marker=marker,
                alpha=0.85,
                edgecolors="white",
                linewidths=0.6,
                label=label,
                zorder=3,
            )
    _style_axes(ax, x_label)
    _log_ticks(ax, x[drawable])
    # Rank statistics need no log axis: ρ is over every finite pair, as in the table.
    ax.set_title(_panel_title(name, x, y, SHORT_NAMES.get(x_name, x_name)), fontsize=12)
    skipped = int((~drawable).sum())
    if skipped:
        ax.set_xlabel(f"{x_label}\n{skipped} of {len(group)} skipped (x ≤ 0 or missing)")
    if not drawable.any():
        _note(ax, "no model with a positive x value")


def _panel_title(name: str, x: np.ndarray, y: np.ndarray, x_short: str = "x") -> str:
    """Dataset name over the Spearman ρ and n of the jointly finite (x, y) pairs."""
    result = rank_correlation(x, y)
    rho = signed(result.spearman_rho)
    if math.isnan(result.spearman_rho):  # why, in a few words (the table's note says more)
        n, constant = undefined_parts(x, y, x_short, "gap")
        why = "needs ≥ 3 models" if n < 3 else f"{' and '.join(constant)} constant"
        rho = f"n/a ({why})"
    return f"{name}\nSpearman ρ = {rho}, n = {result.n}"


def _style_axes(ax: Axes, x_label: str) -> None:
    """Log x, labelled axes, readable ticks and a light grid behind the points."""
    ax.set_xscale("log")
    ax.set_xlabel(x_label, fontsize=11)
    ax.set_ylabel(GAP_LABEL, fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, which="major", color="0.88", linewidth=0.8, zorder=0)
    ax.grid(True, which="minor", axis="x", color="0.94", linewidth=0.5, zorder=0)
    ax.set_axisbelow(True)


def _log_ticks(ax: Axes, x: np.ndarray) -> None:
    """Labels 1-2-5 ticks on short log ranges and decades on long ones, without clutter."""
    if len(x) == 0:
        return
    log_ticks(ax.xaxis, x.min(), x.max())


def _draw_empty(ax: Axes, x_label: str, message: str) -> None:
    """An empty, styled panel carrying a message instead of points."""
    _style_axes(ax, x_label)
    ax.set_xlim(1e-1, 1e1)
    _note(ax, message)


def _note(ax: Axes, message: str) -> None:
    """Centred grey text inside the axes."""
    ax.text(
        0.5,
        0.5,
        message,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=11,
        color="0.4",
    )
