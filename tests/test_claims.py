"""The verdicts the report opens with: hand-built inputs with known answers."""

import json

import numpy as np
import pandas as pd
import pytest

from sensgen.analysis import write_report
from sensgen.analysis.claims import (
    MIN_MODELS,
    correlation_claims,
    pair_claims,
    per_point_claims,
)
from sensgen.analysis.pairs import pair_outcomes, pair_table
from sensgen.analysis.stats import ADVANTAGE_COLUMNS, correlation_table
from test_report import check_report


def _table(rho_j, low_j, rho_params, n=40, advantage=(0.0, -0.1, 0.1)):
    """A correlation table; `advantage`: Jbar's (d, low, high) over #weights."""
    nan3 = (np.nan, np.nan, np.nan)
    rows = [
        ("jacobian_norm", rho_j, low_j, min(rho_j + 0.1, 1.0), *nan3),
        ("n_params", rho_params, rho_params - 0.2, rho_params + 0.2, *advantage),
    ]
    return pd.DataFrame(
        [("mnist", p, n, *rest) for p, *rest in rows],
        columns=["dataset", "predictor", "n", "spearman_rho", "spearman_low", "spearman_high",
                 *ADVANTAGE_COLUMNS],
    )  # fmt: skip


def test_jbar_claim_holds_only_when_its_interval_is_above_zero():
    rises, _ = correlation_claims(_table(0.7, 0.5, 0.1))
    assert (rises.figure, rises.holds) == ("Fig. 5", True) and "+0.70" in rises.measured
    rises, _ = correlation_claims(_table(0.2, -0.1, 0.4))
    assert rises.holds is None and rises.verdict == "inconclusive"  # interval straddles 0
    rises, _ = correlation_claims(_table(-0.6, -0.8, 0.4))  # interval [-0.8, -0.5]
    assert rises.holds is False
    few = correlation_claims(_table(0.9, 0.8, 0.1, n=MIN_MODELS - 1, advantage=(0.8, 0.5, 1.0)))
    assert [c.holds for c in few] == [None, None]


@pytest.mark.parametrize(
    ("advantage", "holds"),
    [((0.6, 0.2, 0.9), True), ((-0.6, -0.9, -0.2), False), ((0.6, -0.05, 1.0), None),
     ((np.nan, np.nan, np.nan), None)],
)  # fmt: skip
def test_jbar_does_better_only_when_the_paired_interval_of_the_difference_clears_zero(
    advantage, holds
):
    # The point estimates (+0.7 against +0.1) are the same in every case: the verdict
    # follows the interval of ρ_Jbar − |ρ_baseline| alone.
    _, beats = correlation_claims(_table(0.7, 0.5, 0.1, advantage=advantage))
    assert beats.figure == "Fig. 1" and beats.holds is holds
    assert "ρ_Jbar − |ρ_baseline| = " in beats.measured


def test_few_noisy_models_give_no_verdict_on_jbar_doing_better():
    # The audit's case: 6 models, Jbar's ρ high but its interval straddling 0, the
    # baseline's near 0. Two point estimates said "holds"; the paired interval does not.
    rng = np.random.default_rng(4)
    gap = np.arange(6.0)
    runs = pd.DataFrame({
        "run_id": [f"r{i}" for i in range(6)], "status": "done", "dataset": "mnist",
        "gap": gap, "jacobian_norm": gap + rng.normal(0, 2.5, 6),
        "n_params": rng.permutation(6).astype(float) * 1e4, "train_loss": rng.random(6),
    })  # fmt: skip
    table = correlation_table(runs, n_boot=1000)
    rises, *beats = correlation_claims(table[table["n"] > 0])
    assert rises.holds is None
    by = table.set_index("predictor")
    for baseline in ("n_params", "train_loss"):  # Jbar ahead on the point estimates
        assert by.loc["jacobian_norm", "spearman_rho"] > abs(by.loc[baseline, "spearman_rho"])
    assert [b.holds for b in beats] == [None, None]


