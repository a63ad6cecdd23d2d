"""Random search, paired factors, scales and memory-bounded packs."""

import math
import re

import pytest

from sensgen import study
from sensgen.batches import derive_seed
from sensgen.errors import UserError
from sensgen.planner import model_memory_bytes, plan_packs
from sensgen.sampling import draw_samples
from sensgen.spec import RunSpec
from sensgen.study_dir import check_same_study, write_study_file

SAMPLED = """
name = "sampled"
[base]
dataset = "digits"
optimizer = "adam"
[sample]
n = 40
seed = 3
width = [8, 16, 32]
lr = {log_uniform = [1e-4, 1e-2]}
init_scale = {choice = [0.5, 1.0, 2.0]}
depth = {uniform = [1, 3]}
[grid]
seed = [0, 1]
"""


def _load(tmp_path, text, **overrides):
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    return study.load(path, overrides)


def test_random_search_draws_within_the_axes_and_is_reproducible(tmp_path):
    s = _load(tmp_path, SAMPLED)
    specs = s.specs()
    assert len(specs) == 80  # 40 draws × 2 grid seeds (draws are distinct almost surely)
    assert {x.width for x in specs} == {8, 16, 32}
    assert {x.init_scale for x in specs} <= {0.5, 1.0, 2.0}
    assert {x.depth for x in specs} <= {1, 2, 3} and all(isinstance(x.depth, int) for x in specs)
    lrs = [x.lr for x in specs]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-2
    # Log-uniform: about half the draws fall below the geometric midpoint 1e-3.
    below = sum(math.log10(lr) < -3 for lr in lrs[::2]) / 40
    assert 0.25 < below < 0.75
    assert [x.run_id for x in _load(tmp_path, SAMPLED).specs()] == [x.run_id for x in specs]


def test_sampled_ranges_round_by_the_fields_type_not_by_the_bounds():
    # Review fix: {uniform = [0, 1]} on random_labels used to round every draw to 0 or 1.
    axes = {
        "random_labels": {"uniform": [0, 1]},
        "lr": {"log_uniform": [1, 10]},
        "width": {"log_uniform": [4.0, 64.0]},
    }
    draws = draw_samples(axes, 20, seed=0, fixed={})
    assert len({d["random_labels"] for d in draws}) == 20
    assert all(0 < d["random_labels"] < 1 for d in draws)
    assert all(isinstance(d["lr"], float) and 1 <= d["lr"] <= 10 for d in draws)
    assert all(isinstance(d["width"], int) and 4 <= d["width"] <= 64 for d in draws)


def test_more_draws_keep_the_earlier_ones():
    axes = {"lr": {"log_uniform": [1e-4, 1e-2]}, "width": [8, 16]}
    assert draw_samples(axes, 5, seed=1, fixed={}) == draw_samples(axes, 9, seed=1, fixed={})[:5]
    assert draw_samples(axes, 5, seed=1, fixed={}) != draw_samples(axes, 5, seed=2, fixed={})


def test_each_draw_gets_a_model_seed_of_its_own(tmp_path):
    # Review fix: every draw trained from seed 0, so draws of one shape started from
    # proportional weights and saw the same minibatch order.
    no_grid = SAMPLED.split("[grid]")[0]
    specs = _load(tmp_path, no_grid).specs()
    assert len({x.seed for x in specs}) == 40
    expected = [derive_seed(0, f"sample:3:{i}") for i in range(40)]
    assert [x.seed for x in specs] == expected
    # More draws keep the earlier runs; the saved study.toml (which writes the default
    # [base] seed = 0 out) plans the same runs; another base seed is a fresh replicate.
    more = _load(tmp_path, no_grid.replace("n = 40", "n = 50")).specs()
    assert [x.run_id for x in more[:40]] == [x.run_id for x in specs]
    saved = study.load(_save(tmp_path, _load(tmp_path, no_grid))).specs()
    assert [x.run_id for x in saved] == [x.run_id for x in specs]
    replicate = _load(tmp_path, no_grid, seed="7").specs()
    assert [x.width for x in replicate] == [x.width for x in specs]
    assert not {x.seed for x in replicate} & {x.seed for x in specs}
    # A [grid] seed axis is used as written.
    assert {x.seed for x in _load(tmp_path, SAMPLED).specs()} == {0, 1}
    assert {x.seed for x in _load(tmp_path, no_grid + "[grid]\nseed = [5]\n").specs()} == {5}


