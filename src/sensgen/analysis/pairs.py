"""Matched pairs of models that differ in one factor: tables and sign tests (paper Fig. 4).

Novak et al. (2018), §3 Study 4 (Fig. 4) and claims 6–9 of §5: each pair is two (or more)
networks identical in hyper-parameters, initial weights and data order but for one factor
(random labels, augmentation, nonlinearity, full batch). One member is expected to
generalize better; the paper plots the better member on x against the other on y and finds
the other above the diagonal y = x for the gap and the mean test Jacobian norm Jbar.

* `pair_table`: one row per comparison (better member vs one other member of a pair).
* `pair_accounting` / `pair_counts`: every planned comparison, and why those that
  `pair_table` leaves out were dropped (a member failed, diverged, is not finished, or is
  below the inclusion rule): the pairs lost are a selection, so the report says how many.
* `pair_outcomes`: per other role and metric, how many pairs lie above the diagonal, with a
  two-sided sign test against "above or below with equal odds".
* `EXPECTED`: the paper's direction per factor and metric, for the report to compare with.

A study's ``[pairs] values`` lists the better member first; its role string (the store's
``pair_role``) is ``role_of(factor, values[0])``. Pass every run with the study's inclusion
rule marked (`sensgen.analysis.inclusion.mark_included`): a pair with a member the rule
leaves out then drops out as a whole, and `pair_accounting` can say so.

Example:
    >>> import pandas as pd
    >>> runs = pd.DataFrame({
    ...     "run_id": ["a", "b", "c", "d"], "status": "done", "dataset": "fashion_mnist",
    ...     "pair_id": ["p", "p", "q", "q"], "pair_role": ["0.0", "1.0", "0.0", "1.0"],
    ...     "gap": [0.2, 0.9, 0.1, 0.9], "jacobian_norm": [1.0, 6.0, 2.0, 9.0],
    ... })
    >>> table = pair_table(runs, better_role=role_of("random_labels", 0))
    >>> table[["pair_id", "other_role", "gap_better", "gap_other"]].to_numpy().tolist()
    [['p', '1.0', 0.2, 0.9], ['q', '1.0', 0.1, 0.9]]
    >>> outcomes = pair_outcomes(table).set_index("metric")
    >>> row = outcomes.loc["jacobian_norm"]
    >>> int(row["n_expected"]), int(row["n"]), float(row["p_value"])
    (2, 2, 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from sensgen.analysis.tables import DONE, column, dataset_labels
from sensgen.planner import _role
from sensgen.spec import RunSpec

METRICS: Final = ("gap", "jacobian_norm", "transitions")

# The paper's claim per factor and metric (§3 Study 4, §5 claims 6–9): True = the other
# member (worse-generalizing) has the higher value, i.e. lies above y = x; False = the
# lower value; None = no directional claim.
EXPECTED: Final[Mapping[str, Mapping[str, bool | None]]] = {
    # 4a, claim 6: random labels raise gap (≈ 0.9), Jbar (nearly all pairs) and,
    # slightly but consistently, transitions.
    "random_labels": {"gap": True, "jacobian_norm": True, "transitions": True},
    # 4b, claim 7: without augmentation, gap, Jbar (every pair) and transitions are higher.
    "augment": {"gap": True, "jacobian_norm": True, "transitions": True},
    # 4c, claim 8: ReLU has the lower gap and Jbar; the paper makes no transitions claim.
    "nonlinearity": {"gap": True, "jacobian_norm": True, "transitions": None},
    # 4d, claim 9: full batch raises gap and Jbar; transitions are the paper's stated
    # exception (no consistent direction).
    "batch_size": {"gap": True, "jacobian_norm": True, "transitions": None},
}

# Why a planned comparison has no row in `pair_table`, in the order a reason is chosen
# when both members have one (the most definite first; "excluded" alone is the rule's).
DROP_REASONS: Final[Mapping[str, str]] = {
    "missing": "a member missing from the results",
    "failed": "a member failed",
    "diverged": "a member diverged",
    "not_finished": "a member not finished (pending or running)",
    "excluded": "a member below the inclusion rule",
}
ACCOUNTING_COLUMNS: Final = ("pair_id", "dataset", "other_role", "dropped")
_STATUS_REASONS: Final = {"failed": "failed", "diverged": "diverged"}
OUTCOME_COLUMNS: Final = (
    "other_role",
    "metric",
    "comparisons",
    "n",
    "n_expected",
    "ties",
    "share",
    "p_value",
    "median_ratio",
    "ratio_pairs",
)


class SignTest(NamedTuple):
    """Sign test of ``other > better`` over the pairs where both values are finite.

    Attributes:
        n: pairs with both values finite and unequal.
        n_expected: pairs with other > better (above the diagonal of Fig. 4).
        ties: pairs with both values finite and equal (not in n).
        share: n_expected / n (NaN when n = 0).
        p_value: two-sided binomial test of n_expected out of n at 1/2 (NaN when n = 0).
    """

    n: int
    n_expected: int
    ties: int
    share: float
    p_value: float


def role_of(factor: str, value: Any) -> str:
    """The ``pair_role`` string the planner gives a factor value, e.g. 0 → "0.0".

    The value is first validated as a run field, so ``[pairs] values`` as written in a
    study (``0``, ``true``, ``"full"``) map to the roles stored for its runs.

    Example:
        >>> [role_of("random_labels", 1), role_of("augment", False), role_of("batch_size", "full")]
        ['1.0', 'false', 'full']
    """
    return _role(RunSpec.model_validate({factor: value}).model_dump(mode="json")[factor])


def pair_table(
    runs: pd.DataFrame, *, better_role: str, metrics: Sequence[str] = METRICS
) -> pd.DataFrame:
    """One row per comparison of a pair's better member with one of its other members.

    Only finished models count (``status == "done"``), and of those only the ones the
    inclusion rule keeps when ``runs`` has an ``included`` column (`mark_included`); a pair
    whose better member does not count gives no row, and neither does an other member that
    does not count (`pair_accounting` says why). Rows without a ``pair_id`` (unpaired
    models) are ignored. A pair of k members gives k − 1 rows.

    Args:
        runs: the store's runs frame (run_id, status, dataset, pair_id, pair_role and the
            metric columns; a missing metric column reads as NaN).
        better_role: the ``pair_role`` of the member expected to generalize better, e.g.
            ``role_of(factor, values[0])``.
        metrics: metric columns to carry.

    Returns:
        DataFrame with columns pair_id, dataset, better_role, other_role, better_run_id,
        other_run_id, then ``<metric>_better`` and ``<metric>_other`` (float64) per metric;
        sorted by dataset, pair_id, other_role.

    Raises:
        ValueError: ``better_role`` is no role of any paired run (listing those present), or
            a pair has two runs in one role.
    """
    paired = _paired_rows(runs, better_role)
    compared = paired.loc[_member_states(paired) == ""].reset_index(drop=True)
    members = _member_frame(compared, metrics)
    better = members.loc[members["pair_role"] == better_role].drop(columns="dataset")
    other = members.loc[members["pair_role"] != better_role]
    table = other.merge(better, on="pair_id", suffixes=("_other", "_better"))
    table = table.rename(
        columns={"pair_role_better": "better_role", "pair_role_other": "other_role"}
    )
    value_columns = [f"{m}_{side}" for m in metrics for side in ("better", "other")]
    order = ["pair_id", "dataset", "better_role", "other_role", "run_id_better", "run_id_other"]
    table = table[[*order, *value_columns]].rename(
        columns={"run_id_better": "better_run_id", "run_id_other": "other_run_id"}
    )
    table = table.sort_values(["dataset", "pair_id", "other_role"], kind="stable")
    return table.reset_index(drop=True)


def pair_accounting(runs: pd.DataFrame, *, better_role: str) -> pd.DataFrame:
    """Every planned comparison, and why `pair_table` drops the ones it drops.

    A pair plans one comparison of its better member with each other role the study's
    pairs hold; each is either compared (a `pair_table` row) or dropped because a member is
    missing, failed, diverged, is not finished, or is below the inclusion rule (``runs``'
    ``included`` column, when present). When both members have a reason, the first in
    `DROP_REASONS` order counts, so each comparison is counted once.

    Args:
        runs: the store's runs frame, every status, ideally with ``included`` marked.
        better_role: as for `pair_table`.

    Returns:
        DataFrame with columns ``ACCOUNTING_COLUMNS``: pair_id, dataset, other_role and
        ``dropped``: "" when compared, else a key of `DROP_REASONS`; sorted like
        `pair_table`.

    Raises:
        ValueError: as `pair_table`.
    """
    paired = _paired_rows(runs, better_role)
    ids, roles = paired["pair_id"].astype(str), paired["pair_role"].astype(str)
    state = dict(zip(zip(ids, roles, strict=True), _member_states(paired), strict=True))
    datasets = dict(zip(ids, dataset_labels(paired), strict=True))
    others = sorted(set(roles) - {better_role})
    rows = []
    for pair_id in sorted(set(ids)):
        better = state.get((pair_id, better_role), "missing")
        for role in others:
            states = {better, state.get((pair_id, role), "missing")}
            dropped = next((reason for reason in DROP_REASONS if reason in states), "")
            rows.append((pair_id, datasets[pair_id], role, dropped))
    frame = pd.DataFrame(rows, columns=list(ACCOUNTING_COLUMNS), dtype=object)
    frame = frame.sort_values(["dataset", "pair_id", "other_role"], kind="stable")
    return frame.reset_index(drop=True)


def pair_counts(accounting: pd.DataFrame) -> dict[str, Any]:
    """Totals of a `pair_accounting` frame, JSON-ready: planned and compared pairs (a pair
    counts as compared when at least one of its comparisons is) and comparisons, and the
    dropped comparisons per `DROP_REASONS` key (zeros included)."""
    dropped = accounting["dropped"]
    kept = dropped == ""
    return {
        "planned_pairs": int(accounting["pair_id"].nunique()),
        "compared_pairs": int(accounting.loc[kept, "pair_id"].nunique()),
        "planned_comparisons": len(accounting),
        "compared_comparisons": int(kept.sum()),
        "dropped": {reason: int((dropped == reason).sum()) for reason in DROP_REASONS},
    }


def pair_count_text(counts: Mapping[str, Any]) -> str:
    """How many planned pairs (or comparisons, with more than two members) are compared
    and why the others were dropped, e.g. "2 of 4 planned pairs compared; 2 dropped: a
    member below the inclusion rule (2)"."""
    n_pairs, n = counts["planned_pairs"], counts["planned_comparisons"]
    kept = counts["compared_comparisons"]
    text = f"{kept} of {n} planned pairs compared"
    if n != n_pairs:  # the better member against each other member of each pair
        text = f"{kept} of {n} planned comparisons ({n_pairs} pairs) compared"
    reasons = [f"{DROP_REASONS[k]} ({v})" for k, v in counts["dropped"].items() if v]
    return f"{text}; {n - kept} dropped: {', '.join(reasons)}" if reasons else text


