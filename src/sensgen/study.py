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

import hashlib
import itertools
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sensgen import data
from sensgen.errors import UserError
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName

SPEC_SCHEMA = 2  # v2 added `augment`
FULL = "full"


class RunSpec(BaseModel):
    """Everything that decides one trained model's result (paper §4).

    Fields: `dataset`, `train_subset` (None: the full training set), `random_labels`
    (fraction of training labels replaced by uniform draws), `width`, `depth` (hidden
    layers), `nonlinearity`, `init_scale` (σ_w²), `optimizer`, `lr`, `batch_size` (None:
    full batch), `max_steps`, `eval_every` (steps between training-accuracy checks),
    `stop_at_fit` (stop at 100% training accuracy), `seed` (initial weights, data order,
    random labels and augmentation draws), `augment` (random translations of the training
    images, plus horizontal flips for CIFAR, drawn on the fly).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = "mnist_sample"
    train_subset: Annotated[int, Field(ge=1)] | None = None
    random_labels: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    width: Annotated[int, Field(ge=1, le=65536)] = 256
    depth: Annotated[int, Field(ge=1, le=64)] = 2
    nonlinearity: Nonlinearity = Nonlinearity.RELU
    init_scale: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: Annotated[float, Field(gt=0.0, le=100.0)] = 1e-3
    batch_size: Annotated[int, Field(ge=1)] | None = 128
    max_steps: Annotated[int, Field(ge=1)] = 10_000
    eval_every: Annotated[int, Field(ge=1)] = 100
    stop_at_fit: bool = True
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    augment: bool = False

    @field_validator("batch_size", "train_subset", mode="before")
    @classmethod
    def _full_means_none(cls, value: Any) -> Any:
        return None if value == FULL else value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in data.names():
            raise ValueError(f"unknown dataset {value!r}; choose one of {', '.join(data.names())}")
        return value

    def canonical_json(self) -> str:
        """Sorted-key JSON of every field plus the schema version: the run's identity."""
        fields = self.model_dump(mode="json")
        fields["schema"] = SPEC_SCHEMA
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        """First 16 hex digits of SHA-256(canonical JSON)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def pack_key(self) -> tuple:
        """Specs with equal keys can train in one pack (same shapes, same schedule)."""
        return (
            self.dataset,
            self.train_subset,
            self.width,
            self.depth,
            self.nonlinearity,
            self.optimizer,
            self.batch_size,
            self.max_steps,
            self.eval_every,
            self.stop_at_fit,
        )

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        fields = json.loads(text)
        fields.pop("schema", None)
        return cls.model_validate(fields)


class Measurements(BaseModel):
    """What is measured on each trained model besides losses, accuracies and the test Jbar.

    None of it enters a run's identity: it describes the trained function, not training.

    Fields: `jacobian_train_points` (Jbar also on this many training points, a fixed subset;
    0: off), `transition_ellipses` (exact transition counts on this many ellipses through
    three test points of different classes; 0: off), `transition_sides` (sides of the
    inscribed polygon, paper §3 Study 4 default 1,200), `points` (store the per-test-point
    table).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    jacobian_train_points: Annotated[int, Field(ge=0)] = 1000
    transition_ellipses: Annotated[int, Field(ge=0, le=100_000)] = 0
    transition_sides: Annotated[int, Field(ge=6, le=10_000_000)] = 1200
    points: bool = True


