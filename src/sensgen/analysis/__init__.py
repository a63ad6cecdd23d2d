"""Analysis of a study's results: tables, statistics, the paper's figures, the HTML report.

Pure functions turn the store's frames (``sensgen.open_results(DIR).runs()``, ``.points()``,
``.profiles()``, ``.region_maps(run_id)``) into tidy DataFrames and matplotlib Figures;
``write_report`` alone writes files. Paper: Novak et al. (2018), §3 Studies 1–6.
A worked example: docs/analysis.md.

Example:
    >>> from sensgen.analysis import correlation_with_ci
    >>> round(correlation_with_ci([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], n_boot=0).spearman_rho, 2)
    0.8
"""

from sensgen.analysis.claims import Claim, correlation_claims, pair_claims, per_point_claims
from sensgen.analysis.figures import (
    gap_vs_jacobian,
    gap_vs_params,
    gap_vs_train_loss,
    gap_vs_transitions,
)
from sensgen.analysis.geometry_figures import (
    boundary_table,
    manifold_profiles,
    profile_summary,
    region_maps_figure,
)
from sensgen.analysis.inclusion import analysed_runs, mark_included
from sensgen.analysis.measure_scores import measure_factor_table, measure_score_table
from sensgen.analysis.models_table import model_table
from sensgen.analysis.pair_figures import paired_scatter
from sensgen.analysis.pairs import pair_accounting, pair_counts, pair_outcomes, pair_table, role_of
from sensgen.analysis.point_figures import jacobian_vs_loss, per_point_auroc
from sensgen.analysis.report import write_report
from sensgen.analysis.stats import correlation_table, correlation_with_ci, sign_test
from sensgen.analysis.tables import (
    RankCorrelation,
    correlation_summary,
    done_runs,
    per_point_distribution,
    per_point_summary,
    rank_correlation,
    status_counts,
)

__all__ = [
    "Claim",
    "RankCorrelation",
    "analysed_runs",
    "boundary_table",
    "correlation_claims",
    "correlation_summary",
    "correlation_table",
    "correlation_with_ci",
    "done_runs",
    "gap_vs_jacobian",
    "gap_vs_params",
    "gap_vs_train_loss",
    "gap_vs_transitions",
    "jacobian_vs_loss",
    "manifold_profiles",
    "mark_included",
    "measure_factor_table",
    "measure_score_table",
    "model_table",
    "pair_accounting",
    "pair_claims",
    "pair_counts",
    "pair_outcomes",
    "pair_table",
    "paired_scatter",
    "per_point_auroc",
    "per_point_claims",
    "per_point_distribution",
    "per_point_summary",
    "profile_summary",
    "rank_correlation",
    "region_maps_figure",
    "role_of",
    "sign_test",
    "status_counts",
    "write_report",
]
