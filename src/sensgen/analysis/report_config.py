"""The report's settings from ``DIR/study.toml``: its ``[inclusion]`` and ``[pairs]`` tables.

``sensgen run`` writes ``DIR/study.toml`` (the study as run), and the report reads these two
tables back from it. The file can be edited by hand (the report itself suggests relaxing
``[inclusion]``), so both tables are validated here as a study file is: a bad value is a
`UserError` (exit 2) that names the file, the field and the fix, never a traceback.

Example:
    >>> from pathlib import Path
    >>> study_pairs({"factor": "random_labels", "values": [0, 1]}, {}, Path("runs/x"))
    {'factor': 'random_labels', 'values': [0, 1], 'overrides': None}
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sensgen.errors import UserError
from sensgen.schema import STUDY_FILE


def study_tables(out_dir: Path) -> dict[str, Any]:
    """``out_dir/study.toml`` as a dict ({} when missing)."""
    path = out_dir / STUDY_FILE
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path} cannot be read as TOML ({err}). {rewrite(out_dir)}") from None


def study_inclusion(table: Any, out_dir: Path) -> dict[str, Any]:
    """The ``[inclusion]`` table validated, defaults filled (paper §4's rule)."""
    from pydantic import ValidationError

    from sensgen.study import Inclusion, describe_errors  # deferred: works without a study

    try:
        if not isinstance(table, Mapping):
            raise UserError(f"[inclusion] must be a table, not {table!r}")
        return Inclusion(**table).model_dump()
    except (ValidationError, UserError) as err:
        why = describe_errors(err) if isinstance(err, ValidationError) else str(err)
        path = out_dir / STUDY_FILE
        raise UserError(f"{path}: inclusion: {why}. {rewrite(out_dir)}") from None


def study_pairs(table: Any, study: Mapping[str, Any], out_dir: Path) -> dict[str, Any] | None:
    """The ``[pairs]`` table validated like a study file's (None when absent).

    Checks, in order: a table of the known keys; a paired factor (`PAIR_FACTORS`); each of
    ``values`` a valid value of that run field (so `role_of` can map it to a stored
    ``pair_role``); then `check_pairing` (distinct values, overrides; ``study``'s ``[grid]``
    and ``[sample]`` give the axes the factor may not be).

    Raises:
        UserError: naming ``out_dir/study.toml`` and ``pairs.<field>``, with the fix.
    """
    if table is None:
        return None
    path = out_dir / STUDY_FILE
    try:
        return _validated_pairs(table, study, str(path)).model_dump()
    except UserError as err:
        raise UserError(f"{err} {rewrite(out_dir)}") from None


def _validated_pairs(table: Any, study: Mapping[str, Any], source: str) -> Any:
    """`study_pairs`' checks; each failure a UserError starting with ``source``."""
    from pydantic import ValidationError

    from sensgen.analysis.pairs import role_of
    from sensgen.study_tables import PAIR_FACTORS, Pairing, check_pairing

    if not isinstance(table, Mapping):
        raise UserError(f"{source}: [pairs] must be a table (factor, values), not {table!r}.")
    try:
        pairs = Pairing(**table)
    except ValidationError as err:
        raise UserError(f"{source}: {_pairs_errors(err)}.") from None
    if pairs.factor not in PAIR_FACTORS:
        raise UserError(
            f"{source}: pairs.factor {pairs.factor!r} is not a paired factor; choose one of "
            f"{', '.join(PAIR_FACTORS)}."
        )
    for i, value in enumerate(pairs.values):
        try:
            role_of(pairs.factor, value)
        except ValidationError as err:
            raise UserError(
                f"{source}: pairs.values[{i}] = {value!r} is not a valid {pairs.factor} "
                f"({err.errors()[0]['msg']}); give each member a valid {pairs.factor}."
            ) from None
    check_pairing(pairs, _axes(study), source)
    return pairs


def _pairs_errors(err: Any) -> str:
    """pydantic's errors of a `Pairing` as "pairs.<field>: why (got ...)" sentences."""
    from sensgen.study_tables import Pairing

    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        if e["type"] == "extra_forbidden":
            valid = ", ".join(Pairing.model_fields)
            parts.append(f"unknown key pairs.{where} (valid in [pairs]: {valid})")
        else:
            parts.append(f"pairs.{where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def _axes(study: Mapping[str, Any]) -> set[str]:
    """The [grid] and [sample] axes of a raw study table (the pairs may not set them)."""
    grid, sample = study.get("grid"), study.get("sample")
    axes = set(grid) if isinstance(grid, Mapping) else set()
    return axes | (set(sample) - {"n", "seed"} if isinstance(sample, Mapping) else set())


def rewrite(out_dir: Path) -> str:
    """The fix for a damaged DIR/study.toml (`sensgen run` writes it, as run)."""
    return (
        f"It is the study as run, written by `sensgen run`: run `sensgen run STUDY --out "
        f"{out_dir}` again with the study file or preset you ran, which writes it anew "
        "(nothing finished is trained again), or fix it by hand."
    )
