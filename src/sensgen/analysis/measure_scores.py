"""Does the Jacobian norm rank models by generalization gap better than the field's
measures? One table: measures × ranking scores, per dataset (paper §6, "Beyond the paper").

`measure_score_table` scores every measure stored by ``measure.generalization_measures``
(`sensgen.measures`), together with the paper's own (Jbar on test and training points,
transitions), against the gap of the included models: Kendall τ-b, Spearman ρ, granulated
Ψ over the hyper-parameter axes that vary (Jiang et al. 2020; NaN where no cell holds two
models, e.g. continuous random-search axes) and the PGDL conditional-mutual-information
score (NaN unless at least two axes form a grid). ``beats_jbar`` says whether the measure's
τ exceeds Jbar's on that dataset.

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

import pandas as pd

from sensgen.analysis.ranking import cmi_pgdl, granulated_psi, kendall_tau, spearman
from sensgen.analysis.tables import dataset_labels, done_runs

# The paper's measures, read from the runs frame, scored beside `sensgen.measures`.
PAPER_MEASURES = ("jacobian_norm", "jacobian_norm_train", "transitions")
# Spec fields that may be a study's hyper-parameter axes.
AXES = ("width", "depth", "lr", "optimizer", "batch_size", "init_scale", "train_subset",
        "nonlinearity", "random_labels", "augment")  # fmt: skip
COLUMNS = ("dataset", "measure", "n", "kendall_tau", "spearman_rho", "psi", "cmi_pgdl",
           "beats_jbar")  # fmt: skip


def measure_score_table(runs: pd.DataFrame, measures: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, measure) with the ranking scores against the gap.

    Args:
        runs: the store's runs frame (already filtered by the inclusion rule).
        measures: `Results.measures()`: run_id plus one column per measure.

    Returns:
        Columns `COLUMNS`; rows sorted by dataset, then by |τ| descending.
    """
    done = done_runs(runs)
    if done.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    merged = done.merge(measures, on="run_id", how="left", suffixes=("", "_measure"))
    names = [m for m in PAPER_MEASURES if m in merged.columns]
    names += [c for c in measures.columns if c != "run_id" and c not in names]
    rows = []
    datasets = dataset_labels(merged)
    for dataset in sorted(datasets.unique()):
        group = merged.loc[datasets == dataset]
        axes = [a for a in AXES if a in group.columns and group[a].nunique(dropna=False) > 1]
        scored = [_scores(group, name, axes) for name in names if group[name].notna().any()]
        jbar = next((s["kendall_tau"] for s in scored if s["measure"] == "jacobian_norm"), math.nan)
        for score in scored:
            score["beats_jbar"] = (
                bool(score["kendall_tau"] > jbar) if not math.isnan(jbar) else None
            )
            rows.append({"dataset": dataset, **score})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    order = table["kendall_tau"].abs().fillna(-1.0)
    return (
        table.assign(_o=-order)
        .sort_values(["dataset", "_o"])
        .drop(columns="_o")
        .reset_index(drop=True)
    )


def _scores(group: pd.DataFrame, name: str, axes: list[str]) -> dict:
    values = pd.to_numeric(group[name], errors="coerce").astype(float)
    frame = group[axes].assign(_mu=values, _gap=group["gap"].astype(float))
    psi = granulated_psi(frame, "_mu", "_gap", axes)[0] if axes else math.nan
    cmi = math.nan
    if len(axes) >= 2:
        with contextlib.suppress(ValueError, ZeroDivisionError):
            cmi = cmi_pgdl(frame, "_mu", "_gap", axes)
    finite = values.notna() & group["gap"].notna()
    return {
        "measure": name,
        "n": int(finite.sum()),
        "kendall_tau": kendall_tau(values.to_numpy(), group["gap"].to_numpy(float)),
        "spearman_rho": spearman(values.to_numpy(), group["gap"].to_numpy(float)),
        "psi": psi,
        "cmi_pgdl": cmi,
    }
