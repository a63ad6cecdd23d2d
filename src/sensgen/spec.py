"""A run spec: everything that decides one trained model's result, and its identity.

A `RunSpec` is frozen and validated (unknown keys and out-of-range values are errors). Its
`run_id` is the SHA-256 of its canonical JSON (sorted keys plus the schema version), so it
depends only on what decides the result, never on paths, workers or devices.

Example:
    >>> spec = RunSpec(dataset="digits", width=64, lr=0.01)
    >>> len(spec.run_id), RunSpec.from_json(spec.canonical_json()) == spec
    (16, True)
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

from sensgen import data
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName

SPEC_SCHEMA = 2  # v2 added `augment`
FULL = "full"


def _not_bool(value: Any) -> Any:
    """Refuse true/false for a number: pydantic reads true as 1, so ``width = true`` trained
    width-1 nets and ``lr = true`` a learning rate of 1, without a word. (A number in quotes,
    ``width = "8"``, is that number: `--set lr=.01`, which TOML cannot read as a number,
    arrives as the string ".01".)"""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


NOT_BOOL = BeforeValidator(_not_bool)


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
    train_subset: Annotated[int, NOT_BOOL, Field(ge=1)] | None = None
    random_labels: Annotated[float, NOT_BOOL, Field(ge=0.0, le=1.0)] = 0.0
    width: Annotated[int, NOT_BOOL, Field(ge=1, le=65536)] = 256
    depth: Annotated[int, NOT_BOOL, Field(ge=1, le=64)] = 2
    nonlinearity: Nonlinearity = Nonlinearity.RELU
    init_scale: Annotated[float, NOT_BOOL, Field(gt=0.0, le=100.0)] = 2.0
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: Annotated[float, NOT_BOOL, Field(gt=0.0, le=100.0)] = 1e-3
    batch_size: Annotated[int, NOT_BOOL, Field(ge=1)] | None = 128
    max_steps: Annotated[int, NOT_BOOL, Field(ge=1)] = 10_000
    eval_every: Annotated[int, NOT_BOOL, Field(ge=1)] = 100
    stop_at_fit: StrictBool = True
    seed: Annotated[int, NOT_BOOL, Field(ge=0, le=2**63 - 1)] = 0
    augment: StrictBool = False

    @field_validator("batch_size", "train_subset", mode="before")
    @classmethod
    def _full_means_none(cls, value: Any) -> Any:
        if isinstance(value, str) and value != FULL and not _is_number(value):
            raise ValueError(f'expected a number or "{FULL}", not the string {value!r}')
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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
