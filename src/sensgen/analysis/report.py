"""The study report: figures, tables and a static HTML page under ``DIR/report/``.

This is the only module of ``sensgen.analysis`` that writes files. It turns a study's runs
(and per-point) frames into:

    DIR/report/index.html             self-contained page (inline CSS, relative image links)
    DIR/report/gap_vs_jacobian.png    paper Fig. 5 (§3 Study 5), plus .svg
    DIR/report/gap_vs_params.png      paper Fig. 1 left (§3 Study 1), plus .svg
    DIR/report/gap_vs_train_loss.png  paper Fig. 1 right (§3 Study 1), plus .svg
    DIR/report/models.csv             one row per finished model
    DIR/report/summary.json           status counts, rank correlations, per-point summary

Every file is written under a temporary name in the same folder and renamed into place, so
a reader never sees half a file and a second run overwrites cleanly. With no finished model
the page still appears and says so; figures of an earlier report are removed.

Example:
    >>> from sensgen.analysis import write_report
    >>> index = write_report("runs/quickstart")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tomllib
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from sensgen.analysis import figures, tables
from sensgen.analysis.html import document, esc, figure_html, html_table
from sensgen.analysis.inclusion import analysed_runs
from sensgen.analysis.report_geometry import geometry_sections
from sensgen.errors import UserError

REPORT_DIR = "report"
FIGURES: dict[str, tuple[Callable[[pd.DataFrame], Figure], str]] = {
    "gap_vs_jacobian": (
        figures.gap_vs_jacobian,
        "Generalization gap against mean test Jacobian norm (paper Fig. 5).",
    ),
    "gap_vs_params": (
        figures.gap_vs_params,
        "Generalization gap against the number of weights (paper Fig. 1, left).",
    ),
    "gap_vs_train_loss": (
        figures.gap_vs_train_loss,
        "Generalization gap against final train loss (paper Fig. 1, right).",
    ),
}
_PREDICTOR_NAMES = {
    "jacobian_norm": "mean test ‖J‖_F (Jbar)",
    "n_params": "number of weights",
    "train_loss": "final train loss",
}
_PNG_DPI = 150
_MAX_REGION_RUNS = 50  # region maps read for the boundary-density summary

_EXPLANATION = """\
Each point is one trained network. The x axis of the first figure is its mean test-point
input sensitivity, Jbar: the Frobenius norm of the Jacobian of the <em>softmax output</em>
with respect to the <em>standardised</em> (preprocessed, flattened) input, ‖∂p(x)/∂x‖_F,
computed per test point and then averaged over the test set (log scale). It measures how much
the predicted class probabilities move under a small random perturbation of an input near the
data. The y axis is the generalization gap, train accuracy minus test accuracy. Novak et al.
(ICLR 2018, §3 Study 5, Fig. 5) find that, on every dataset, the gap rises monotonically with
this sensitivity: read the figure left to right, points should climb, and models trained on
random labels (orange triangles) should sit at the upper right. Each panel's title gives the
Spearman rank correlation ρ over the drawn models (+1 = perfectly monotone increasing, 0 = no
monotone relation). The two companion figures show the paper's baselines (Fig. 1), the number
of weights and the final train loss, which do <em>not</em> explain the gap there; the
correlation table compares all three predictors per dataset."""


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    runs: pd.DataFrame | None = None,
    points: pd.DataFrame | None = None,
    inclusion: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the study report (figures, CSV, JSON, HTML) to ``out_dir/report/``.

    Args:
        out_dir: the study directory.
        runs: the runs frame; read with ``sensgen.store.open_results(out_dir)`` if None.
        points: the per-point frame; read from the store if None and ``runs`` is None too.
            An empty frame skips the per-point summary.
        inclusion: the study's ``[inclusion]`` table (``apply``, ``min_train_acc``); read
            from ``out_dir/study.toml`` when the runs are read from the store, else no rule.

    Returns:
        Path of ``out_dir/report/index.html``.
    """
    out_dir = Path(out_dir)
    profiles, maps = pd.DataFrame(), {}
    if runs is None:
        runs, points, profiles, maps = _read_store(out_dir, points)
        inclusion = _study_inclusion(out_dir) if inclusion is None else inclusion
    if points is None:
        points = pd.DataFrame()
    report = out_dir / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    counts = tables.status_counts(runs)
    rule = dict(inclusion or {"apply": False})
    n_done = len(tables.done_runs(runs))
    runs = analysed_runs(runs, **rule)
    kept = set(runs["run_id"]) if "run_id" in runs.columns else set()
    points = points[points["run_id"].isin(kept)] if "run_id" in points.columns else points
    profiles = profiles[profiles["run_id"].isin(kept)] if len(profiles) else profiles
    maps = {k: v for k, v in maps.items() if k in kept}
    models = tables.model_table(runs)
    correlations = tables.correlation_summary(runs)
    per_point = _per_point_by_dataset(points, runs)
    drawn = _write_figures(report, runs) if len(models) else _remove_figures(report)
    extra = geometry_sections(profiles, maps, lambda name, fig: _save(report, name, fig))
    _write_text(report / "models.csv", models.to_csv(index=False))
    summary = _summary(counts, correlations, per_point)
    _write_text(report / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    note = _inclusion_note(rule, len(models), n_done)
    page = _page(
        out_dir.resolve().name, counts, correlations, per_point, models, drawn, [note, *extra]
    )
    index = report / "index.html"
    _write_text(index, page)
    return index


def _read_store(out_dir: Path, points: pd.DataFrame | None) -> tuple[Any, ...]:
    """Reads the runs, points (unless given), profiles and region maps of a study."""
    from sensgen.store import open_results  # deferred: analysis works without a store

    with open_results(out_dir) as results:
        runs = results.runs()
        points = results.points() if points is None else points
        profiles = results.profiles()
        maps = {}
        if (out_dir / "regions").is_dir() and any((out_dir / "regions").iterdir()):
            for run_id in tables.done_runs(runs)["run_id"][:_MAX_REGION_RUNS]:
                with contextlib.suppress(UserError):  # a run measured without maps
                    maps[run_id] = results.region_maps(run_id)
        return runs, points, profiles, maps


def _study_inclusion(out_dir: Path) -> dict[str, Any]:
    """The ``[inclusion]`` rule of ``out_dir/study.toml``, validated (the default rule if the
    file is missing)."""
    from sensgen.study import Inclusion  # deferred: analysis works without a study

    path = out_dir / "study.toml"
    table = tomllib.loads(path.read_text("utf-8")).get("inclusion", {}) if path.is_file() else {}
    return Inclusion(**table).model_dump()


def _inclusion_note(rule: Mapping[str, Any], n_included: int, n_done: int) -> str:
    if not rule.get("apply"):
        return f"<p>Inclusion: every finished model is analysed ({n_done}).</p>"
    threshold = rule.get("min_train_acc")
    what = f"{threshold:.1%}" if threshold is not None else "100% (99.9% for CIFAR-100)"
    return (
        f"<p>Inclusion (paper §4): models with training accuracy ≥ {what}. "
        f"<strong>{n_included} of {n_done}</strong> finished models qualify; the figures, "
        "statistics and the table below use only those.</p>"
    )


def _save(report: Path, name: str, fig: Figure) -> None:
    _write_bytes(report / f"{name}.png", _render(fig, "png"))
    _write_bytes(report / f"{name}.svg", _render(fig, "svg"))


def _per_point_by_dataset(points: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Median over done models, per dataset, of the per-point ρ(‖J‖, CE) and error AUROC."""
    columns = ["dataset", "models", "median_spearman_rho", "median_auroc_error"]
    per_model = tables.per_point_summary(points)
    done = tables.done_runs(runs)
    if per_model.empty or done.empty:
        return pd.DataFrame(columns=columns)
    names = pd.DataFrame({"run_id": done["run_id"], "dataset": tables.dataset_labels(done)})
    merged = per_model.merge(names, on="run_id", how="inner")
    grouped = merged.groupby("dataset", sort=True)
    frame = pd.DataFrame(
        {
            "models": grouped["run_id"].count(),
            "median_spearman_rho": grouped["spearman_rho"].median(),
            "median_auroc_error": grouped["auroc_error"].median(),
        }
    )
    return frame.reset_index().reindex(columns=columns)


def _write_figures(report: Path, runs: pd.DataFrame) -> list[str]:
    """Saves every figure as PNG and SVG; returns the figure names in page order."""
    for name, (build, _caption) in FIGURES.items():
        fig = build(runs)
        _write_bytes(report / f"{name}.png", _render(fig, "png"))
        _write_bytes(report / f"{name}.svg", _render(fig, "svg"))
    return list(FIGURES)


def _remove_figures(report: Path) -> list[str]:
    """Deletes figures left by an earlier report, so the folder matches the page."""
    for name in FIGURES:
        for suffix in (".png", ".svg"):
            (report / f"{name}{suffix}").unlink(missing_ok=True)
    return []


def _render(fig: Figure, fmt: str) -> bytes:
    """Renders a figure to bytes; SVG without a date so reruns are byte-identical."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else None
    fig.savefig(buffer, format=fmt, dpi=_PNG_DPI, metadata=metadata, facecolor="white")
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    """Writes UTF-8 text atomically."""
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    """Writes to a temporary file in the same folder, then renames it over ``path``."""
    # open(..., "xb") rather than mkstemp: mkstemp's 0600 mode would ignore the umask.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _summary(
    counts: pd.DataFrame, correlations: pd.DataFrame, per_point: pd.DataFrame
) -> dict[str, Any]:
    """The JSON summary: plain types only, NaN as null."""
    return {
        "status_counts": {row.status: int(row.count) for row in counts.itertuples()},
        "correlations": _records(correlations),
        "per_point": _records(per_point),
    }


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of JSON-ready values."""
    return [
        {key: _json_value(value) for key, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def _json_value(value: Any) -> Any:
    """numpy scalars to Python, NaN / NA to None."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _page(
    study: str,
    counts: pd.DataFrame,
    correlations: pd.DataFrame,
    per_point: pd.DataFrame,
    models: pd.DataFrame,
    drawn: list[str],
    extra: list[str] = (),
) -> str:
    """The whole index.html as a string."""
    title = f"sensgen report: {study}"
    body = [
        f"<h1>{esc(title)}</h1>",
        '<p class="muted">Sensitivity and generalization in neural networks '
        "(Novak et al., ICLR 2018).</p>",
        f'<p class="lead">{_EXPLANATION}</p>',
        "<h2>Models by status</h2>",
        html_table(counts, ["status", "count"], {"count": "models"}, "status"),
    ]
    if models.empty:
        body += [
            *extra[:1],  # the inclusion note: finished models may all have failed the rule
            "<h2>Figures</h2><p><strong>No finished models to analyse yet</strong>: nothing "
            "to plot. Run or resume the study, then build the report again.</p>",
        ]
    else:
        body += _results_sections(correlations, per_point, drawn)
        body += list(extra)
        body += _models_section(models)
    return document(title, "\n".join(body))