def _member_states(members: pd.DataFrame) -> np.ndarray:
    """Per row, "" when the model counts in a comparison, else its `DROP_REASONS` key.

    Like `done_runs`, a frame without a status column has no finished model.
    """
    n = len(members)
    if "status" not in members.columns:
        return np.full(n, "not_finished", dtype=object)
    status = members["status"].astype(str).to_numpy()
    kept = members["included"].to_numpy(bool) if "included" in members.columns else np.ones(n)
    unfinished = [_STATUS_REASONS.get(s, "not_finished") for s in status]
    done = np.where(kept.astype(bool), "", "excluded")
    return np.where(status == DONE, done, np.array(unfinished, dtype=object)).astype(object)


def _paired_rows(runs: pd.DataFrame, better_role: str) -> pd.DataFrame:
    """Rows with a pair id and role; checks that ``better_role`` names one of the roles."""
    if "pair_id" not in runs.columns or "pair_role" not in runs.columns:
        return runs.iloc[0:0].assign(pair_id="", pair_role="")
    paired = runs.loc[runs["pair_id"].notna() & runs["pair_role"].notna()]
    roles = sorted(set(paired["pair_role"].astype(str)))
    if roles and better_role not in roles:
        raise ValueError(
            f"better_role {better_role!r} matches no pair_role of the paired runs; roles "
            f"present: {', '.join(map(repr, roles))}. Use role_of(factor, values[0])."
        )
    duplicated = paired.duplicated(["pair_id", "pair_role"], keep=False)
    if duplicated.any():
        first = paired.loc[duplicated].iloc[0]
        raise ValueError(
            f"pair {first['pair_id']!r} has several runs in role {first['pair_role']!r}; "
            "each member of a pair needs its own value of the factor."
        )
    return paired


