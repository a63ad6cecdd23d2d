"""Paired-factor tables, sign tests and the Fig. 4 scatter on hand-built frames."""

import html
import io
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.lines import Line2D

from sensgen.analysis.inclusion import mark_included
from sensgen.analysis.pair_figures import DIAGONAL_LABEL, _panel_title, paired_scatter
from sensgen.analysis.pairs import (
    ACCOUNTING_COLUMNS,
    EXPECTED,
    METRICS,
    OUTCOME_COLUMNS,
    pair_accounting,
    pair_count_text,
    pair_counts,
    pair_outcomes,
    pair_table,
    role_of,
    sign_test,
)
from sensgen.analysis.report_sections import pairs_section
from sensgen.planner import expand
from sensgen.study import PAIR_FACTORS

NONLINEARITIES = ("relu", "relu6", "hard_tanh", "hard_sigmoid")


def _runs(rows):
    """A runs frame from (run_id, status, pair_id, pair_role, gap, jacobian_norm) tuples,
    with the store's string dtype (NaN when unpaired) for pair_id and pair_role."""
    columns = ["run_id", "status", "pair_id", "pair_role", "gap", "jacobian_norm"]
    frame = pd.DataFrame(rows, columns=columns).assign(dataset="fashion_mnist")
    return frame.astype({"pair_id": "str", "pair_role": "str"})


def _label_runs():
    return _runs(
        [
            ("a0", "done", "p1", "0.0", 0.2, 1.0),
            ("a1", "done", "p1", "1.0", 0.9, 6.0),
            ("b0", "done", "p2", "0.0", 0.1, 2.0),
            ("b1", "failed", "p2", "1.0", np.nan, np.nan),
            ("c0", "diverged", "p3", "0.0", np.nan, np.nan),
            ("c1", "done", "p3", "1.0", 0.8, 5.0),
            ("u", "done", None, None, 0.5, 3.0),
        ]
    )


def _nonlinearity_runs():
    rows = [
        (f"n{i}", "done", "n", role, 0.1 * (i + 1), 2.0**i) for i, role in enumerate(NONLINEARITIES)
    ]
    rows += [(f"m{i}", "done", "m", role, 0.2, 1.0 + i) for i, role in enumerate(NONLINEARITIES)]
    rows[5] = ("m1", "failed", "m", "relu6", np.nan, np.nan)
    return _runs(rows)


def test_pair_table_keeps_pairs_with_both_members_done():
    table = pair_table(_label_runs(), better_role="0.0")
    assert table["pair_id"].tolist() == ["p1"]
    row = table.iloc[0]
    assert (row["better_role"], row["other_role"]) == ("0.0", "1.0")
    assert (row["better_run_id"], row["other_run_id"]) == ("a0", "a1")
    assert (row["gap_better"], row["gap_other"]) == (0.2, 0.9)
    assert (row["jacobian_norm_better"], row["jacobian_norm_other"]) == (1.0, 6.0)
    assert row["dataset"] == "fashion_mnist"
    assert math.isnan(row["transitions_better"]) and math.isnan(row["transitions_other"])


def test_pair_table_compares_each_other_member_with_the_better_one():
    table = pair_table(_nonlinearity_runs(), better_role="relu")
    assert list(zip(table["pair_id"], table["other_role"], strict=True)) == [
        ("m", "hard_sigmoid"),
        ("m", "hard_tanh"),
        ("n", "hard_sigmoid"),
        ("n", "hard_tanh"),
        ("n", "relu6"),
    ]
    n_rows = table.loc[table["pair_id"] == "n"].set_index("other_role")
    assert (n_rows["jacobian_norm_better"] == 1.0).all()
    assert n_rows["jacobian_norm_other"].to_dict() == {
        "relu6": 2.0,
        "hard_tanh": 4.0,
        "hard_sigmoid": 8.0,
    }
    assert set(table["better_role"]) == {"relu"}


