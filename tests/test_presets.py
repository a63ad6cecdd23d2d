"""Every built-in preset loads, documents itself, scales to the paper, and runs (tiny)."""

from pathlib import Path

import pytest

from sensgen import study as study_module
from sensgen.runner import run
from sensgen.store import open_results

PRESETS = study_module.preset_names()
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_the_paper_presets_exist():
    expected = {"quickstart", "fig1-capacity", "fig2-manifold", "fig3-regions", "fig4-factors"}
    expected |= {"fig5-correlation", "per-point"}
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_opens_with_its_command(name):
    from importlib import resources

    text = resources.files("sensgen.presets").joinpath(f"{name}.toml").read_text("utf-8")
    assert text.startswith(f"# {name}")
    assert f"sensgen run {name}" in text
    s = study_module.load(name)
    assert s.name == name and len(s.specs()) >= 2
    if "[scales.paper]" in text:
        paper = study_module.load(name, {"scale": "paper"})
        assert len(paper.specs()) >= len(s.specs())


TINY = {
    "base.max_steps": "3",
    "base.eval_every": "1",
    "base.train_subset": "300",
    "base.batch_size": "32",
    "measure.jacobian_train_points": "20",
    "execution.pack_size": "64",
}


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "quickstart"])
def test_preset_runs_end_to_end_when_shrunk(name, tmp_path):
    s = study_module.load(name)
    if s.base.get("dataset") == "fashion_mnist" and not FASHION.exists():
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
    overrides = dict(TINY)
    if s.sample is not None:
        overrides["sample.n"] = "1"
    for axis in ("train_subset", "seed"):
        if axis in s.grid:
            overrides[f"grid.{axis}"] = "[300]" if axis == "train_subset" else "[0]"
    if s.measure.transition_ellipses:
        overrides["measure.transition_ellipses"] = "1"
        overrides["measure.transition_sides"] = "60"
    if s.measure.profile_ellipses:
        overrides |= {"measure.profile_ellipses": "1", "measure.profile_points": "60"}
        overrides |= {"measure.profile_bins": "6", "measure.transition_sides": "60"}
    if s.measure.region_planes:
        overrides |= {"measure.region_planes": "1", "measure.region_resolution": "16"}
    shrunk = study_module.load(name, overrides)
    result = run(shrunk, tmp_path / name, progress=False, report=True)
    runs = open_results(tmp_path / name).runs()
    assert len(runs) == result.n_runs >= 1
    assert set(runs["status"]) <= {"done", "diverged"}
    assert (tmp_path / name / "report" / "index.html").exists()
    with open_results(tmp_path / name) as results:
        done = runs.loc[runs["status"] == "done", "run_id"]
        if s.measure.profile_ellipses:  # 3 paths x 1 ellipse x 6 bins per done model
            assert len(results.profiles()) == 18 * len(done)
        if s.measure.region_planes:
            assert all(results.region_maps(r)["trained"].shape == (1, 16, 16) for r in done)
