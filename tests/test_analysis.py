"""Tables and figures of sensgen.analysis, built from seeded synthetic runs frames."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sensgen.analysis import (
    correlation_summary,
    gap_vs_jacobian,
    gap_vs_params,
    gap_vs_train_loss,
    gap_vs_transitions,
    model_table,
    per_point_summary,
    rank_correlation,
    status_counts,
)
from sensgen.analysis.inclusion import mark_included
from sensgen.analysis.models_table import MODEL_COLUMNS
from sensgen.analysis.tables import CORRELATION_COLUMNS, PREDICTORS


def gap_vs_synthetic_transitions(runs: pd.DataFrame) -> Figure:
    """`gap_vs_transitions` on runs given a transitions column (∝ Jbar) if they lack one."""
    if "transitions" not in runs.columns:
        runs = runs.assign(transitions=100.0 * runs["jacobian_norm"])
    return gap_vs_transitions(runs)


FIGURES = [
    (gap_vs_jacobian, "jacobian_norm"),
    (gap_vs_params, "n_params"),
    (gap_vs_train_loss, "train_loss"),
    (gap_vs_synthetic_transitions, "transitions"),
]


def synthetic_runs(
    n: int = 12, *, datasets: tuple[str, ...] = ("digits",), seed: int = 0
) -> pd.DataFrame:
    """Done runs whose gap rises strictly with the Jacobian norm; every 4th has random labels."""
    rng = np.random.default_rng(seed)
    frames = []
    for name in datasets:
        jacobian = np.sort(np.exp(rng.normal(1.0, 1.5, n)))
        frames.append(
            pd.DataFrame(
                {
                    "run_id": [f"{name}-{i:03d}" for i in range(n)],
                    "pack_id": "p0",
                    "status": "done",
                    "dataset": name,
                    "width": rng.choice([64, 128, 256], n),
                    "depth": rng.choice([1, 2, 3], n),
                    "nonlinearity": "relu",
                    "optimizer": "sgd",
                    "lr": 0.01,
                    "batch_size": rng.choice([32.0, 128.0, np.nan], n),
                    "init_scale": 2.0,
                    "random_labels": np.where(np.arange(n) % 4 == 0, 1.0, 0.0),
                    "seed": np.arange(n),
                    "steps": 1000,
                    "train_acc": 1.0,
                    "test_acc": 1.0 - np.linspace(0.05, 0.9, n),
                    "gap": np.linspace(0.05, 0.9, n),
                    "jacobian_norm": jacobian,
                    "n_params": rng.integers(10_000, 1_000_000, n),
                    "train_loss": 10.0 ** rng.uniform(-8, -2, n),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def scatter_points(fig: Figure) -> int:
    """Number of points drawn in all scatter collections of all axes."""
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections)


def axes_text(ax) -> str:
    return " ".join([ax.get_title(), ax.get_xlabel(), *(t.get_text() for t in ax.texts)])


# tables ----------------------------------------------------------------------------------


def test_model_table_keeps_done_runs_with_reader_columns():
    runs = synthetic_runs(8)
    runs.loc[[1, 2, 3], "status"] = ["failed", "pending", "diverged"]
    table = model_table(runs)
    assert list(table.columns) == list(MODEL_COLUMNS)
    assert len(table) == 5
    assert set(table["status"]) == {"done"}
    assert set(table["run_id"]) == set(runs.loc[runs["status"] == "done", "run_id"])
    assert table["width"].dtype == "Int64"
    done = runs[runs["status"] == "done"]
    assert table["batch_size"].isna().sum() == done["batch_size"].isna().sum()  # full batch
    assert table["gap"].is_monotonic_increasing


def test_model_table_fills_missing_columns_and_accepts_empty_frames():
    runs = synthetic_runs(3).drop(columns=["nonlinearity", "seed"])
    table = model_table(runs)
    assert table["nonlinearity"].isna().all() and table["seed"].isna().all()
    assert model_table(runs.iloc[0:0]).empty


def test_model_table_adds_every_varying_run_field_the_pairs_and_each_figures_x():
    runs = synthetic_runs(8).assign(train_subset=[1000, 4000] * 4, augment=False, eval_every=100)
    runs["pair_id"] = pd.Series([f"p{i // 2}" for i in range(8)], dtype="str")
    runs["pair_role"] = pd.Series(["0.0", "1.0"] * 4, dtype="str")
    runs["transitions"] = 100.0 * runs["jacobian_norm"]
    runs["jacobian_norm_train"] = np.nan  # not measured: no column
    runs.loc[0, ["train_acc", "eval_every"]] = [0.99, 50]  # excluded, yet eval_every varies
    runs.loc[1, "status"] = "pending"
    table = model_table(mark_included(runs, apply=True))
    columns = list(table.columns)
    seed = MODEL_COLUMNS.index("seed") + 1
    assert columns[:seed] == list(MODEL_COLUMNS[:seed])
    assert columns[seed : seed + 4] == ["train_subset", "eval_every", "pair_id", "pair_role"]
    assert columns[columns.index("jacobian_norm") + 1] == "transitions"
    assert "train_loss" in columns and "augment" not in columns
    assert "jacobian_norm_train" not in columns
    assert sorted(table["run_id"]) == sorted(runs["run_id"][2:])  # done and included
    assert table["train_subset"].dtype == "Int64" and set(table["train_subset"]) == {1000, 4000}
    assert table.set_index("run_id").loc["digits-003", "pair_id"] == "p1"


def test_status_counts_lists_every_status_including_zeros_and_unknown_ones():
    runs = synthetic_runs(6)
    runs.loc[[0, 1], "status"] = "failed"
    runs.loc[2, "status"] = "weird"
    counts = status_counts(runs).set_index("status")["count"]
    assert list(counts.index) == ["pending", "running", "done", "failed", "diverged", "weird"]
    assert counts.to_dict() == {
        "pending": 0,
        "running": 0,
        "done": 3,
        "failed": 2,
        "diverged": 0,
        "weird": 1,
    }
    assert status_counts(pd.DataFrame())["count"].sum() == 0


def test_correlation_summary_is_one_for_a_monotone_relation():
    runs = synthetic_runs(10, datasets=("cifar10", "mnist"))
    summary = correlation_summary(runs)
    assert list(summary.columns) == list(CORRELATION_COLUMNS)
    assert len(summary) == 2 * len(PREDICTORS)
    jacobian = summary[summary["predictor"] == "jacobian_norm"].set_index("dataset")
    assert list(jacobian.index) == ["cifar10", "mnist"]
    np.testing.assert_allclose(jacobian["spearman_rho"], 1.0)
    np.testing.assert_allclose(jacobian["kendall_tau"], 1.0)
    assert (jacobian["spearman_p"] < 1e-3).all() and (jacobian["n"] == 10).all()


def test_correlation_summary_ignores_unfinished_and_missing_values():
    runs = synthetic_runs(10)
    runs.loc[0, "status"] = "failed"
    runs.loc[1, "jacobian_norm"] = np.nan
    row = correlation_summary(runs).set_index("predictor").loc["jacobian_norm"]
    assert row["n"] == 8
    assert row["spearman_rho"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "change",
    [
        lambda runs: runs.iloc[:2],
        lambda runs: runs.assign(jacobian_norm=3.0),
        lambda runs: runs.assign(gap=0.5),
        lambda runs: runs.assign(jacobian_norm=np.nan),
    ],
    ids=["two-models", "constant-x", "constant-gap", "all-missing"],
)
def test_correlation_summary_is_nan_without_warnings_when_undefined(change):
    summary = correlation_summary(change(synthetic_runs(6)))  # warnings are errors here
    row = summary.set_index("predictor").loc["jacobian_norm"]
    for name in ("spearman_rho", "spearman_p", "kendall_tau", "kendall_p"):
        assert math.isnan(row[name])


def test_correlation_summary_of_no_done_runs_is_empty():
    runs = synthetic_runs(4).assign(status="pending")
    assert correlation_summary(runs).empty


def test_rank_correlation_counts_only_jointly_finite_pairs():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, np.inf])
    y = np.array([5.0, 4.0, 3.0, np.nan, 1.0, 0.0])
    result = rank_correlation(x, y)
    assert result.n == 3
    assert result.spearman_rho == pytest.approx(-1.0)
    assert result.kendall_tau == pytest.approx(-1.0)


def test_per_point_summary_matches_hand_computed_values():
    # Model a: norm rises with loss and every error has a larger norm than every correct point.
    # Model b: one tie between an error and a correct point, counted half.
    points = pd.DataFrame(
        {
            "run_id": ["a"] * 4 + ["b"] * 4 + ["a"],
            "split": ["test"] * 8 + ["train"],
            "loss": [0.1, 0.2, 2.0, 3.0, 0.1, 0.2, 0.3, 0.4, 9.0],
            "correct": [True, True, False, False, True, True, False, True, True],
            "jacobian_norm": [0.01, 0.02, 1.0, 2.0, 1.0, 2.0, 2.0, 3.0, 0.0],
        }
    )
    summary = per_point_summary(points).set_index("run_id")
    assert summary.loc["a", "n_points"] == 4
    assert summary.loc["a", "spearman_rho"] == pytest.approx(1.0)
    assert summary.loc["a", "auroc_error"] == pytest.approx(1.0)
    assert summary.loc["b", "auroc_error"] == pytest.approx((1 + 0.5 + 0) / 3)
    no_errors = points.assign(correct=True)
    assert per_point_summary(no_errors)["auroc_error"].isna().all()
    assert per_point_summary(pd.DataFrame()).empty


# figures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "x_name"), FIGURES)
def test_figure_has_one_log_panel_per_dataset_and_every_point(build, x_name):
    runs = synthetic_runs(9, datasets=("cifar10", "fashion_mnist"))
    runs.loc[0, "status"] = "failed"
    fig = build(runs)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]
    assert scatter_points(fig) == 17
    assert all("skipped" not in axes_text(ax) for ax in fig.axes)
    assert "generalization gap" in fig.axes[0].get_ylabel()
    fig.savefig(io.BytesIO(), format="png")  # tick formatters run on draw


@pytest.mark.parametrize(("build", "x_name"), FIGURES)
def test_figure_skips_and_reports_non_positive_or_missing_x(build, x_name):
    runs = synthetic_runs(8).assign(transitions=lambda r: 100.0 * r["jacobian_norm"])
    runs[x_name] = runs[x_name].astype(float)
    runs.loc[[1, 2], x_name] = [0.0, np.nan]
    runs.loc[3, x_name] = -1.0
    fig = build(runs)
    assert scatter_points(fig) == 5
    assert "3 of 8 skipped" in axes_text(fig.axes[0])
    fig.savefig(io.BytesIO(), format="png")


def test_gap_vs_jacobian_separates_random_labels_and_reports_rho():
    runs = synthetic_runs(8)
    fig = gap_vs_jacobian(runs)
    (ax,) = fig.axes
    by_label = {c.get_label(): len(c.get_offsets()) for c in ax.collections}
    assert by_label == {"true labels": 6, "random labels (fraction > 0)": 2}
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 2
    assert "Spearman ρ = +1.00, n = 8" in ax.get_title()
    assert "‖J‖" in ax.get_xlabel() or "\\|J\\|" in ax.get_xlabel()
    assert len(fig.legends) == 1


def test_figure_with_four_datasets_wraps_without_empty_axes():
    fig = gap_vs_params(synthetic_runs(4, datasets=("a", "b", "c", "d")))
    assert len(fig.axes) == 4
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(("build", "x_name"), FIGURES)
def test_figure_without_done_runs_is_a_single_annotated_panel(build, x_name):
    fig = build(synthetic_runs(3).assign(status="failed"))
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert scatter_points(fig) == 0
    assert "no finished models" in axes_text(ax)
    fig.savefig(io.BytesIO(), format="png")


@pytest.mark.parametrize(("build", "x_name"), FIGURES)
def test_figure_with_one_model_draws_it_without_a_correlation(build, x_name):
    fig = build(synthetic_runs(1))
    (ax,) = fig.axes
    assert scatter_points(fig) == 1
    assert "ρ = n/a (needs ≥ 3 models), n = 1" in ax.get_title()
    fig.savefig(io.BytesIO(), format="png")


def test_figure_with_all_x_missing_draws_an_empty_labelled_panel():
    fig = gap_vs_train_loss(synthetic_runs(4).assign(train_loss=0.0))
    (ax,) = fig.axes
    assert scatter_points(fig) == 0
    assert "4 of 4 skipped" in axes_text(ax)
    assert "n/a" in ax.get_title()
    fig.savefig(io.BytesIO(), format="png")


def test_figures_do_not_touch_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    gap_vs_jacobian(synthetic_runs(4))
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    ("build", "x_name", "values"),
    [
        (gap_vs_jacobian, "jacobian_norm", [0.3932, 0.3941, 0.3952]),  # seeds of one config
        (gap_vs_params, "n_params", [25_450, 25_610, 25_770]),
        (gap_vs_train_loss, "train_loss", [2.1e-4, 2.2e-4, 2.3e-4]),
    ],
)
def test_narrow_log_x_range_gets_few_distinct_non_overlapping_tick_labels(build, x_name, values):
    # Within a decade and between two 1-2-5 ticks, matplotlib's LogLocator falls back to
    # linear ticks: nine 6-digit labels ran into each other ("0.393250.39350.39375").
    runs = synthetic_runs(3).assign(**{x_name: values})
    fig = build(runs)
    (ax,) = fig.axes
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi]
    labels = [t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text()]
    texts = [label.get_text() for label in labels]
    assert 2 <= len(texts) <= 6, texts
    assert len(set(texts)) == len(texts), texts  # no two ticks share a label
    boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), texts