def _member_frame(done: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """pair_id, dataset, run_id, pair_role (all str) and the metrics as float64."""
    frame = done.reindex(columns=["pair_id", "run_id", "pair_role"]).astype(str)
    frame.insert(1, "dataset", dataset_labels(done))
    for metric in metrics:
        frame[metric] = column(done, metric)
    return frame


def sign_test(better: np.ndarray, other: np.ndarray) -> SignTest:
    """Counts pairs with other > better and tests that share against 1/2 (two-sided).

    Args:
        better: array of shape ``[P]``, the better member's values.
        other: array of shape ``[P]``, the other member's values; pairs where either is
            not finite are left out.

    Returns:
        A `SignTest`. Example: 8 of 8 pairs above the diagonal give p = 2 / 2⁸.
    """
    better = np.asarray(better, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    finite = np.isfinite(better) & np.isfinite(other)
    ties = int((finite & (better == other)).sum())
    n = int(finite.sum()) - ties
    k = int((finite & (other > better)).sum())
    if n == 0:
        return SignTest(0, 0, ties, np.nan, np.nan)
    return SignTest(n, k, ties, k / n, float(stats.binomtest(k, n, 0.5).pvalue))


def pair_outcomes(table: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Per other role and metric: the share of pairs above the diagonal, with a sign test.

    Paper §3 Study 4: the worse-generalizing member should show the higher gap and Jbar
    (see `EXPECTED` for each factor's claims). ``median_ratio`` is the median of
    other / better over the ``ratio_pairs`` pairs where both are positive (the paper's "×3
    to ×100" scale): a subset of the n pairs when some value is 0 or negative (a gap below
    0, a dead network's Jbar of 0), which the report says beside it.

    Args:
        table: a `pair_table` frame.
        metrics: the metrics to test; each needs ``<metric>_better`` and ``<metric>_other``
            (absent columns read as NaN, giving n = 0).

    Returns:
        DataFrame with columns ``OUTCOME_COLUMNS``: other_role, metric, comparisons (rows of
        the table), n, n_expected, ties, share, p_value, median_ratio, ratio_pairs; roles
        sorted, metrics in the given order. share, p_value and median_ratio are NaN when
        undefined.
    """
    rows = []
    roles = table["other_role"] if "other_role" in table.columns else pd.Series(dtype=str)
    for role in sorted(roles.unique()):
        group = table.loc[roles == role]
        for metric in metrics:
            better = column(group, f"{metric}_better")
            other = column(group, f"{metric}_other")
            rows.append(
                {
                    "other_role": role,
                    "metric": metric,
                    "comparisons": len(group),
                    **sign_test(better, other)._asdict(),
                    "median_ratio": _median_ratio(better, other),
                    "ratio_pairs": int(_ratio_kept(better, other).sum()),
                }
            )
    frame = pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS))
    counts = ("comparisons", "n", "n_expected", "ties", "ratio_pairs")
    return frame.astype(dict.fromkeys(counts, "int64"))


def _median_ratio(better: np.ndarray, other: np.ndarray) -> float:
    """Median of other / better over pairs where both are finite and positive; else NaN."""
    keep = _ratio_kept(better, other)
    return float(np.median(other[keep] / better[keep])) if keep.any() else np.nan


def _ratio_kept(better: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The pairs a ratio is defined for: both values finite and positive."""
    return np.isfinite(better) & np.isfinite(other) & (better > 0) & (other > 0)
