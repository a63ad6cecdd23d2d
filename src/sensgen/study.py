"""Studies: a TOML file (or built-in preset) that expands into frozen run specs and packs.

A study file has a `[base]` table of run-spec defaults and a `[grid]` table whose every
key lists values; the study is the Cartesian product of the grid over the base::

    name = "my-study"
    description = "What it tests."

    [base]
    dataset = "mnist_sample"
    optimizer = "adam"
    lr = 1e-3

    [grid]
    width = [64, 256]
    seed = [0, 1, 2]

    [execution]          # how to run it; never part of a run's identity
    pack_size = 16

Every key is validated: unknown keys and out-of-range values are `UserError`s naming the
key. A `RunSpec` is frozen; its `run_id` is the SHA-256 of its canonical JSON (sorted
keys, schema version), so it depends only on what decides the result, never on paths,
workers or devices. Same-shape specs are grouped into packs that train together.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sensgen import data
from sensgen.errors import UserError
from sensgen.planner import Pack, PlannedSpec, check_plan_size, expand, plan_packs
from sensgen.sampling import check_sample_axes, check_sample_draws, draw_samples, seed_draws
from sensgen.schema import STUDY_FILE
from sensgen.spec import FULL, SPEC_SCHEMA, RunSpec
from sensgen.study_tables import (
    PAIR_FACTORS,
    Execution,
    Inclusion,
    Measurements,
    Pairing,
    Sampling,
    check_pairing,
)
from sensgen.study_toml import study_toml

__all__ = [
    "FULL",
    "PAIR_FACTORS",
    "SPEC_SCHEMA",
    "Execution",
    "Inclusion",
    "Measurements",
    "Pack",
    "Pairing",
    "PlannedSpec",
    "RunSpec",
    "Sampling",
    "Study",
    "load",
    "plan_packs",
    "preset_names",
]


TABLES = ("base", "grid", "sample", "pairs", "inclusion", "measure", "execution")


class Study(BaseModel):
    """A named set of runs: `base` defaults, `[sample]` draws × `[grid]` axes × `[pairs]`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    scale: str = "default"
    scales: dict[str, dict[str, Any]] = Field(default_factory=dict)
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    sample: Sampling | None = None
    pairs: Pairing | None = None
    inclusion: Inclusion = Inclusion()
    measure: Measurements = Measurements()
    execution: Execution = Execution()

    @field_validator("name")
    @classmethod
    def _names_a_folder(cls, name: str) -> str:
        """The name is the default study directory's last part (runs/NAME): "." and ".."
        would make it runs/ itself, or the working directory."""
        if set(name) == {"."}:
            raise ValueError("dots alone name no folder of the study's own (runs/NAME)")
        return name

    def planned(self) -> list[PlannedSpec]:
        """Every run of the study with its pair membership, deduplicated by run_id."""
        samples = []
        if self.sample is not None:
            axes, fixed = self.sample.axes(), self.fixed_fields()
            samples = draw_samples(axes, self.sample.n, self.sample.seed, fixed)
            # A [grid] seed axis still wins: grid values override a draw's in expand().
            samples = seed_draws(samples, self.sample.seed, fixed["seed"])
        if self.pairs is None:
            return expand(self.base, self.grid, samples)
        pairs = self.pairs
        return expand(self.base, self.grid, samples, pairs.factor, pairs.values, pairs.overrides)

    def fixed_fields(self) -> dict[str, Any]:
        """Every run field's value outside [grid] and [sample]: [base] over the defaults,
        each validated as the run field (``augment = 1`` is ``true``)."""
        fields = RunSpec().model_dump(mode="json")
        for key, value in self.base.items():
            fields[key] = RunSpec.model_validate({key: value}).model_dump(mode="json")[key]
        return fields

    def specs(self) -> list[RunSpec]:
        """Every run of the study, deduplicated by run_id."""
        return [p.spec for p in self.planned()]

    def to_toml(self) -> str:
        """The study as TOML, defaults resolved into `[base]` (written to DIR/study.toml)."""
        tables = {
            "base": {**RunSpec().model_dump(mode="json"), **self.base},
            "grid": self.grid,
            "sample": self.sample.model_dump() if self.sample else None,
            "pairs": self.pairs.model_dump() if self.pairs else None,
            "inclusion": self.inclusion.model_dump(),
            "measure": self.measure.model_dump(),
            "execution": self.execution.model_dump(),
        }
        top = {"name": self.name, "description": self.description, "scale": self.scale}
        return study_toml(top, tables)


