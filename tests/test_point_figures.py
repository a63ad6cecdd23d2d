"""Tests for the per-point statistics (Study 6) in tables and the per-point figures."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from sensgen.analysis.point_figures import (
    COUNT_LABEL,
    done_points_with_dataset,
    jacobian_vs_loss,
    per_point_auroc,
)
from sensgen.analysis.tables import (
    DISTRIBUTION_COLUMNS,
    PER_POINT_COLUMNS,
    max_probability,
    per_point_distribution,
    per_point_summary,
)
from sensgen.execute import _point_frame


def stored_points(logits: list[list[float]], labels: list[int]) -> pd.DataFrame:
    """The points frame the executor stores for these logits (norms are placeholders)."""
    y = torch.tensor(labels)
    norms = {"softmax": torch.ones(len(labels)), "logits": torch.ones(len(labels))}
    return _point_frame("m", torch.tensor(logits, dtype=torch.float64), y, norms)


def synthetic_points(n_models: int = 3, n: int = 400, *, seed: int = 0) -> pd.DataFrame:
    """Test points whose norm tracks the loss; errors are the high-loss points."""
    rng = np.random.default_rng(seed)
    loss = np.exp(rng.normal(-2.0, 1.5, n_models * n))
    correct = loss < 0.5
    return pd.DataFrame(
        {
            "run_id": np.repeat([f"m{i}" for i in range(n_models)], n),
            "split": "test",
            "loss": loss,
            "correct": correct,
            "margin": np.where(correct, 1.0, -0.5),
            "jacobian_norm": loss * np.exp(rng.normal(0.0, 0.3, n_models * n)),
            "jacobian_norm_logits": np.exp(rng.normal(size=n_models * n)),
        }
    )


def texts(fig: Figure) -> str:
    """Every title, label and text of a figure, joined."""
    parts = [fig.get_suptitle()]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        parts += [t.get_text() for t in ax.texts]
        parts += [t.get_text() for t in ax.get_xticklabels()]
    return "\n".join(parts)


def render(fig: Figure) -> None:
    """Draws the figure (tick formatters and layout run on draw)."""
    fig.savefig(io.BytesIO(), format="png")


# max_probability and per_point_summary ---------------------------------------------------


def test_max_probability_from_stored_columns_equals_softmax_max():
    # Rows 0-1 correct, rows 2-4 wrong; row 4's p_y underflows to 0 in float64, so the
    # formula p_y · exp(−margin) would give 0 · inf: the stored loss keeps it exact.
    logits = [
        [2.0, 0.5, -1.0],
        [0.1, 0.3, 0.2],
        [1.0, 3.0, -2.0],
        [0.0, 0.25, 0.5],
        [0.0, 800.0, -5.0],
    ]
    labels = [0, 1, 0, 1, 0]
    frame = stored_points(logits, labels)
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1).amax(-1).numpy()
    p_max = max_probability(frame["loss"].to_numpy(), frame["margin"].to_numpy())
    assert list(frame["correct"]) == [True, True, False, False, False]
    assert frame["p_y"].iloc[4] == 0.0
    np.testing.assert_array_equal(p_max[:2], expected[:2])  # p_max = p_y bit for bit
    np.testing.assert_allclose(p_max[2:], expected[2:], rtol=1e-14, atol=0)
    # The brief's form from p_y agrees where p_y does not underflow.
    head = frame.iloc[:4]
    from_p_y = head["p_y"] * np.exp(np.maximum(0.0, -head["margin"]))
    np.testing.assert_allclose(p_max[:4], from_p_y, rtol=1e-14, atol=0)


def test_auroc_confidence_matches_hand_example():
    # 1 − p_max: correct points 0.1 and 0.4, wrong points 0.3 and 0.5. Of the four
    # (wrong, correct) pairs, the wrong point scores higher in three: AUROC = 3/4.
    p_max = np.array([0.9, 0.6, 0.7, 0.5])
    p_y = np.array([0.9, 0.6, 0.2, 0.1])
    correct = np.array([True, True, False, False])
    points = pd.DataFrame(
        {
            "run_id": "a",
            "loss": -np.log(p_y),
            "margin": np.where(correct, 1.0, -np.log(p_max / p_y)),  # z_y − z_max
            "correct": correct,
            "jacobian_norm": [0.1, 0.2, 0.3, 0.4],
        }
    )
    row = per_point_summary(points).iloc[0]
    assert row["auroc_confidence"] == pytest.approx(0.75)
    assert row["auroc_error"] == pytest.approx(1.0)
    assert row["n_errors"] == 2


def test_per_point_summary_adds_logit_and_correct_only_correlations():
    # Over all points the norm ranks are 3, 2, 1, 4, 5 against loss ranks 1-5: squared rank
    # differences sum to 8, so ρ = 1 − 6·8 / (5·24) = 0.6. Among the three correct points
    # the norm falls as the loss rises (ρ = −1). Logit norms fall with loss throughout.
    points = pd.DataFrame(
        {
            "run_id": "a",
            "split": "test",
            "loss": [0.1, 0.2, 0.3, 2.0, 3.0],
            "correct": [True, True, True, False, False],
            "margin": [1.0, 1.0, 1.0, -1.0, -1.0],
            "jacobian_norm": [0.3, 0.2, 0.1, 1.0, 2.0],
            "jacobian_norm_logits": [5.0, 4.0, 3.0, 2.0, 1.0],
        }
    )
    row = per_point_summary(points).iloc[0]
    assert list(per_point_summary(points).columns) == list(PER_POINT_COLUMNS)
    assert row["spearman_rho"] == pytest.approx(0.6)
    assert row["spearman_rho_correct"] == pytest.approx(-1.0)
    assert row["spearman_rho_logits"] == pytest.approx(-1.0)
    without = per_point_summary(points.drop(columns=["jacobian_norm_logits", "margin"]))
    assert math.isnan(without["spearman_rho_logits"].iloc[0])
    assert math.isnan(without["auroc_confidence"].iloc[0])
    assert without["spearman_rho"].iloc[0] == pytest.approx(0.6)


def test_per_point_summary_skips_points_without_a_correctness_flag():
    points = pd.DataFrame(
        {
            "run_id": "a",
            "loss": [0.1, 0.2, 3.0, 9.0],
            "correct": [1.0, 1.0, 0.0, np.nan],
            "margin": [1.0, 1.0, -1.0, -1.0],
            "jacobian_norm": [0.1, 5.0, 1.0, 0.01],
        }
    )
    row = per_point_summary(points).iloc[0]
    assert row["auroc_error"] == pytest.approx(0.5)  # 1.0 beats 0.1, loses to 5.0
    assert row["n_errors"] == 1 and row["n_points"] == 4


def test_per_point_distribution_gives_quantiles_over_models():
    summary = pd.DataFrame(
        {
            "run_id": list("abcdef"),
            "spearman_rho": [0.0, 0.25, 0.5, 0.75, 1.0, np.nan],
            "auroc_error": [0.7] * 6,
        }
    )
    table = per_point_distribution(summary).set_index("metric")
    assert list(table.reset_index().columns) == list(DISTRIBUTION_COLUMNS)
    rho = table.loc["spearman_rho"]
    assert rho["models"] == 5
    assert tuple(rho[["min", "q10", "median", "q90", "max"]]) == pytest.approx(
        (0.0, 0.1, 0.5, 0.9, 1.0)
    )
    assert table.loc["auroc_error", "median"] == pytest.approx(0.7)
    assert table.loc["auroc_confidence", "models"] == 0
    assert math.isnan(table.loc["auroc_confidence", "median"])


# done_points_with_dataset ------------------------------------------------------------------


def test_done_points_with_dataset_keeps_finished_models_and_adds_their_dataset():
    points = synthetic_points(3, 5)
    runs = pd.DataFrame(
        {
            "run_id": ["m0", "m1", "m2"],
            "dataset": ["mnist", "cifar10", "mnist"],
            "status": ["done", "diverged", "done"],
        }
    )
    kept = done_points_with_dataset(points, runs)
    assert sorted(kept["run_id"].unique()) == ["m0", "m2"]
    assert (kept["dataset"] == "mnist").all() and len(kept) == 10
    assert done_points_with_dataset(points, runs.iloc[0:0]).empty


# jacobian_vs_loss ----------------------------------------------------------------------------


def test_jacobian_vs_loss_bins_every_positive_point_on_log_axes():
    points = synthetic_points()
    points.loc[[0, 1], "loss"] = [0.0, np.nan]
    points.loc[2, "jacobian_norm"] = -1.0
    points.loc[3, "split"] = "train"  # not a test point: neither drawn nor counted
    fig = jacobian_vs_loss(points)
    render(fig)
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.collections[0].get_array().sum() == len(points) - 4
    assert "3 of 1199 points skipped" in ax.get_xlabel()
    assert fig.axes[1].get_ylabel() == COUNT_LABEL  # the colourbar
    rho = np.median(per_point_summary(points)["spearman_rho"])
    assert f"ρ = +{rho:.2f} (3 models)" in ax.get_title()


def test_jacobian_vs_loss_draws_one_panel_per_dataset():
    points = synthetic_points(3).assign(dataset=np.repeat(["mnist", "cifar10", "mnist"], 400))
    fig = jacobian_vs_loss(points)
    render(fig)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title().splitlines()[0] for ax in panels] == ["cifar10", "mnist"]
    assert [ax.collections[0].get_array().sum() for ax in panels] == [400, 800]
    assert "(1 model)" in panels[0].get_title() and "(2 models)" in panels[1].get_title()


@pytest.mark.parametrize("rows", [slice(0, 0), slice(0, 1)])
def test_jacobian_vs_loss_handles_empty_and_single_point_input(rows):
    fig = jacobian_vs_loss(synthetic_points(1).iloc[rows])
    render(fig)
    assert fig.axes[0].get_xscale() == "log"
    if rows.stop == 0:
        assert "no per-point results yet" in texts(fig)
    else:
        assert fig.axes[0].collections[0].get_array().sum() == 1
        assert "ρ = n/a (1 model)" in texts(fig)


def test_jacobian_vs_loss_notes_a_panel_without_drawable_points():
    fig = jacobian_vs_loss(synthetic_points(1).assign(loss=0.0))
    render(fig)
    assert "no point with positive ‖J‖ and CE" in texts(fig)
    assert "400 of 400 points skipped" in texts(fig)


# per_point_auroc -----------------------------------------------------------------------------


def strip_sizes(ax) -> list[int]:
    """Number of dots in each scatter (strip) of an Axes."""
    return [len(c.get_offsets()) for c in ax.collections]


def test_per_point_auroc_shows_one_dot_per_model_and_the_chance_line():
    summary = per_point_summary(synthetic_points(5))
    summary.loc[0, "auroc_confidence"] = np.nan
    fig = per_point_auroc(summary)
    render(fig)
    rho_ax, auroc_ax = fig.axes
    assert strip_sizes(rho_ax) == [5, 5, 5]
    assert strip_sizes(auroc_ax) == [5, 4]
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in auroc_ax.get_lines())
    assert auroc_ax.get_ylim() == pytest.approx((-0.02, 1.02))
    median = np.median(summary["auroc_error"])
    assert f"median +{median:.2f}" in texts(fig)
    wins = int((summary["auroc_error"] > summary["auroc_confidence"]).sum())
    assert f"above baseline in {wins} of 4 models" in auroc_ax.get_title()


def test_per_point_auroc_draws_a_panel_row_per_dataset():
    summary = per_point_summary(synthetic_points(4)).assign(dataset=["a", "b", "a", "b"])
    fig = per_point_auroc(summary)
    render(fig)
    assert len(fig.axes) == 4
    assert strip_sizes(fig.axes[0])[0] == 2 and fig.axes[0].get_title().startswith("a\n")


def test_per_point_auroc_notes_empty_and_single_model_input():
    empty = per_point_auroc(per_point_summary(pd.DataFrame()))
    render(empty)
    assert "no per-point results yet" in texts(empty)
    single = per_point_auroc(per_point_summary(synthetic_points(1)))
    render(single)
    assert "only 1 model: no spread to show" in texts(single)
    assert strip_sizes(single.axes[1]) == [1, 1]
