"""The paper's per-test-point figures (Study 6), one pure function each.

Novak et al. (2018), §3 Study 6: within one trained model, the input-output Jacobian norm
at a test point tracks that point's cross-entropy loss, so sensitivity flags the points a
model gets wrong. Each function returns a ``matplotlib.figure.Figure`` built with the
object API (no pyplot state); saving it is the caller's job.

* ``jacobian_vs_loss``: hexbin of per-point ‖J(x)‖_F against CE(x), both on log axes,
  pooled over models, one panel per dataset.
* ``per_point_auroc``: the spread over models of the within-model Spearman ρ(‖J‖, CE) and
  of the misclassification AUROC of ‖J‖ next to the confidence baseline 1 − max_j p_j.
  Per the §2.1 bound ‖J‖_F ≤ 2 CE(x) ‖J_logits‖_2, confident points have small norms
  mechanically, so ‖J‖ earns credit only where it beats that baseline.

The store's points frame has no dataset column; ``done_points_with_dataset`` keeps the
points (or per-model rows) of finished models and adds their dataset from the runs frame.

Example:
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> loss = np.exp(rng.normal(-2.0, 1.5, 200))
    >>> points = pd.DataFrame({
    ...     "run_id": np.repeat(["a", "b"], 100), "split": "test", "loss": loss,
    ...     "jacobian_norm": loss * np.exp(rng.normal(0.0, 0.3, 200)),
    ... })
    >>> fig = jacobian_vs_loss(points)
    >>> fig.axes[0].get_xscale(), fig.axes[0].get_yscale()
    ('log', 'log')
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sensgen.analysis.numbers import signed
from sensgen.analysis.plotting import panel_figure
from sensgen.analysis.tables import column, done_runs, per_point_summary

NORM_LABEL = r"per-point $\|J(x)\|_F$ (softmax output)"
LOSS_LABEL = "per-point cross-entropy CE(x) (nats)"
COUNT_LABEL = "test points per hexagon (log scale)"
ALL_MODELS = "all models"

_PANEL_SIZE = (5.2, 4.4)  # inches per panel
_MAX_COLUMNS = 3
_GRIDSIZE = 40  # hexagons across the x range
_JITTER = 0.12  # half-width of the strip jitter, in units of group spacing
# Okabe-Ito colours (distinct under colour blindness), one per strip group.
_RHO_GROUPS = (
    ("spearman_rho", "‖J‖ vs CE", "#0072B2"),
    ("spearman_rho_logits", "‖J_logits‖ vs CE", "#009E73"),
    ("spearman_rho_correct", "‖J‖ vs CE,\ncorrect only", "#CC79A7"),
)
_AUROC_GROUPS = (
    ("auroc_error", "‖J(x)‖_F", "#0072B2"),
    ("auroc_confidence", "1 − max p\n(baseline)", "#E69F00"),
)


def done_points_with_dataset(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of finished models only, with a ``dataset`` column from the runs frame.

    Args:
        frame: any frame keyed by ``run_id`` (the points frame or ``per_point_summary``).
        runs: the store's runs frame.

    Returns:
        ``frame``'s rows whose model is done, in order, with ``dataset`` replaced or added.
    """
    done = done_runs(runs)
    if "run_id" not in frame.columns or "run_id" not in done.columns:
        return frame.iloc[0:0].assign(dataset=pd.Series(dtype=object))
    names = done.set_index("run_id")["dataset"] if "dataset" in done.columns else None
    kept = frame.loc[frame["run_id"].isin(done["run_id"])].drop(columns="dataset", errors="ignore")
    dataset = kept["run_id"].map(names) if names is not None else None
    return kept.assign(dataset=dataset).reset_index(drop=True)


def jacobian_vs_loss(points: pd.DataFrame) -> Figure:
    """Hexbin of per-point ‖J(x)‖_F (x) against CE(x) (y), pooled over models (Study 6).

    Both axes are log10-scaled; colour is the number of test points per hexagon on a log
    scale. Points with a non-positive or missing norm or loss cannot sit on log axes: each
    panel counts them in its x label. Each title gives the median over models of the
    within-model Spearman ρ(‖J‖, CE), the number in ``per_point_summary``.

    Args:
        points: the store's points frame (run_id, split, loss, jacobian_norm); test rows
            only are used. With a ``dataset`` column, one panel per dataset.

    Returns:
        A Figure with one hexbin Axes (and colourbar) per dataset, or one Axes with a note
        when there is no test point.
    """
    if "split" in points.columns:
        points = points.loc[points["split"] == "test"]
    names, groups = _split_by_dataset(points)
    fig, axes = panel_figure(max(len(names), 1), n_columns=_MAX_COLUMNS, panel_size=_PANEL_SIZE)
    if not names:
        _style_hexbin_axes(axes[0])
        _note(axes[0], "no per-point results yet")
    for ax, name, group in zip(axes, names, groups, strict=False):
        _draw_hexbin(fig, ax, name, group)
    fig.suptitle("Per test point: input sensitivity vs loss", fontsize=14)
    return fig