# ---- loading ----------------------------------------------------------------------------

PRESETS_PACKAGE = "sensgen.presets"


def preset_names() -> list[str]:
    """Names of the built-in studies (`sensgen run NAME`)."""
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load(path_or_preset: str | Path, overrides: Mapping[str, str] | None = None) -> Study:
    """Load a study from a TOML file or a preset name, applying `--set KEY=VALUE` overrides.

    Overrides address `base.KEY`, `grid.KEY` (a TOML array), `execution.KEY`, `name` or a
    bare run-spec KEY (which sets `base.KEY` and removes that axis from [grid] and [sample]).
    Every ``[scales.NAME]`` is checked as `--set scale=NAME` would apply it, chosen or not.

    Raises:
        UserError: missing file, TOML syntax error, unknown key, bad value — naming it.
    """
    source, text = _read_study_text(path_or_preset)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(
            f"{source} is not valid TOML ({err}). Fix the syntax and run again."
        ) from None
    sets = {k: _parse_value(v) for k, v in (overrides or {}).items()}
    chosen = sets.pop("scale", raw.get("scale", "default"))
    # An error may be in a value given on the command line rather than in the file.
    where = f"{source} with --set {', '.join(sets)}" if sets else source
    study = _validate(_scaled(raw, chosen, sets, source), where)
    _check_draws(raw, chosen, study, where)
    scales = raw.get("scales")
    for name in scales if isinstance(scales, dict) else []:
        if name != chosen or name == "default":
            _check_scale(_scaled(raw, name, sets, source), name, where)
    return study


def _scaled(raw: dict, scale: Any, sets: Mapping[str, Any], source: str) -> dict:
    """A copy of the parsed file with a scale's overrides applied, then `--set`'s."""
    raw = copy.deepcopy({**raw, "scale": scale})
    _apply_scale(raw, source)
    for key, value in sets.items():
        _set_key(raw, key, value, f"--set {key}", source)
    return raw


def _check_draws(raw: dict, scale: Any, study: Study, source: str) -> None:
    """`check_sample_draws` on the study to run, unless a --set fixed the last axis of a
    [sample] that has axes as written (``--set width=256``: one configuration, as asked)."""
    if study.sample is None or study.sample.axes():
        return
    try:
        written = Study.model_validate(_scaled(raw, scale, {}, source))
    except ValidationError:
        written = None  # (valid only with its --set values, which _validate has checked)
    if written is None or written.sample is None or not written.sample.axes():
        check_sample_draws(study.sample.n, study.grid, source)


def _check_scale(raw: dict, name: str, source: str) -> None:
    """Validate a ``[scales.NAME]`` this run does not apply, as `--set scale=NAME` would
    (without planning, so no dataset checks): a misspelt key or a bad value in
    ``[scales.paper]`` was found only by the paper-scale run, on the cluster it was for."""
    where = f"{source} [scales.{name}]"
    if name == "default":
        raise UserError(
            f"{where} is never applied: the default scale is the study as written. Put its "
            "keys in the study's tables, or rename the table."
        )
    try:
        _check_axes(Study.model_validate(raw), where)
    except ValidationError as err:
        raise UserError(
            f"{where}: {describe_errors(err)}. Fix the scale (it applies with --set scale={name})."
        ) from None


