"""The paper's inclusion rule: which finished models the analysis keeps (paper §4).

The paper analyses only models that fit their training set: 100% training accuracy (99.9%
for CIFAR-100, whose FC nets rarely reach 100%). A study's ``[inclusion]`` table sets the
rule: ``apply = false`` keeps every finished model (the paper's augmentation pairs, Fig. 4b,
were reportedly not filtered), ``min_train_acc`` overrides the threshold.

`mark_included` adds a boolean ``included`` column; `analysed_runs` drops the finished models
that fail the rule, so every figure and statistic downstream sees only included models while
status counts still see every run.

Example:
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"status": ["done", "done", "failed"], "dataset": "mnist",
    ...                      "train_acc": [1.0, 0.98, float("nan")]})
    >>> mark_included(runs, apply=True)["included"].tolist()
    [True, False, False]
    >>> len(analysed_runs(runs, apply=True))
    2
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sensgen.analysis.tables import DONE, column

# Training accuracy a model needs by dataset when the study sets no min_train_acc.
DEFAULT_THRESHOLD = 1.0
THRESHOLDS = {"cifar100": 0.999}


def thresholds(runs: pd.DataFrame, min_train_acc: float | None = None) -> np.ndarray:
    """Per row, the training accuracy the rule asks for (float64 [N])."""
    if min_train_acc is not None:
        return np.full(len(runs), float(min_train_acc))
    datasets = runs["dataset"] if "dataset" in runs.columns else pd.Series([""] * len(runs))
    return datasets.map(lambda d: THRESHOLDS.get(d, DEFAULT_THRESHOLD)).to_numpy(np.float64)


def mark_included(
    runs: pd.DataFrame, *, apply: bool = True, min_train_acc: float | None = None
) -> pd.DataFrame:
    """A copy of ``runs`` with ``included``: done and (if ``apply``) train_acc ≥ threshold.

    The comparison allows 1e-12 of rounding, so a model with every training point right
    (train_acc = 1.0 exactly) is always in.
    """
    done = (runs["status"] == DONE).to_numpy() if "status" in runs.columns else np.ones(len(runs))
    fits = column(runs, "train_acc") >= thresholds(runs, min_train_acc) - 1e-12
    included = done.astype(bool) & (fits if apply else True)
    return runs.assign(included=included)


def analysed_runs(
    runs: pd.DataFrame, *, apply: bool = True, min_train_acc: float | None = None
) -> pd.DataFrame:
    """``runs`` less the finished models that fail the rule (other statuses are kept)."""
    marked = mark_included(runs, apply=apply, min_train_acc=min_train_acc)
    if "status" not in marked.columns:  # every row counts as finished
        return marked.loc[marked["included"]].reset_index(drop=True)
    done = marked["status"] == DONE
    return marked.loc[~done | marked["included"]].reset_index(drop=True)