def _paired_runs(n_pairs=8, flip=0):
    """Pairs (true vs random labels): the random member has the higher gap and Jbar,
    except in the first ``flip`` pairs."""
    rows = []
    for i in range(n_pairs):
        up = -1.0 if i < flip else 1.0
        for role, sign in (("0.0", 0.0), ("1.0", up)):
            rows.append(
                {
                    "run_id": f"r{i}-{role}", "status": "done", "dataset": "mnist",
                    "pair_id": f"p{i}", "pair_role": role, "random_labels": float(role),
                    "gap": 0.3 + 0.2 * sign + 0.01 * i, "jacobian_norm": 1.0 + sign + 0.1 * i,
                    "transitions": np.nan, "train_acc": 1.0, "n_params": 1000 + i,
                    "train_loss": 1e-3,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_pair_claims_need_a_majority_and_a_significant_sign_test():
    outcomes = pair_outcomes(pair_table(_paired_runs(), better_role="0.0"))
    claims = pair_claims(outcomes, "random_labels", "random labels")
    by = {c.paper.split("higher ")[-1]: c for c in claims}
    assert by["gap"].holds and by["Jbar"].holds  # 8 of 8, p = 2/256
    assert by["transitions"].holds is None  # no values
    outcomes = pair_outcomes(pair_table(_paired_runs(flip=2), better_role="0.0"))
    gap = next(c for c in pair_claims(outcomes, "random_labels", "x") if "gap" in c.paper)
    assert gap.holds is None  # 6 of 8: p = 0.29, inconclusive
    outcomes = pair_outcomes(pair_table(_paired_runs(flip=8), better_role="0.0"))
    gap = next(c for c in pair_claims(outcomes, "random_labels", "x") if "gap" in c.paper)
    assert gap.holds is False  # 0 of 8 on the paper's side, p = 2/256


def test_a_pair_claim_never_rounds_its_share_onto_100_percent():
    outcomes = pd.DataFrame({
        "other_role": ["1.0"], "metric": ["gap"], "n": [200], "n_expected": [199],
        "share": [199 / 200], "p_value": [1e-50],
    })  # fmt: skip
    [claim] = pair_claims(outcomes, "random_labels", "random labels")
    assert "199 of 200 pairs (99.5%)" in claim.measured and claim.holds


def test_each_pair_claim_names_its_own_role_when_a_factor_has_several_values():
    # relu against relu6 (the paper's side in every pair) and against hard_tanh (never).
    runs = _paired_runs()
    runs["pair_role"] = runs["pair_role"].map({"0.0": "relu", "1.0": "relu6"})
    third = runs[runs["pair_role"] == "relu6"].assign(
        pair_role="hard_tanh", gap=0.0, jacobian_norm=0.0, run_id=lambda f: f["run_id"] + "h"
    )
    outcomes = pair_outcomes(pair_table(pd.concat([runs, third]), better_role="relu"))
    claims = pair_claims(outcomes, "nonlinearity", "nonlinearity = relu6, hard_tanh")
    gap = {c.paper: c.holds for c in claims if c.paper.endswith("higher gap")}
    assert gap == {
        "nonlinearity: the member with nonlinearity = hard_tanh has the higher gap": False,
        "nonlinearity: the member with nonlinearity = relu6 has the higher gap": True,
    }


def test_report_of_pairs_whose_better_members_were_all_excluded(tmp_path):
    # Augmented members that miss 100% training accuracy: the inclusion rule removes every
    # "better" member. The report says so (and how the paper treats Study 4b), no crash.
    runs = _paired_runs()
    runs["pair_role"] = runs["pair_role"].map({"0.0": "true", "1.0": "false"})
    runs.loc[runs["pair_role"] == "true", "train_acc"] = 0.998
    pairs = {"factor": "augment", "values": [True, False]}
    index = write_report(tmp_path, runs=runs, pairs=pairs, inclusion={"apply": True}, n_boot=50)
    page = index.read_text()
    assert "No pairs to compare" in page and "inclusion.apply=false" in page
    kept = write_report(tmp_path, runs=runs, pairs=pairs, inclusion={"apply": False}, n_boot=50)
    summary = json.loads((kept.parent / "summary.json").read_text())
    assert summary["pairs"] == 8


def test_per_point_claims_count_the_models_on_each_side():
    # One row per model. 8 of 8 ρ above 0: p = 2/2⁸, holds; AUROC: 6 of 8 above 0.5
    # (p = 0.29), no verdict, though the median is above 0.5.
    summary = pd.DataFrame(
        {
            "spearman_rho": [0.5, 0.6, 0.7, 0.8, 0.8, 0.85, 0.9, 0.9],
            "auroc_error": [0.45, 0.49, 0.6, 0.6, 0.62, 0.7, 0.7, 0.7],
            "auroc_confidence": [0.8] * 8,
        }
    )
    rho, auroc = per_point_claims(summary)
    assert rho.holds is True and "8 of 8 models above 0, sign test p = 0.0078" in rho.measured
    assert "median within-model Spearman ρ = +0.80 over 8 models" in rho.measured
    assert auroc.holds is None and "6 of 8 models above 0.5, sign test p = 0.29" in auroc.measured
    assert "median AUROC = 0.610 (softmax-confidence baseline: 0.800)" in auroc.measured
    # Most models on the other side, significantly: does not hold.
    (below,) = per_point_claims(pd.DataFrame({"spearman_rho": [-0.1] * 7 + [-0.2]}))
    assert below.holds is False and "0 of 8 models above 0" in below.measured


def test_per_point_claims_judge_the_models_trained_on_true_labels():
    # The quickstart: 16 true-label models at ρ ≈ +0.99, 12 random-label ones at ρ ≈ −0.2
    # (their test loss is against labels they never learnt). Together: 16 of 28, p = 0.57.
    summary = pd.DataFrame(
        {
            "spearman_rho": [0.99] * 16 + [-0.2] * 12,
            "auroc_error": [0.9] * 16 + [0.5] * 12,
            "random_labels": [0.0] * 16 + [1.0] * 12,
        }
    )
    rho, auroc = per_point_claims(summary)
    assert rho.holds is True and "16 of 16 models above 0" in rho.measured
    assert "over 16 models trained on true labels (12 random-label models left out" in (
        rho.measured
    )
    assert auroc.holds is True and "median AUROC = 0.900" in auroc.measured
    mixed = per_point_claims(summary.drop(columns="random_labels"))
    assert mixed[0].holds is None and "16 of 28 models above 0" in mixed[0].measured


@pytest.mark.parametrize("n", [1, 5])
def test_per_point_claims_give_no_verdict_on_five_models_or_fewer(n):
    # A sign test over n ≤ 5 models cannot reach p < 0.05 (two-sided, 5 of 5: 0.0625): a
    # single model's ρ over its 10,000 points said "holds" for the whole study.
    summary = pd.DataFrame({"spearman_rho": [0.9] * n, "auroc_error": [0.8] * n})
    assert [c.holds for c in per_point_claims(summary)] == [None, None]


def test_per_point_claims_refuse_the_distribution_they_once_took():
    distribution = pd.DataFrame({"metric": ["spearman_rho"], "models": [3], "median": [0.8]})
    with pytest.raises(TypeError, match="per_point_summary's frame, one row per model"):
        per_point_claims(distribution)


def test_report_of_a_paired_study_draws_fig4_and_lists_its_claims(tmp_path):
    runs = _paired_runs()
    pairs = {"factor": "random_labels", "values": [0.0, 1.0]}
    index = write_report(tmp_path, runs=runs, pairs=pairs, n_boot=200)
    summary = json.loads((index.parent / "summary.json").read_text())
    fig4 = [c for c in summary["claims"] if c["figure"] == "Fig. 4"]
    assert [c["verdict"] for c in fig4] == ["holds", "holds", "inconclusive"]
    outcomes = {r["metric"]: r for r in summary["pair_outcomes"]}
    assert outcomes["gap"]["n_expected"] == 8 and outcomes["gap"]["p_value"] == pytest.approx(
        2 / 256
    )
    page = check_report(index, n_done=16, extra=("pairs",))
    assert page.rows["claims"] == len(summary["claims"]) and page.rows["pair-outcomes"] == 3