CONDITIONAL = """
name = "conditional"
[base]
dataset = "digits"
[sample]
n = 60
seed = 2
optimizer = ["sgd", "momentum", "adam", "rmsprop"]
width = [8, 16]
lr = {by = "optimizer", sgd = {log_uniform = [1e-3, 1e-1]}, momentum = [0.01, 0.1], \
adam = {log_uniform = [1e-4, 3e-3]}, rmsprop = {choice = [3e-4]}}
"""


def test_a_conditional_axis_draws_from_the_branch_of_the_value_drawn(tmp_path):
    # The paper's space (§4): learning-rate ranges differ per optimiser.
    specs = _load(tmp_path, CONDITIONAL).specs()
    by_optimizer = {}
    for x in specs:
        by_optimizer.setdefault(x.optimizer, []).append(x.lr)
    assert set(by_optimizer) == {"sgd", "momentum", "adam", "rmsprop"}
    assert all(1e-3 <= lr <= 1e-1 for lr in by_optimizer["sgd"])
    assert set(by_optimizer["momentum"]) <= {0.01, 0.1}
    assert all(1e-4 <= lr <= 3e-3 for lr in by_optimizer["adam"])
    assert set(by_optimizer["rmsprop"]) == {3e-4}
    # Plain axes are drawn first: adding the conditional axis leaves them as they were.
    axes = {"optimizer": ["sgd", "adam"], "width": [8, 16, 32]}
    conditional = {**axes, "lr": {"by": "optimizer", "sgd": [0.1], "adam": [0.001]}}
    with_lr = draw_samples(conditional, 30, seed=0, fixed={})
    without = draw_samples(axes, 30, seed=0, fixed={})
    assert [{k: d[k] for k in axes} for d in with_lr] == without
    assert all(d["lr"] == (0.1 if d["optimizer"] == "sgd" else 0.001) for d in with_lr)


def test_a_conditional_axis_on_numbers_uses_their_toml_text(tmp_path):
    axes = {"batch_size": [32, 128], "lr": {"by": "batch_size", "32": [0.1], "128": [0.3]}}
    draws = draw_samples(axes, 20, seed=0, fixed={})
    assert {(d["batch_size"], d["lr"]) for d in draws} == {(32, 0.1), (128, 0.3)}
    # Written out as the study directory's study.toml and read back: the same runs
    # (the key "0.5" must be quoted there, or TOML reads a dotted key).
    text = CONDITIONAL.replace("width = [8, 16]", "init_scale = [0.5, 2.0]").replace(
        "[sample]", '[sample]\nwidth = {by = "init_scale", "0.5" = [8], "2.0" = [16]}'
    )
    s = _load(tmp_path, text)
    assert {(x.init_scale, x.width) for x in s.specs()} == {(0.5, 8), (2.0, 16)}
    saved = study.load(_save(tmp_path, s)).specs()
    assert [x.run_id for x in saved] == [x.run_id for x in s.specs()]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('by = "optimizer"', 'by = "colour"'), "must name a run field"),
        (
            ('by = "optimizer"', 'by = "depth"'),
            "every value of depth (fixed in [base]); missing: 2",
        ),
        (("[3e-4]}}\n", "[3e-4]}}\n[grid]\nnonlinearity = ['relu', 'elu']\n"), None),
        (
            (", rmsprop = {choice = [3e-4]}", ""),
            "every value of sample.optimizer; missing: rmsprop",
        ),
        (("momentum = [0.01, 0.1]", "momentum = {uniform = [0.1, 0.01]}"), "sample.lr.momentum"),
    ],
)
def test_bad_conditional_axes_are_refused_naming_the_key(tmp_path, edit, message):
    text = CONDITIONAL.replace(*edit)
    assert text != CONDITIONAL
    if message is None:  # a [grid] axis beside a conditional one is fine
        assert _load(tmp_path, text).specs()
        return
    with pytest.raises(UserError, match=re.escape(message)) as err:
        _load(tmp_path, text)
    assert "sample.lr" in str(err.value)


def test_a_conditional_axis_needs_a_list_axis_to_follow(tmp_path):
    text = CONDITIONAL.replace(
        'optimizer = ["sgd", "momentum", "adam", "rmsprop"]',
        "optimizer = {log_uniform = [1, 2]}",
    )
    with pytest.raises(UserError, match=r"sample\.lr: by = 'optimizer' names a \[sample\] axis"):
        _load(tmp_path, text)
    # A TOML date is no run value, but is refused as one, not with a traceback.
    with pytest.raises(UserError, match="optimizer"):
        _load(tmp_path, CONDITIONAL.replace('"sgd", "momentum"', '"sgd", 1979-05-27, "momentum"'))


