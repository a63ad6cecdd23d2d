"""Which of the paper's claims hold on a study: one pure function per kind of evidence.

Each returns `Claim`s: the paper's statement, the figure it comes from, what we measured
and a verdict (True: holds, False: does not, None: no verdict, e.g. too few models). The
report opens with them and repeats each under its figure. Verdict rules, stated so users
can check them:

* Fig. 5 (Study 5), "the gap rises with Jbar": holds when the bootstrap 95% interval of
  Spearman ρ lies above 0, does not hold when it lies below 0, and is inconclusive (no
  verdict) when it straddles 0 or fewer than 5 models have both values. The same rule for
  transitions (the paper calls that relation less consistent).
* Fig. 1 (Study 1), "#weights / final train loss do not explain the gap; Jbar does better":
  holds when the paired bootstrap interval of d = ρ(gap, Jbar) − |ρ(gap, baseline)|
  (`stats.spearman_advantage`: both ρ on the same resamples of the same models; the
  interval from those of ρ_J − ρ_B and ρ_J + ρ_B) lies above 0, does not hold when it lies
  below 0, inconclusive when it straddles 0 or fewer than 5 models have all three values.
  Two point estimates alone would call a Jbar ρ of +0.71 over 6 models, whose own interval
  straddles 0, better than a baseline at +0.06.
* Fig. 4 (Study 4), per factor and metric the paper makes a claim about: holds when the
  sign test gives p < 0.05 with most pairs on the paper's side of the diagonal, does not
  hold when p < 0.05 with most pairs on the other side, else no verdict.
* Study 6 (per point), "‖J(x)‖ rises with CE(x)" and "flags misclassified points better
  than chance": the models are counted by the side their within-model Spearman ρ(‖J(x)‖,
  CE) falls on (above 0), and their misclassification AUROC of ‖J(x)‖ (above 0.5); holds
  when the sign test over models gives p < 0.05 with most models above, does not hold
  when p < 0.05 with most below, else no verdict (5 models or fewer can never reach it:
  one model's ρ over its test points says nothing of the next model's). Only models
  trained on true labels count: a random-label model's test loss is against labels it
  never learnt (its ρ is negative: −0.2 in the quickstart). The medians and the
  confidence baseline's AUROC are reported beside them (no paper claim).
* Figs. 2 and 3 come from `sensgen.analysis.report_geometry`.

Example:
    >>> import pandas as pd
    >>> table = pd.DataFrame({"dataset": ["mnist"], "predictor": ["jacobian_norm"], "n": [40],
    ...                       "spearman_rho": [0.8], "spearman_low": [0.6],
    ...                       "spearman_high": [0.9]})
    >>> correlation_claims(table)[0].holds
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sensgen.analysis.numbers import percent, signed
from sensgen.analysis.pairs import EXPECTED, sign_test
from sensgen.analysis.stats import ADVANTAGE_COLUMNS
from sensgen.analysis.tables import column, per_point_distribution

MIN_MODELS = 5  # fewer models than this: no verdict on a correlation
SIGNIFICANCE = 0.05
_PREDICTOR_TEXT = {
    "jacobian_norm": "mean test Jacobian norm (Jbar)",
    "transitions": "transitions along ellipses through test points",
    "n_params": "number of weights",
    "train_loss": "final train loss",
}
_METRIC_TEXT = {"gap": "gap", "jacobian_norm": "Jbar", "transitions": "transitions"}


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, checked on this study."""

    figure: str  # e.g. "Fig. 5", "Fig. 4a"
    paper: str  # the paper's statement
    measured: str  # our number(s), in words
    holds: bool | None  # None: no verdict

    @property
    def verdict(self) -> str:
        return {True: "holds", False: "does not hold", None: "inconclusive"}[self.holds]


def correlation_claims(table: pd.DataFrame) -> list[Claim]:
    """Fig. 5 and Fig. 1 claims per dataset from `stats.correlation_table`'s frame."""
    claims = []
    for dataset, rows in table.groupby("dataset", sort=True):
        by = rows.set_index("predictor")
        for predictor in ("jacobian_norm", "transitions"):
            if predictor in by.index and by.loc[predictor, "n"] > 0:
                claims.append(_rises(dataset, predictor, by.loc[predictor]))
        if "jacobian_norm" in by.index:
            for baseline in ("n_params", "train_loss"):
                if baseline in by.index and by.loc[baseline, "n"] > 0:
                    claims.append(_beats(dataset, by.loc["jacobian_norm"], baseline, by))
    return claims


def pair_claims(outcomes: pd.DataFrame, factor: str, other_label: str) -> list[Claim]:
    """Fig. 4 claims from `pairs.pair_outcomes`, for the metrics the paper speaks about.

    `other_label` names the other member in each statement; where the outcomes hold several
    other roles (a factor with several values: relu against relu6 and hard_tanh), each
    statement names its own role instead, "factor = role", or two rows would make the same
    statement with opposite verdicts."""
    claims = []
    expected = EXPECTED.get(factor, {})
    several = outcomes["other_role"].nunique() > 1 if "other_role" in outcomes else False
    for row in outcomes.itertuples(index=False):
        label = f"{factor} = {row.other_role}" if several else other_label
        if expected.get(row.metric) is not True:
            continue
        metric = _METRIC_TEXT.get(row.metric, row.metric)
        if row.n == 0:
            holds, measured = None, "no pair with both values"
        else:
            holds = sign_verdict(row.share, row.p_value)
            measured = (
                f"{row.n_expected} of {row.n} pairs ({percent(row.share)}) have the higher "
                f"{metric} with {row.other_role}; sign test p = {row.p_value:.2g}"
            )
        claims.append(
            Claim(
                "Fig. 4",
                f"{factor}: the member with {label} has the higher {metric}",
                measured,
                holds,
            )
        )
    return claims


