"""Paired-factor scatter (paper Fig. 4): better member on x, the other member on y.

Novak et al. (2018), §3 Study 4, Fig. 4: one column per metric — generalization gap
(linear axes), mean test Jacobian norm Jbar and transitions (log axes) — with the diagonal
y = x drawn. A point above the diagonal is a pair where the member expected to generalize
worse (random labels, no augmentation, another nonlinearity, full batch) has the higher
value; the paper finds nearly all pairs above it for the gap and Jbar (see
`sensgen.analysis.pairs.EXPECTED`). Each panel's title gives the share of pairs above the
diagonal and the two-sided sign-test p-value, the numbers of `pair_outcomes`.

The function is pure: a `pair_table` frame in, a ``matplotlib.figure.Figure`` out (object
API, no pyplot state); the report saves it.

Example:
    >>> import pandas as pd
    >>> table = pd.DataFrame({
    ...     "pair_id": ["p", "q"], "dataset": "fashion_mnist", "better_role": "0.0",
    ...     "other_role": "1.0", "gap_better": [0.2, 0.1], "gap_other": [0.9, 0.9],
    ...     "jacobian_norm_better": [1.0, 2.0], "jacobian_norm_other": [6.0, 9.0],
    ... })
    >>> fig = paired_scatter(table, factor="random_labels", better_label="true labels",
    ...                      other_label="random labels")
    >>> [ax.get_yscale() for ax in fig.axes]
    ['linear', 'log', 'log']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sensgen.analysis.numbers import percent
from sensgen.analysis.pairs import METRICS, pair_count_text, sign_test
from sensgen.analysis.plotting import bottom_legend, legend_handles, log_ticks
from sensgen.analysis.tables import column

METRIC_LABELS = {
    "gap": "generalization gap",
    "jacobian_norm": r"mean test $\|J\|_F$",
    "jacobian_norm_logits": r"mean test $\|J_{\mathrm{logits}}\|_F$",
    "transitions": "transitions (mean over test ellipses)",
    "transitions_sampled": "transitions, sampled (mean over test ellipses)",
    "transitions_sign": "sign changes (mean over test ellipses)",
}
PANEL_TITLES = {"gap": "Gap", "jacobian_norm": "Jacobian norm", "transitions": "Transitions"}
LOG_METRICS = frozenset(METRIC_LABELS) - {"gap"}
DIAGONAL_LABEL = "y = x"
# Okabe-Ito colours, one per other role; they stay distinct under colour blindness.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_PANEL_SIZE = 4.6  # inches per square panel


def paired_scatter(
    table: pd.DataFrame,
    *,
    factor: str,
    better_label: str,
    other_label: str,
    metrics: Sequence[str] = METRICS,
    counts: Mapping[str, Any] | None = None,
) -> Figure:
    """One square panel per metric: the better member's value on x, the other's on y.

    Args:
        table: a `pair_table` frame (other_role, dataset and ``<metric>_better`` /
            ``<metric>_other`` columns; an absent metric reads as missing).
        factor: the paired factor (``[pairs] factor``), named in the figure title.
        better_label: how to name the better member, e.g. "true labels".
        other_label: how to name the other member(s), e.g. "random labels".
        metrics: metrics to draw, one panel each; log axes for all but the gap.
        counts: the study's `pairs.pair_counts`; the title then says how many planned
            pairs are drawn and why the others were dropped ("2 of 4 planned pairs
            compared; 2 dropped: a member below the inclusion rule (2)") rather than
            "2 pairs", so pairs lost to a failed or excluded member are not silently missing.

    Returns:
        A Figure with one Axes per metric, or a single Axes with a note when the table has
        no rows.
    """
    if table.empty:
        return _empty_figure(factor, counts)
    fig = Figure(figsize=(_PANEL_SIZE * len(metrics), _PANEL_SIZE + 1.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=True):
        _draw_metric(ax, table, metric, better_label, other_label)
    _legend(fig, axes)
    fig.suptitle(_suptitle(table, factor, other_label, better_label, counts), fontsize=14)
    return fig


def _draw_metric(
    ax: Axes, table: pd.DataFrame, metric: str, better_label: str, other_label: str
) -> None:
    """Scatters one metric's pairs (a colour per other role), the diagonal and the title."""
    better = column(table, f"{metric}_better")
    other = column(table, f"{metric}_other")
    log = metric in LOG_METRICS
    drawable = np.isfinite(better) & np.isfinite(other)
    if log:
        drawable &= (better > 0) & (other > 0)
    name = METRIC_LABELS.get(metric, metric)
    ax.set_xlabel(f"{name}\n{better_label}", fontsize=11)
    ax.set_ylabel(f"{name}\n{other_label}", fontsize=11)
    ax.set_box_aspect(1)  # equal limits on a square box: y = x runs corner to corner
    roles = table["other_role"].astype(str).to_numpy()
    finite = np.isfinite(better) & np.isfinite(other)
    if not drawable.any():
        _style(ax, *((0.1, 10.0) if log else (0.0, 1.0)), log)
        if finite.any():  # measured, but every pair has a value ≤ 0 (a dead network's 0)
            _note(ax, f"{metric}: every pair has a value ≤ 0,\nwhich a log axis cannot show")
            ax.set_title(_panel_title(metric, roles, better, other), fontsize=11)
            n = len(table)
            ax.set_xlabel(f"{ax.get_xlabel()}\n{n} of {n} not drawn (missing or ≤ 0)")
        else:
            _note(ax, f"{metric}: no pair has\nboth values (not measured?)")
            ax.set_title(PANEL_TITLES.get(metric, metric), fontsize=11)
        return
    _scatter_roles(ax, table, better, other, drawable)
    lo, hi = _limits(np.concatenate([better[drawable], other[drawable]]), log)
    ax.plot([lo, hi], [lo, hi], "--", color="0.35", linewidth=1.0, label=DIAGONAL_LABEL)
    _style(ax, lo, hi, log)
    ax.set_title(_panel_title(metric, roles, better, other), fontsize=11)
    skipped = int((~drawable).sum())
    if skipped:
        ax.set_xlabel(f"{ax.get_xlabel()}\n{skipped} of {len(table)} not drawn (missing or ≤ 0)")


def _scatter_roles(
    ax: Axes, table: pd.DataFrame, better: np.ndarray, other: np.ndarray, drawable: np.ndarray
) -> None:
    """One scatter per other role, in Okabe-Ito colours, labelled by role."""
    roles = table["other_role"].astype(str).to_numpy()
    for i, role in enumerate(sorted(set(roles))):
        keep = drawable & (roles == role)
        if keep.any():
            ax.scatter(
                better[keep],
                other[keep],
                s=40,
                c=_COLOURS[i % len(_COLOURS)],
                alpha=0.85,
                edgecolors="white",
                linewidths=0.6,
                label=role,
                zorder=3,
            )


def _limits(values: np.ndarray, log: bool) -> tuple[float, float]:
    """Shared x/y limits around ``values`` with a margin (a factor on log axes)."""
    lo, hi = float(values.min()), float(values.max())
    if log:
        pad = 10 ** (0.08 * max(math.log10(hi / lo), 0.5))
        return lo / pad, hi * pad
    pad = 0.08 * max(hi - lo, 0.02)
    return lo - pad, hi + pad


def _style(ax: Axes, lo: float, hi: float, log: bool) -> None:
    """Equal limits, log scales with readable ticks where asked, a light grid."""
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            log_ticks(axis, lo, hi)
    else:  # the default locator's steps of 0.0025 label a narrow gap range too densely
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.tick_params(labelsize=10)
    ax.grid(True, which="major", color="0.88", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)


def _panel_title(metric: str, roles: np.ndarray, better: np.ndarray, other: np.ndarray) -> str:
    """Metric, then per other role the share above the diagonal and the sign-test p.

    The numbers are `pair_outcomes`' (one line per role when there are several, since
    comparisons sharing a better member are not independent); rows that a log axis cannot
    draw still count when both values are finite.
    """
    lines = [PANEL_TITLES.get(metric, metric)]
    unique = sorted(set(roles))
    for role in unique:
        test = sign_test(better[roles == role], other[roles == role])
        ties = f", {test.ties} tied" if test.ties else ""
        counts = f"{test.n_expected}/{test.n}"
        if len(unique) == 1:
            lines.append(f"above y = x: {counts} pairs, {_percent(test.share)}")
            lines.append(f"sign test p = {_p_text(test.p_value)}{ties}")
        else:
            lines.append(f"{role}: {counts} above y = x, p = {_p_text(test.p_value)}{ties}")
    return "\n".join(lines)


def _percent(share: float) -> str:
    """Whole percent, but 199 of 200 pairs is "99.5%", never "100%" (`numbers.percent`)."""
    return percent(share)


def _p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.2g}"


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below the panels: the other roles (when several) and the diagonal."""
    handles = legend_handles(axes)
    roles = [label for label in handles if label != DIAGONAL_LABEL]
    if len(roles) == 1:
        handles.pop(roles[0])  # the y label already names the single other role
    bottom_legend(fig, handles)


def _suptitle(
    table: pd.DataFrame,
    factor: str,
    other_label: str,
    better_label: str,
    counts: Mapping[str, Any] | None,
) -> str:
    datasets = ", ".join(sorted(set(table.get("dataset", pd.Series(dtype=str)).astype(str))))
    title = f"Paired factor {factor}: {other_label} vs {better_label} ({datasets})"
    if counts is not None:
        return f"{title}\n{pair_count_text(counts)}"
    n_pairs = table["pair_id"].nunique() if "pair_id" in table.columns else len(table)
    return f"{title}, {n_pairs} pairs"


def _empty_figure(factor: str, counts: Mapping[str, Any] | None) -> Figure:
    """A single panel saying that no pair has both members finished (and included)."""
    fig = Figure(figsize=(6.0, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    why = "\n(both members must be done and included)"
    if counts is not None:
        why = "\n" + pair_count_text(counts).replace("; ", "\n")
    _note(ax, f"no complete pairs for {factor} yet{why}")
    fig.suptitle(f"Paired factor {factor}", fontsize=14)
    return fig


def _note(ax: Axes, message: str) -> None:
    """Centred grey text inside the axes."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")
