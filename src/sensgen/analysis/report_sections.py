"""The report's sections: each draws its figures (through ``save``), checks its claims and
returns the HTML that shows them.

A `Section` carries HTML fragments, the `Claim`s it checked and a JSON-ready summary. Each
figure's caption states the paper's claim, our measured figure and the verdict. Figures are
drawn only from what the study holds: a study without pairs gets no Fig. 4 section, one
without per-point tables no Study 6 section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from sensgen.analysis import figures, tables
from sensgen.analysis.claims import Claim, correlation_claims, pair_claims, per_point_claims
from sensgen.analysis.html import esc, figure_html, html_table
from sensgen.analysis.measure_scores import measure_factor_table, measure_score_table
from sensgen.analysis.pair_figures import paired_scatter
from sensgen.analysis.pairs import (
    pair_accounting,
    pair_count_text,
    pair_counts,
    pair_outcomes,
    pair_table,
    role_of,
)
from sensgen.analysis.point_figures import (
    done_points_with_dataset,
    jacobian_vs_loss,
    per_point_auroc,
)
from sensgen.analysis.stats import correlation_table

Save = Callable[[str, Figure], None]

_CORRELATION_HEADERS = {
    "predictor": "predictor",
    "spearman_rho": "Spearman ρ",
    "spearman_low": "95% CI low",
    "spearman_high": "95% CI high",
    "kendall_tau": "Kendall τ-b",
    "kendall_low": "τ CI low",
    "kendall_high": "τ CI high",
    "pearson_r": "Pearson r",
    "pearson_low": "r CI low",
    "pearson_high": "r CI high",
    "spearman_p": "p (ρ)",
}
_OUTCOME_SHOWN = ("other_role", "metric", "n", "n_expected", "ties", "share", "p_value",
                  "median_ratio")  # fmt: skip
_PREDICTOR_NAMES = {
    "jacobian_norm": "mean test ‖J‖_F (Jbar)",
    "transitions": "transitions (test ellipses)",
    "n_params": "number of weights",
    "train_loss": "final train loss",
}
_OUTCOME_HEADERS = {
    "other_role": "other member",
    "n_expected": "on the paper's side",
    "share": "share",
    "p_value": "sign-test p",
    "median_ratio": "median other / better",
    "ratio_pairs": "pairs in the ratio",
}


@dataclass
class Section:
    """HTML, checked claims and a JSON-ready summary of one part of the report."""

    html: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def correlation_section(runs: pd.DataFrame, save: Save, *, n_boot: int = 1000) -> Section:
    """Fig. 5 (gap vs Jbar, and vs transitions when measured) and Fig. 1 (vs #weights, vs
    final train loss), with the correlation table (bootstrap 95% intervals)."""
    table = correlation_table(runs, n_boot=n_boot)
    table = _with_notes(table[table["n"] > 0].reset_index(drop=True), runs)
    claims = correlation_claims(table)
    parts = ["<h2>Sensitivity and the generalization gap across models (Figs. 5 and 1)</h2>"]
    plots = [
        ("gap_vs_jacobian", figures.gap_vs_jacobian, "Fig. 5", "jacobian_norm"),
        ("gap_vs_transitions", figures.gap_vs_transitions, "Fig. 5 (companion)", "transitions"),
        ("gap_vs_params", figures.gap_vs_params, "Fig. 1", "n_params"),
        ("gap_vs_train_loss", figures.gap_vs_train_loss, "Fig. 1", "train_loss"),
    ]
    for name, build, figure, predictor in plots:
        if predictor == "transitions" and not (table["predictor"] == predictor).any():
            continue  # transitions not measured in this study
        save(name, build(runs))
        mine = [c for c in claims if c.figure == figure and _about(c, predictor)]
        parts.append(figure_html(name, _caption(mine, figure)))
    shown = table.assign(predictor=table["predictor"].map(_PREDICTOR_NAMES))
    columns = ["dataset", "predictor", "n", *list(_CORRELATION_HEADERS)[1:], "note"]
    parts += [
        "<h3>Rank correlation of the gap with each predictor</h3>",
        "<p>Over included models per dataset; n counts models with both values finite. "
        "Intervals: percentile bootstrap over models (1,000 resamples, seeded); blank where "
        "undefined (the note says why). Paper claim: Jbar correlates clearly and positively; "
        "the baselines do not.</p>",
        html_table(shown, columns, _CORRELATION_HEADERS, "correlations", sortable=True),
    ]
    return Section(parts, claims, {"correlations": table})


def _with_notes(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``note`` column: why a row's correlation is undefined ("" if it is
    not), from the same finished models `correlation_table` used."""
    done = tables.done_runs(runs)
    datasets = tables.dataset_labels(done)
    notes = []
    for row in table.itertuples(index=False):
        group = done.loc[datasets == row.dataset]
        x, y = tables.column(group, row.predictor), tables.column(group, "gap")
        name = _PREDICTOR_NAMES.get(row.predictor, row.predictor)
        notes.append(tables.undefined_reason(x, y, name, "the gap"))
    return table.assign(note=pd.Series(notes, index=table.index, dtype=object))