def per_point_claims(summary: pd.DataFrame) -> list[Claim]:
    """Study 6 claims from `tables.per_point_summary`'s frame (one row per model; module
    docstring: the rule). With a ``random_labels`` column, only its rows at 0 count."""
    if "metric" in summary.columns:  # (before this version it took the distribution)
        raise TypeError("per_point_claims takes per_point_summary's frame, one row per model")
    left_out = ""
    if "random_labels" in summary.columns:
        random = column(summary, "random_labels") != 0
        summary = summary.loc[~random]
        left_out = f" trained on true labels ({_count(int(random.sum()), 'random-label model')} "
        left_out += "left out: their test loss is against labels they never learnt)"
    by = per_point_distribution(summary).set_index("metric")
    claims = []
    if by.loc["spearman_rho", "models"] > 0:
        rho = by.loc["spearman_rho"]
        holds, test = _models_above(column(summary, "spearman_rho"), 0.0)
        claims.append(
            Claim(
                "Study 6",
                "per test point, ‖J(x)‖ rises with the point's cross-entropy",
                f"median within-model Spearman ρ = {signed(rho['median'])} over "
                f"{_count(int(rho['models']), 'model')}{left_out} (range "
                f"{signed(rho['min'])} to {signed(rho['max'])}); {test}",
                holds,
            )
        )
    if by.loc["auroc_error", "models"] > 0:
        auroc = by.loc["auroc_error"]
        baseline = by.loc["auroc_confidence", "median"]
        extra = "" if math.isnan(baseline) else f" (softmax-confidence baseline: {baseline:.3f})"
        holds, test = _models_above(column(summary, "auroc_error"), 0.5)
        claims.append(
            Claim(
                "Study 6",
                "‖J(x)‖ flags misclassified test points better than chance (AUROC > 0.5)",
                f"median AUROC = {auroc['median']:.3f}{extra}; {test}",
                holds,
            )
        )
    return claims


def _models_above(values, level: float) -> tuple[bool | None, str]:
    """Verdict and words of the sign test of the models' `values` against `level`."""
    test = sign_test(np.full(len(values), level), values)
    if test.n == 0:
        return None, "no model off the line"
    words = f"{test.n_expected} of {_count(test.n, 'model')} above {level:g}, sign test p = "
    return sign_verdict(test.share, test.p_value), words + f"{test.p_value:.2g}"


def sign_verdict(share: float, p_value: float) -> bool | None:
    """A sign test's verdict (`pairs.sign_test`): True when p < 0.05 with most on the
    paper's side (``share`` > 1/2), False when most are on the other, else None (NaN when
    nothing was tested: None)."""
    significant = p_value < SIGNIFICANCE and share != 0.5
    return bool(share > 0.5) if significant else None


def _rises(dataset: str, predictor: str, row: pd.Series) -> Claim:
    paper = f"{dataset}: the gap rises with the {_PREDICTOR_TEXT[predictor]}"
    n = int(row["n"])
    measured = (
        f"Spearman ρ = {signed(row['spearman_rho'])} "
        f"[{signed(row['spearman_low'])}, {signed(row['spearman_high'])}], n = {n}"
    )
    if math.isnan(row["spearman_rho"]):  # say why, not just "n/a"
        measured = f"Spearman ρ = {_rho(row)}, n = {n}"
    low, high = row["spearman_low"], row["spearman_high"]
    holds = None
    if n >= MIN_MODELS and not (math.isnan(low) or math.isnan(high)):
        holds = True if low > 0 else False if high < 0 else None
    figure = "Fig. 5" if predictor == "jacobian_norm" else "Fig. 5 (companion)"
    return Claim(figure, paper, measured, holds)


def _beats(dataset: str, jacobian: pd.Series, baseline: str, by: pd.DataFrame) -> Claim:
    other = by.loc[baseline]
    paper = f"{dataset}: the {_PREDICTOR_TEXT[baseline]} does not explain the gap; Jbar does better"
    # Jbar must correlate more strongly than the baseline in either direction (a baseline
    # at ρ = −0.9 explains the gap, reversed, better than Jbar at +0.3), beyond the
    # resampling noise of the two ρ together (module docstring).
    d, low, high = (other.get(c, math.nan) for c in ADVANTAGE_COLUMNS)
    difference = f"{signed(d)} [{signed(low)}, {signed(high)}]"
    if math.isnan(d):
        difference = "n/a (needs both ρ)"
    measured = (
        f"ρ(gap, {_PREDICTOR_TEXT[baseline]}) = {_rho(other)} vs "
        f"ρ(gap, Jbar) = {_rho(jacobian)}; ρ_Jbar − |ρ_baseline| = {difference}"
    )
    n = min(int(jacobian["n"]), int(other["n"]))
    holds = None
    if n >= MIN_MODELS and not (math.isnan(low) or math.isnan(high)):
        holds = True if low > 0 else False if high < 0 else None
    return Claim("Fig. 1", paper, measured, holds)


def _rho(row: pd.Series) -> str:
    """A row's Spearman ρ, or "n/a" with the reason from the table's ``note`` column
    (`report_sections` adds it: too few models, or a column the same for every model)."""
    note = row.get("note", "")
    if math.isnan(row["spearman_rho"]) and isinstance(note, str) and note:
        return f"n/a ({note})"
    return signed(row["spearman_rho"])


def _count(n: int, noun: str) -> str:
    """The count with its noun: 1 model, 3 models."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