def test_pair_table_columns_and_empty_inputs():
    expected = ["pair_id", "dataset", "better_role", "other_role", "better_run_id"]
    expected += ["other_run_id", "gap_better", "gap_other"]
    table = pair_table(_label_runs(), better_role="0.0", metrics=("gap",))
    assert list(table.columns) == expected
    unpaired = _label_runs().drop(columns=["pair_id", "pair_role"])
    assert pair_table(unpaired, better_role="0.0", metrics=("gap",)).empty
    all_failed = _label_runs().assign(status="failed")
    empty = pair_table(all_failed, better_role="0.0", metrics=("gap",))
    assert empty.empty and list(empty.columns) == expected


def test_pair_table_names_the_roles_when_better_role_is_unknown():
    with pytest.raises(ValueError, match=r"'True'.*'0\.0', '1\.0'"):
        pair_table(_label_runs(), better_role="True")


def test_pair_table_rejects_two_runs_in_one_role():
    runs = pd.concat([_label_runs(), _runs([("a2", "done", "p1", "1.0", 0.7, 4.0)])])
    with pytest.raises(ValueError, match="p1"):
        pair_table(runs, better_role="0.0")


@pytest.mark.parametrize(
    ("factor", "values", "roles"),
    [
        ("random_labels", [0, 1], ["0.0", "1.0"]),
        ("augment", [True, False], ["true", "false"]),
        ("nonlinearity", ["relu", "hard_tanh"], ["relu", "hard_tanh"]),
        ("batch_size", [128, "full"], ["128", "full"]),
    ],
)
def test_role_of_matches_the_planner(factor, values, roles):
    planned = expand({"dataset": "fashion_mnist"}, {}, [], factor, values)
    assert [p.pair_role for p in planned] == roles
    assert [role_of(factor, v) for v in values] == roles


def test_sign_test_counts_ties_apart_and_skips_missing():
    better = np.array([1.0, 1.0, 1.0, 2.0, np.nan])
    other = np.array([2.0, 1.0, 0.5, 3.0, 9.0])
    assert tuple(sign_test(better, other)) == pytest.approx((3, 2, 1, 2 / 3, 1.0))
    all_above = sign_test(np.zeros(8), np.ones(8))
    assert (all_above.n, all_above.n_expected, all_above.share) == (8, 8, 1.0)
    assert all_above.p_value == pytest.approx(2 / 256, rel=1e-12)
    none = sign_test(np.ones(2), np.ones(2))
    assert (none.n, none.ties) == (0, 2)
    assert math.isnan(none.share) and math.isnan(none.p_value)


def _table(other_role, better, other):
    return pd.DataFrame(
        {
            "pair_id": [f"{other_role}{i}" for i in range(len(better))],
            "other_role": other_role,
            "gap_better": better,
            "gap_other": other,
        }
    )


def test_pair_outcomes_shares_and_p_values_per_role():
    # role "b": 6 above, 2 below, 1 tie, 1 missing → p = 2 (C(8,0) + C(8,1) + C(8,2)) / 2⁸
    above, below = [(1.0, 2.0)] * 6, [(2.0, 1.0)] * 2
    b_pairs = [*above, *below, (1.0, 1.0), (np.nan, 1.0)]
    b = _table("b", *zip(*b_pairs, strict=True))
    a = _table("a", [1.0] * 8, [4.0] * 8)
    outcomes = pair_outcomes(pd.concat([b, a]), metrics=("gap", "transitions"))
    assert list(outcomes.columns) == list(OUTCOME_COLUMNS)
    rows = outcomes.set_index(["other_role", "metric"])
    gap_b = rows.loc[("b", "gap")]
    assert (gap_b["comparisons"], gap_b["n"], gap_b["n_expected"], gap_b["ties"]) == (10, 8, 6, 1)
    assert gap_b["share"] == pytest.approx(0.75)
    assert gap_b["p_value"] == pytest.approx(2 * (1 + 8 + 28) / 256, rel=1e-12)
    assert gap_b["median_ratio"] == pytest.approx(2.0)
    gap_a = rows.loc[("a", "gap")]
    assert (gap_a["n_expected"], gap_a["median_ratio"]) == (8, 4.0)
    assert gap_a["p_value"] == pytest.approx(2 / 256, rel=1e-12)
    missing = rows.loc[("a", "transitions")]
    assert missing["n"] == 0 and math.isnan(missing["p_value"])
    assert outcomes["other_role"].tolist() == ["a", "a", "b", "b"]


