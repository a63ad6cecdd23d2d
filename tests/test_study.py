"""Study files: validation, run identity, grid expansion, packing, overrides."""

import pytest

from sensgen import study
from sensgen.errors import UserError
from sensgen.study import RunSpec, plan_packs


def _write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


TINY = """
name = "tiny"
[base]
dataset = "digits"
optimizer = "sgd"
lr = 0.1
[grid]
width = [8, 16]
depth = [1, 2]
seed = [0, 1]
"""


def test_golden_run_id():
    # The identity of a run must never change silently: stored studies depend on it.
    spec = RunSpec(dataset="mnist_sample", width=256, depth=2, lr=1e-3, seed=0)
    assert spec.canonical_json() == (
        '{"augment":false,"batch_size":128,"dataset":"mnist_sample","depth":2,'
        '"eval_every":100,"init_scale":2.0,"lr":0.001,"max_steps":10000,"nonlinearity":"relu",'
        '"optimizer":"adam","random_labels":0.0,"schema":2,"seed":0,"stop_at_fit":true,'
        '"train_subset":null,"width":256}'
    )
    assert spec.run_id == "a27ce2582e9c8d37"


def test_run_id_depends_only_on_result_deciding_fields():
    a = RunSpec(dataset="digits", lr=0.1, width=8)
    b = RunSpec(width=8, lr=0.1, dataset="digits")
    assert a.run_id == b.run_id
    assert RunSpec(dataset="digits", lr=0.2, width=8).run_id != a.run_id
    assert RunSpec.from_json(a.canonical_json()) == a


def test_full_means_none_and_round_trips():
    spec = RunSpec(dataset="digits", batch_size="full", train_subset="full")
    assert spec.batch_size is None and spec.train_subset is None
    assert RunSpec.from_json(spec.canonical_json()).batch_size is None


def test_grid_expands_and_packs_group_by_shape(tmp_path):
    s = study.load(_write(tmp_path, TINY))
    specs = s.specs()
    assert len(specs) == 8 and len({x.run_id for x in specs}) == 8
    packs = plan_packs(specs, pack_size=16)
    assert len(packs) == 4  # (width, depth) shapes; seeds share a pack
    assert all(len(p.specs) == 2 for p in packs)
    assert [p.pack_id for p in packs] == [p.pack_id for p in plan_packs(specs, pack_size=16)]
    small = plan_packs(specs, pack_size=1)
    assert len(small) == 8 and len({p.pack_id for p in small}) == 8


def test_duplicate_grid_points_are_deduplicated(tmp_path):
    text = TINY.replace("seed = [0, 1]", "seed = [0, 0, 1]")
    assert len(study.load(_write(tmp_path, text)).specs()) == 8


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (("width = [8, 16]", "widht = [8, 16]"), "'widht'"),
        (("[base]", "[bsae]\nx = 1\n[base]"), "'bsae'"),
        (("lr = 0.1", "lr = -0.1"), "lr"),
        (("lr = 0.1", "lr = 0.1\nnonlinearity = 'swish'"), "nonlinearity"),
        (('dataset = "digits"', 'dataset = "imagenet"'), "imagenet"),
        (("seed = [0, 1]", "seed = []"), "grid.seed"),
        (("lr = 0.1", "lr = 0.1\ntrain_subset = 99999"), "train_subset"),
        (("lr = 0.1", "lr = 0.1\nbatch_size = 5000"), "batch_size"),
        (("[grid]", "[grid"), "not valid TOML"),
        (("[grid]", "[execution]\npack_memory_gb = inf\n[grid]"), "pack_memory_gb"),
        (("[grid]", "[execution]\npack_memory_gb = 1e400\n[grid]"), "pack_memory_gb"),
        # (the default study directory is runs/NAME: these were runs/ and the working one)
        (('name = "tiny"', 'name = ".."'), r"name: dots alone name no folder .* \(got '\.\.'\)"),
        (('name = "tiny"', 'name = "."'), r"name: dots alone name no folder"),
    ],
)
def test_bad_study_files_name_the_problem(tmp_path, edit, names):
    path = _write(tmp_path, TINY.replace(*edit))
    with pytest.raises(UserError, match=names) as info:
        study.load(path)
    assert str(path) in str(info.value)


def test_a_directory_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    # `sensgen run quickstart --out quickstart`, resumed from the same folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()
    assert study.load("quickstart").name == "quickstart"
    (tmp_path / "mystudy").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        study.load("mystudy")


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        study.load(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="quickstart"):
        study.load("nosuchpreset")


def test_unreadable_study_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        study.load(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(UserError, match="UTF-8"):
        study.load(latin1)


def test_a_byte_order_mark_is_not_a_toml_error(tmp_path):
    # A UTF-8 file saved with a BOM (Windows editors) was refused as "not valid TOML
    # (Invalid statement (at line 1, column 1))", an error nothing visible explains.
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff".encode() + TINY.encode())
    assert study.load(path).specs() == study.load(_write(tmp_path, TINY)).specs()


def test_overrides(tmp_path):
    path = _write(tmp_path, TINY)
    s = study.load(path, {"width": "32", "grid.seed": "[0, 1, 2]", "execution.pack_size": "2"})
    specs = s.specs()
    assert {x.width for x in specs} == {32} and {x.seed for x in specs} == {0, 1, 2}
    assert len(specs) == 6 and s.execution.pack_size == 2
    assert study.load(path, {"base.optimizer": "adam"}).specs()[0].optimizer == "adam"
    with pytest.raises(UserError, match="'widht'"):
        study.load(path, {"widht": "3"})
    with pytest.raises(UserError, match="lr"):
        study.load(path, {"lr": "abc"})


def test_resolved_study_round_trips_through_toml(tmp_path):
    s = study.load(_write(tmp_path, TINY))
    again = study.load(_write(tmp_path, s.to_toml(), "resolved.toml"))
    assert [x.run_id for x in again.specs()] == [x.run_id for x in s.specs()]


def test_quickstart_preset_spans_the_factors():
    specs = study.load("quickstart").specs()
    assert len(specs) >= 24
    assert {s.dataset for s in specs} == {"mnist_sample"}
    for field in ("width", "depth", "lr", "random_labels"):
        assert len({getattr(s, field) for s in specs}) >= 2, field
    assert "quickstart" in study.preset_names()


def test_an_unknown_table_or_field_lists_the_valid_ones(tmp_path):
    from sensgen.errors import UserError
    from sensgen.study import load

    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[gird]\nwidth = [8]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"unknown key 'gird' \(valid: name, .*grid, sample"):
        load(path)
    path.write_text('name = "s"\n[measure]\ntransition_elipses = 4\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"valid in \[measure\]: .*transition_ellipses"):
        load(path)