def test_a_conditional_axis_follows_a_field_fixed_in_base_and_extra_branches_are_unused(
    tmp_path,
):
    # --set optimizer=sgd fixes it for every run (and drops the sample axis): lr follows.
    specs = _load(tmp_path, CONDITIONAL, optimizer="sgd").specs()
    assert {x.optimizer for x in specs} == {"sgd"}
    assert all(1e-3 <= x.lr <= 1e-1 for x in specs)
    # Narrowing the parent axis leaves the other branches unused, not refused.
    narrowed = _load(tmp_path, CONDITIONAL, **{"sample.optimizer": '["adam"]'}).specs()
    assert {x.optimizer for x in narrowed} == {"adam"}
    assert all(1e-4 <= x.lr <= 3e-3 for x in narrowed)
    # The paper scale of fig5-correlation: one optimiser for every run.
    paper = study.load("fig5-correlation", {"scale": "paper", "optimizer": "momentum"}).specs()
    assert {x.optimizer for x in paper} == {"momentum"}
    assert {x.lr for x in paper} <= {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}


def test_an_axis_in_both_grid_and_sample_is_refused(tmp_path):
    # Found by review: the grid's optimizer silently replaced the draw's, so sgd runs got
    # the adam branch's learning rates.
    with pytest.raises(UserError, match=r"optimizer is both a \[grid\] axis and a \[sample\]"):
        study.load("fig5-correlation", {"scale": "paper", "grid.optimizer": '["sgd"]'})
    text = CONDITIONAL.replace('by = "optimizer"', 'by = "width"').replace("width = [8, 16]\n", "")
    with pytest.raises(UserError, match=r"names a field set after the draws \(a \[grid\] axis"):
        _load(tmp_path, text + "[grid]\nwidth = [8, 16]\n")


def test_a_conditional_axis_cannot_follow_the_pairs_factor_or_the_seed(tmp_path):
    # Found by review: it followed [base]'s value, not the members' own.
    paired = CONDITIONAL.replace('by = "optimizer"', 'by = "batch_size"') + (
        '[pairs]\nfactor = "batch_size"\nvalues = [128, "full"]\n'
    )
    with pytest.raises(UserError, match=r"names a field set after the draws"):
        _load(tmp_path, paired)
    with pytest.raises(UserError, match=r"names a field set after the draws"):
        _load(tmp_path, CONDITIONAL.replace('by = "optimizer"', 'by = "seed"'))
    # A [base] value is read as the run field (a boolean must be one: augment = 1 is
    # refused, as width = true is).
    text = CONDITIONAL.replace('by = "optimizer"', 'by = "augment"').replace(
        "[sample]", "augment = true\n[sample]"
    )
    with pytest.raises(UserError, match="missing: true"):
        _load(tmp_path, text)
    with pytest.raises(UserError, match=r"augment: Input should be a valid boolean \(got 1\)"):
        _load(tmp_path, text.replace("augment = true", "augment = 1"))


def test_dotted_branch_keys_get_a_hint_to_quote_them(tmp_path):
    text = """
name = "dotted"
[base]
dataset = "digits"
[sample]
n = 4
random_labels = [0.0, 0.5]
lr = {by = "random_labels", 0.0 = [0.1], 0.5 = [0.2]}
"""
    with pytest.raises(UserError, match=r"missing: 0\.0, 0\.5\. Quote keys that hold a dot"):
        _load(tmp_path, text)
    quoted = text.replace("0.0 = [0.1], 0.5 = [0.2]", '"0.0" = [0.1], "0.5" = [0.2]')
    assert {(x.random_labels, x.lr) for x in _load(tmp_path, quoted).specs()} <= {
        (0.0, 0.1),
        (0.5, 0.2),
    }


def test_the_base_seed_of_a_sampled_study_is_validated(tmp_path):
    no_grid = SAMPLED.split("[grid]")[0]
    ids = [x.run_id for x in _load(tmp_path, no_grid, seed="1").specs()]
    assert [x.run_id for x in _load(tmp_path, no_grid, seed="1.0").specs()] == ids
    with pytest.raises(UserError, match="seed"):
        _load(tmp_path, no_grid, seed="-3")


