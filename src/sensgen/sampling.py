"""`[sample]`: random configurations over some run fields (paper §4: random search).

An axis is a list (uniform choice), ``{choice = [...]}``, ``{log_uniform = [lo, hi]}``,
``{uniform = [lo, hi]}``, or a conditional axis ``{by = FIELD, VALUE = AXIS, ...}`` whose
range depends on the value another axis took in the same draw (or that `[base]` fixes),
e.g. the paper's learning rates per optimiser (§4: sgd and momentum 1e-3 … 1e-1, adam
and rmsprop 1e-4 … 3e-3):

    lr = {by = "optimizer", sgd = {log_uniform = [1e-3, 1e-1]}, adam = ...}

`check_sample_axes` validates a study's axes; `draw_samples` draws them; `seed_draws`
gives each draw a model seed of its own.
"""

from __future__ import annotations

import json
import math
import random
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from sensgen.batches import derive_seed
from sensgen.errors import UserError
from sensgen.spec import RunSpec


def draw_samples(
    axes: Mapping[str, Any], n: int, seed: int, fixed: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """`n` random configurations; draw i uses its own generator seeded by (seed, i).

    An axis is a list (uniform choice), ``{choice = [...]}``, ``{log_uniform = [lo, hi]}``
    or ``{uniform = [lo, hi]}``; a range over an integer run field (width, depth,
    batch_size, ...) rounds to integers, one over a float field (lr, init_scale,
    random_labels) never does, whatever the bounds are written as. A *conditional* axis,
    ``{by = "optimizer", sgd = AXIS, adam = AXIS, ...}``, draws from the branch named by the
    value another axis took in this draw, or else by the run field's value in ``fixed``
    (the study's `[base]` with the run defaults): the paper's learning-rate ranges differ
    per optimiser (§4). Each draw depends only on (seed, i), so raising n keeps the earlier
    draws; plain axes are drawn first, in name order, then conditional ones, so adding a
    conditional axis leaves the others' values as they were.
    """
    plain = sorted((k, a) for k, a in axes.items() if not _is_conditional(a))
    conditional = sorted((k, a) for k, a in axes.items() if _is_conditional(a))
    draws = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        draw = {name: _draw(rng, axis, name in _INTEGER_FIELDS) for name, axis in plain}
        for name, axis in conditional:
            parent = axis["by"]
            branch = axis[_condition_key(draw[parent] if parent in draw else fixed[parent])]
            draw[name] = _draw(rng, branch, name in _INTEGER_FIELDS)
        draws.append(dict(sorted(draw.items())))
    return draws


def _is_conditional(axis: Any) -> bool:
    """Whether a `[sample]` axis is conditional: a table with a ``by`` key."""
    return isinstance(axis, dict) and "by" in axis


def _condition_key(value: Any) -> str:
    """The key of a conditional axis's branch for a drawn value: strings as they are,
    numbers and booleans as JSON writes them ("32", "0.5", "1e-05", "true")."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def seed_draws(
    draws: list[dict[str, Any]], sample_seed: int, base_seed: int
) -> list[dict[str, Any]]:
    """The draws, each with a model `seed` of its own.

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


def check_sample_axes(
    sample_axes: dict[str, Any], fixed: Mapping[str, Any], varied: Iterable[str], source: str
) -> None:
    """Every axis is well formed; raises `UserError` naming ``sample.KEY`` otherwise.

    ``fixed`` holds the run fields' values outside `[sample]` (`[base]` over the run
    defaults); ``varied`` the fields set after the draws (`[grid]` axes, the `[pairs]`
    factor and overridden fields, the seed), which a conditional axis cannot follow.
    """
    for key, axis in sample_axes.items():
        if _is_conditional(axis):
            _check_conditional_axis(key, axis, sample_axes, fixed, set(varied), source)
        else:
            _check_sample_axis(key, axis, source)


def check_sample_draws(n: int, grid: Mapping[str, Any], source: str) -> None:
    """Refuse the n draws of a `[sample]` with no axes (the caller's to check) when a
    [grid] seed axis sets the seed each draw would otherwise get (`seed_draws`): they are
    all one configuration, which collapsed into one run per grid point without a word."""
    if "seed" in grid and n > 1:
        raise UserError(
            f"{source}: [sample] has no axes (only n = {n} and its seed), and grid.seed "
            "sets every run's seed, so its draws are all one configuration. Add the axes to "
            "sample from to [sample], or remove [sample] (or grid.seed, for n seeds)."
        )


def _check_conditional_axis(
    key: str,
    axis: dict[str, Any],
    sample_axes: dict[str, Any],
    fixed: Mapping[str, Any],
    varied: set[str],
    source: str,
) -> None:
    """``{by = FIELD, VALUE = SUB_AXIS, ...}``: FIELD is a plain list or choice axis of
    `[sample]`, or a run field fixed for the whole study (`[base]` or its default), and
    every value it can take has a branch. Other branches are allowed (unused), so a scale
    may narrow the parent axis without restating the conditional one."""
    where = f"{source}: sample.{key}"
    parent_name = axis["by"] if isinstance(axis["by"], str) else repr(axis["by"])
    usage = f'e.g. {key} = {{by = "optimizer", adam = [...], sgd = [...]}}'
    if parent_name in sample_axes:
        parent = sample_axes[parent_name]
        if isinstance(parent, dict) and set(parent) == {"choice"}:
            parent = parent["choice"]
        if not isinstance(parent, list) or not parent:
            raise UserError(
                f"{where}: by = {parent_name!r} names a [sample] axis that is not a list or "
                f"{{choice = [...]}}; a conditional axis needs the values it can take ({usage})."
            )
        values, origin = parent, f"sample.{parent_name}"
    elif parent_name in varied:
        raise UserError(
            f"{where}: by = {parent_name!r} names a field set after the draws (a [grid] axis, "
            f"the [pairs] factor or overrides, or the seed). Move {parent_name} to [sample], "
            "or fix it in [base]."
        )
    elif parent_name in fixed:
        values, origin = [fixed[parent_name]], f"{parent_name} (fixed in [base])"
    else:
        raise UserError(
            f"{where}: by = {parent_name!r} must name a run field: another [sample] axis "
            f"given as a list or {{choice = [...]}}, or a field set in [base] ({usage})."
        )
    branches = {k for k in axis if k != "by"}
    if missing := sorted({_condition_key(v) for v in values} - branches):
        hint = ""
        if any(isinstance(axis[k], dict) and not _is_axis_table(axis[k]) for k in branches):
            hint = ' Quote keys that hold a dot, e.g. "0.5" = [...]: bare, TOML splits them.'
        raise UserError(
            f"{where}: give a branch for every value of {origin}; missing: "
            f"{', '.join(missing)}.{hint}"
        )
    for value in sorted(branches):
        _check_sample_axis(f"{key}.{value}", axis[value], source)


_RANGES = ("log_uniform", "uniform")


def _is_axis_table(axis: dict[str, Any]) -> bool:
    """Whether a table is one of the axis forms (``{choice = ...}`` or a range)."""
    return len(axis) == 1 and next(iter(axis)) in ("choice", *_RANGES)


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
    ranged = kind in _RANGES and isinstance(values, list) and len(values) == 2
    numbers = ranged and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numbers or values[0] >= values[1] or (kind == "log_uniform" and values[0] <= 0):
        raise UserError(
            f"{where} = {{{kind} = {values!r}}} is not a valid axis: use {{choice = [...]}} "
            "with values, or {log_uniform|uniform = [lo, hi]} with lo < hi (lo > 0 for "
            "log_uniform)."
        )
