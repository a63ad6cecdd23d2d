"""The measures × ranking-scores tables of the report (issue 7, item 3), on hand-built
models whose scores can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sensgen.analysis.measure_scores import measure_factor_table, measure_score_table
from sensgen.analysis.ranking import granulated_psi, psi_by_axis
from sensgen.analysis.report_sections import factor_wide, measures_section


def grid_runs() -> pd.DataFrame:
    """A 2 (width) × 2 (depth) × 2 (random_labels) grid on one dataset, plus a failed run.

    gap = 0.1·(width index) + 0.2·(depth index) + 0.4·random_labels, so every factor raises
    the gap. Jbar follows the gap except that it falls with width.
    """
    rows = []
    for i, (w, d, r) in enumerate((w, d, r) for w in (0, 1) for d in (0, 1) for r in (0, 1)):
        gap = 0.1 * w + 0.2 * d + 0.4 * r
        rows.append({"run_id": f"m{i}", "dataset": "mnist", "status": "done",
                     "width": (64, 128)[w], "depth": d + 1, "random_labels": bool(r),
                     "gap": gap, "jacobian_norm": 1.0 - 0.1 * w + 0.2 * d + 0.4 * r,
                     "train_loss": 0.01 * (2 - w)})  # fmt: skip
    bad = {"run_id": "bad", "dataset": "mnist", "status": "failed", "width": 64, "depth": 1,
           "random_labels": False, "gap": 9.0, "jacobian_norm": -9.0}  # fmt: skip
    rows.append(bad)
    return pd.DataFrame(rows)


def grid_measures(runs: pd.DataFrame) -> pd.DataFrame:
    gap = runs["gap"].to_numpy()
    return pd.DataFrame({
        "run_id": runs["run_id"],
        "perfect": np.exp(gap),  # any increasing function of the gap
        "reversed": -gap,
        "constant": 1.0,  # no ranking: every τ undefined
    })  # fmt: skip


def test_score_table_perfect_reversed_and_jbar():
    runs = grid_runs()
    table = measure_score_table(runs, grid_measures(runs)).set_index("measure")
    assert table.loc["perfect", "kendall_tau"] == pytest.approx(1.0)
    assert table.loc["perfect", "spearman_rho"] == pytest.approx(1.0)
    assert table.loc["perfect", "psi"] == pytest.approx(1.0)
    assert table.loc["reversed", "kendall_tau"] == pytest.approx(-1.0)
    assert table.loc["reversed", "psi"] == pytest.approx(-1.0)
    assert math.isnan(table.loc["constant", "kendall_tau"])
    # The final train loss (paper Fig. 1) falls with width alone: ψ_width = −1; constant
    # in every depth and random-labels cell while the gap varies, ψ = 0 there (JNMKB).
    assert table.loc["train_loss", "psi"] == pytest.approx(-1 / 3)
    # The failed run is left out: 8 finished models.
    assert set(table["n"]) == {8}
    # Jbar: ψ = (ψ_width + ψ_depth + ψ_random_labels) / 3 = (−1 + 1 + 1) / 3.
    assert table.loc["jacobian_norm", "psi"] == pytest.approx(1 / 3)
    assert table.loc["perfect", "beats_jbar"] and not table.loc["reversed", "beats_jbar"]
    # Sorted by |τ|: the two ±1 measures first.
    assert list(table.index[:2]) in (["perfect", "reversed"], ["reversed", "perfect"])


def test_factor_table_hand_computed():
    runs = grid_runs()
    table = measure_factor_table(runs, grid_measures(runs))
    assert set(table["factor"]) == {"width", "depth", "random_labels"}
    psi = table.set_index(["factor", "measure"])["psi"]
    cells = table.set_index(["factor", "measure"])["cells"]
    # Within each of the 4 (depth, random_labels) cells Jbar falls as width (and the gap)
    # rise: τ = −1 in each; along depth and random labels it rises with the gap.
    assert psi["width", "jacobian_norm"] == pytest.approx(-1.0)
    assert psi["depth", "jacobian_norm"] == pytest.approx(1.0)
    assert psi["random_labels", "jacobian_norm"] == pytest.approx(1.0)
    assert cells["width", "jacobian_norm"] == 4
    assert psi["width", "perfect"] == pytest.approx(1.0)
    assert psi["depth", "reversed"] == pytest.approx(-1.0)
    # A constant measure orders no pair of a cell whose gap varies: τ = 0 there (JNMKB).
    assert cells["depth", "constant"] == 4 and psi["depth", "constant"] == 0.0
    beats = table.set_index(["factor", "measure"])["beats_jbar"]
    assert beats["width", "perfect"]  # 1 above Jbar's −1
    assert not beats["width", "reversed"]  # −1 is not above −1
    assert not beats["depth", "perfect"]  # nor 1 above 1


def test_an_undefined_score_neither_beats_nor_loses_to_jbar():
    # "sparse" has a value for one model only: its τ and every ψ are undefined, so whether
    # it beats Jbar is unknown (None), not "no" (False), in both tables.
    runs = grid_runs()
    measures = grid_measures(runs).assign(sparse=[1.0] + [np.nan] * 8)
    scores = measure_score_table(runs, measures).set_index("measure")
    assert math.isnan(scores.loc["sparse", "kendall_tau"])
    assert scores.loc["sparse", "beats_jbar"] is None
    assert scores.loc["perfect", "beats_jbar"] is True
    factors = measure_factor_table(runs, measures)
    sparse = factors.loc[factors["measure"] == "sparse"]
    assert len(sparse) == 3 and sparse["psi"].isna().all()
    assert sparse["beats_jbar"].map(lambda b: b is None).all()


def test_factor_table_agrees_with_granulated_psi_on_a_random_grid():
    rng = np.random.default_rng(0)
    n = 3 * 4 * 2 * 2  # two models per cell of a 3 × 4 × 2 grid
    runs = pd.DataFrame({
        "run_id": [f"r{i}" for i in range(n)], "status": "done", "dataset": "cifar10",
        "width": np.tile([64, 128, 256], n // 3), "depth": np.repeat([1, 2, 3, 4], n // 4),
        "optimizer": np.tile(np.repeat(["sgd", "adam"], 3), n // 6),
        "gap": rng.random(n), "jacobian_norm": rng.random(n),
    })  # fmt: skip
    measures = pd.DataFrame({"run_id": runs["run_id"], "mu": rng.random(n)})
    table = measure_factor_table(runs, measures)
    merged = runs.merge(measures, on="run_id")
    axes = ["width", "depth", "optimizer"]
    for name in ("jacobian_norm", "mu"):
        _, expected = granulated_psi(merged, name, "gap", axes)
        got = table.loc[table["measure"] == name].set_index("factor")["psi"]
        for axis in axes:
            assert got[axis] == pytest.approx(expected[axis])


def test_models_of_different_seeds_are_never_pooled_into_one_cell():
    # A width × seed grid: within each seed Jbar orders the two widths as the gap does
    # (ψ_width = 1), while the seeds move the gap and Jbar in opposite directions. Pooling
    # the seeds into one width cell (as a fixed list of hyper-parameter axes did) gave a
    # negative ψ_width, and a measure looked better than Jbar along width.
    seeds, widths = np.repeat([0, 1, 2], 2), np.tile([64, 128], 3)
    runs = pd.DataFrame({
        "run_id": [f"r{i}" for i in range(6)], "status": "done", "dataset": "mnist",
        "seed": seeds, "width": widths, "gap": 0.1 * (widths == 128) + seeds,
        "jacobian_norm": 1.0 * (widths == 128) + 10.0 * (2 - seeds),
    })  # fmt: skip
    measures = pd.DataFrame({"run_id": runs["run_id"], "margin": -runs["gap"]})
    table = measure_factor_table(runs, measures).set_index(["factor", "measure"])
    assert table.loc[("width", "jacobian_norm"), ["psi", "cells"]].tolist() == [1.0, 3]
    assert table.loc[("seed", "jacobian_norm"), ["psi", "cells"]].tolist() == [-1.0, 2]
    assert not table.loc[("width", "margin"), "beats_jbar"]  # −1 is not above 1
    scores = measure_score_table(runs, measures).set_index("measure")
    assert scores.loc["jacobian_norm", "psi"] == 0.0  # the mean of ψ_width and ψ_seed


def test_continuous_axis_is_left_out():
    # lr drawn at random: every cell along lr holds one model, so ψ_lr is undefined for all.
    runs = grid_runs().assign(lr=np.linspace(1e-3, 1e-2, 9))
    table = measure_factor_table(runs, grid_measures(runs))
    assert "lr" not in set(table["factor"])
    # ...and with lr varying inside every cell, no other axis has a cell of two models.
    assert table.empty


def test_n_counts_the_values_the_scores_use():
    # An infinite measure (flatness at σ = 0) is dropped by the correlations, so n says so.
    runs = grid_runs()
    measures = grid_measures(runs).assign(perfect=lambda m: m["perfect"].where(m.index > 0, np.inf))
    table = measure_score_table(runs, measures).set_index("measure")
    assert table.loc["perfect", "n"] == 7 and table.loc["reversed", "n"] == 8


def test_psi_by_axis_counts_cells():
    frame = pd.DataFrame({"a": [1, 1, 2, 2, 3], "b": [1, 2, 1, 2, 1],
                          "mu": [1.0, 2, 3, 1, 0], "g": [1.0, 2, 3, 4, 5]})  # fmt: skip
    out = psi_by_axis(frame, "mu", "g", ["a", "b"])
    # Along a: cells b=1 (mu 1,3,0 vs g 1,3,5: τ = −1/3) and b=2 (mu 2,1 vs g 2,4: τ = −1).
    assert out["a"] == (pytest.approx((-1 / 3 - 1) / 2), 2)
    # Along b: cells a=1 (τ = 1), a=2 (τ = −1); a=3 holds one model.
    assert out["b"] == (pytest.approx(0.0), 2)


def test_wide_table_and_report_section():
    runs = grid_runs()
    measures = grid_measures(runs)
    factors = measure_factor_table(runs, measures)
    wide = factor_wide(factors).set_index("measure")
    assert "ψ width (4 cells)" in wide.columns
    assert wide.loc["perfect", "ψ width (4 cells)"] == pytest.approx(1.0)
    # perfect beats Jbar along width only (1 > −1); reversed never; Jbar not itself.
    assert wide.loc["perfect", "above Jbar"] == 1
    assert wide.loc["reversed", "above Jbar"] == 0
    assert wide.loc["jacobian_norm", "above Jbar"] == 0
    section = measures_section(runs, measures)
    html = "".join(section.html)
    assert 'id="measure-factors"' in html and 'id="measure-scores"' in html
    assert set(section.summary) == {"measure_scores", "measure_factors"}


def test_no_measures_no_section():
    runs = grid_runs()
    assert measures_section(runs, pd.DataFrame({"run_id": []})).html == []
    assert measure_factor_table(runs.iloc[0:0], grid_measures(runs)).empty


def test_no_varying_axis_no_factor_rows():
    runs = grid_runs()
    one = runs.loc[(runs["width"] == 64) & (runs["depth"] == 1) & ~runs["random_labels"]]
    assert measure_factor_table(one, grid_measures(runs)).empty
    assert not measure_score_table(one, grid_measures(runs)).empty
