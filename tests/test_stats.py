"""Tests for sensgen.analysis.stats: correlations with bootstrap intervals and the sign test."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sensgen.analysis.stats import (
    ADVANTAGE_COLUMNS,
    BASELINES,
    TABLE_PREDICTORS,
    CorrelationCI,
    correlation_table,
    correlation_with_ci,
    sign_test,
    spearman_advantage,
)

METHODS = (("pearson", "r"), ("spearman", "rho"), ("kendall", "tau"))


def fields(result: CorrelationCI, method: str, name: str) -> tuple[float, float, float, float]:
    """(estimate, p, low, high) of one method."""
    row = result._asdict()
    return tuple(row[f"{method}_{key}"] for key in (name, "p", "low", "high"))


# correlation_with_ci ----------------------------------------------------------------------


def test_linear_relation_gives_one_with_collapsed_intervals():
    x = np.arange(20.0)
    result = correlation_with_ci(x, 3.0 * x + 2.0, n_boot=300)
    assert result.n == 20
    for method, name in METHODS:
        estimate, p, low, high = fields(result, method, name)
        assert estimate == pytest.approx(1.0, abs=1e-12)
        assert low == pytest.approx(1.0, abs=1e-12)
        assert high == pytest.approx(1.0, abs=1e-12)
        assert p < 1e-6


def test_monotone_nonlinear_relation_is_one_for_ranks_only():
    x = np.arange(20.0)
    result = correlation_with_ci(x, np.exp(x), n_boot=300)
    assert (result.spearman_low, result.spearman_high) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert (result.kendall_low, result.kendall_high) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert result.pearson_r < 0.8  # exp is far from linear over 20 e-folds
    assert result.pearson_low < result.pearson_r < result.pearson_high


def test_independent_data_interval_covers_zero():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=300), rng.normal(size=300)
    result = correlation_with_ci(x, y)
    for method, name in METHODS:
        estimate, p, low, high = fields(result, method, name)
        assert low < 0.0 < high
        assert low <= estimate <= high
        assert high - low < 0.35  # about 4 / sqrt(n) wide for r; tighter for τ
        assert p > 0.05


def test_small_example_matches_hand_computation_and_scipy():
    # dx = dy-ish: Σdxdy = 8, Σdx² = Σdy² = 10, so r = ρ = 0.8 (values are their own ranks);
    # 8 concordant and 2 discordant of 10 pairs give τ = 0.6.
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    result = correlation_with_ci(x, y, n_boot=200)
    assert result.pearson_r == pytest.approx(0.8, abs=1e-12)
    assert result.spearman_rho == pytest.approx(0.8, abs=1e-12)
    assert result.kendall_tau == pytest.approx(0.6, abs=1e-12)
    # t = r sqrt(n − 2) / sqrt(1 − r²) on 3 degrees of freedom, for both r and ρ.
    t_p = 2 * stats.t.sf(0.8 * math.sqrt(3) / 0.6, df=3)
    assert result.pearson_p == pytest.approx(t_p, rel=1e-10)
    assert result.spearman_p == pytest.approx(t_p, rel=1e-10)
    # Exact τ test: 14 of the 120 permutations of 5 have ≤ 2 inversions; two-sided → 28/120.
    assert result.kendall_p == pytest.approx(28 / 120, rel=1e-10)
    assert result.pearson_p == pytest.approx(stats.pearsonr(x, y).pvalue, rel=1e-12)
    assert result.kendall_p == pytest.approx(stats.kendalltau(x, y).pvalue, rel=1e-12)


def test_bootstrap_matches_a_plain_scipy_loop_with_ties_and_constant_resamples():
    # x has six tied zeros: about 10% of resamples are constant in x and must be skipped.
    x = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    y = np.array([0.3, -1.0, 2.0, 0.5, 0.5, 1.5, 2.5, 0.1])
    n_boot, seed, level = 400, 7, 0.9
    result = correlation_with_ci(x, y, n_boot=n_boot, seed=seed, level=level)
    index = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    replicates = {"pearson": [], "spearman": [], "kendall": []}
    for row in index:
        a, b = x[row], y[row]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        replicates["pearson"].append(stats.pearsonr(a, b).statistic)
        replicates["spearman"].append(stats.spearmanr(a, b).statistic)
        replicates["kendall"].append(stats.kendalltau(a, b).statistic)
    assert 0.5 * n_boot < len(replicates["pearson"]) < n_boot
    for method, name in METHODS:
        expected = np.quantile(replicates[method], [0.05, 0.95])
        _, _, low, high = fields(result, method, name)
        assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)


def test_bootstrap_is_reproducible_with_the_seed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    first = correlation_with_ci(x, y, seed=11, n_boot=200)
    assert correlation_with_ci(x, y, seed=11, n_boot=200) == first
    other = correlation_with_ci(x, y, seed=12, n_boot=200)
    assert other.pearson_r == first.pearson_r  # estimates do not depend on the seed
    assert other.pearson_low != first.pearson_low


def test_wider_level_gives_a_wider_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    narrow = correlation_with_ci(x, y, level=0.5, n_boot=300)
    wide = correlation_with_ci(x, y, level=0.99, n_boot=300)
    assert wide.spearman_low < narrow.spearman_low < narrow.spearman_high < wide.spearman_high


def test_non_finite_pairs_are_dropped():
    rng = np.random.default_rng(2)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    dirty_x = np.concatenate([x[:10], [np.nan, 1.0, np.inf], x[10:]])
    dirty_y = np.concatenate([y[:10], [1.0, np.nan, 2.0], y[10:]])
    assert correlation_with_ci(dirty_x, dirty_y, n_boot=200) == correlation_with_ci(
        x, y, n_boot=200
    )


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),  # constant x
        ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]),  # constant y
        ([1.0, 2.0, np.nan], [1.0, 2.0, 3.0]),  # two finite pairs
        ([], []),
    ],
)
def test_undefined_input_gives_nan_without_warnings(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = correlation_with_ci(np.array(x), np.array(y), n_boot=100)
    assert result.n == int(np.isfinite(np.array(x) + np.array(y)).sum())
    assert all(math.isnan(value) for value in result[1:])


def test_interval_is_nan_when_most_resamples_are_undefined():
    # Resamples are valid only if they hold both point 0 (x's odd one) and point 19 (y's):
    # probability (1 − 0.95^20)² ≈ 0.41 < ½.
    x = np.zeros(20)
    x[0] = 1.0
    y = np.zeros(20)
    y[19] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = correlation_with_ci(x, y, n_boot=500)
    assert result.pearson_r == pytest.approx(-1 / 19, abs=1e-12)
    assert math.isnan(result.pearson_low) and math.isnan(result.kendall_high)


def test_no_resamples_gives_nan_intervals_but_estimates():
    x = np.arange(6.0)
    result = correlation_with_ci(x, x**2, n_boot=0)
    assert result.spearman_rho == pytest.approx(1.0)
    assert math.isnan(result.spearman_low) and math.isnan(result.pearson_high)


@pytest.mark.parametrize(
    ("x", "y", "options"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], {}),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"n_boot": -1}),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"level": 1.0}),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], {"level": 0.0}),
    ],
)
def test_bad_arguments_raise(x, y, options):
    with pytest.raises(ValueError, match=r"x and y|n_boot"):
        correlation_with_ci(np.array(x), np.array(y), **options)


# correlation_table ------------------------------------------------------------------------


def table_runs() -> pd.DataFrame:
    """Two datasets of done models (plus a failed one); no transitions column."""
    rng = np.random.default_rng(5)
    frames = []
    for name, n in (("mnist", 12), ("cifar10", 9)):
        jacobian = np.exp(rng.normal(size=n))
        frames.append(
            pd.DataFrame(
                {
                    "run_id": [f"{name}-{i}" for i in range(n)],
                    "dataset": name,
                    "status": "done",
                    "gap": 0.1 * np.log(jacobian) + 0.02 * rng.normal(size=n),
                    "jacobian_norm": jacobian,
                    "n_params": rng.integers(1_000, 100_000, n),
                    "train_loss": np.exp(rng.normal(-3.0, 1.0, n)),
                }
            )
        )
    runs = pd.concat(frames, ignore_index=True)
    runs.loc[0, "status"] = "failed"
    return runs


def test_correlation_table_rows_equal_correlation_with_ci_per_dataset():
    runs = table_runs()
    table = correlation_table(runs, n_boot=100, seed=3)
    assert list(table.columns) == [
        "dataset", "predictor", "target", *CorrelationCI._fields, *ADVANTAGE_COLUMNS
    ]  # fmt: skip
    assert list(table["dataset"]) == ["cifar10"] * 4 + ["mnist"] * 4
    assert tuple(table["predictor"][:4]) == TABLE_PREDICTORS
    assert (table["target"] == "gap").all()
    done = runs.loc[(runs["dataset"] == "mnist") & (runs["status"] == "done")]
    expected = correlation_with_ci(
        done["jacobian_norm"].to_numpy(), done["gap"].to_numpy(), n_boot=100, seed=3
    )
    row = table.set_index(["dataset", "predictor"]).loc[("mnist", "jacobian_norm")]
    assert row["n"] == 11  # the failed model is left out
    assert tuple(row[list(CorrelationCI._fields)]) == pytest.approx(tuple(expected), nan_ok=True)
    assert row["spearman_rho"] > 0.5
    missing = table.loc[table["predictor"] == "transitions"]
    assert (missing["n"] == 0).all() and missing["spearman_rho"].isna().all()


def test_the_table_s_baseline_rows_carry_jbar_s_paired_advantage():
    runs = table_runs()
    table = correlation_table(runs, n_boot=200, seed=3).set_index(["dataset", "predictor"])
    done = runs.loc[(runs["dataset"] == "cifar10") & (runs["status"] == "done")]
    for baseline in BASELINES:
        expected = spearman_advantage(
            done["jacobian_norm"], done[baseline], done["gap"], n_boot=200, seed=3
        )
        got = table.loc[("cifar10", baseline), list(ADVANTAGE_COLUMNS)]
        assert tuple(got) == pytest.approx(expected)
    for predictor in ("jacobian_norm", "transitions"):
        assert table.loc[("mnist", predictor), list(ADVANTAGE_COLUMNS)].isna().all()


def test_jbar_s_advantage_is_the_difference_of_the_two_spearman_rhos():
    rng = np.random.default_rng(0)
    y = rng.normal(size=30)
    jbar, baseline = y + 0.3 * rng.normal(size=30), -y + 2.0 * rng.normal(size=30)
    d, low, high = spearman_advantage(jbar, baseline, y, n_boot=500)
    rho_j, rho_b = stats.spearmanr(jbar, y).statistic, stats.spearmanr(baseline, y).statistic
    assert d == pytest.approx(rho_j - abs(rho_b), abs=1e-12)
    assert low < d < high <= 1 and low > 0  # Jbar clearly ahead of a weak, reversed baseline
    # Seeded: the same interval again; another seed, another (close) one.
    assert spearman_advantage(jbar, baseline, y, n_boot=500) == (d, low, high)
    assert spearman_advantage(jbar, baseline, y, n_boot=500, seed=1)[1] != low


def test_jbar_s_advantage_resamples_both_rhos_together():
    # Jbar and the baseline identical: every resample gives d = ρ − |ρ| = 0 exactly (for
    # ρ ≥ 0), so the paired interval is [0, 0]; resampling the two ρ apart would not be.
    y = np.arange(12.0)
    jbar = y + np.array([0, 3, -2, 1, 0, 4, -3, 2, 0, -1, 5, 1.0])
    d, low, high = spearman_advantage(jbar, jbar.copy(), y, n_boot=300)
    assert (d, low, high) == (0.0, 0.0, 0.0)


def test_jbar_s_advantage_rarely_says_jbar_does_worse_when_neither_predicts():
    # 300 simulated studies of 15 models where neither Jbar nor the baseline relates to the
    # gap (the baselines' place in the paper): "does not hold" (high < 0) must stay near
    # the interval's 2.5% per side, 5% for the two differences. A percentile interval of
    # ρ_J − |ρ_B| itself said so in 11% of the same studies (the kink of |ρ_B| at 0).
    rng = np.random.default_rng(0)
    verdicts = []
    for i in range(300):
        y, jbar, baseline = rng.normal(size=(3, 15))
        _, low, high = spearman_advantage(jbar, baseline, y, n_boot=500, seed=i)
        verdicts.append((low > 0, high < 0))
    holds, fails = np.mean(verdicts, axis=0)
    assert holds < 0.03 and fails < 0.08


@pytest.mark.parametrize(
    "columns",
    [([1.0, 2], [2.0, 1], [0.0, 1]), ([1.0, 1, 1, 1], [1.0, 2, 3, 4], [4.0, 3, 2, 1]),
     ([1.0, np.nan, 3, np.inf], [1.0, 2, 3, 4], [1.0, 2, 3, 4])],
)  # fmt: skip
def test_jbar_s_advantage_is_undefined_on_too_few_or_constant_values(columns):
    assert all(np.isnan(spearman_advantage(*map(np.array, columns), n_boot=50)))


def test_correlation_table_of_no_done_runs_is_empty():
    runs = table_runs().assign(status="running")
    table = correlation_table(runs, n_boot=10)
    assert table.empty and "kendall_high" in table.columns


# sign_test --------------------------------------------------------------------------------


def test_sign_test_matches_the_binomial_distribution():
    assert sign_test(10, 10).p_value == pytest.approx(2 * 0.5**10, rel=1e-12)
    assert sign_test(0, 10).p_value == pytest.approx(2 * 0.5**10, rel=1e-12)
    assert sign_test(5, 10).p_value == pytest.approx(1.0)
    # P(K ≥ 8) = (C(10,8) + C(10,9) + C(10,10)) / 2^10 = 56/1024; two-sided doubles it.
    assert sign_test(8, 10).p_value == pytest.approx(112 / 1024, rel=1e-12)
    result = sign_test(8, 10)
    assert (result.n, result.n_expected_side, result.share) == (10, 8, 0.8)


def test_sign_test_of_no_pairs_is_nan_and_bad_counts_raise():
    result = sign_test(0, 0)
    assert result.n == 0 and math.isnan(result.share) and math.isnan(result.p_value)
    for k, n in ((11, 10), (-1, 10), (0, -1)):
        with pytest.raises(ValueError, match="n_expected_side"):
            sign_test(k, n)