def test_pair_outcomes_on_an_empty_table():
    empty = pair_table(_label_runs().assign(status="failed"), better_role="0.0")
    outcomes = pair_outcomes(empty)
    assert outcomes.empty and list(outcomes.columns) == list(OUTCOME_COLUMNS)


def test_expected_covers_every_paired_factor_and_metric():
    assert set(EXPECTED) == set(PAIR_FACTORS)
    for claims in EXPECTED.values():
        assert set(claims) == set(METRICS)
        assert claims["gap"] is True and claims["jacobian_norm"] is True
    assert EXPECTED["batch_size"]["transitions"] is None  # the paper's stated exception
    assert EXPECTED["random_labels"]["transitions"] is True


def _scatter_table():
    rng = np.random.default_rng(0)
    better = rng.uniform(1.0, 10.0, size=8)
    table = pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(8)],
            "dataset": "fashion_mnist",
            "better_role": "0.0",
            "other_role": "1.0",
            "gap_better": np.linspace(0.1, 0.4, 8),
            "gap_other": np.full(8, 0.9),
            "jacobian_norm_better": better,
            "jacobian_norm_other": better * 5.0,
            "transitions_better": np.nan,
            "transitions_other": np.nan,
        }
    )
    return table


def _diagonal(ax):
    lines = [line for line in ax.get_lines() if line.get_label() == DIAGONAL_LABEL]
    assert len(lines) == 1
    return lines[0]


def _texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_paired_scatter_panels_scales_diagonal_and_titles():
    fig = paired_scatter(
        _scatter_table(), factor="random_labels", better_label="true", other_label="random"
    )
    gap, jac, trans = fig.axes
    assert [ax.get_xscale() for ax in fig.axes] == ["linear", "log", "log"]
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log", "log"]
    for ax in (gap, jac):
        line = _diagonal(ax)
        assert isinstance(line, Line2D)
        assert np.array_equal(line.get_xdata(), line.get_ydata())
        assert ax.get_xlim() == ax.get_ylim()
        assert tuple(line.get_xdata()) == pytest.approx(ax.get_xlim())
        assert "8/8 pairs, 100%" in ax.get_title()
        assert f"p = {2 / 256:.2g}" in ax.get_title()
        assert len(ax.collections) == 1  # one other role: one scatter
    assert not trans.get_lines() and "no pair has" in _texts(fig)
    fig.savefig(io.BytesIO(), format="png")


def test_paired_scatter_colours_each_other_role():
    table = pair_table(_nonlinearity_runs(), better_role="relu", metrics=("gap", "jacobian_norm"))
    fig = paired_scatter(
        table,
        factor="nonlinearity",
        better_label="ReLU",
        other_label="other φ",
        metrics=("gap", "jacobian_norm"),
    )
    assert len(fig.axes) == 2
    colours = {tuple(c.get_facecolor()[0]) for c in fig.axes[1].collections}
    assert len(fig.axes[1].collections) == 3 and len(colours) == 3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["hard_sigmoid", "hard_tanh", "relu6", DIAGONAL_LABEL]
    # pair n: Jacobian 1 → 2, 4, 8; pair m (relu6 failed): 1 → 3, 4. All above y = x.
    title = fig.axes[1].get_title().splitlines()
    assert title[1:] == [
        "hard_sigmoid: 2/2 above y = x, p = 0.5",
        "hard_tanh: 2/2 above y = x, p = 0.5",
        "relu6: 1/1 above y = x, p = 1",
    ]
    fig.savefig(io.BytesIO(), format="png")
    (suptitle,) = [t for t in fig.texts if t.get_text() == fig.get_suptitle()]
    bottom = suptitle.get_window_extent().y0
    assert all(ax.title.get_window_extent().y1 <= bottom for ax in fig.axes)  # no overlap


