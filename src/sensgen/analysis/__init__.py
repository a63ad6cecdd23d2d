"""Analysis of a study's results: tables, the paper's figures, and the HTML report.

Pure functions turn the store's frames (``sensgen.open_results(DIR).runs()`` and
``.points()``) into tidy DataFrames and matplotlib Figures; ``write_report`` alone writes
files. Paper: Novak et al. (2018), §3 Study 1 (Fig. 1), Study 5 (Fig. 5), Study 6.

Example:
    >>> from sensgen.analysis import correlation_summary, gap_vs_jacobian
    >>> from sensgen.store import open_results  # doctest: +SKIP
    >>> runs = open_results("runs/quickstart").runs()  # doctest: +SKIP
    >>> correlation_summary(runs)  # doctest: +SKIP
    >>> gap_vs_jacobian(runs).savefig("fig5.png")  # doctest: +SKIP
"""

from sensgen.analysis.figures import gap_vs_jacobian, gap_vs_params, gap_vs_train_loss
from sensgen.analysis.report import write_report
from sensgen.analysis.tables import (
    RankCorrelation,
    correlation_summary,
    done_runs,
    model_table,
    per_point_summary,
    rank_correlation,
    status_counts,
)

__all__ = [
    "RankCorrelation",
    "correlation_summary",
    "done_runs",
    "gap_vs_jacobian",
    "gap_vs_params",
    "gap_vs_train_loss",
    "model_table",
    "per_point_summary",
    "rank_correlation",
    "status_counts",
    "write_report",
]
