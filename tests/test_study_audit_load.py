"""Study-file audit: user mistakes that were accepted silently or answered with a wrong fix."""

import pytest

from sensgen import cli, planner, study
from sensgen.errors import UserError

TINY = """
name = "tiny"
[base]
dataset = "digits"
width = 8
depth = 1
max_steps = 10
[grid]
seed = [0, 1]
"""


def _write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_number_typed_without_a_leading_digit_or_in_quotes_is_that_number(tmp_path):
    # `--set lr=.01` is no TOML number, so it arrives as the string ".01"; refusing strings
    # for numbers broke it (and study.toml files that older versions wrote with it).
    path = _write(tmp_path, TINY)
    assert study.load(path, {"lr": ".01"}).specs()[0].lr == 0.01
    assert (
        study.load(_write(tmp_path, TINY.replace("width = 8", 'width = "8"'))).specs()[0].width == 8
    )
    with pytest.raises(UserError, match=r"width: "):
        study.load(_write(tmp_path, TINY.replace("width = 8", 'width = "eight"')))


def test_full_stays_a_word_and_a_misspelt_full_says_so(tmp_path):
    s = study.load(_write(tmp_path, TINY.replace("width = 8", 'width = 8\nbatch_size = "full"')))
    assert s.specs()[0].batch_size is None
    with pytest.raises(UserError, match=r'batch_size: .*a number or "full"'):
        study.load(_write(tmp_path, TINY.replace("width = 8", 'width = 8\nbatch_size = "Full"')))


def test_the_seed_limit_in_the_message_is_the_real_one(tmp_path):
    # It said "less than 9223372036854776000" (2**63 as a float): a seed below that failed.
    with pytest.raises(UserError, match="9223372036854775807") as info:
        study.load(_write(tmp_path, TINY), {"seed": str(2**63)})
    assert "9223372036854776000" not in str(info.value)
    assert study.load(_write(tmp_path, TINY), {"seed": str(2**63 - 1)}).specs()[0].seed == 2**63 - 1


@pytest.mark.parametrize(
    ("scale", "names"),
    [
        ("wdth = 16", r"\[scales.big\] wdth: unknown key 'wdth'"),
        ("base.lr = -1.0", r"\[scales.big\]: lr: "),
        ("grid.width = 16", r"\[scales.big\]: grid.width: "),
        ("execution.pack_sise = 2", r"\[scales.big\]: unknown key 'execution.pack_sise'"),
    ],
)
def test_a_scale_not_applied_is_still_checked(tmp_path, scale, names):
    # Found only by `--set scale=big`, e.g. the paper-scale run on a cluster.
    path = _write(tmp_path, f"{TINY}\n[scales.big]\n{scale}\n")
    with pytest.raises(UserError, match=names):
        study.load(path)


def test_a_scales_default_table_is_refused(tmp_path):
    # scale "default" is the study as written: [scales.default] was silently never applied.
    with pytest.raises(UserError, match=r"\[scales.default\] is never applied"):
        study.load(_write(tmp_path, f"{TINY}\n[scales.default]\nwidth = 16\n"))


def test_valid_scales_and_presets_still_load(tmp_path):
    path = _write(tmp_path, f"{TINY}\n[scales.big]\nwidth = 16\ngrid.seed = [0, 1, 2]\n")
    assert {s.width for s in study.load(path).specs()} == {8}
    assert len(study.load(path, {"scale": "big"}).specs()) == 3
    for name in study.preset_names():
        assert study.load(name).specs()


def test_an_error_from_a_set_value_names_the_set(tmp_path):
    path = _write(tmp_path, TINY)
    with pytest.raises(UserError, match=r"s.toml with --set lr: lr: ") as info:
        study.load(path, {"lr": ""})
    assert "--set" in str(info.value)


def test_an_unknown_set_key_suggests_its_table_and_the_fix_works(tmp_path):
    path = _write(tmp_path, TINY)
    with pytest.raises(UserError, match=r"Did you mean execution.pack_size\?"):
        study.load(path, {"pack_size": "1"})
    with pytest.raises(UserError, match=r"Did you mean sample.n\?"):
        study.load(path, {"n": "3"})
    assert study.load(path, {"execution.pack_size": "1"}).execution.pack_size == 1


def test_a_study_directory_passed_as_the_study_names_its_study_file(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "study.toml").write_text(TINY, encoding="utf-8")
    with pytest.raises(UserError, match="is a directory") as info:
        study.load(out)
    fix = f"sensgen run {out / 'study.toml'} --out {out}"
    assert fix in str(info.value)
    assert study.load(out / "study.toml").name == "tiny"  # the fix works


def test_a_preset_name_with_toml_suffix_names_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="`sensgen run quickstart`"):
        study.load("quickstart.toml")


def test_a_plan_too_large_is_refused_before_expanding(tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "MAX_RUNS", 100)
    text = TINY.replace("seed = [0, 1]", "lr = [0.1, 0.01]\n[sample]\nn = 60\nwidth = [8, 16]")
    with pytest.raises(UserError, match=r"60 \(sample.n\) × 2 \(grid.lr\) = 120 runs"):
        study.load(_write(tmp_path, text))
    assert len(study.load(_write(tmp_path, text), {"sample.n": "50"}).specs()) <= 100


def test_sample_draws_that_can_only_coincide_are_refused(tmp_path):
    # No axes, and grid.seed sets each run's seed: n = 5 draws were one configuration.
    path = _write(tmp_path, TINY + "[sample]\nn = 5\n")
    with pytest.raises(UserError, match=r"\[sample\] has no axes"):
        study.load(path)
    # A --set that fixes the last axis of a [sample] with axes asks for one configuration.
    sampled = _write(tmp_path, TINY + "[sample]\nn = 5\nlr = [0.1, 0.2]\n", "sampled.toml")
    assert {s.lr for s in study.load(sampled, {"lr": "0.3"}).specs()} == {0.3}
    # A --set that adds the seed axis to an axis-less [sample] collapses it just the same.
    no_seed = _write(tmp_path, TINY.replace("seed = [0, 1]", "") + "[sample]\nn = 5\n", "n.toml")
    with pytest.raises(UserError, match=r"with --set grid.seed: \[sample\] has no axes"):
        study.load(no_seed, {"grid.seed": "[0, 1]"})
    # Without a seed axis its draws are n seeds, as documented.
    seeds = study.load(_write(tmp_path, TINY.replace("seed = [0, 1]", "") + "[sample]\nn = 5\n"))
    assert len({s.seed for s in seeds.specs()}) == 5


def test_the_cli_exits_2_without_a_traceback(tmp_path, capsys):
    path = _write(tmp_path, TINY.replace("width = 8", 'width = "eight"'))
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "width" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["smile 🙂", "𝔣(x) = ‖J‖", "del\x7f", "café\ttab"])
def test_the_study_as_run_reads_back_whatever_the_description(tmp_path, text):
    # json.dumps wrote 🙂 as a surrogate pair, which TOML refuses: DIR/study.toml could not
    # be read back, so `run` failed after training and `report` refused the directory.
    s = study.load(_write(tmp_path, TINY), {"description": f'"{text}"'.replace("\x7f", "\\u007f")})
    assert s.description == text
    again = study.load(_write(tmp_path, s.to_toml(), "resolved.toml"))
    assert again.description == text and again.specs() == s.specs()