def per_point_auroc(summary: pd.DataFrame) -> Figure:
    """Spread over models of the within-model ρ(‖J‖, CE) and misclassification AUROCs.

    Left panel: per model, Spearman ρ of ‖J(x)‖_F with CE(x) (and, where measured, of
    ‖J_logits(x)‖_F with CE(x) and of ‖J‖ with CE over correct points only); 0 = no
    relation. Right panel: per model, the AUROC for misclassification of ‖J(x)‖_F and of
    the confidence baseline 1 − max_j p_j(x); 0.5 = chance. One dot per model (jittered
    sideways) over a box of the quartiles; tick labels give the medians, the right title
    how often ‖J‖ beats the baseline. Paper §3 Study 6, claim 11.

    Args:
        summary: ``per_point_summary`` output; with a ``dataset`` column (see
            ``done_points_with_dataset``), one row of panels per dataset.

    Returns:
        A Figure with two Axes per dataset; one Axes with a note when no model has a
        value, and a note on any panel row backed by a single model.
    """
    names, groups = _split_by_dataset(summary)
    names, groups = _with_values(names, groups)
    if not names:
        fig, axes = panel_figure(1, n_columns=1, panel_size=_PANEL_SIZE)
        _note(axes[0], "no per-point results yet")
        axes[0].set_axis_off()
        return fig
    fig, axes = panel_figure(2 * len(names), n_columns=2, panel_size=_PANEL_SIZE)
    for row, (name, group) in enumerate(zip(names, groups, strict=True)):
        rho_ax, auroc_ax = axes[2 * row], axes[2 * row + 1]
        _draw_rho_panel(rho_ax, name, group)
        _draw_auroc_panel(auroc_ax, group)
        if len(group) == 1:
            _note(rho_ax, "only 1 model: no spread to show", y=0.08)
    fig.suptitle("Per test point, within each model: ‖J(x)‖ vs loss and errors", fontsize=14)
    return fig


def _split_by_dataset(frame: pd.DataFrame) -> tuple[list[str], list[pd.DataFrame]]:
    """Dataset names (sorted; one ``all models`` group without the column) and their rows."""
    if frame.empty or "run_id" not in frame.columns:
        return [], []
    if "dataset" not in frame.columns:
        return [ALL_MODELS], [frame]
    labels = frame["dataset"].astype(object).where(frame["dataset"].notna(), "(none)")
    labels = labels.astype(str)
    names = sorted(labels.unique())
    return names, [frame.loc[labels == name] for name in names]


def _with_values(
    names: list[str], groups: list[pd.DataFrame]
) -> tuple[list[str], list[pd.DataFrame]]:
    """Drops the datasets where no model has any finite per-point statistic."""
    metrics = [key for key, _, _ in (*_RHO_GROUPS, *_AUROC_GROUPS)]
    kept = [
        (name, group)
        for name, group in zip(names, groups, strict=True)
        if any(np.isfinite(column(group, key)).any() for key in metrics)
    ]
    return [name for name, _ in kept], [group for _, group in kept]


def _draw_hexbin(fig: Figure, ax: Axes, name: str, group: pd.DataFrame) -> None:
    """One dataset's pooled hexbin, its colourbar, a title with ρ and a skipped count."""
    norm, loss = column(group, "jacobian_norm"), column(group, "loss")
    drawable = np.isfinite(norm) & (norm > 0) & np.isfinite(loss) & (loss > 0)
    if drawable.any():
        cells = ax.hexbin(
            norm[drawable],
            loss[drawable],
            xscale="log",
            yscale="log",
            gridsize=_GRIDSIZE,
            mincnt=1,
            norm=LogNorm(),
            cmap="viridis",
            linewidths=0.2,
        )
        fig.colorbar(cells, ax=ax, label=COUNT_LABEL)
    _style_hexbin_axes(ax)
    ax.set_title(_hexbin_title(name, group), fontsize=12)
    skipped = int((~drawable).sum())
    if skipped:
        ax.set_xlabel(
            f"{NORM_LABEL}\n{skipped} of {len(group)} points skipped (‖J‖ or CE ≤ 0 or missing)"
        )
    if not drawable.any():
        _note(ax, "no point with positive ‖J‖ and CE")