def _parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, arrays, tables), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _read_study_text(path_or_preset: str | Path) -> tuple[str, str]:
    path = Path(path_or_preset)
    # A directory named like a preset is most likely that preset's study directory
    # (`sensgen run quickstart --out quickstart`, resumed from the same folder): the preset.
    preset_dir = path.is_dir() and path.suffix != ".toml" and str(path) in preset_names()
    if (path.suffix == ".toml" or path.exists()) and not preset_dir:
        if not path.is_file():
            raise UserError(f"Study file {path} {_not_a_file(path)}")
        try:
            # utf-8-sig: Windows editors (Notepad, PowerShell's Out-File) start UTF-8 with a
            # byte-order mark, which tomllib calls an "Invalid statement" at line 1, column 1.
            return str(path), path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"Study file {path} cannot be read as UTF-8 text ({err}). Pass a readable "
                "TOML file (TOML files are UTF-8)."
            ) from None
    name = str(path_or_preset)
    if name not in preset_names():
        raise UserError(
            f"Unknown study {name!r}: it is neither a .toml file nor a built-in preset. "
            f"Presets: {', '.join(preset_names())}. Or pass the path of a study TOML file."
        )
    text = resources.files(PRESETS_PACKAGE).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return f"preset {name!r}", text


def _not_a_file(path: Path) -> str:
    """Why a study path is no file, and the fix: a study directory's own study, a preset."""
    if path.is_dir() and (path / STUDY_FILE).is_file():
        return (
            f"is a directory: a study directory, it seems. To resume it, run "
            f"`sensgen run {path / STUDY_FILE} --out {path}`."
        )
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    if path.suffix == ".toml" and path.name == str(path) and path.stem in preset_names():
        return f"{what}. For the built-in preset, drop the suffix: `sensgen run {path.stem}`."
    return f"{what}. Pass an existing .toml file or a preset name ({', '.join(preset_names())})."


def _apply_scale(raw: dict, source: str) -> None:
    """Apply the `[scales.NAME]` overrides of the chosen `scale` (e.g. ``--set scale=paper``)."""
    name = raw.get("scale", "default")
    if name == "default":
        return
    scales = raw.get("scales", {})
    if not isinstance(scales, dict):
        raise UserError(
            f"{source}: scales must be a table of [scales.NAME] tables, got {scales!r}. "
            "Write each scale as a [scales.NAME] table of overrides."
        )
    if not isinstance(name, str) or name not in scales:
        raise UserError(
            f"{source}: scale {name!r} is not defined; this study defines: "
            f"{', '.join(['default', *scales])}. Use one of those, or add a [scales.NAME] table."
        )
    if not isinstance(scales[name], dict):
        raise UserError(
            f"{source}: scales.{name} must be a table of overrides (KEY = VALUE or "
            f"TABLE = {{FIELD = VALUE}}), got {scales[name]!r}."
        )
    for key, value in scales[name].items():
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        for field, v in entries:
            full = key if field is None else f"{key}.{field}"
            _set_key(raw, full, v, f"[scales.{name}] {full}", source)


def _set_key(raw: dict, key: str, value: Any, origin: str, source: str) -> None:
    """Set TABLE.FIELD, a top-level key, or a bare run field (which leaves [grid], [sample]
    and the pairs' overrides, so that its value applies to every run)."""
    table, _, field = key.rpartition(".")
    if table in TABLES:
        raw.setdefault(table, {})[field] = value
    elif table == "" and field in ("name", "description"):
        raw[field] = value
    elif table == "" and field in RunSpec.model_fields:
        raw.setdefault("base", {})[field] = value
        for name in ("grid", "sample"):
            axes = raw.get(name)
            # sample.seed is the sampler's own seed, not an axis.
            if isinstance(axes, dict) and not (name == "sample" and field == "seed"):
                axes.pop(field, None)
        _drop_pair_override(raw.get("pairs"), field)
    else:
        tables = [t for t, model in _TABLE_MODELS.items() if field in model.model_fields]
        hint = f" Did you mean {' or '.join(f'{t}.{field}' for t in tables)}?" if tables else ""
        raise UserError(
            f"{origin}: unknown key {key!r} for {source}.{hint} Use TABLE.FIELD with TABLE "
            f"one of {', '.join(TABLES)}, or a run field ({', '.join(RunSpec.model_fields)})."
        )


