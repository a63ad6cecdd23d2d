"""Does the Jacobian norm rank models by generalization gap better than the field's
measures? One table: measures × ranking scores, per dataset (paper §6, "Beyond the paper").

`measure_score_table` scores every measure stored by ``measure.generalization_measures``
(`sensgen.measures`), together with the paper's own (Jbar on test and training points,
transitions), against the gap of the included models: Kendall τ-b, Spearman ρ, granulated
Ψ over the hyper-parameter axes that vary (Jiang et al. 2020; NaN where no cell holds two
models, e.g. continuous random-search axes) and the PGDL conditional-mutual-information
score (NaN unless at least two axes form a grid). ``beats_jbar`` says whether the measure's
τ exceeds Jbar's on that dataset.

`measure_factor_table` breaks Ψ down by factor: for each run field that varies (a grid
axis, a paired factor such as ``random_labels``, the seed), ψ_axis = the mean within-cell
τ-b of the measure against the gap over cells where only that field varies (Jiang et al.
2020, Eq. 3), so "does Jbar beat X when only the width changes?" is one row.

Example:
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"run_id": list("abcd"), "dataset": "mnist", "status": "done",
    ...                      "gap": [0.1, 0.2, 0.3, 0.4], "jacobian_norm": [1.0, 2, 3, 4],
    ...                      "width": [64, 64, 128, 128], "depth": [1, 2, 1, 2]})
    >>> measures = pd.DataFrame({"run_id": list("abcd"), "n_params": [4.0, 3, 2, 1]})
    >>> tau = measure_score_table(runs, measures).set_index("measure")["kendall_tau"]
    >>> float(tau["jacobian_norm"]), float(tau["n_params"])
    (1.0, -1.0)
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd

from sensgen.analysis.ranking import cmi_pgdl, granulated_psi, kendall_tau, psi_by_axis, spearman
from sensgen.analysis.tables import dataset_labels, done_runs
from sensgen.spec import RunSpec

# The paper's measures and the final train loss (Fig. 1), read from the runs frame, scored
# beside `sensgen.measures`.
PAPER_MEASURES = ("jacobian_norm", "jacobian_norm_train", "transitions", "train_loss")
# Every run field a study may vary, the seed included: a cell of ψ_axis holds models equal
# in every other field that varies (`_dataset_groups`), so models differing in seed are
# never pooled into one cell (they were, with a fixed list of hyper-parameters, and ψ then
# mixed within-seed and across-seed orderings: a sign flip in a 2-seed grid).
AXES = tuple(name for name in RunSpec.model_fields if name != "dataset")
COLUMNS = ("dataset", "measure", "n", "kendall_tau", "spearman_rho", "psi", "cmi_pgdl",
           "beats_jbar")  # fmt: skip
FACTOR_COLUMNS = ("dataset", "factor", "measure", "psi", "cells", "beats_jbar")


def measure_score_table(runs: pd.DataFrame, measures: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, measure) with the ranking scores against the gap.

    Args:
        runs: the store's runs frame (already filtered by the inclusion rule).
        measures: `Results.measures()`: run_id plus one column per measure.

    Returns:
        Columns `COLUMNS`; rows sorted by dataset, then by |τ| descending.
    """
    rows = []
    for dataset, group, axes, names in _dataset_groups(runs, measures):
        scored = [_scores(group, name, axes) for name in names]
        _mark_beats_jbar(scored, "kendall_tau")
        rows += [{"dataset": dataset, **score} for score in scored]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return _by_magnitude(table, ["dataset"], "kendall_tau")


