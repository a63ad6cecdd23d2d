"""Tidy tables over a study's results: statuses, rank correlations, per-point statistics.

The models table itself is `sensgen.analysis.models_table`.

Every function here is pure: a pandas DataFrame in (the store's ``runs()`` or ``points()``
frame), a new DataFrame out, no I/O and no plotting. The figures and the report build on
these tables, so a number shown in a figure title is the number in ``summary.json``.

The central statistic is the paper's Study 5 (Novak et al. 2018, §3, Fig. 5; claim 10 of
§5): per dataset, how well does the mean test-point Jacobian norm Jbar rank the models by
generalization gap, compared with the two baselines of Fig. 1, the number of weights and
the final train loss? Rank correlations (Spearman ρ, Kendall τ-b) answer "does the gap rise
monotonically with the measure" without assuming a functional form.

Example:
    >>> import pandas as pd
    >>> runs = pd.DataFrame({
    ...     "run_id": ["a", "b", "c", "d"], "dataset": "digits", "status": "done",
    ...     "gap": [0.1, 0.2, 0.3, 0.4], "jacobian_norm": [1.0, 2.0, 4.0, 8.0],
    ...     "n_params": [1e4, 1e5, 1e3, 1e6], "train_loss": [1e-3, 1e-4, 1e-2, 1e-5],
    ... })
    >>> summary = correlation_summary(runs)
    >>> float(summary.set_index("predictor").loc["jacobian_norm", "spearman_rho"])
    1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

DONE = "done"
STATUSES = ("pending", "running", "done", "failed", "diverged")
PREDICTORS = ("jacobian_norm", "n_params", "train_loss")
NO_DATASET = "(none)"

CORRELATION_COLUMNS = (
    "dataset",
    "predictor",
    "n",
    "spearman_rho",
    "spearman_p",
    "kendall_tau",
    "kendall_p",
)
PER_POINT_COLUMNS = (
    "run_id",
    "n_points",
    "spearman_rho",
    "auroc_error",
    "n_errors",
    "auroc_confidence",
    "spearman_rho_logits",
    "spearman_rho_correct",
)
DISTRIBUTION_METRICS = ("spearman_rho", "auroc_error", "auroc_confidence")
DISTRIBUTION_COLUMNS = ("metric", "models", "min", "q10", "median", "q90", "max")
_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


class RankCorrelation(NamedTuple):
    """Rank correlation of two columns over their jointly finite entries.

    Attributes:
        n: number of pairs where both values are finite.
        spearman_rho: Spearman's ρ (NaN when n < 3 or a column is constant).
        spearman_p: two-sided p-value for ρ = 0.
        kendall_tau: Kendall's τ-b, which handles ties (§6 of the brief).
        kendall_p: two-sided p-value for τ = 0.
    """

    n: int
    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float


def column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """Returns a column as float64, or all-NaN when the frame lacks it.

    Args:
        frame: any DataFrame.
        name: column name.

    Returns:
        Array of shape ``[len(frame)]``; non-numeric entries become NaN.
    """
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    values = pd.to_numeric(frame[name], errors="coerce")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def dataset_labels(frame: pd.DataFrame) -> pd.Series:
    """Returns the dataset name of each row as a string; missing names become ``(none)``."""
    if "dataset" not in frame.columns:
        return pd.Series(NO_DATASET, index=frame.index, dtype=object)
    return frame["dataset"].astype(object).where(frame["dataset"].notna(), NO_DATASET).astype(str)


def done_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Returns the rows of finished models (``status == "done"``), index reset.

    Failed, diverged, pending and running models have no trustworthy results; every table
    and figure of the paper is over finished models only (§4, "Training and inclusion").
    """
    if "status" not in runs.columns:
        return runs.iloc[0:0].reset_index(drop=True)
    return runs.loc[runs["status"] == DONE].reset_index(drop=True)


