"""Shared matplotlib pieces of the figure modules: panel grids, readable log ticks, legends.

Object API only (no pyplot state), so figures are safe to build in threads and tests.

Example:
    >>> fig, axes = panel_figure(4, n_columns=3, panel_size=(4.0, 3.0))
    >>> len(axes), tick_label(2e-5, 0), tick_label(0.02, 0)
    (4, '$2\\\\times10^{-5}$', '0.02')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter


def panel_figure(
    n_panels: int, *, n_columns: int, panel_size: tuple[float, float]
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout Figure with exactly ``n_panels`` Axes, ``n_columns`` per row."""
    ncols = min(n_panels, n_columns)
    nrows = math.ceil(n_panels / ncols)
    width, height = panel_size
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[n_panels:]:
        fig.delaxes(ax)
    return fig, list(grid[:n_panels])


def tick_label(value: float, _position: int) -> str:
    """Plain numbers from 0.001 to 9999, powers of ten (with a mantissa) beyond."""
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e4:
        return f"{value:g}"
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10**exponent
    if abs(mantissa - 1) < 1e-6:
        return f"$10^{{{exponent}}}$"
    return f"${mantissa:.4g}\\times10^{{{exponent}}}$"  # 2.55×10⁴ between the 1-2-5 ticks


def log_ticks(axis: Axis, lo: float, hi: float) -> None:
    """1-2-5 ticks on a short log range [lo, hi], decades on a long one; no minor labels.

    A range that holds fewer than two 1-2-5 ticks (models that differ by a few percent) gets
    four or so plain ticks: LogLocator would fall back to a dense linear locator there, whose
    long labels run into each other."""
    subs = (1.0,) if math.log10(hi / lo) > 2.5 else (1.0, 2.0, 5.0)
    if lo < hi and _ticks_125(lo, hi) < 2:
        axis.set_major_locator(MaxNLocator(nbins=4))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(tick_label))
    axis.set_minor_formatter(NullFormatter())


def _ticks_125(lo: float, hi: float) -> int:
    """How many of the ticks 1, 2, 5 × 10^k lie in [lo, hi] (0 < lo)."""
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    return sum(lo <= m * 10.0**k <= hi for k in decades for m in (1, 2, 5))


def legend_handles(axes: Iterable[Axes]) -> dict[str, object]:
    """Each label's first handle over all axes, in drawing order."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    return handles


def bottom_legend(fig: Figure, handles: dict[str, object], labels: Sequence[str] = ()) -> None:
    """One legend row under the panels (nothing when there are no handles)."""
    if handles:
        fig.legend(
            list(handles.values()),
            list(labels or handles.keys()),
            loc="outside lower center",
            ncols=len(handles),
            fontsize=11,
            frameon=False,
        )
