"""`[sample]`: random configurations over some run fields (paper §4: random search).

An axis is a list (uniform choice), ``{choice = [...]}``, ``{log_uniform = [lo, hi]}``,
``{uniform = [lo, hi]}``, or a conditional axis ``{by = AXIS, VALUE = AXIS, ...}`` whose
range depends on the value another axis took in the same draw, e.g. the paper's learning
rates per optimiser (§4: sgd and momentum 1e-3 … 1e-1, adam and rmsprop 1e-4 … 3e-3):

    lr = {by = "optimizer", sgd = {log_uniform = [1e-3, 1e-1]}, adam = ...}

`check_sample_axes` validates a study's axes; `draw_samples` draws them; `seed_draws`
gives each draw a model seed of its own.
"""

from __future__ import annotations

import json
import math
import random
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from sensgen.batches import derive_seed
from sensgen.errors import UserError
from sensgen.spec import RunSpec


def draw_samples(axes: Mapping[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` random configurations; draw i uses its own generator seeded by (seed, i).

    An axis is a list (uniform choice), ``{choice = [...]}``, ``{log_uniform = [lo, hi]}``
    or ``{uniform = [lo, hi]}``; a range over an integer run field (width, depth,
    batch_size, ...) rounds to integers, one over a float field (lr, init_scale,
    random_labels) never does, whatever the bounds are written as. A *conditional* axis,
    ``{by = "optimizer", sgd = AXIS, adam = AXIS, ...}``, draws from the axis named by the
    value another axis took in this draw (the paper's learning-rate ranges differ per
    optimiser, §4). Each draw depends only on (seed, i), so raising n keeps the earlier
    draws; plain axes are drawn first, in name order, then conditional ones, so adding a
    conditional axis leaves the others' values as they were.
    """
    plain = sorted((k, a) for k, a in axes.items() if not is_conditional(a))
    conditional = sorted((k, a) for k, a in axes.items() if is_conditional(a))
    draws = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        draw = {name: _draw(rng, axis, name in _INTEGER_FIELDS) for name, axis in plain}
        for name, axis in conditional:
            branch = axis[condition_key(draw[axis["by"]])]
            draw[name] = _draw(rng, branch, name in _INTEGER_FIELDS)
        draws.append(dict(sorted(draw.items())))
    return draws


def is_conditional(axis: Any) -> bool:
    """Whether a `[sample]` axis is conditional: a table with a ``by`` key."""
    return isinstance(axis, dict) and "by" in axis


def condition_key(value: Any) -> str:
    """The key of a conditional axis's branch for a drawn value: strings as they are,
    numbers and booleans as TOML writes them ("32", "0.5", "true")."""
    return value if isinstance(value, str) else json.dumps(value)


def seed_draws(
    draws: list[dict[str, Any]], sample_seed: int, base_seed: int
) -> list[dict[str, Any]]:
    """The draws, each with a model `seed` of its own unless it already has one.

    Draw i gets seed_i = derive_seed(base_seed, "sample:{sample_seed}:{i}"): without this
    every draw would train from the run default seed 0, so two draws of one shape would
    start from proportional weights (W ~ N(0, σ_w²/fan_in) from one generator) and see the
    same minibatch order, which are not the independent models the paper's random search
    draws. Like the draws, seed_i depends only on (sample_seed, i), so raising n keeps the
    earlier runs; a different `[base] seed` gives a fresh replicate of the same
    configurations. Grid and pair members of a draw share its seed (a matched comparison).
    """
    return [
        {"seed": derive_seed(base_seed, f"sample:{sample_seed}:{i}"), **draw}
        for i, draw in enumerate(draws)
    ]


def _leaf_types(annotation: Any) -> set[Any]:
    args = typing.get_args(annotation)
    if not args:
        return {annotation}
    if typing.get_origin(annotation) is Annotated:
        return _leaf_types(args[0])
    return set().union(*(_leaf_types(a) for a in args))


# Run fields holding integers: a sampled range over them is rounded (bool is not int here).
_INTEGER_FIELDS = frozenset(
    name for name, f in RunSpec.model_fields.items() if int in _leaf_types(f.annotation)
)


def _draw(rng: random.Random, axis: Any, integer: bool) -> Any:
    if isinstance(axis, list):
        return rng.choice(axis)
    ((kind, values),) = axis.items()
    if kind == "choice":
        return rng.choice(values)
    lo, hi = values
    if kind == "log_uniform":
        value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        value = rng.uniform(lo, hi)
    return round(value) if integer else value


def check_sample_axes(sample_axes: dict[str, Any], source: str) -> None:
    """Every axis is well formed; raises `UserError` naming ``sample.KEY`` otherwise."""
    for key, axis in sample_axes.items():
        if is_conditional(axis):
            _check_conditional_axis(key, axis, sample_axes, source)
        else:
            _check_sample_axis(key, axis, source)


def _check_conditional_axis(
    key: str, axis: dict[str, Any], sample_axes: dict[str, Any], source: str
) -> None:
    """``{by = AXIS, VALUE = SUB_AXIS, ...}``: `by` names a plain list or choice axis of
    `[sample]`, and every value it can take has a branch (and nothing else does)."""
    where = f"{source}: sample.{key}"
    parent_name = axis["by"]
    parent = sample_axes.get(parent_name) if isinstance(parent_name, str) else None
    if isinstance(parent, dict) and set(parent) == {"choice"}:
        parent = parent["choice"]
    if not isinstance(parent, list) or not parent:
        raise UserError(
            f"{where}: by = {parent_name!r} must name another [sample] axis given as a list "
            "or {choice = [...]} (a conditional axis draws from the branch of the value "
            f'that axis took), e.g. {key} = {{by = "optimizer", adam = [...], sgd = [...]}}.'
        )
    expected = {condition_key(v) for v in parent}
    branches = {k for k in axis if k != "by"}
    if branches != expected:
        problems = []
        if missing := sorted(expected - branches):
            problems.append(f"missing: {', '.join(missing)}")
        if extra := sorted(branches - expected):
            problems.append(f"not values of {parent_name}: {', '.join(extra)}")
        raise UserError(
            f"{where}: give one branch per value of sample.{parent_name} "
            f"({', '.join(sorted(expected))}); {'; '.join(problems)}."
        )
    for value in sorted(branches):
        _check_sample_axis(f"{key}.{value}", axis[value], source)


def _check_sample_axis(key: str, axis: Any, source: str) -> None:
    where = f"{source}: sample.{key}"
    if isinstance(axis, list):
        if not axis:
            raise UserError(f"{where} is an empty list; give at least one value.")
        return
    if not isinstance(axis, dict) or len(axis) != 1:
        raise UserError(
            f"{where} must be a list of values or one of {{choice = [...]}}, "
            "{log_uniform = [lo, hi]}, {uniform = [lo, hi]}."
        )
    ((kind, values),) = axis.items()
    if kind == "choice" and isinstance(values, list) and values:
        return
    ranged = kind in ("log_uniform", "uniform") and isinstance(values, list) and len(values) == 2
    numbers = ranged and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numbers or values[0] >= values[1] or (kind == "log_uniform" and values[0] <= 0):
        raise UserError(
            f"{where} = {{{kind} = {values!r}}} is not a valid axis: use {{choice = [...]}} "
            "with values, or {log_uniform|uniform = [lo, hi]} with lo < hi (lo > 0 for "
            "log_uniform)."
        )
