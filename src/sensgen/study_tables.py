"""The tables of a study file besides `[base]` and `[grid]` (`sensgen.study.Study`).

`[measure]` (`Measurements`: what is measured on each trained model), `[execution]` (how
the study runs), `[sample]` (random draws over some axes, paper §4), `[pairs]` (each
configuration once per value of one factor, paper §3 Study 4) and `[inclusion]` (which
trained models the analysis keeps, paper §4). Each is a frozen pydantic model that names
an unknown or out-of-range key in its error. Only `[sample]` and `[pairs]` change which
runs a study plans; the others never enter a run's identity.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from sensgen.errors import UserError
from sensgen.measures.suite import GROUPS as MEASURE_GROUPS
from sensgen.spec import NOT_BOOL, RunSpec


class Measurements(BaseModel):
    """What is measured on each trained model besides losses, accuracies and the test Jbar.

    None of it enters a run's identity: it describes the trained function, not training.

    Fields: `jacobian_train_points` (Jbar also on this many training points, a fixed subset;
    0: off), `transition_ellipses` (exact transition counts on this many ellipses through
    three test points of different classes; 0: off), `transition_sides` (sides of the
    inscribed polygon, paper §3 Study 4 default 1,200), `points` (store the per-test-point
    table).

    Study 2 (Fig. 2, `sensgen.geometry.measure_profiles`): `profile_ellipses` ellipses of each
    kind (random, different-class and same-class training points; 0: off), each sampled at
    `profile_points` angles and binned into `profile_bins` bins (a multiple of 3, so the
    anchors are bin centres). Study 3 (Fig. 3, `sensgen.geometry.measure_regions`):
    `region_planes` planes through three training points (0: off), `region_resolution`²
    pixels over `region_extent` times the anchors' extent, at init and after training.
    Beyond the paper (`sensgen.measures`): `generalization_measures` stores the norm-,
    margin- and flatness-based measures per model (true: every group of
    `sensgen.measures.GROUPS`; or a list of groups, e.g. ``["norms", "margin"]`` to skip the
    flatness and sharpness searches), margin and flatness on `measure_points` training
    points.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    jacobian_train_points: Annotated[int, NOT_BOOL, Field(ge=0)] = 1000
    transition_ellipses: Annotated[int, NOT_BOOL, Field(ge=0, le=100_000)] = 0
    transition_sides: Annotated[int, NOT_BOOL, Field(ge=6, le=10_000_000)] = 1200
    points: StrictBool = True
    profile_ellipses: Annotated[int, NOT_BOOL, Field(ge=0, le=10_000)] = 0
    profile_points: Annotated[int, NOT_BOOL, Field(ge=3, le=1_000_000)] = 600
    profile_bins: Annotated[int, NOT_BOOL, Field(ge=3, le=100_000, multiple_of=3)] = 60
    region_planes: Annotated[int, NOT_BOOL, Field(ge=0, le=1_000)] = 0
    region_resolution: Annotated[int, NOT_BOOL, Field(ge=2, le=4096)] = 256
    region_extent: Annotated[float, NOT_BOOL, Field(gt=0.0, le=100.0)] = 1.5
    generalization_measures: StrictBool | list[str] = False
    measure_points: Annotated[int, NOT_BOOL, Field(ge=1)] = 1000

    @field_validator("generalization_measures")
    @classmethod
    def _known_groups(cls, value: bool | list[str]) -> bool | list[str]:
        unknown = [] if isinstance(value, bool) else sorted(set(value) - set(MEASURE_GROUPS))
        if unknown:
            raise ValueError(
                f"unknown measure group(s) {unknown}: use true (all), false, or a list of "
                f"{', '.join(MEASURE_GROUPS)}"
            )
        return value

    def measure_groups(self) -> tuple[str, ...]:
        """The `sensgen.measures.GROUPS` to compute (empty: none), in their canonical order."""
        chosen = self.generalization_measures
        if isinstance(chosen, bool):
            return MEASURE_GROUPS if chosen else ()
        return tuple(g for g in MEASURE_GROUPS if g in chosen)

    @model_validator(mode="after")
    def _points_fill_bins(self) -> Measurements:
        if self.profile_ellipses and self.profile_points < self.profile_bins:
            raise ValueError(
                f"profile_points ({self.profile_points}) must be >= profile_bins "
                f"({self.profile_bins}) so every angle bin holds a sample; use a multiple, "
                f"e.g. {10 * self.profile_bins}"
            )
        return self