def _save(tmp_path, s):
    path = tmp_path / "saved.toml"
    path.write_text(s.to_toml(), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("axis", "message"),
    [
        ("lr = {log_uniform = [0.0, 1e-2]}", "lo > 0"),
        ("lr = {uniform = [0.1, 0.01]}", "lo < hi"),
        ("lr = {normal = [0.1, 0.01]}", "not a valid axis"),
        ("lr = []", "empty list"),
        ("widht = [1, 2]", "'widht'"),
        ("lr = {uniform = [true, 5]}", "not a valid axis"),
    ],
)
def test_bad_sample_axes_are_named(tmp_path, axis, message):
    text = SAMPLED.replace("lr = {log_uniform = [1e-4, 1e-2]}", axis)
    with pytest.raises(UserError, match=message):
        _load(tmp_path, text)


PAIRED = """
name = "paired"
[base]
dataset = "digits"
optimizer = "sgd"
lr = 0.1
[grid]
width = [8, 16]
seed = [0, 1]
[pairs]
factor = "random_labels"
values = [0.0, 1.0]
"""


def test_pairs_share_everything_but_the_factor(tmp_path):
    planned = _load(tmp_path, PAIRED).planned()
    assert len(planned) == 8
    groups = {}
    for p in planned:
        groups.setdefault(p.pair_id, []).append(p)
    assert len(groups) == 4 and all(len(g) == 2 for g in groups.values())
    for members in groups.values():
        a, b = (m.spec.model_dump() for m in members)
        assert {k for k in a if a[k] != b[k]} == {"random_labels"}
        assert [m.pair_role for m in members] == ["0.0", "1.0"]


