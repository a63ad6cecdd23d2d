"""The models table of the report and ``models.csv``: one row per analysed model.

A reader must be able to tell every model apart and find it in every figure: so besides
the usual architecture and training columns the table carries every run field that varies
in the study (a grid axis such as ``train_subset`` or ``augment``), the pair a model
belongs to, and each figure's x variable (Jbar, #weights, final train loss, transitions).

Example:
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"run_id": ["a", "b"], "status": "done", "dataset": "digits",
    ...                      "train_subset": [1000, 4000], "augment": False, "gap": [0.2, 0.1]})
    >>> model_table(runs)[["run_id", "train_subset"]].to_numpy().tolist()
    [['b', 4000], ['a', 1000]]
    >>> "augment" in model_columns(runs)  # the same for every model: not a column
    False
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sensgen.analysis.tables import column, done_runs

MODEL_COLUMNS = (
    "run_id",
    "dataset",
    "width",
    "depth",
    "nonlinearity",
    "optimizer",
    "lr",
    "batch_size",
    "init_scale",
    "random_labels",
    "seed",
    "steps",
    "train_acc",
    "test_acc",
    "gap",
    "jacobian_norm",
    "n_params",
    "train_loss",
    "status",
)
# Shown where the study has them: the pair a model belongs to, and measurements a study
# may ask for (the x of the transitions figure; Jbar on training points).
PAIR_COLUMNS = ("pair_id", "pair_role")
MEASURED_COLUMNS = ("transitions", "transitions_sampled", "transitions_sign", "jacobian_norm_train")
_INTEGER_COLUMNS = ("width", "depth", "batch_size", "seed", "steps", "n_params")
_INTEGER_COLUMNS += ("train_subset", "max_steps", "eval_every")


def model_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished model with the columns a reader wants, sorted by dataset and gap.

    Enough columns to tell every model apart and find it in every figure (`model_columns`):
    ``MODEL_COLUMNS`` (a column the input lacks is filled with NaN), every other run field
    that varies among the study's runs (``train_subset``, ``augment``, ...), the pair
    columns of a paired study and the measurements it holds (transitions, Jbar on training
    points). Integral columns (width, depth, batch size, seed, steps, #weights, ...) use
    pandas' nullable ``Int64`` so that a full-batch run shows an empty batch size rather
    than ``nan``.

    Args:
        runs: the store's runs frame (one row per model, any status). With an
            ``included`` column (`mark_included`), only the included done models are rows,
            while the columns still follow every run.

    Returns:
        DataFrame with columns ``model_columns(runs)``, one row per done (included) model.
    """
    rows = done_runs(runs)
    if "included" in rows.columns:
        rows = rows.loc[rows["included"].astype(bool)]
    table = rows.reindex(columns=model_columns(runs))
    for name in _INTEGER_COLUMNS:
        if name in table.columns:
            table[name] = _as_nullable_int(table[name])
    table = table.sort_values(["dataset", "gap", "run_id"], na_position="last", kind="stable")
    return table.reset_index(drop=True)


def model_columns(runs: pd.DataFrame) -> list[str]:
    """The models table's columns for a study's runs frame (any status).

    ``MODEL_COLUMNS``, with after ``seed`` each other `RunSpec` field that takes more
    than one value among the runs (missing counts as a value: ``train_subset`` empty is
    the full set) and ``PAIR_COLUMNS`` when some run has a pair, and after
    ``jacobian_norm`` each of ``MEASURED_COLUMNS`` that some run has a finite value of.
    """
    from sensgen.spec import RunSpec  # deferred: tables work on any frame

    varying = [
        name
        for name in RunSpec.model_fields
        if name not in MODEL_COLUMNS
        and name in runs.columns
        and runs[name].nunique(dropna=False) > 1
    ]
    paired = "pair_id" in runs.columns and bool(runs["pair_id"].notna().any())
    measured = [name for name in MEASURED_COLUMNS if np.isfinite(column(runs, name)).any()]
    columns = list(MODEL_COLUMNS)
    at = columns.index("seed") + 1
    columns[at:at] = [*varying, *(PAIR_COLUMNS if paired else ())]
    at = columns.index("jacobian_norm") + 1
    columns[at:at] = measured
    return columns


def _as_nullable_int(values: pd.Series) -> pd.Series:
    """Casts to ``Int64`` when every present value is integral; otherwise leaves it alone."""
    numeric = pd.to_numeric(values, errors="coerce")
    present = numeric.dropna()
    if numeric.isna().sum() != values.isna().sum():
        return values  # some entries are not numbers: keep them as they are
    if len(present) and not np.all(np.isfinite(present) & (present == np.round(present))):
        return values
    return numeric.round().astype("Int64")
