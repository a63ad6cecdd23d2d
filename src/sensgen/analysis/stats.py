"""Correlation estimates with p-values and bootstrap intervals, and the sign test.

The report states each headline correlation as an estimate with a 95% interval, not a bare
number (Novak et al. 2018 give none; sensgen adds them, see the paper notes' §6). Every
function is pure: arrays or a runs frame in, numbers or a DataFrame out.

* ``correlation_with_ci``: Pearson r, Spearman ρ and Kendall τ-b of two columns over their
  jointly finite pairs, each with a two-sided p-value for "no association" and a percentile
  bootstrap interval.
* ``correlation_table``: that, per dataset and predictor, of the generalization gap against
  Jbar (Fig. 5, §3 Study 5) and the baselines (#weights and train loss, Fig. 1, Study 1;
  transitions, Fig. 5 companions).
* ``spearman_advantage``: ρ(Jbar, gap) − |ρ(baseline, gap)| with a paired bootstrap interval,
  for the Fig. 1 claim that Jbar explains the gap better than #weights or train loss.
* ``sign_test``: for paired comparisons (Studies 2-4: does the intervention move Jbar the
  expected way?), the share of pairs on the expected side and a two-sided binomial p-value.

Example:
    >>> import numpy as np
    >>> x = np.arange(10.0)
    >>> result = correlation_with_ci(x, np.exp(x), n_boot=200)
    >>> result.n, round(result.spearman_rho, 12), result.spearman_low, result.spearman_high
    (10, 1.0, 1.0, 1.0)
    >>> sign_test(10, 10).p_value == 2 * 0.5**10
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from sensgen.analysis.tables import column, dataset_labels, done_runs

TABLE_PREDICTORS = ("jacobian_norm", "transitions", "n_params", "train_loss")
BASELINES = ("n_params", "train_loss")  # Fig. 1: predictors Jbar is compared against
ADVANTAGE_COLUMNS = ("jbar_advantage", "jbar_advantage_low", "jbar_advantage_high")
METHODS = ("pearson", "spearman", "kendall")
_MIN_PAIRS = 3
# A percentile interval over mostly-undefined resamples would describe a conditional
# distribution, not the sampling spread: below this share of valid resamples it is NaN.
_MIN_VALID_SHARE = 0.5


class CorrelationCI(NamedTuple):
    """Three correlation coefficients with p-values and bootstrap percentile intervals.

    Attributes:
        n: number of jointly finite (x, y) pairs used.
        pearson_r, pearson_p, pearson_low, pearson_high: Pearson's r, its two-sided
            p-value for r = 0, and the interval's lower and upper ends.
        spearman_rho, spearman_p, spearman_low, spearman_high: the same for Spearman's ρ.
        kendall_tau, kendall_p, kendall_low, kendall_high: the same for Kendall's τ-b.
    """

    n: int
    pearson_r: float
    pearson_p: float
    pearson_low: float
    pearson_high: float
    spearman_rho: float
    spearman_p: float
    spearman_low: float
    spearman_high: float
    kendall_tau: float
    kendall_p: float
    kendall_low: float
    kendall_high: float


class SignTest(NamedTuple):
    """Result of a two-sided sign test.

    Attributes:
        n: pairs compared (ties excluded by the caller).
        n_expected_side: pairs that moved the expected way.
        share: ``n_expected_side / n`` (NaN when n = 0).
        p_value: two-sided exact binomial p-value under P(expected side) = ½ (NaN if n = 0).
    """

    n: int
    n_expected_side: int
    share: float
    p_value: float


def correlation_with_ci(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> CorrelationCI:
    """Pearson r, Spearman ρ and Kendall τ-b of ``y`` on ``x`` with bootstrap intervals.

    Over the n pairs where both values are finite:

    * r = Σ (x_i − x̄)(y_i − ȳ) / sqrt(Σ (x_i − x̄)² · Σ (y_i − ȳ)²);
    * ρ = r of the ranks (ties get their average rank);
    * τ-b = (C − D) / sqrt((n₀ − n_x)(n₀ − n_y)), with C concordant and D discordant pairs,
      n₀ = n(n − 1)/2 and n_x, n_y the pairs tied in x, in y.

    The p-values are scipy's two-sided tests of zero association (t-distribution for r and
    ρ; exact or normal approximation for τ). The interval is the percentile bootstrap: draw
    ``n_boot`` resamples of the n pairs with replacement (``numpy.random.default_rng(seed)``),
    recompute each statistic, and take the (1 − level)/2 and (1 + level)/2 quantiles of its
    values. A resample where x or y is constant leaves that statistic undefined and is
    skipped; if fewer than half the resamples are valid, the interval is NaN.

    Args:
        x: array of shape ``[N]``.
        y: array of shape ``[N]``.
        n_boot: bootstrap resamples (0 gives NaN intervals).
        seed: seed of the resampling generator; equal seeds give equal intervals.
        level: coverage of the interval, in (0, 1).

    Returns:
        A ``CorrelationCI``; every statistic NaN (and no warning) when n < 3 or a column is
        constant.

    Raises:
        ValueError: if the shapes differ, ``n_boot`` < 0 or ``level`` is outside (0, 1).
    """
    x, y = _finite_pairs(x, y)
    if n_boot < 0 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 0 and 0 < level < 1, got {n_boot} and {level}")
    n = len(x)
    if n < _MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return CorrelationCI(n, *([np.nan] * 12))
    estimates = _estimates(x, y)
    intervals = _bootstrap_intervals(x, y, n_boot=n_boot, seed=seed, level=level)
    values = []
    for method in METHODS:
        values += [*estimates[method], *intervals[method]]
    return CorrelationCI(n, *values)


def correlation_table(
    runs: pd.DataFrame,
    predictors: Sequence[str] = TABLE_PREDICTORS,
    target: str = "gap",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per dataset and predictor, ``correlation_with_ci`` of the target over finished models.

    The statistics for the report's Fig. 1 (§3 Study 1: #weights, train loss) and Fig. 5
    (Study 5: Jbar, transitions) captions. Each row resamples with the same ``seed``, so a
    row's interval does not depend on which other rows are in the table.

    Args:
        runs: the store's runs frame; only ``status == "done"`` rows are used. A predictor
            column the frame lacks gives a row with n = 0 and NaN statistics.
        predictors: run columns to correlate with the target, in output order.
        target: the run column on the y side (default: the generalization gap).
        n_boot: bootstrap resamples per row.
        seed: resampling seed.
        level: interval coverage.

    Returns:
        DataFrame with columns dataset, predictor, target, the ``CorrelationCI`` fields and
        ``ADVANTAGE_COLUMNS``: one row per (dataset, predictor), datasets sorted by name.
        The advantage columns are `spearman_advantage` of Jbar over the row's predictor
        for the `BASELINES` (when Jbar is among the predictors), NaN in the other rows.
    """
    done = done_runs(runs)
    datasets = dataset_labels(done)
    rows = []
    for name in sorted(datasets.unique()):
        group = done.loc[datasets == name]
        y = column(group, target)
        for predictor in predictors:
            result = correlation_with_ci(
                column(group, predictor), y, n_boot=n_boot, seed=seed, level=level
            )
            advantage = (np.nan, np.nan, np.nan)
            if predictor in BASELINES and "jacobian_norm" in predictors:
                jbar, baseline = column(group, "jacobian_norm"), column(group, predictor)
                advantage = spearman_advantage(
                    jbar, baseline, y, n_boot=n_boot, seed=seed, level=level
                )
            keys = {"dataset": name, "predictor": predictor, "target": target}
            rows.append(
                keys | result._asdict() | dict(zip(ADVANTAGE_COLUMNS, advantage, strict=True))
            )
    columns = ["dataset", "predictor", "target", *CorrelationCI._fields, *ADVANTAGE_COLUMNS]
    return pd.DataFrame(rows, columns=columns).astype({"n": "int64"})