def status_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Counts models per status: the five known statuses first (zeros included), then others.

    Args:
        runs: the store's runs frame.

    Returns:
        DataFrame with columns ``status`` (str) and ``count`` (int).
    """
    observed = runs["status"].astype(str) if "status" in runs.columns else pd.Series(dtype=str)
    counts = observed.value_counts()
    extra = sorted(set(counts.index) - set(STATUSES))
    order = [*STATUSES, *extra]
    values = [int(counts.get(status, 0)) for status in order]
    return pd.DataFrame({"status": order, "count": values})


def rank_correlation(x: np.ndarray, y: np.ndarray) -> RankCorrelation:
    """Spearman ρ and Kendall τ-b of ``y`` against ``x`` over their jointly finite entries.

    Undefined cases (fewer than 3 pairs, or a constant column) give NaN without a warning.

    Args:
        x: array of shape ``[N]``.
        y: array of shape ``[N]``.

    Returns:
        A ``RankCorrelation``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return RankCorrelation(n, np.nan, np.nan, np.nan, np.nan)
    with warnings.catch_warnings():
        # Defined above; scipy may still warn on near-degenerate inputs (e.g. exact p-values).
        warnings.simplefilter("ignore")
        spearman = stats.spearmanr(x, y)
        kendall = stats.kendalltau(x, y)
    return RankCorrelation(
        n,
        float(spearman.statistic),
        float(spearman.pvalue),
        float(kendall.statistic),
        float(kendall.pvalue),
    )


