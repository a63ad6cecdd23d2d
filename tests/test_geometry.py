"""Profiles along ellipses (Fig. 2) and region maps before/after training (Fig. 3), stored."""

import pytest
import torch

from sensgen import study as study_module
from sensgen.cli import main
from sensgen.errors import UserError
from sensgen.geometry import (
    PATH_KINDS,
    anchor_problem,
    different_class_anchor_indices,
    measure_profiles,
    measure_regions,
    profile_anchors,
    same_class_anchor_indices,
)
from sensgen.metrics import (
    angle_bins,
    bin_arc_length,
    ellipse,
    ellipse_axes,
    jacobian_norm,
    plane_grid,
    region_map,
    transitions,
)
from sensgen.models import MLP
from sensgen.runner import run
from sensgen.store import open_results
from sensgen.study import Measurements

CONFIG = Measurements(profile_ellipses=2, profile_points=120, profile_bins=12, transition_sides=240)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 6, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 4
    net = MLP(6, 4, width=16, depth=2, generator=g)
    return x, y, net


def test_same_class_anchors_are_three_distinct_points_of_one_class_and_extend():
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 2, 1])  # class 2 has only two points
    rows = same_class_anchor_indices(labels, 20, seed=3)
    assert rows.shape == (20, 3)
    assert all(len(set(r.tolist())) == 3 for r in rows)
    assert bool((labels[rows] == labels[rows[:, :1]]).all())
    assert set(labels[rows[:, 0]].tolist()) <= {0, 1}
    assert torch.equal(same_class_anchor_indices(labels, 5, seed=3), rows[:5])


def test_profile_anchors_per_kind(data):
    x, y, _ = data
    anchors = profile_anchors(x, y, 3, seed=0)
    assert set(anchors) == set(PATH_KINDS)
    assert all(a.shape == (3, 3, 6) for a in anchors.values())
    members = {tuple(row.tolist()) for row in x}
    index = {tuple(row.tolist()): i for i, row in enumerate(x)}
    for kind in ("different_class", "same_class"):
        assert all(tuple(p.tolist()) in members for p in anchors[kind].reshape(-1, 6))

    def labels(kind):
        return y[[index[tuple(p.tolist())] for p in anchors[kind].reshape(-1, 6)]]

    assert bool((labels("different_class").view(3, 3).sort(1).values.diff(1) > 0).all())
    assert bool((labels("same_class").view(3, 3).diff(1) == 0).all())
    assert not any(tuple(p.tolist()) in members for p in anchors["random"].reshape(-1, 6))
    again = profile_anchors(x, y, 3, seed=0)
    assert all(torch.equal(again[k], anchors[k]) for k in PATH_KINDS)


def test_profiles_agree_with_direct_computations(data):
    """Bin means of ‖J‖ average the per-sample norms; densities × arc length = t_exact."""
    x, y, net = data
    frame = measure_profiles(net, x, y, config=CONFIG, seed=0)
    assert len(frame) == 3 * 2 * 12
    anchors = profile_anchors(x, y, 2, seed=0)
    net64 = net.double()
    edges, centres = angle_bins(12)
    for kind in PATH_KINDS:
        for i, (x1, x2, x3) in enumerate(anchors[kind]):
            rows = frame[(frame["path"] == kind) & (frame["ellipse"] == i)].sort_values("bin")
            assert rows["angle"].to_numpy() == pytest.approx(centres.numpy())
            norms = jacobian_norm(net64, ellipse(x1, x2, x3, n_points=120))  # 10 per bin
            assert rows["jacobian_norm"].mean() == pytest.approx(norms.mean().item(), rel=1e-12)
            length = bin_arc_length(*ellipse_axes(x1, x2, x3), edges).numpy()
            crossings = (rows["transition_density"].to_numpy() * length).sum()
            polygon = ellipse(x1, x2, x3, n_points=240)
            assert crossings == pytest.approx(transitions(net64, polygon, method="exact"))