class Execution(BaseModel):
    """How a study runs; none of this enters a run's identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pack_size: Annotated[int, NOT_BOOL, Field(ge=1, le=4096)] = 16
    # estimated training memory per pack (finite: it sizes packs; inf would overflow)
    pack_memory_gb: Annotated[float, NOT_BOOL, Field(gt=0.0, allow_inf_nan=False)] = 4.0


class Sampling(BaseModel):
    """`[sample]`: n random configurations over some axes (paper §4: random search).

    Every other key is an axis: a list (uniform choice), ``{choice = [...]}``,
    ``{log_uniform = [lo, hi]}``, ``{uniform = [lo, hi]}``, or a conditional axis
    ``{by = "optimizer", adam = AXIS, sgd = AXIS, ...}``. `seed` seeds the draws; each
    draw also gets a model seed of its own (`sampling.seed_draws`) unless `[grid]` has a
    `seed` axis.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    n: Annotated[int, NOT_BOOL, Field(ge=1, le=1_000_000)]
    seed: Annotated[int, NOT_BOOL, Field(ge=0)] = 0

    def axes(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Pairing(BaseModel):
    """`[pairs]`: every configuration once per value of one factor (paper §3 Study 4).

    The first value is the member expected to generalize better (the x axis of Fig. 4);
    with more than two values the first is compared with each of the others.
    `overrides` (optional, one table per value) gives other run fields a member sets,
    e.g. ``[{}, {max_steps = 10000}]`` for the paper's 1e4 full-batch steps against 1e5
    (§4); the members of a pair share every field but the factor and these.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    factor: str
    values: Annotated[list[Any], Field(min_length=2)]
    overrides: list[dict[str, Any]] | None = None


class Inclusion(BaseModel):
    """`[inclusion]`: which trained models the analysis keeps (paper §4).

    `min_train_acc` None means the paper's rule: 100% training accuracy, 99.9% for CIFAR-100.
    `apply = false` keeps every finished model (the paper's augmentation pairs, Fig. 4b).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    apply: StrictBool = True
    min_train_acc: Annotated[float, NOT_BOOL, Field(ge=0.0, le=1.0)] | None = None

    def threshold(self, dataset: str) -> float:
        if self.min_train_acc is not None:
            return self.min_train_acc
        return 0.999 if dataset == "cifar100" else 1.0


PAIR_FACTORS = ("random_labels", "augment", "nonlinearity", "batch_size")


def check_pairing(pairs: Pairing, axes: set[str], source: str) -> None:
    """A `[pairs]` table is sound: a paired factor that no [grid] or [sample] axis (`axes`)
    also sets, distinct values, and overrides `_check_pair_overrides` accepts.

    Raises:
        UserError: naming the key, for the study file `source`.
    """
    factor = pairs.factor
    if factor not in PAIR_FACTORS:
        raise UserError(
            f"{source}: pairs.factor {factor!r} is not a paired factor; choose one of "
            f"{', '.join(PAIR_FACTORS)}."
        )
    if factor in axes:
        raise UserError(
            f"{source}: pairs.factor {factor!r} also appears in [grid] or [sample]; the "
            "pairs set it, so remove it there."
        )
    _check_pair_values(factor, pairs.values, source)
    _check_pair_overrides(pairs, axes, source)


def _check_pair_values(factor: str, values: list[Any], source: str) -> None:
    """The values must stay distinct once validated (1 and true are one augment value)."""
    canonical = [
        RunSpec.model_validate({factor: v}).model_dump(mode="json")[factor] for v in values
    ]
    if len({json.dumps(v) for v in canonical}) != len(canonical):
        raise UserError(
            f"{source}: pairs.values {values!r} name the same {factor} more than once "
            f"(as run fields they are {canonical!r}); give each member of a pair its own value."
        )


def _check_pair_overrides(pairs: Pairing, axes: set[str], source: str) -> None:
    """One table of run fields per pair value; none names the factor, the seed or an axis."""
    if pairs.overrides is None:
        return
    if len(pairs.overrides) != len(pairs.values):
        raise UserError(
            f"{source}: pairs.overrides has {len(pairs.overrides)} tables for "
            f"{len(pairs.values)} pairs.values; give one per value ({{}} for none)."
        )
    for i, extra in enumerate(pairs.overrides):
        for key, value in extra.items():
            where = f"pairs.overrides[{i}].{key}"
            if key not in RunSpec.model_fields:
                raise UserError(
                    f"{source}: {where}: unknown run field {key!r}. Valid fields: "
                    f"{', '.join(RunSpec.model_fields)}."
                )
            if key in ("seed", "dataset", *PAIR_FACTORS) or key in axes:  # factor included
                why = "the pair factor" if key == pairs.factor else "what the pair shares"
                if key in axes:
                    why = "a [grid] or [sample] axis"
                raise UserError(
                    f"{source}: {where}: {key} is {why}, which a member may not override "
                    "(the pair would differ in more than its factor and budget); remove it "
                    "from the overrides."
                )
            try:
                RunSpec.model_validate({key: value})
            except ValidationError as err:
                reason = err.errors()[0]["msg"]
                raise UserError(
                    f"{source}: {where}: {reason}. Fix the study and run again."
                ) from None