def undefined_reason(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> str:
    """Why a correlation of ``y`` with ``x`` is undefined (`rank_correlation`'s rule), in
    words for the report; "" when it is defined.

    Example:
        >>> undefined_reason(np.ones(4), np.arange(4.0), "Jbar", "gap")
        'Jbar is the same for all 4 models'
    """
    n, same = undefined_parts(x, y, x_name, y_name)
    if n < 3:
        return f"needs 3 models with both values, has {n}"
    verb = "is" if len(same) == 1 else "are"
    return f"{' and '.join(same)} {verb} the same for all {n} models" if same else ""


def undefined_parts(
    x: np.ndarray, y: np.ndarray, x_name: str, y_name: str
) -> tuple[int, list[str]]:
    """(n, the names of the columns constant over them): n counts the models with both
    values finite, the ones `rank_correlation` ranks; its ρ is undefined when n < 3 or a
    column is constant. The reasons `undefined_reason` and the figures' titles give."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    same = [name for name, v in ((x_name, x[keep]), (y_name, y[keep])) if v.size and np.ptp(v) == 0]
    return int(keep.sum()), same


def correlation_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, rank correlation of the generalization gap with Jbar and two baselines.

    For each dataset and each predictor μ in ``PREDICTORS`` (the mean test Jacobian norm
    Jbar, the number of weights, the final train loss), over the finished models where both
    gap and μ are finite: n, Spearman ρ(μ, gap) and Kendall τ-b(μ, gap) with two-sided
    p-values. Paper claim 10 (§3 Study 5, Fig. 5 and Fig. 1): Jbar should give a clearly
    positive ρ while #weights and train loss should not.

    Args:
        runs: the store's runs frame; non-done rows are ignored.

    Returns:
        DataFrame with columns ``CORRELATION_COLUMNS``: one row per (dataset, predictor),
        datasets sorted by name, predictors in ``PREDICTORS`` order. NaN where undefined.
    """
    done = done_runs(runs)
    datasets = dataset_labels(done)
    rows = []
    for name in sorted(datasets.unique()):
        group = done.loc[datasets == name]
        gap = column(group, "gap")
        for predictor in PREDICTORS:
            result = rank_correlation(column(group, predictor), gap)
            rows.append({"dataset": name, "predictor": predictor, **result._asdict()})
    frame = pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
    return frame.astype({"n": "int64"})


def per_point_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Per model, how well the per-point Jacobian norm tracks that point's loss (Study 6).

    Over each model's test points (paper §3 Study 6, claim 11):

    * ``spearman_rho``: Spearman ρ(‖J(x)‖_F, CE(x)), J of the softmax output;
    * ``auroc_error``: AUROC of ‖J(x)‖_F as a score for misclassification, the probability
      that a random misclassified point has a larger norm than a random correct one (ties
      count half);
    * ``auroc_confidence``: the same AUROC for the confidence baseline 1 − max_j p_j(x),
      with max_j p_j from the stored loss and margin (``max_probability``);
    * ``spearman_rho_logits``: ρ(‖J_logits(x)‖_F, CE(x)), NaN without that column. By the
      §2.1 bound ‖J‖_F ≤ 2 CE(x) ‖J_logits‖_2, confident points have small softmax norms
      mechanically; the logit Jacobian carries no such bound;
    * ``spearman_rho_correct``: ρ(‖J(x)‖_F, CE(x)) over correctly classified points only.

    Args:
        points: the store's points frame (run_id, split, loss, correct, margin,
            jacobian_norm, jacobian_norm_logits, ...). Only ``split == "test"`` rows are
            used when a split column is present.

    Returns:
        DataFrame with columns ``PER_POINT_COLUMNS``, one row per model sorted by run_id;
        NaN where undefined (fewer than 3 points, a constant column, a missing column, or
        no errors / no correct points for the AUROCs).
    """
    if points.empty or "run_id" not in points.columns:
        return pd.DataFrame(columns=list(PER_POINT_COLUMNS))
    if "split" in points.columns:
        points = points.loc[points["split"] == "test"]
    rows = [_per_point_row(run_id, group) for run_id, group in points.groupby("run_id")]
    frame = pd.DataFrame(rows, columns=list(PER_POINT_COLUMNS))
    return frame.astype({"n_points": "int64", "n_errors": "int64"})


def per_point_distribution(
    summary: pd.DataFrame, metrics: Sequence[str] = DISTRIBUTION_METRICS
) -> pd.DataFrame:
    """Spread over models of the per-model Study 6 statistics.

    Args:
        summary: ``per_point_summary`` output (one row per model).
        metrics: its columns to summarise, in output order.

    Returns:
        DataFrame with columns ``DISTRIBUTION_COLUMNS``: per metric, the number of models
        with a finite value and the min, 10% quantile, median, 90% quantile and max over
        them (linear interpolation); NaN when no model has a value.
    """
    rows = []
    for metric in metrics:
        values = column(summary, metric)
        values = values[np.isfinite(values)]
        quantiles = (
            np.quantile(values, _QUANTILES) if len(values) else np.full(len(_QUANTILES), np.nan)
        )
        rows.append([metric, len(values), *(float(q) for q in quantiles)])
    frame = pd.DataFrame(rows, columns=list(DISTRIBUTION_COLUMNS))
    return frame.astype({"models": "int64"})


def max_probability(loss: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """The top softmax probability max_j p_j(x), from the stored loss and margin.

    With CE = −log p_y and margin m = z_y − max_{j≠y} z_j: every p_j / p_y = exp(z_j − z_y),
    so max_j p_j = p_y · exp(max(0, −m)) = exp(−CE + max(0, −m)). For a correct point
    (m ≥ 0) that is p_y itself; for a wrong one, p_y scaled by its logit deficit.

    Args:
        loss: per-point cross-entropy CE(x), shape ``[N]``.
        margin: per-point logit margin, shape ``[N]``.

    Returns:
        max_j p_j(x), shape ``[N]``.
    """
    return np.exp(_log_max_probability(loss, margin))


def _log_max_probability(loss: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """log max_j p_j = −CE + max(0, −margin), shape ``[N]`` (no underflow of p_y)."""
    return -np.asarray(loss, dtype=np.float64) + np.maximum(0.0, -np.asarray(margin, float))


def _per_point_row(run_id: str, group: pd.DataFrame) -> dict:
    """One model's row of ``per_point_summary``."""
    norm, loss = column(group, "jacobian_norm"), column(group, "loss")
    correct = column(group, "correct")
    known = np.isfinite(correct)  # points without a correctness flag enter no AUROC
    wrong = correct[known] == 0
    # 1 − p_max as −expm1(log p_max): exact to relative precision even when p_max ≈ 1.
    confidence_error = -np.expm1(_log_max_probability(loss, column(group, "margin")))
    is_correct = correct == 1
    return {
        "run_id": run_id,
        "n_points": len(group),
        "n_errors": int(wrong.sum()),
        "spearman_rho": _spearman(norm, loss),
        "auroc_error": _auroc(norm[known], wrong),
        "auroc_confidence": _auroc(confidence_error[known], wrong),
        "spearman_rho_logits": _spearman(column(group, "jacobian_norm_logits"), loss),
        "spearman_rho_correct": _spearman(norm[is_correct], loss[is_correct]),
    }


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ over jointly finite entries; NaN (no warning) when fewer than 3 or constant."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # defined above; scipy may still warn near-constant
        return float(stats.spearmanr(x, y).statistic)


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``score`` for ``positive`` via the rank-sum formula; NaN if a class is empty."""
    keep = np.isfinite(score)
    score, positive = score[keep], positive[keep]
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.nan
    ranks = stats.rankdata(score)  # average ranks: ties count half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