def test_one_reference_is_paired_with_several_alternatives(tmp_path):
    text = PAIRED.replace('factor = "random_labels"', 'factor = "nonlinearity"').replace(
        "values = [0.0, 1.0]", 'values = ["relu", "relu6", "hard_tanh"]'
    )
    planned = _load(tmp_path, text).planned()
    assert len(planned) == 12 and len({p.pair_id for p in planned}) == 4
    assert {p.pair_role for p in planned} == {"relu", "relu6", "hard_tanh"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('factor = "random_labels"', 'factor = "lr"'), "not a paired factor"),
        (("seed = [0, 1]", "seed = [0, 1]\nrandom_labels = [0.0]"), "also appears"),
        (("values = [0.0, 1.0]", "values = [0.0]"), "pairs.values"),
        (("values = [0.0, 1.0]", "values = [0.0, 0]"), "same random_labels more than once"),
        (
            (
                'factor = "random_labels"\nvalues = [0.0, 1.0]',
                'factor = "augment"\nvalues = [true, true]',
            ),
            "same augment more than once",
        ),
    ],
)
def test_bad_pairs_are_named(tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        _load(tmp_path, PAIRED.replace(*edit))


FULL_BATCH_PAIRS = PAIRED.replace(
    'factor = "random_labels"\nvalues = [0.0, 1.0]',
    'factor = "batch_size"\nvalues = [32, "full"]\noverrides = [{}, {max_steps = 50}]',
).replace("lr = 0.1", "lr = 0.1\nmax_steps = 500")


def test_pair_members_may_override_other_fields(tmp_path):
    """The paper's full-batch members take 1e4 steps against 1e5 (§4): an override."""
    planned = _load(tmp_path, FULL_BATCH_PAIRS).planned()
    groups = {}
    for p in planned:
        groups.setdefault(p.pair_id, []).append(p.spec)
    assert len(groups) == 4 and all(len(g) == 2 for g in groups.values())
    for mini, full in groups.values():
        assert (mini.batch_size, mini.max_steps) == (32, 500)
        assert (full.batch_size, full.max_steps) == (None, 50)
        a, b = mini.model_dump(), full.model_dump()
        assert {k for k in a if a[k] != b[k]} == {"batch_size", "max_steps"}
    # Without overrides (or with empty ones) the pairs, and their ids, are as before.
    plain = FULL_BATCH_PAIRS.replace("overrides = [{}, {max_steps = 50}]", "")
    empty = FULL_BATCH_PAIRS.replace("{max_steps = 50}", "{}")
    ids = [
        {(p.spec.run_id, p.pair_id) for p in _load(tmp_path, t).planned()} for t in (plain, empty)
    ]
    assert ids[0] == ids[1]


def test_a_conditional_axis_cannot_follow_an_overridden_field(tmp_path):
    text = FULL_BATCH_PAIRS.replace("{max_steps = 50}", '{optimizer = "adam"}') + (
        '[sample]\nn = 2\nlr = {by = "optimizer", sgd = [0.1], adam = [0.001]}\n'
    )
    with pytest.raises(UserError, match=r"'optimizer' names a field set after the draws"):
        _load(tmp_path, text)


def test_a_directory_refuses_other_pair_overrides_and_other_studies(tmp_path):
    """A run keeps its first pair: changed overrides would put two members in one role."""
    out = tmp_path / "out"
    out.mkdir()
    first = _load(tmp_path, FULL_BATCH_PAIRS)
    write_study_file(out, first)
    check_same_study(out, first)  # resuming is fine
    check_same_study(out, _load(tmp_path, FULL_BATCH_PAIRS, **{"grid.width": "[8, 32]"}))
    for changed in ("{max_steps = 80}", "{}"):
        other = _load(tmp_path, FULL_BATCH_PAIRS.replace("{max_steps = 50}", changed))
        with pytest.raises(UserError, match=r"pairs\.overrides = \[\{\}, \{'max_steps': 50"):
            check_same_study(out, other)
    with pytest.raises(UserError, match="already holds study 'paired', not 'other'"):
        check_same_study(out, _load(tmp_path, FULL_BATCH_PAIRS, name="other"))


def test_a_directory_refuses_pairs_by_another_factor_or_added_pairs(tmp_path):
    # The random_labels = 0 member is also the augment = false one: it kept its old pair,
    # and the new augment = true member was left in a pair of its own, without a word.
    out = tmp_path / "out"
    out.mkdir()
    labels = _load(tmp_path, PAIRED)
    write_study_file(out, labels)
    by_labels = 'factor = "random_labels"\nvalues = [0.0, 1.0]'
    augment = PAIRED.replace(by_labels, 'factor = "augment"\nvalues = [false, true]')
    with pytest.raises(UserError, match=r"pairs\.factor = 'random_labels'; this study pairs by"):
        check_same_study(out, _load(tmp_path, augment))
    unpaired = PAIRED[: PAIRED.index("[pairs]")]
    write_study_file(out, _load(tmp_path, unpaired))
    with pytest.raises(UserError, match=r"planned without \[pairs\]; this study pairs them"):
        check_same_study(out, labels)
    write_study_file(out, labels)
    check_same_study(out, _load(tmp_path, unpaired))  # pairs dropped: the runs keep theirs
    more = PAIRED.replace("values = [0.0, 1.0]", "values = [0.0, 0.5, 1.0]")
    check_same_study(out, _load(tmp_path, more))  # another member per pair: an extension


def test_empty_pair_overrides_are_the_same_study_as_none(tmp_path):
    # [{}, {}] (e.g. what a bare --set leaves) changes no member: resuming is fine.
    out = tmp_path / "out"
    out.mkdir()
    plain = _load(tmp_path, FULL_BATCH_PAIRS.replace("overrides = [{}, {max_steps = 50}]\n", ""))
    assert plain.pairs.overrides is None
    empty = _load(tmp_path, FULL_BATCH_PAIRS.replace("{max_steps = 50}", "{}"))
    assert empty.pairs.overrides == [{}, {}]
    assert [p.spec.run_id for p in empty.planned()] == [p.spec.run_id for p in plain.planned()]
    write_study_file(out, plain)
    check_same_study(out, empty)
    write_study_file(out, empty)
    check_same_study(out, plain)


def test_none_is_written_as_full(tmp_path):
    s = study.Study(
        name="x", base={"dataset": "digits"}, pairs={"factor": "batch_size", "values": [32, None]}
    )
    again = _load(tmp_path, s.to_toml())
    assert again.pairs.values == [32, "full"]
    assert [p.spec.run_id for p in again.planned()] == [p.spec.run_id for p in s.planned()]


def test_pair_overrides_round_trip_and_a_bare_set_applies_to_every_run(tmp_path):
    s = _load(tmp_path, FULL_BATCH_PAIRS)
    again = _load(tmp_path, s.to_toml())
    assert [p.spec.run_id for p in again.planned()] == [p.spec.run_id for p in s.planned()]
    assert again.pairs.overrides == [{}, {"max_steps": 50}]
    capped = _load(tmp_path, FULL_BATCH_PAIRS, max_steps="20")
    assert {p.spec.max_steps for p in capped.planned()} == {20}
    assert capped.pairs.overrides == [{}, {}]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("[{}]", r"1 tables for 2 pairs\.values"),
        ("[{}, {max_stesp = 5}]", r"pairs\.overrides\[1\]\.max_stesp: unknown run field"),
        ("[{}, {max_steps = 0}]", r"pairs\.overrides\[1\]\.max_steps"),
        ("[{batch_size = 16}, {}]", "is the pair factor"),
        ("[{}, {width = 32}]", r"a \[grid\] or \[sample\] axis"),
        ("[{}, {dataset = 'mnist_sample'}]", "dataset is what the pair shares"),
        ("[{}, {augment = true}]", "augment is what the pair shares"),
    ],
)
def test_bad_pair_overrides_are_named(tmp_path, edit, message):
    text = FULL_BATCH_PAIRS.replace("[{}, {max_steps = 50}]", edit)
    with pytest.raises(UserError, match=message):
        _load(tmp_path, text)