def test_anchors_are_the_least_sensitive_bins_of_a_trained_net():
    """Trained on the anchors, the net is flat there: the anchor bins' ‖J‖ is far below the
    midway bins' on the different-class ellipse (the paper's Fig. 2 in miniature)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g)
    y = torch.arange(9) % 3
    net = MLP(5, 3, width=32, depth=2, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    config = Measurements(profile_ellipses=1, profile_points=600, profile_bins=60)
    frame = measure_profiles(net, x, y, config=config, seed=0)
    jac = frame[frame["path"] == "different_class"].set_index("bin")["jacobian_norm"]
    anchors, midway = jac[[10, 30, 50]], jac[[0, 20, 40]]
    assert anchors.max() < 0.1 * midway.min()


def test_smooth_nets_have_no_transition_density(data):
    x, y, _ = data
    net = MLP(6, 4, width=8, depth=1, nonlinearity="tanh")
    frame = measure_profiles(net, x, y, config=CONFIG, seed=0)
    assert frame["transition_density"].isna().all()
    assert frame["jacobian_norm"].gt(0).all()


def test_region_maps_before_and_after(data):
    x, y, trained = data
    initial = MLP(6, 4, width=16, depth=2, generator=torch.Generator().manual_seed(9))
    config = Measurements(region_planes=2, region_resolution=32, region_extent=1.5)
    maps = measure_regions(initial, trained, x.float(), y, config=config, seed=0)
    assert maps["init"].shape == maps["trained"].shape == (2, 32, 32)
    assert maps["init"].dtype == torch.int32 and maps["anchors"].shape == (2, 3, 2)
    assert bool((maps["labels"].sort(1).values.diff(1) > 0).all())  # three classes
    assert bool(((maps["anchors"] >= 0) & (maps["anchors"] <= 31)).all())
    assert not torch.equal(maps["init"], maps["trained"])


def test_anchor_pixels_map_back_to_the_anchors(data):
    x, y, net = data
    config = Measurements(region_planes=2, region_resolution=41)
    maps = measure_regions(net, net, x.float(), y, config=config, seed=0)
    assert torch.equal(maps["init"], maps["trained"])  # the same net twice
    assert torch.equal(y[maps["indices"]], maps["labels"])
    for p in range(2):
        grid = plane_grid(*x[maps["indices"][p]], resolution=41)
        ids = region_map(net.double(), grid.points, resolution=41)
        assert torch.equal(ids.to(torch.int32), maps["trained"][p])
        lo, hi = grid.u_coords[0], grid.u_coords[-1]
        coords = lo + maps["anchors"][p].flip(-1) * (hi - lo) / 40  # (row, col) -> (u, v)
        assert torch.allclose(coords, grid.anchor_coords, atol=1e-9)


def test_study_with_profiles_and_regions_runs_stores_and_resumes(tmp_path):
    spec = dict(dataset="digits", width=16, depth=1, max_steps=30, eval_every=10, stop_at_fit=False)
    s = study_module.Study(
        name="geo",
        base=spec,
        grid={"seed": [0, 1], "nonlinearity": ["relu", "tanh"]},
        measure={
            "jacobian_train_points": 20,
            "profile_ellipses": 1,
            "profile_points": 60,
            "profile_bins": 6,
            "transition_sides": 60,
            "region_planes": 1,
            "region_resolution": 16,
        },
    )
    run(s, tmp_path / "geo", progress=False, report=False)
    with open_results(tmp_path / "geo") as results:
        runs = results.runs()
        assert set(runs["status"]) == {"done"}
        profiles = results.profiles()
        assert len(profiles) == 4 * 3 * 6
        relu = runs.loc[runs["nonlinearity"] == "relu", "run_id"]
        has_density = profiles.groupby("run_id")["transition_density"].apply(
            lambda d: d.notna().all()
        )
        assert set(has_density[has_density].index) == set(relu)
        for run_id in runs["run_id"]:
            maps = results.region_maps(run_id)
            assert maps["init"].shape == maps["trained"].shape == (1, 16, 16)
            assert not torch.equal(maps["init"], maps["trained"])
        with pytest.raises(UserError, match="not a done run"):
            results.region_maps("0123456789abcdef")
    before = open_results(tmp_path / "geo").profiles()
    run(s, tmp_path / "geo", progress=False, report=False)  # nothing to do
    assert open_results(tmp_path / "geo").profiles().equals(before)
    # The report reads the maps of models the inclusion rule keeps (at most a few):
    # here the rule keeps the two best-fitted models, and the cap is 2.
    from sensgen.analysis import report

    best = runs.sort_values("train_acc", ascending=False)
    rule = {"apply": True, "min_train_acc": float(best["train_acc"].iloc[1])}
    kept = set(best.loc[best["train_acc"] >= rule["min_train_acc"], "run_id"])
    assert 2 <= len(kept) < len(runs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "_MAX_REGION_RUNS", 2)
        maps = report._read_store(tmp_path / "geo", None, rule)[3]
    assert len(maps) == 2 and set(maps) <= kept


def test_profiles_and_regions_are_empty_or_refused_when_not_measured(tmp_path):
    s = study_module.Study(
        name="plain",
        base=dict(dataset="digits", width=8, depth=1, max_steps=5, eval_every=5),
        measure={"jacobian_train_points": 0},
    )
    run(s, tmp_path / "plain", progress=False, report=False)
    with open_results(tmp_path / "plain") as results:
        assert results.profiles().empty
        assert list(results.profiles().columns)[:3] == ["run_id", "path", "ellipse"]
        with pytest.raises(UserError, match="region_planes"):
            results.region_maps(results.runs()["run_id"][0])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("measure.profile_bins", "10", "profile_bins"),
        ("measure.profile_points", "30", "profile_points"),
        ("measure.region_resolution", "1", "region_resolution"),
    ],
)
def test_bad_geometry_settings_exit_2_naming_the_field(key, value, message, tmp_path, capsys):
    args = ["run", "quickstart", "--out", str(tmp_path / "x"), "--set", f"{key}={value}"]
    args += ["--set", "measure.profile_ellipses=1"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.db").exists()


@pytest.mark.parametrize(
    "labels",
    [[0, 1], [0, 0, 1, 1, 2], [0, 0, 0, 1, 1], [0, 1, 2], [0, 1, 2, 2, 2], [5]],
)
def test_anchor_problem_agrees_with_the_anchors_it_checks_for(labels):
    # `sensgen run` refuses a study by anchor_problem before training: it must refuse
    # exactly what the anchor draws after training would fail on.
    y = torch.tensor(labels)
    config = Measurements(profile_ellipses=2, region_planes=1)
    problem = anchor_problem(y, config)
    try:
        different_class_anchor_indices(y, 1, seed=0)
        same_class_anchor_indices(y, 1, seed=0)
    except UserError:
        assert problem is not None
    else:
        assert problem is None
    only_planes = anchor_problem(y, Measurements(region_planes=1))
    assert (only_planes is None) == (len(set(labels)) >= 3)
    assert anchor_problem(y, Measurements()) is None
