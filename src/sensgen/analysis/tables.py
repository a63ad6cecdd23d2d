"""Tidy tables over a study's results: the models, their statuses, and rank correlations.

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
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

DONE = "done"
STATUSES = ("pending", "running", "done", "failed", "diverged")
PREDICTORS = ("jacobian_norm", "n_params", "train_loss")
NO_DATASET = "(none)"

MODEL_COLUMNS = (
    "run_id",
    "dataset",
    "width",
    "depth",
    "nonlinearity",
    "optimizer",
    "lr",
    "batch_size",
    "init_scale",
    "random_labels",
    "seed",
    "steps",
    "train_acc",
    "test_acc",
    "gap",
    "jacobian_norm",
    "n_params",
    "status",
)
_INTEGER_COLUMNS = ("width", "depth", "batch_size", "seed", "steps", "n_params")
CORRELATION_COLUMNS = (
    "dataset",
    "predictor",
    "n",
    "spearman_rho",
    "spearman_p",
    "kendall_tau",
    "kendall_p",
)


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


def model_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished model with the columns a reader wants, sorted by dataset and gap.

    Columns are ``MODEL_COLUMNS``; a column the input lacks is filled with NaN. Integral
    columns (width, depth, batch size, seed, steps, #weights) use pandas' nullable ``Int64``
    so that a full-batch run shows an empty batch size rather than ``nan``.

    Args:
        runs: the store's runs frame (one row per model).

    Returns:
        DataFrame with columns ``MODEL_COLUMNS``, one row per done model.
    """
    table = done_runs(runs).reindex(columns=list(MODEL_COLUMNS))
    for name in _INTEGER_COLUMNS:
        table[name] = _as_nullable_int(table[name])
    table = table.sort_values(["dataset", "gap", "run_id"], na_position="last", kind="stable")
    return table.reset_index(drop=True)


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

    Over each model's test points: Spearman ρ(‖J(x)‖_F, CE(x)), and the AUROC of ‖J(x)‖_F
    as a score for misclassification (probability that a random misclassified point has a
    larger norm than a random correct one, ties counted half). Paper §3 Study 6, claim 11.

    Args:
        points: the store's points frame (run_id, split, loss, correct, jacobian_norm, ...).
            Only ``split == "test"`` rows are used when a split column is present.

    Returns:
        DataFrame with columns run_id, n_points, spearman_rho, auroc_error; NaN where
        undefined (fewer than 3 points, a constant column, or no errors / no correct points).
    """
    columns = ["run_id", "n_points", "spearman_rho", "auroc_error"]
    if points.empty or "run_id" not in points.columns:
        return pd.DataFrame(columns=columns)
    if "split" in points.columns:
        points = points.loc[points["split"] == "test"]
    rows = []
    for run_id, group in points.groupby("run_id", sort=True):
        norm = column(group, "jacobian_norm")
        wrong = column(group, "correct") == 0
        rows.append(
            {
                "run_id": run_id,
                "n_points": len(group),
                "spearman_rho": rank_correlation(norm, column(group, "loss")).spearman_rho,
                "auroc_error": _auroc(norm, wrong),
            }
        )
    return pd.DataFrame(rows, columns=columns)


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


def _as_nullable_int(values: pd.Series) -> pd.Series:
    """Casts to ``Int64`` when every present value is integral; otherwise leaves it alone."""
    numeric = pd.to_numeric(values, errors="coerce")
    present = numeric.dropna()
    if numeric.isna().sum() != values.isna().sum():
        return values  # some entries are not numbers: keep them as they are
    if len(present) and not np.all(np.isfinite(present) & (present == np.round(present))):
        return values
    return numeric.round().astype("Int64")