def _hexbin_title(name: str, group: pd.DataFrame) -> str:
    """Dataset name over the median within-model Spearman ρ and the models it is over
    (of how many drawn, where some models' ρ is undefined: a constant ‖J‖ or CE)."""
    rho = column(per_point_summary(group), "spearman_rho")
    models = group["run_id"].nunique()
    finite = rho[np.isfinite(rho)]
    value = signed(float(np.median(finite))) if len(finite) else "n/a"
    title = f"{name}\nmedian within-model Spearman ρ = {value}"
    if len(finite) in (0, models):  # over every model drawn, or n/a for all of them
        return f"{title} ({models} {_models(models)})"
    return f"{title}\n(over {len(finite)} of {models} models; the others' ρ is undefined)"


def _style_hexbin_axes(ax: Axes) -> None:
    """Log-log axes with labels and a light grid."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(NORM_LABEL, fontsize=11)
    ax.set_ylabel(LOSS_LABEL, fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, which="major", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)


def _draw_rho_panel(ax: Axes, name: str, group: pd.DataFrame) -> None:
    """Strip-and-box plot of the within-model Spearman ρ values, with a zero line."""
    _strip_box(ax, group, _RHO_GROUPS, seed=0)
    ax.axhline(0.0, color="0.35", linestyle="--", linewidth=1.0, zorder=1)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("within-model Spearman ρ", fontsize=11)
    ax.set_title(f"{name}\nrank correlation with CE(x), per model", fontsize=12)


def _draw_auroc_panel(ax: Axes, group: pd.DataFrame) -> None:
    """Strip-and-box plot of the two misclassification AUROCs, with the chance line."""
    _strip_box(ax, group, _AUROC_GROUPS, seed=1)
    ax.axhline(0.5, color="0.35", linestyle="--", linewidth=1.0, zorder=1)
    ax.text(1.0, 0.5, " chance", transform=ax.get_yaxis_transform(), va="center", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("misclassification AUROC", fontsize=11)
    ax.set_title(f"error detection, per model\n{_beats_baseline(group)}", fontsize=12)


def _beats_baseline(group: pd.DataFrame) -> str:
    """How many models' ‖J‖ AUROC exceeds their confidence-baseline AUROC."""
    own, baseline = column(group, "auroc_error"), column(group, "auroc_confidence")
    both = np.isfinite(own) & np.isfinite(baseline)
    if not both.any():
        return "‖J‖ vs baseline: n/a"
    wins, models = int((own[both] > baseline[both]).sum()), int(both.sum())
    return f"‖J‖ above baseline in {wins} of {models} {_models(models)}"


def _strip_box(ax: Axes, group: pd.DataFrame, spec: tuple, *, seed: int) -> None:
    """One jittered strip (a dot per model) over a quartile box per group with values."""
    rng = np.random.default_rng(seed)  # fixed jitter: identical figures on every run
    ticks, labels = [], []
    for key, label, colour in spec:
        values = column(group, key)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            continue
        position = len(ticks)
        ax.boxplot(
            values,
            positions=[position],
            widths=0.5,
            showfliers=False,  # every model is already a dot
            medianprops={"color": "black", "linewidth": 1.5},
            boxprops={"color": "0.3"},
            whiskerprops={"color": "0.3"},
            capprops={"color": "0.3"},
        )
        jitter = rng.uniform(-_JITTER, _JITTER, len(values)) if len(values) > 1 else 0.0
        ax.scatter(position + jitter, values, s=18, c=colour, alpha=0.7, zorder=3)
        ticks.append(position)
        labels.append(f"{label}\nmedian {signed(float(np.median(values)))}")
    ax.set_xticks(ticks, labels, fontsize=10)
    ax.set_xlim(-0.6, max(len(ticks), 2) - 0.4)
    ax.tick_params(axis="y", labelsize=10)
    ax.grid(True, axis="y", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)


def _models(count: int) -> str:
    """``model`` or ``models``."""
    return "model" if count == 1 else "models"


def _note(ax: Axes, message: str, *, y: float = 0.5) -> None:
    """Centred grey text inside the axes."""
    ax.text(0.5, y, message, transform=ax.transAxes, ha="center", va="center", color="0.4")