def _results_sections(
    correlations: pd.DataFrame, per_point: pd.DataFrame, drawn: list[str]
) -> list[str]:
    """Correlation table, figures and the per-point summary."""
    shown = correlations.assign(
        predictor=correlations["predictor"].map(_PREDICTOR_NAMES).fillna(correlations["predictor"])
    )
    parts = [
        "<h2>Rank correlation of the gap with each predictor</h2>",
        "<p>Over finished models per dataset; n counts models with both values finite. "
        "Kendall τ is τ-b; p-values are two-sided. Paper claim: Jbar correlates clearly "
        "and positively, the baselines do not.</p>",
        html_table(shown, list(tables.CORRELATION_COLUMNS), _CORRELATION_HEADERS, "correlations"),
        "<h2>Figures</h2>",
    ]
    for name in drawn:
        caption = FIGURES[name][1]
        parts.append(figure_html(name, caption))
    if not per_point.empty:
        parts += [
            "<h2>Per test point (Study 6)</h2>",
            "<p>Per model, Spearman ρ between a test point's ‖J(x)‖_F and its cross-entropy, "
            "and the AUROC of ‖J(x)‖_F for flagging misclassified points; medians over "
            "models.</p>",
            html_table(per_point, list(per_point.columns), _PER_POINT_HEADERS, "per-point"),
        ]
    return parts


def _models_section(models: pd.DataFrame) -> list[str]:
    """The table of all finished models."""
    return [
        f"<h2>Finished models ({len(models)})</h2>",
        '<p>Also as <a href="models.csv">models.csv</a>. An empty batch size means full '
        "batch; init_scale is σ_w²; random_labels is the fraction of shuffled labels.</p>",
        '<div class="scroll">',
        html_table(models, list(models.columns), {}, "models", sortable=True),
        "</div>",
    ]


_CORRELATION_HEADERS = {
    "spearman_rho": "Spearman ρ",
    "spearman_p": "p (ρ)",
    "kendall_tau": "Kendall τ",
    "kendall_p": "p (τ)",
}
_PER_POINT_HEADERS = {
    "median_spearman_rho": "median ρ(‖J‖, CE)",
    "median_auroc_error": "median AUROC (errors)",
}