def spearman_advantage(
    jbar: np.ndarray,
    baseline: np.ndarray,
    y: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """d = ρ(jbar, y) − |ρ(baseline, y)| (Spearman) and a paired bootstrap interval for it.

    Fig. 1 (§3 Study 1) claims that the gap is explained by Jbar and not by #weights or the
    final train loss. Two separate intervals (one per ρ) do not settle "Jbar does better":
    the two ρ share their models, so their errors are correlated. Here both are recomputed
    on the *same* resamples of the models where all three values are finite. |ρ| on the
    baseline's side (a baseline strongly anti-correlated with the gap explains it too), so
    d = min(ρ_J − ρ_B, ρ_J + ρ_B), in [−2, 1]. The interval is [min of the two lows, min of
    the two highs] of the percentile intervals of ρ_J − ρ_B and ρ_J + ρ_B: low > 0 exactly
    when both differences are clearly positive, high < 0 when either is clearly negative.
    (A percentile interval of d itself would be pulled down by the kink of |ρ_B| at 0, just
    where the paper puts the baselines: with both true ρ at 0 and 12–20 models it fell
    below 0 in 13% of simulated studies, against 4–6% this way.) A resample where a column
    is constant is skipped; with fewer than half valid, the interval is NaN.

    Args:
        jbar, baseline, y: arrays of shape ``[N]`` (one value per model).
        n_boot, seed, level: as `correlation_with_ci`.

    Returns:
        (d, low, high); all NaN when fewer than 3 models have all three values or a column
        is constant.

    Example:
        >>> y = np.arange(8.0)
        >>> d, low, high = spearman_advantage(y**2, np.array([3.0, 1, 4, 1, 5, 9, 2, 6]), y)
        >>> round(d, 3), low > 0
        (0.497, True)
    """
    jbar, baseline, y = (np.asarray(a, dtype=np.float64).ravel() for a in (jbar, baseline, y))
    if not jbar.shape == baseline.shape == y.shape:
        raise ValueError(f"lengths differ: {len(jbar)}, {len(baseline)}, {len(y)}")
    keep = np.isfinite(jbar) & np.isfinite(baseline) & np.isfinite(y)
    columns = np.stack([jbar[keep], baseline[keep], y[keep]])  # [3, n]
    n = columns.shape[1]
    if n < _MIN_PAIRS or (np.ptp(columns, axis=1) == 0).any():
        return np.nan, np.nan, np.nan
    d = float(np.min(_differences(columns[None])))
    if n_boot == 0:
        return d, np.nan, np.nan
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [B, n]
    resampled = columns[:, index].transpose(1, 0, 2)  # [B, 3, n]
    valid = (np.ptp(resampled, axis=2) > 0).all(axis=1)
    minus, plus = _differences(resampled[valid])
    (low_minus, high_minus), (low_plus, high_plus) = (
        _percentile_interval(v, n_boot, level) for v in (minus, plus)
    )
    # (np.min: NaN, an interval undefined, stays NaN whichever side it is on; d ≤ ρ_J ≤ 1,
    # so a high end past 1, where both differences' intervals reach beyond it, says 1)
    high = float(np.min([high_minus, high_plus, 1.0]))
    return d, float(np.min([low_minus, low_plus])), high


def _differences(columns: np.ndarray) -> np.ndarray:
    """(ρ_J − ρ_B, ρ_J + ρ_B) per row of ``[B, 3, n]`` (jbar, baseline, y) → ``[2, B]``."""
    ranks = stats.rankdata(columns, axis=2)
    rho_jbar = _rowwise_pearson(ranks[:, 0], ranks[:, 2])
    rho_baseline = _rowwise_pearson(ranks[:, 1], ranks[:, 2])
    return np.stack([rho_jbar - rho_baseline, rho_jbar + rho_baseline])


def sign_test(n_expected_side: int, n_total: int) -> SignTest:
    """Share of pairs on the expected side and a two-sided exact binomial (sign) test.

    Under the null hypothesis each pair falls on either side with probability ½, so the
    count k of pairs on the expected side is Binomial(n, ½) and the p-value is
    P(|K − n/2| ≥ |k − n/2|) (``scipy.stats.binomtest``). Ties, pairs exactly on the
    diagonal, carry no sign: the caller drops them and passes only the n untied pairs.

    Args:
        n_expected_side: untied pairs that moved the expected way, ``0 <= k <= n_total``.
        n_total: untied pairs.

    Returns:
        A ``SignTest``; share and p-value NaN when ``n_total`` is 0.

    Raises:
        ValueError: if the counts are negative or ``n_expected_side > n_total``.
    """
    k, n = int(n_expected_side), int(n_total)
    if k < 0 or n < 0 or k > n:
        raise ValueError(f"need 0 <= n_expected_side <= n_total, got {k} and {n}")
    if n == 0:
        return SignTest(0, 0, np.nan, np.nan)
    p_value = stats.binomtest(k, n, p=0.5, alternative="two-sided").pvalue
    return SignTest(n, k, k / n, float(p_value))


def _finite_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The jointly finite entries of two equal-length arrays, as float64 ``[n]`` arrays."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _estimates(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[float, float]]:
    """(statistic, two-sided p-value) per method from scipy, on non-constant ``[n]`` data."""
    with warnings.catch_warnings():
        # Defined here; scipy may still warn on near-constant input or exact p-values.
        warnings.simplefilter("ignore")
        results = {
            "pearson": stats.pearsonr(x, y),
            "spearman": stats.spearmanr(x, y),
            "kendall": stats.kendalltau(x, y),
        }
    return {key: (float(_snap(r.statistic)), float(r.pvalue)) for key, r in results.items()}


def _bootstrap_intervals(
    x: np.ndarray, y: np.ndarray, *, n_boot: int, seed: int, level: float
) -> dict[str, tuple[float, float]]:
    """Percentile interval (low, high) per method from ``n_boot`` paired resamples."""
    if n_boot == 0:
        return {method: (np.nan, np.nan) for method in METHODS}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(x), size=(n_boot, len(x)))  # [B, n]
    xb, yb = x[index], y[index]  # [B, n] each
    valid = (np.ptp(xb, axis=1) > 0) & (np.ptp(yb, axis=1) > 0)  # [B]
    xb, yb = xb[valid], yb[valid]
    replicates = {
        "pearson": _rowwise_pearson(xb, yb),
        "spearman": _rowwise_pearson(stats.rankdata(xb, axis=1), stats.rankdata(yb, axis=1)),
        "kendall": np.array([_kendall(a, b) for a, b in zip(xb, yb, strict=True)]),
    }
    return {key: _percentile_interval(v, n_boot, level) for key, v in replicates.items()}


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall τ-b of two non-constant ``[n]`` arrays (scipy, O(n log n))."""
    return float(_snap(stats.kendalltau(a, b).statistic))


def _snap(value: float | np.ndarray) -> float | np.ndarray:
    """A coefficient within rounding (1e-12) of ±1 as exactly ±1: scipy's τ-b of a perfectly
    concordant sample with ties is 0.9999999999999999, which the report would print in
    full (`numbers.significant` never rounds onto a whole number)."""
    value = np.asarray(value, dtype=np.float64)
    return np.where(np.abs(np.abs(value) - 1.0) < 1e-12, np.sign(value), value)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of ``[B, n]`` arrays with non-constant rows → ``[B]``."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    r = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return _snap(np.clip(r, -1.0, 1.0))  # rounding can step just past ±1


def _percentile_interval(values: np.ndarray, n_boot: int, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of the valid replicates, or NaN, NaN."""
    values = values[np.isfinite(values)]
    if len(values) == 0 or len(values) < _MIN_VALID_SHARE * n_boot:
        return np.nan, np.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