def test_paired_scatter_on_an_empty_table_says_so():
    empty = pair_table(_label_runs().assign(status="failed"), better_role="0.0")
    fig = paired_scatter(empty, factor="augment", better_label="with", other_label="without")
    assert len(fig.axes) == 1
    assert "no complete pairs" in _texts(fig)
    fig.savefig(io.BytesIO(), format="png")


def test_pairs_section_names_the_fields_members_override():
    pairs = {"factor": "random_labels", "values": [0.0, 1.0]}
    saved = []
    plain = pairs_section(_label_runs(), pairs, lambda name, fig: saved.append(name))
    assert any("identical but for random_labels (0.0," in part for part in plain.html)
    budget = {**pairs, "overrides": [{}, {"max_steps": 50}]}
    section = pairs_section(_label_runs(), budget, lambda name, fig: saved.append(name))
    text = "the max_steps each member sets"
    assert any(f"identical but for random_labels and {text} (0.0," in p for p in section.html)
    assert saved == ["pairs", "pairs"]


def _audited_runs():
    """Four random-label pairs, every status and the inclusion rule marked: p1 and p2
    complete; p3's random member below 100% train accuracy; p4's true member failed, and
    p5's random member still pending."""
    runs = _runs(
        [
            ("a0", "done", "p1", "0.0", 0.1, 1.0),
            ("a1", "done", "p1", "1.0", 0.9, 6.0),
            ("b0", "done", "p2", "0.0", 0.2, 2.0),
            ("b1", "done", "p2", "1.0", 0.8, 5.0),
            ("c0", "done", "p3", "0.0", 0.1, 1.5),
            ("c1", "done", "p3", "1.0", 0.9, 7.0),
            ("d0", "failed", "p4", "0.0", np.nan, np.nan),
            ("d1", "done", "p4", "1.0", 0.9, 9.0),
            ("e0", "done", "p5", "0.0", 0.1, 1.0),
            ("e1", "pending", "p5", "1.0", np.nan, np.nan),
        ]
    )
    runs["train_acc"] = [1.0, 1.0, 1.0, 1.0, 1.0, 0.9935, np.nan, 1.0, 1.0, np.nan]
    return mark_included(runs, apply=True)


def test_pair_accounting_says_why_each_planned_comparison_was_dropped():
    runs = _audited_runs()
    accounting = pair_accounting(runs, better_role="0.0")
    assert list(accounting.columns) == list(ACCOUNTING_COLUMNS)
    assert accounting.set_index("pair_id")["dropped"].to_dict() == {
        "p1": "",
        "p2": "",
        "p3": "excluded",
        "p4": "failed",
        "p5": "not_finished",
    }
    assert pair_counts(accounting) == {
        "planned_pairs": 5,
        "compared_pairs": 2,
        "planned_comparisons": 5,
        "compared_comparisons": 2,
        "dropped": {"missing": 0, "failed": 1, "diverged": 0, "not_finished": 1, "excluded": 1},
    }
    # The compared comparisons are exactly pair_table's rows.
    compared = accounting.loc[accounting["dropped"] == "", "pair_id"].tolist()
    assert pair_table(runs, better_role="0.0")["pair_id"].tolist() == compared == ["p1", "p2"]


def test_pair_accounting_counts_each_comparison_once_and_a_missing_member():
    runs = _label_runs().iloc[:-1]  # p1 complete, p2 random member failed, p3 better diverged
    runs = pd.concat([runs, _runs([("f1", "done", "p4", "1.0", 0.9, 6.0)])])  # p4: no better
    both = runs.assign(status=np.where(runs["run_id"] == "a1", "running", runs["status"]))
    both.loc[both["run_id"] == "a0", "status"] = "failed"  # p1: failed and running
    dropped = pair_accounting(both, better_role="0.0")["dropped"].tolist()
    assert dropped == ["failed", "failed", "diverged", "missing"]
    nonlinearity = pair_counts(pair_accounting(_nonlinearity_runs(), better_role="relu"))
    assert (nonlinearity["planned_pairs"], nonlinearity["planned_comparisons"]) == (2, 6)
    assert nonlinearity["compared_comparisons"] == 5 and nonlinearity["dropped"]["failed"] == 1
    assert pair_count_text(nonlinearity) == (
        "5 of 6 planned comparisons (2 pairs) compared; 1 dropped: a member failed (1)"
    )