def _drop_pair_override(pairs: Any, field: str) -> None:
    """Remove `field` from every table of ``pairs.overrides`` (unvalidated raw TOML)."""
    overrides = pairs.get("overrides") if isinstance(pairs, dict) else None
    for extra in overrides if isinstance(overrides, list) else []:
        if isinstance(extra, dict):
            extra.pop(field, None)


def _validate(raw: dict, source: str) -> Study:
    try:
        study = Study.model_validate(raw)
        _check_axes(study, source)
        specs = study.specs()
    except ValidationError as err:
        raise UserError(f"{source}: {describe_errors(err)}. Fix the study and run again.") from None
    for spec in {s.pack_key(): s for s in specs}.values():
        _check_against_dataset(spec, source)
    return study


def _check_axes(study: Study, source: str) -> None:
    """Every base/grid/sample key is a run field; lists are non-empty; pairs are sound."""
    sample_axes = study.sample.axes() if study.sample else {}
    for table, keys in (("base", study.base), ("grid", study.grid), ("sample", sample_axes)):
        for key in keys:
            if key not in RunSpec.model_fields:
                raise UserError(
                    f"{source}: unknown run field {key!r} in [{table}]. Valid fields: "
                    f"{', '.join(RunSpec.model_fields)}. Fix the key and run again."
                )
    for key, values in study.grid.items():
        if not values:
            raise UserError(f"{source}: grid.{key} is an empty list; give at least one value.")
    n_draws = study.sample.n if study.sample else None
    n_members = len(study.pairs.values) if study.pairs else None
    check_plan_size(n_draws, {k: len(v) for k, v in study.grid.items()}, n_members, source)
    varied = {*study.grid, "seed"}
    if study.pairs is not None:  # set per member, after the draws
        varied |= {study.pairs.factor, *(k for e in study.pairs.overrides or [] for k in e)}
    check_sample_axes(sample_axes, study.fixed_fields(), varied, source)
    if overlap := sorted(study.grid.keys() & sample_axes.keys()):
        key = overlap[0]
        raise UserError(
            f"{source}: {key} is both a [grid] axis and a [sample] axis, and a run takes "
            f"one value (the grid's would silently win). Keep grid.{key} or sample.{key}."
        )
    if study.pairs is not None:
        check_pairing(study.pairs, {*study.grid, *sample_axes}, source)


def describe_errors(err: ValidationError) -> str:
    """One readable sentence per pydantic error, naming the key."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "study"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}{_valid_keys(e['loc'])}")
        else:
            msg = e["msg"].removeprefix("Value error, ")  # (a validator's own sentence)
            parts.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "; ".join(parts)


_TABLE_MODELS: dict[str, type[BaseModel]] = {"sample": Sampling, "pairs": Pairing}
_TABLE_MODELS |= {"inclusion": Inclusion, "measure": Measurements, "execution": Execution}


def _valid_keys(loc: tuple) -> str:
    """ ", valid: ..." for an unknown key at the top of a study or in one of its tables."""
    if len(loc) == 1:
        return f" (valid: {', '.join(Study.model_fields)})"
    if len(loc) == 2 and loc[0] in _TABLE_MODELS:
        return f" (valid in [{loc[0]}]: {', '.join(_TABLE_MODELS[loc[0]].model_fields)})"
    return ""


def _check_against_dataset(spec: RunSpec, source: str) -> None:
    n_train = data.describe(spec.dataset).n_train
    if spec.train_subset is not None and spec.train_subset > n_train:
        raise UserError(
            f"{source}: train_subset = {spec.train_subset} exceeds the {n_train} training "
            f'images of {spec.dataset!r}; use at most {n_train} or "full".'
        )
    if spec.batch_size is not None and spec.batch_size > (spec.train_subset or n_train):
        raise UserError(
            f"{source}: batch_size = {spec.batch_size} exceeds the training set size; "
            'use a smaller batch_size or "full".'
        )