def pairs_section(runs: pd.DataFrame, pairs: Mapping[str, Any] | None, save: Save) -> Section:
    """Fig. 4: one factor's pairs, the paired scatter and the sign tests.

    ``runs`` should hold every run with the inclusion rule marked (`mark_included`), so the
    section can say how many planned pairs it compares and why it drops the others (a
    member failed, diverged, is not finished or is below the rule): the pairs lost are not
    a random subset (e.g. the random-label members that fail to fit).
    """
    if not pairs or not pairs.get("factor") or not {"pair_id", "pair_role"} <= set(runs.columns):
        return Section()
    factor, values = pairs["factor"], list(pairs["values"])
    roles = [role_of(factor, v) for v in values]
    stored = sorted(set(runs["pair_role"].dropna().astype(str)))
    numbered = enumerate(zip(values, roles, strict=True))
    unmatched = [(i, value, role) for i, (value, role) in numbered if role not in stored]
    if unmatched:
        return Section([_unmatched_values(factor, unmatched, stored)])
    better = roles[0]
    counts = pair_counts(pair_accounting(runs, better_role=better))
    table = pair_table(runs, better_role=better)
    head = f"<h2>Paired factor: {esc(factor)} (Fig. 4)</h2>"
    summary: dict[str, Any] = {"pairs": len(table), "pair_counts": counts}
    if table.empty:
        return Section([head + _no_pairs_left(factor, counts)], [], summary)
    # Roles the study's runs hold beyond pairs.values (an earlier, longer list) are compared too.
    others = ", ".join([*roles[1:], *(r for r in stored if r not in roles)])
    outcomes = pair_outcomes(table)
    claims = pair_claims(outcomes, factor, f"{factor} = {others}")
    label, other = f"{factor} = {better}", f"{factor} = {others}"
    figure = paired_scatter(
        table, factor=factor, better_label=label, other_label=other, counts=counts
    )
    save("pairs", figure)
    overridden = sorted({k for extra in pairs.get("overrides") or [] for k in extra})
    also = f" and the {', '.join(overridden)} each member sets" if overridden else ""
    parts = [
        head,
        f"<p>Pairs of models identical but for {esc(factor)}{esc(also)} ({esc(better)}, "
        f"expected to generalize better, against {esc(others)}): "
        f"{esc(pair_count_text(counts))}.</p>",
        figure_html("pairs", _caption(claims, "Fig. 4")),
        html_table(
            outcomes,
            [*_OUTCOME_SHOWN, "ratio_pairs"],
            _OUTCOME_HEADERS,
            "pair-outcomes",
        ),
        "<p>n counts the pairs with both values finite and unequal (ties apart). The median "
        "ratio is over the pairs where both values are positive, which may be fewer (a gap "
        "below 0, a Jbar or transition count of 0); blank where no pair has both.</p>",
    ]
    return Section(parts, claims, summary | {"pair_outcomes": outcomes})


def _no_pairs_left(factor: str, counts: Mapping[str, Any]) -> str:
    """The pairs section when no planned pair has both members compared."""
    hint = ""
    if factor == "augment" and counts["dropped"]["excluded"]:
        hint = (
            " The paper analyses its augmentation pairs (Study 4b) without the rule: set "
            "<code>[inclusion] apply = false</code> (<code>--set inclusion.apply=false</code>)."
        )
    return f"<p>No pairs to compare: {esc(pair_count_text(counts))}.{hint}</p>"


def _unmatched_values(
    factor: str, unmatched: Sequence[tuple[int, Any, str]], stored: Sequence[str]
) -> str:
    """The pairs section when ``[pairs] values`` name roles no stored run has: the table no
    longer describes the runs (edited by hand?), which no inclusion rule explains."""
    named = "; ".join(f"pairs.values[{i}] = {v!r} (pair_role {r!r})" for i, v, r in unmatched)
    have = ", ".join(map(repr, stored)) or "none"
    return (
        f"<h2>Paired factor: {esc(factor)} (Fig. 4)</h2><p>No pairs to compare: "
        f"{esc(named)} matches no run of this study, whose paired runs have pair_role "
        f"{esc(have)}. The [pairs] table of the study's study.toml does not describe its "
        "runs: set pairs.values back to the values the study was run with (the better "
        "member first), then build the report again.</p>"
    )


def per_point_section(points: pd.DataFrame, runs: pd.DataFrame, save: Save) -> Section:
    """Study 6: ‖J(x)‖ against CE(x) per test point, and the per-model statistics."""
    if points.empty:
        return Section()
    done = done_points_with_dataset(points, runs)
    summary = done_points_with_dataset(tables.per_point_summary(done), runs)
    if summary.empty:
        return Section()
    distribution = tables.per_point_distribution(summary)
    claims = per_point_claims(_with_label_noise(summary, runs))
    save("per_point_hexbin", jacobian_vs_loss(done))
    save("per_point_auroc", per_point_auroc(summary))
    parts = [
        "<h2>Per test point (Study 6)</h2>",
        figure_html("per_point_hexbin", _caption(claims[:1], "Study 6")),
        figure_html("per_point_auroc", _caption(claims[1:], "Study 6")),
        "<p>Spread over models of the within-model statistics (AUROC: misclassified points "
        "scored by ‖J(x)‖_F, or by the softmax-confidence baseline 1 − max p).</p>",
        html_table(distribution, list(distribution.columns), {}, "per-point"),
    ]
    return Section(parts, claims, {"per_point": distribution})