def measure_factor_table(runs: pd.DataFrame, measures: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, factor, measure): ψ along that factor alone.

    ψ_factor = mean over cells (models equal in every other varying axis, ≥ 2 of them and a
    gap that varies) of the within-cell Kendall τ-b of the measure against the gap, 0 in a
    cell where the measure is constant (`granulated_psi`); ``cells`` is the number of cells
    averaged. ``beats_jbar``: ψ above Jbar's ψ for the same factor
    (None where either is undefined). A factor with no defined cell for any measure (e.g. a
    continuous random-search axis: every cell holds one model) is left out.

    Example:
        >>> import pandas as pd
        >>> runs = pd.DataFrame({"run_id": list("abcd"), "status": "done",
        ...                      "gap": [0.1, 0.2, 0.3, 0.4], "jacobian_norm": [1.0, 2, 4, 3],
        ...                      "width": [64, 128, 64, 128], "depth": [1, 1, 2, 2]})
        >>> measures = pd.DataFrame({"run_id": list("abcd"), "margin": [4.0, 3, 2, 1]})
        >>> table = measure_factor_table(runs, measures).set_index(["factor", "measure"])
        >>> table.loc[("width", "jacobian_norm"), "psi"], table.loc[("depth", "margin"), "psi"]
        (np.float64(0.0), np.float64(-1.0))
    """
    rows = []
    for dataset, group, axes, names in _dataset_groups(runs, measures):
        if not axes:
            continue  # one configuration (or seeds only): no factor to break down
        by_axis = {name: _psi_by_axis(group, name, axes) for name in names}
        for axis in axes:
            scored = [{"measure": name, **by_axis[name][axis]} for name in names]
            if not any(s["cells"] for s in scored):
                continue
            _mark_beats_jbar(scored, "psi")
            rows += [{"dataset": dataset, "factor": axis, **score} for score in scored]
    table = pd.DataFrame(rows, columns=list(FACTOR_COLUMNS))
    return _by_magnitude(table, ["dataset", "factor"], "psi")


def _dataset_groups(runs: pd.DataFrame, measures: pd.DataFrame):
    """Yields (dataset, its finished models merged with their measures, the varying axes,
    the measures with at least one value), the paper's measures first."""
    done = done_runs(runs)
    if done.empty:
        return
    merged = done.merge(measures, on="run_id", how="left", suffixes=("", "_measure"))
    names = [m for m in PAPER_MEASURES if m in merged.columns]
    names += [c for c in measures.columns if c != "run_id" and c not in names]
    datasets = dataset_labels(merged)
    for dataset in sorted(datasets.unique()):
        group = merged.loc[datasets == dataset]
        axes = [a for a in AXES if a in group.columns and group[a].nunique(dropna=False) > 1]
        yield dataset, group, axes, [n for n in names if group[n].notna().any()]


def _mark_beats_jbar(scored: list[dict], score: str) -> None:
    """Sets each row's ``beats_jbar``: its `score` above Jbar's (None if either is NaN: an
    undefined score is no evidence either way)."""
    jbar = next((s[score] for s in scored if s["measure"] == "jacobian_norm"), math.nan)
    for row in scored:
        undefined = math.isnan(jbar) or math.isnan(row[score])
        row["beats_jbar"] = None if undefined else bool(row[score] > jbar)


def _by_magnitude(table: pd.DataFrame, keys: list[str], score: str) -> pd.DataFrame:
    """Sorted by `keys`, then |score| descending (NaN last)."""
    order = table[score].astype(float).abs().fillna(-1.0)
    return (
        table.assign(_o=-order).sort_values([*keys, "_o"]).drop(columns="_o").reset_index(drop=True)
    )


def _psi_by_axis(group: pd.DataFrame, name: str, axes: list[str]) -> dict[str, dict]:
    frame = _measure_frame(group, name, axes)
    return {
        axis: {"psi": psi, "cells": cells}
        for axis, (psi, cells) in psi_by_axis(frame, "_mu", "_gap", axes).items()
    }


def _measure_frame(group: pd.DataFrame, name: str, axes: list[str]) -> pd.DataFrame:
    values = pd.to_numeric(group[name], errors="coerce").astype(float)
    return group[axes].assign(_mu=values, _gap=group["gap"].astype(float))


def _scores(group: pd.DataFrame, name: str, axes: list[str]) -> dict:
    frame = _measure_frame(group, name, axes)
    values = frame["_mu"]
    psi = granulated_psi(frame, "_mu", "_gap", axes)[0] if axes else math.nan
    cmi = math.nan
    if len(axes) >= 2:
        with contextlib.suppress(ValueError, ZeroDivisionError):
            cmi = cmi_pgdl(frame, "_mu", "_gap", axes)
    # The correlations drop non-finite values (an infinite flatness: σ = 0), so n does too.
    finite = np.isfinite(values.to_numpy()) & np.isfinite(group["gap"].to_numpy(float))
    return {
        "measure": name,
        "n": int(finite.sum()),
        "kendall_tau": kendall_tau(values.to_numpy(), group["gap"].to_numpy(float)),
        "spearman_rho": spearman(values.to_numpy(), group["gap"].to_numpy(float)),
        "psi": psi,
        "cmi_pgdl": cmi,
    }
