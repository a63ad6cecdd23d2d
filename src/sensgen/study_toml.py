"""Study values written as TOML, for the study as run (DIR/study.toml; `sensgen.study`).

Only what a study holds: strings, booleans, numbers, lists and inline tables of them, and
None, which a study spells "full" (batch_size, train_subset). Written so that `tomllib`
reads back the very values: a study directory must reopen as it was run.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sensgen.spec import FULL


def _toml_string(text: str) -> str:
    """A TOML basic string. Not json.dumps(text) alone: it writes a character beyond
    U+FFFF (an emoji in a description) as a surrogate pair, which TOML refuses, so the
    study directory's study.toml could not be read back; TOML also wants DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else quoted ("0.5" bare would be a dotted key)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def toml_value(value: Any) -> str:
    """A study value as TOML (None is "full"), for DIR/study.toml (`sensgen.study`)."""
    if value is None:  # only batch_size and train_subset take None, spelled "full"
        return _toml_string(FULL)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, int | float):
        return repr(value)
    return _toml_string(str(value))


def study_toml(top: dict[str, Any], tables: dict[str, dict[str, Any] | None]) -> str:
    """A study file: ``top`` (name, description, scale) then each table that is not None,
    its None values left out; a scale other than "default" as an empty ``[scales.NAME]``:
    its overrides are already in the tables, and the empty table keeps the name loadable
    without applying them twice (after later --set values)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for table, entries in tables.items():
        if entries is not None:
            lines += ["", f"[{table}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in entries.items() if v is not None]
    if top["scale"] != "default":
        lines += ["", f"[scales.{toml_value(top['scale'])}]"]
    return "\n".join(lines) + "\n"