def _with_label_noise(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with each model's ``random_labels`` from the runs frame (0 if absent), for
    `per_point_claims`, which judges models trained on true labels only."""
    if "random_labels" not in runs.columns:
        return summary
    noise = runs.set_index("run_id")["random_labels"]
    return summary.assign(random_labels=summary["run_id"].map(noise).fillna(0.0))


def measures_section(runs: pd.DataFrame, measures: pd.DataFrame) -> Section:
    """Beyond the paper: every stored measure's ranking scores against the gap."""
    if len(measures.columns) <= 1:
        return Section()
    table = measure_score_table(runs, measures)
    headers = {"kendall_tau": "Kendall τ-b", "spearman_rho": "Spearman ρ", "psi": "Ψ",
               "cmi_pgdl": "CMI (PGDL) ×100", "beats_jbar": "τ above Jbar's"}  # fmt: skip
    parts = [
        "<h2>Does the Jacobian norm beat the field's measures? (beyond the paper)</h2>",
        "<p>Each measure ranked against the gap over the included models: Kendall τ-b, "
        "Spearman ρ, granulated Ψ over the axes that vary (Jiang et al. 2020; blank where no "
        "cell holds two models) and the PGDL conditional-mutual-information score (blank "
        "unless two axes form a grid). Sorted by |τ|.</p>",
        html_table(table, list(table.columns), headers, "measure-scores", sortable=True),
    ]
    factors = measure_factor_table(runs, measures)
    if not factors.empty:
        wide = factor_wide(factors)
        parts += [
            "<h3>Per factor</h3>",
            "<p>ψ of each measure along one factor at a time: the mean Kendall τ-b against "
            "the gap within cells of models that differ only in that factor (Jiang et al. "
            "2020, Eq. 3). The last column counts the factors where the measure's ψ is above "
            "Jbar's. Factors whose cells all hold a single model (e.g. a continuous "
            "random-search axis) are not shown.</p>",
            html_table(wide, list(wide.columns), {}, "measure-factors", sortable=True),
        ]
    return Section(parts, [], {"measure_scores": table, "measure_factors": factors})


def factor_wide(factors: pd.DataFrame) -> pd.DataFrame:
    """`measure_factor_table` as one row per (dataset, measure), one ψ column per factor
    (headed with its cell count) and ``above Jbar``: the number of factors where the
    measure's ψ exceeds Jbar's."""
    cells = factors.groupby("factor", sort=False)["cells"].max()
    label = {f: f"ψ {f} ({n} cells)" for f, n in cells.items()}
    wide = factors.pivot_table(
        index=["dataset", "measure"], columns="factor", values="psi", dropna=False, sort=False
    ).rename(columns=label)
    above = factors.assign(b=factors["beats_jbar"].eq(True)).groupby(["dataset", "measure"])
    wide["above Jbar"] = above["b"].sum().astype(int)
    wide = wide.reset_index().rename_axis(columns=None)
    # Jbar first in each dataset, then the measures that beat it along the most factors.
    order = [wide["dataset"], wide["measure"] != "jacobian_norm", -wide["above Jbar"]]
    keys = pd.DataFrame({i: k.to_numpy() for i, k in enumerate(order)})
    return wide.loc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(
        drop=True
    )


def claims_html(claims: Sequence[Claim]) -> str:
    """The opening summary: one row per checked claim with its verdict."""
    if not claims:
        return "<p>No paper claim can be checked yet (no finished, included models).</p>"
    rows = "".join(
        f"<tr><td class='text'>{esc(c.figure)}</td><td class='text'>{esc(c.paper)}</td>"
        f"<td class='text'>{esc(c.measured)}</td><td class='text {_css(c)}'>{esc(c.verdict)}"
        "</td></tr>"
        for c in claims
    )
    head = "".join(f"<th class='text'>{h}</th>" for h in ("figure", "paper", "measured", ""))
    return f'<table id="claims"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _about(claim: Claim, predictor: str) -> bool:
    words = {"jacobian_norm": "Jacobian", "transitions": "transitions"}
    words |= {"n_params": "weights", "train_loss": "train loss"}
    return words[predictor] in claim.paper


def _caption(claims: Sequence[Claim], figure: str) -> str:
    if not claims:
        return f"Paper {figure}: no claim can be checked on these models yet."
    return " ".join(
        f"{c.paper} (paper {c.figure}). Measured: {c.measured}: {c.verdict}." for c in claims
    )


def _css(claim: Claim) -> str:
    return {True: "holds", False: "fails", None: "open"}[claim.holds]