def test_pair_table_leaves_out_a_pair_whose_member_the_inclusion_rule_excludes():
    runs = _audited_runs()
    assert "p3" not in set(pair_table(runs, better_role="0.0")["pair_id"])
    every = mark_included(runs.drop(columns="included"), apply=False)
    assert "p3" in set(pair_table(every, better_role="0.0")["pair_id"])


def _pairs_section(runs, pairs):
    figures = {}
    section = pairs_section(runs, pairs, lambda name, fig: figures.setdefault(name, fig))
    return section, html.unescape(" ".join(" ".join(section.html).split())), figures


def test_pairs_section_says_how_many_planned_pairs_it_compares_and_why_it_drops_others():
    pairs = {"factor": "random_labels", "values": [0.0, 1.0]}
    section, text, figures = _pairs_section(_audited_runs(), pairs)
    counted = (
        "2 of 5 planned pairs compared; 3 dropped: a member failed (1), a member not finished "
        "(pending or running) (1), a member below the inclusion rule (1)"
    )
    assert counted in text
    assert counted in figures["pairs"].get_suptitle()
    assert section.summary["pairs"] == 2
    assert section.summary["pair_counts"]["dropped"]["excluded"] == 1


def test_pairs_section_without_a_complete_pair_gives_the_reasons():
    runs = _audited_runs()
    runs = runs.assign(included=runs["included"] & runs["run_id"].isin(["c0", "c1"]))
    section, text, figures = _pairs_section(runs, {"factor": "random_labels", "values": [0, 1]})
    assert "No pairs to compare: 0 of 5 planned pairs compared; 5 dropped" in text
    assert "a member below the inclusion rule (3)" in text and not figures
    assert section.summary["pair_counts"]["compared_pairs"] == 0


def test_pairs_section_names_values_that_match_no_stored_role():
    # A [pairs] table edited after the run: no inclusion rule explains the missing role.
    pairs = {"factor": "random_labels", "values": [0.5, 1.0]}
    section, text, figures = _pairs_section(_audited_runs(), pairs)
    assert "pairs.values[0] = 0.5 (pair_role '0.5') matches no run" in text
    assert "pair_role '0.0', '1.0'" in text and "inclusion rule" not in text
    assert not figures and not section.claims


def test_pair_panel_titles_never_round_a_share_to_100_percent():
    better, other = np.zeros(200), np.r_[np.ones(199), -1.0]
    title = _panel_title("gap", np.full(200, "1.0"), better, other)
    assert "199/200 pairs, 99.5%" in title


def test_paired_scatter_tick_labels_do_not_run_into_each_other_on_close_values():
    # Gaps of nonlinearity pairs within 0.02 of each other (fig4-factors, tiny): the default
    # linear locator put nine 6-character labels ("0.2325") under a 4.6-inch panel.
    table = pd.DataFrame(
        {
            "pair_id": ["p0", "p1", "p2"],
            "dataset": "fashion_mnist",
            "better_role": "relu",
            "other_role": "hard_tanh",
            "gap_better": [0.2413, 0.2442, 0.2471],
            "gap_other": [0.2361, 0.2379, 0.2306],
            "jacobian_norm_better": [0.2711, 0.2725, 0.2730],
            "jacobian_norm_other": [0.2840, 0.2880, 0.2970],
        }
    )
    fig = paired_scatter(
        table, factor="nonlinearity", better_label="relu", other_label="hard_tanh",
        metrics=("gap", "jacobian_norm"),
    )  # fmt: skip
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi]
        labels = [t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text()]
        texts = [label.get_text() for label in labels]
        assert 2 <= len(texts) <= 6, texts
        boxes = sorted((b.get_window_extent(renderer) for b in labels), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), texts