class Execution(BaseModel):
    """How a study runs; none of this enters a run's identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pack_size: Annotated[int, Field(ge=1, le=4096)] = 16


class Study(BaseModel):
    """A named set of run specs: `base` defaults crossed with the `grid` axes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    measure: Measurements = Measurements()
    execution: Execution = Execution()

    def specs(self) -> list[RunSpec]:
        """Every run of the study, deduplicated by run_id, in grid order."""
        axes = list(self.grid)
        seen: dict[str, RunSpec] = {}
        for values in itertools.product(*(self.grid[a] for a in axes)):
            spec = RunSpec.model_validate({**self.base, **dict(zip(axes, values, strict=True))})
            seen.setdefault(spec.run_id, spec)
        return list(seen.values())

    def to_toml(self) -> str:
        """The study as TOML, defaults resolved into `[base]` (written to DIR/study.toml)."""
        base = {**RunSpec().model_dump(mode="json"), **self.base}
        lines = [
            f"name = {_toml_value(self.name)}",
            f"description = {_toml_value(self.description)}",
        ]
        for table, entries in (
            ("base", base),
            ("grid", self.grid),
            ("measure", self.measure.model_dump()),
            ("execution", self.execution.model_dump()),
        ):
            lines += ["", f"[{table}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in entries.items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


@dataclass(frozen=True)
class Pack:
    """Same-shape specs that train together; `pack_id` hashes their run_ids."""

    pack_id: str
    specs: tuple[RunSpec, ...]


def plan_packs(specs: Iterable[RunSpec], pack_size: int) -> list[Pack]:
    """Group specs by `pack_key` (order of first appearance), split into packs of ≤ pack_size."""
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.pack_key(), []).append(spec)
    packs = []
    for members in groups.values():
        for start in range(0, len(members), pack_size):
            chunk = tuple(members[start : start + pack_size])
            ids = ",".join(sorted(s.run_id for s in chunk))
            packs.append(Pack(hashlib.sha256(ids.encode()).hexdigest()[:16], chunk))
    return packs


# ---- loading ----------------------------------------------------------------------------

PRESETS_PACKAGE = "sensgen.presets"


def preset_names() -> list[str]:
    """Names of the built-in studies (`sensgen run NAME`)."""
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load(path_or_preset: str | Path, overrides: Mapping[str, str] | None = None) -> Study:
    """Load a study from a TOML file or a preset name, applying `--set KEY=VALUE` overrides.

    Overrides address `base.KEY`, `grid.KEY` (a TOML array), `execution.KEY`, `name` or a
    bare run-spec KEY (which sets `base.KEY` and removes that axis from the grid).

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
    for assignment, value in (overrides or {}).items():
        _apply_override(raw, assignment, value, source)
    return _validate(raw, source)


def _read_study_text(path_or_preset: str | Path) -> tuple[str, str]:
    path = Path(path_or_preset)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise UserError(
                f"Study file {path} {what}. Pass an existing .toml file or a preset "
                f"name ({', '.join(preset_names())})."
            )
        try:
            return str(path), path.read_text(encoding="utf-8")
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


def _apply_override(raw: dict, key: str, value: str, source: str) -> None:
    """Apply one `--set KEY=VALUE`; VALUE is parsed as a TOML value (bare words as strings)."""
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    table, _, field = key.rpartition(".")
    if table in ("base", "grid", "measure", "execution"):
        raw.setdefault(table, {})[field] = parsed
    elif table == "" and field in ("name", "description"):
        raw[field] = parsed
    elif table == "" and field in RunSpec.model_fields:
        raw.setdefault("base", {})[field] = parsed
        raw.get("grid", {}).pop(field, None)
    else:
        raise UserError(
            f"--set {key}={value}: unknown key {key!r} for {source}. Use base.FIELD, grid.FIELD, "
            f"execution.FIELD or a run field ({', '.join(RunSpec.model_fields)})."
        )


def _validate(raw: dict, source: str) -> Study:
    try:
        study = Study.model_validate(raw)
        for key in (*study.base, *study.grid):
            if key not in RunSpec.model_fields:
                raise UserError(
                    f"{source}: unknown run field {key!r}. Valid fields: "
                    f"{', '.join(RunSpec.model_fields)}. Fix the key and run again."
                )
        for key, values in study.grid.items():
            if not values:
                raise UserError(f"{source}: grid.{key} is an empty list; give at least one value.")
        specs = study.specs()
    except ValidationError as err:
        raise UserError(f"{source}: {_describe(err)}. Fix the study file and run again.") from None
    for spec in specs:
        _check_against_dataset(spec, source)
    return study


def _describe(err: ValidationError) -> str:
    """One readable sentence per pydantic error, naming the key."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "study"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        else:
            parts.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


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
