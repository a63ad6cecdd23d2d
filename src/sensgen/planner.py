"""From a study to run specs (grid × random samples × pairs) and from specs to packs.

Expansion (paper §4: "sampled at random, not a full grid"; Study 4: matched pairs):

1. Configurations: `n` random draws from the `[sample]` axes (uniform choices, log-uniform
   or uniform ranges), each from its own seeded generator; one empty draw without `[sample]`.
   Unless `[grid]` has a `seed` axis, each draw also gets a model seed of its own
   (`sampling.seed_draws`): independent initial weights and data order per configuration.
2. Each configuration is crossed with the `[grid]` axes (the Cartesian product).
3. With `[pairs]`, each result is instantiated once per factor value (and the fields of
   that value's `overrides` table, if any). The members share every other field, the seed
   included, and a `pair_id` (SHA-256 of the spec without the factor and the overridden
   fields); `pair_role` is the factor's value as text ("relu", "full", "true", "0.0"), the
   first value being the member the paper expects to generalize better.

Specs are deduplicated by `run_id`. Packs group specs that can train together (same
`pack_key`) in chunks bounded by `pack_size` and by a memory estimate.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sensgen import data, train
from sensgen.errors import UserError
from sensgen.optim import OPTIMIZERS
from sensgen.spec import RunSpec


@dataclass(frozen=True)
class PlannedSpec:
    """A run spec with its place in a paired design (None outside pairs)."""

    spec: RunSpec
    pair_id: str | None = None
    pair_role: str | None = None


def expand(
    base: Mapping[str, Any],
    grid: Mapping[str, list[Any]],
    samples: list[dict[str, Any]],
    pair_factor: str | None = None,
    pair_values: list[Any] | None = None,
    pair_overrides: list[dict[str, Any]] | None = None,
) -> list[PlannedSpec]:
    """Every run of a study: samples × grid (× pair values), deduplicated by run_id.

    Pair member i sets the factor to ``pair_values[i]`` and the fields of
    ``pair_overrides[i]`` (if given); a pair's id hashes what its members share.
    """
    axes = list(grid)
    planned: dict[str, PlannedSpec] = {}
    for sample in samples or [{}]:
        for values in itertools.product(*(grid[a] for a in axes)):
            fields = {**base, **sample, **dict(zip(axes, values, strict=True))}
            for p in _paired(fields, pair_factor, pair_values, pair_overrides):
                planned.setdefault(p.spec.run_id, p)
    return list(planned.values())


def _paired(
    fields: dict[str, Any],
    factor: str | None,
    values: list[Any] | None,
    overrides: list[dict[str, Any]] | None,
):
    if factor is None:
        yield PlannedSpec(RunSpec.model_validate(fields))
        return
    values = values or []
    overrides = overrides or [{} for _ in values]
    members = [
        RunSpec.model_validate({**fields, **extra, factor: v})
        for v, extra in zip(values, overrides, strict=True)
    ]
    # Without overrides this is the factor alone: pair ids stay what they were.
    differing = {factor, *(key for extra in overrides for key in extra)}
    shared = members[0].model_dump(mode="json", exclude=differing)
    pair_id = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]
    for spec in members:
        yield PlannedSpec(spec, pair_id, _role(spec.model_dump(mode="json")[factor]))


def _role(value: Any) -> str:
    """A factor value as a readable role: "relu", "full" (batch size), "true", "0.0"."""
    if isinstance(value, str):
        return value
    return "full" if value is None else json.dumps(value)


MAX_RUNS = 1_000_000  # as many as [sample] n may draw; planning them takes about a minute


def check_plan_size(
    n_draws: int | None, grid: Mapping[str, int], n_members: int | None, source: str
) -> None:
    """Refuse a study that would plan more than `MAX_RUNS` runs, before expanding it.

    The count is draws × the product of the [grid] list lengths × pair members (an upper
    bound: equal runs are planned once). A plan of millions of specs is a mistake (one
    grid axis too many, an n meant for another study) that used to fill the memory of
    the machine, silently, before the first model trained.
    """
    factors = {"sample.n": n_draws or 1, **{f"grid.{k}": v for k, v in grid.items()}}
    factors["pairs.values"] = n_members or 1
    if (total := math.prod(factors.values())) <= MAX_RUNS:
        return
    sizes = " × ".join(f"{v:,} ({k})" for k, v in factors.items() if v > 1)
    raise UserError(
        f"{source}: this study plans {sizes} = {total:,} runs, more than the {MAX_RUNS:,} "
        "sensgen plans in one study. Lower sample.n or shorten the [grid] lists (or split "
        "the study into several, each with its own --out)."
    )


@dataclass(frozen=True)
class Pack:
    """Same-shape specs that train together; `pack_id` hashes their run_ids."""

    pack_id: str
    specs: tuple[RunSpec, ...]


def model_memory_bytes(spec: RunSpec) -> int:
    """A generous estimate of one model's training memory in a pack (float32).

    Copies of its n_params parameters (`train.train_pack`): the parameters (updated in
    place, `divergence`), a gradient buffer unless the optimiser takes the gradient into its
    own state (momentum), and the optimiser's state buffers (`optim.OPTIMIZERS`). Then the
    batch: inputs and, per hidden unit and layer, 4 values (pre-activation, activation,
    backpropagated gradient and its product with φ'), and 2 per class. A full-batch run
    holds one chunk of at most `train.FULL_BATCH_CHUNK` examples at a time, plus the first
    layer's pack-wide products (2 per first-layer unit).
    """
    info = data.describe(spec.dataset)
    d = math.prod(info.image_shape)
    n_params = sum(
        n_out * (n_in + 1)
        for n_in, n_out in itertools.pairwise([d] + [spec.width] * spec.depth + [info.n_classes])
    )
    optimizer = OPTIMIZERS[spec.optimizer]
    # The scratch too, which a pack needs should it fall back from the fused update.
    copies = 1 + (optimizer.accumulator is None) + len(optimizer.carried + optimizer.scratch)
    n_train = spec.train_subset or info.n_train
    batch = spec.batch_size or min(n_train, train.FULL_BATCH_CHUNK)
    per_example = d + 4 * spec.width * spec.depth + 2 * info.n_classes
    if spec.batch_size is None:
        per_example += 2 * spec.width
    return 4 * (copies * n_params + batch * per_example)


def plan_packs(
    specs: Iterable[RunSpec], pack_size: int, memory_bytes: int | None = None
) -> list[Pack]:
    """Group specs by `pack_key` (first-appearance order) into packs of ≤ pack_size models
    whose summed `model_memory_bytes` stays within `memory_bytes` (at least one model)."""
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.pack_key(), []).append(spec)
    packs = []
    for members in groups.values():
        size = pack_size
        if memory_bytes is not None:
            size = max(1, min(pack_size, memory_bytes // model_memory_bytes(members[0])))
        for start in range(0, len(members), size):
            chunk = tuple(members[start : start + size])
            ids = ",".join(sorted(s.run_id for s in chunk))
            packs.append(Pack(hashlib.sha256(ids.encode()).hexdigest()[:16], chunk))
    return packs