def test_pair_overrides_may_not_set_the_shared_seed(tmp_path):
    unseeded = FULL_BATCH_PAIRS.replace("seed = [0, 1]\n", "")
    with pytest.raises(
        UserError, match=r"pairs\.overrides\[1\]\.seed: seed is what the pair shares"
    ):
        _load(tmp_path, unseeded.replace("{max_steps = 50}", "{seed = 3}"))


SCALED = (
    PAIRED
    + """
[scales.paper]
base.lr = 0.05
grid.width = [8, 16, 32]
execution.pack_size = 4
"""
)


def test_scale_applies_its_overrides_and_set_still_wins(tmp_path):
    default = _load(tmp_path, SCALED)
    assert default.scale == "default" and len(default.specs()) == 8
    paper = _load(tmp_path, SCALED, scale="paper")
    assert paper.scale == "paper" and len(paper.specs()) == 12
    assert {s.lr for s in paper.specs()} == {0.05} and paper.execution.pack_size == 4
    mine = _load(tmp_path, SCALED, scale="paper", lr="0.2")
    assert {s.lr for s in mine.specs()} == {0.2}
    with pytest.raises(UserError, match="scale 'huge' is not defined"):
        _load(tmp_path, SCALED, scale="huge")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scales = 3\n" + PAIRED, "scales must be a table"),
        (PAIRED + "[scales]\npaper = 3\n", "scales.paper must be a table"),
        (PAIRED + "[scales.small]\nlr = 0.1\n", "scale 'paper' is not defined"),
    ],
)
def test_malformed_scales_are_user_errors(tmp_path, text, message):
    # Review fix: a non-table `scales` or `scales.paper` was a TypeError/AttributeError.
    with pytest.raises(UserError, match=message):
        _load(tmp_path, text, scale="paper")


def test_resolved_study_at_a_scale_reloads_as_run(tmp_path):
    # Review fix: DIR/study.toml of a `--set scale=paper` run named an undefined scale.
    mine = _load(tmp_path, SCALED, scale="paper", lr="0.2")
    again = _load(tmp_path, mine.to_toml())
    assert again.scale == "paper"
    assert [s.run_id for s in again.specs()] == [s.run_id for s in mine.specs()]
    assert {s.lr for s in again.specs()} == {0.2}


def test_inclusion_rule_defaults_to_the_papers():
    rule = study.Inclusion()
    assert rule.threshold("cifar10") == 1.0 and rule.threshold("cifar100") == 0.999
    assert study.Inclusion(min_train_acc=0.95).threshold("cifar100") == 0.95


def test_resolved_study_with_sample_and_pairs_round_trips(tmp_path):
    for text in (SAMPLED, PAIRED):
        s = _load(tmp_path, text)
        again = _load(tmp_path, s.to_toml())
        assert [p.spec.run_id for p in again.planned()] == [p.spec.run_id for p in s.planned()]


def test_packs_are_bounded_by_estimated_memory():
    big = [RunSpec(dataset="digits", width=512, depth=2, seed=i, batch_size=32) for i in range(10)]
    per_model = model_memory_bytes(big[0])
    # params: 64·512+512 + 512·512+512 + 512·10+10 weights and biases, 4 float32 copies.
    n_params = (64 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert per_model >= 16 * n_params
    packs = plan_packs(big, pack_size=16, memory_bytes=3 * per_model)
    assert [len(p.specs) for p in packs] == [3, 3, 3, 1]
    assert [len(p.specs) for p in plan_packs(big, pack_size=16)] == [10]
    assert [len(p.specs) for p in plan_packs(big, 16, memory_bytes=1)] == [1] * 10
