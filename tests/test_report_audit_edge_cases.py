"""Reports on unusual but legitimate studies: every run diverged, undefined correlations,
zeros on log axes, infinite values, awkward directory names (found by an audit of the
report on tiny `digits` studies)."""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil

import numpy as np
import pandas as pd
import pytest

from chromium import Browser
from sensgen.analysis import write_report
from sensgen.analysis.claims import per_point_claims
from sensgen.analysis.figures import gap_vs_jacobian
from sensgen.analysis.html import html_table
from sensgen.analysis.pair_figures import paired_scatter
from sensgen.analysis.pairs import pair_outcomes
from sensgen.analysis.point_figures import jacobian_vs_loss
from sensgen.analysis.stats import correlation_table, correlation_with_ci
from test_analysis import synthetic_runs

CHROMIUM = shutil.which("chromium")


def page_text(index) -> str:
    """The page's visible text: no style or script, tags dropped, entities resolved."""
    raw = re.sub(r"<(style|script)>.*?</\1>", " ", index.read_text(encoding="utf-8"), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def test_a_study_whose_runs_all_diverged_says_so_rather_than_to_resume_it(tmp_path):
    runs = synthetic_runs(3).assign(status="diverged", jacobian_norm=np.nan)
    text = page_text(write_report(tmp_path / "study", runs=runs, n_boot=0))
    assert "Every run diverged (3)" in text and "will not change that" in text
    assert "Run or resume the study" not in text  # resuming trains nothing: it is final


def test_the_resume_command_in_the_banner_survives_a_space_in_the_directory(tmp_path):
    out = tmp_path / "my study's runs"
    runs = synthetic_runs(4)
    runs.loc[0, "status"] = "pending"
    text = page_text(write_report(out, runs=runs, n_boot=0))
    command = re.search(r"Resume with (sensgen run .*?); it builds", text).group(1)
    assert shlex.split(command) == ["sensgen", "run", str(out / "study.toml"), "--out", str(out)]


def test_an_infinite_value_sorts_as_a_number_in_the_page():
    table = html_table(pd.DataFrame({"x": [1.0, np.inf, -np.inf]}), ["x"], {}, "t", sortable=True)
    # JavaScript's parseFloat reads "Infinity"; "inf" would read as NaN and sort as missing.
    assert 'data-v="Infinity"' in table and 'data-v="-Infinity"' in table
    assert 'data-v="inf"' not in table


def test_undefined_correlations_say_why_in_the_claims_and_the_table(tmp_path):
    runs = synthetic_runs(6).assign(gap=0.02, n_params=2410)  # identical models
    index = write_report(tmp_path / "study", runs=runs, n_boot=50)
    summary = json.loads((index.parent / "summary.json").read_text())
    fig5 = next(c for c in summary["claims"] if c["figure"] == "Fig. 5")
    assert "n/a (the gap is the same for all 6 models)" in fig5["measured"]
    notes = {row["predictor"]: row["note"] for row in summary["correlations"]}
    assert notes["n_params"] == "number of weights and the gap are the same for all 6 models"
    assert "the gap is the same for all 6 models" in page_text(index)


def test_a_figure_title_gives_the_same_rho_and_n_as_the_table_when_some_x_is_zero():
    runs = synthetic_runs(10)
    runs.loc[[1, 4, 6], "jacobian_norm"] = 0.0  # dead networks: finite, but not on a log axis
    row = correlation_table(runs, n_boot=0).set_index("predictor").loc["jacobian_norm"]
    title = gap_vs_jacobian(runs).axes[0].get_title()
    assert row["n"] == 10
    assert f"ρ = {row['spearman_rho']:+.2f}".replace("-", "−") + ", n = 10" in title


def test_a_figure_title_says_why_rho_is_undefined():
    runs = synthetic_runs(5).assign(jacobian_norm=0.5)
    assert "ρ = n/a (Jbar constant), n = 5" in gap_vs_jacobian(runs).axes[0].get_title()


def test_the_hexbin_title_counts_only_the_models_its_median_is_over():
    rng = np.random.default_rng(0)
    loss = np.exp(rng.normal(-2.0, 1.0, 60))
    norm = np.concatenate([loss[:20] * 2.0, np.full(40, 1e-3)])  # two models: constant ‖J‖
    points = pd.DataFrame({"run_id": np.repeat(["a", "b", "c"], 20), "split": "test",
                           "loss": loss, "jacobian_norm": norm})  # fmt: skip
    title = jacobian_vs_loss(points).axes[0].get_title()
    assert "ρ = +1.00" in title and "over 1 of 3 models" in title


def test_a_pair_panel_whose_values_are_zero_shows_the_sign_test_not_not_measured():
    table = pd.DataFrame({
        "pair_id": ["p", "q", "r"], "dataset": "digits", "better_role": "0.0",
        "other_role": "1.0", "gap_better": [0.02, 0.01, 0.03], "gap_other": [0.0, 0.0, 0.01],
        "jacobian_norm_better": [0.2, 0.3, 0.25], "jacobian_norm_other": [0.1, 0.2, 0.1],
        "transitions_better": [27.0, 30.0, 28.0], "transitions_other": [0.0, 0.0, 0.0],
    })  # fmt: skip
    fig = paired_scatter(table, factor="random_labels", better_label="0", other_label="1")
    panel = fig.axes[2]
    text = " ".join(t.get_text() for t in panel.texts)
    assert "not measured" not in text and "≤ 0" in text
    assert "0/3" in panel.get_title() and "p = 0.25" in panel.get_title()


def test_the_median_ratio_says_over_how_many_pairs_it_is():
    table = pd.DataFrame({
        "other_role": "1.0", "jacobian_norm_better": [0.2, 0.3, 0.25, 0.2],
        "jacobian_norm_other": [0.0, 0.0, 0.0, 2e-6],
    })  # fmt: skip
    row = pair_outcomes(table, metrics=["jacobian_norm"]).iloc[0]
    assert (row["n"], row["ratio_pairs"]) == (4, 1)  # the ratio is over 1 of the 4 pairs


def test_a_rho_just_short_of_1_is_not_printed_as_1():
    summary = pd.DataFrame({"spearman_rho": [0.995, 0.9962, 0.9966, 0.9979]})
    (claim,) = per_point_claims(summary)
    assert "ρ = +0.996 over 4 models" in claim.measured and "+1.00" not in claim.measured


def test_kendall_tau_of_a_tied_but_concordant_sample_is_exactly_1():
    x = np.array([1.0, 1.0, 2.0, 3.0, 3.0])
    result = correlation_with_ci(x, x, n_boot=50)
    # scipy gives 0.9999999999999999 here, which the report printed in full.
    assert result.kendall_tau == 1.0 and result.kendall_low == 1.0
    assert correlation_with_ci(x, -x, n_boot=50).kendall_tau == -1.0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH")
def test_a_long_unbroken_directory_name_does_not_widen_the_page(tmp_path):
    index = write_report(tmp_path / ("A" * 200), runs=synthetic_runs(4), n_boot=0)
    with Browser(CHROMIUM, tmp_path / "profile", timeout=60) as browser:
        page = browser.open_page()
        page.navigate(index.resolve().as_uri())
        widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert not page.errors()
    assert widths[0] <= widths[1], f"page {widths[0]} px wide in a {widths[1]} px window"
