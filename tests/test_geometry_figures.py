"""Fig. 2 / Fig. 3 summaries and figures on synthetic inputs with known answers."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sensgen.analysis.geometry_figures import (
    boundary_table,
    manifold_profiles,
    profile_summary,
    region_maps_figure,
)
from sensgen.analysis.report_geometry import (
    boundary_contrast,
    geometry_claims,
    manifold_contrasts,
)
from sensgen.metrics import angle_bins


def _profiles(n_bins=12):
    """Two models, two ellipses each; ‖J‖ = 10 off the anchors, 0.1 (model a) or 0.3 (b)
    at the anchor bins; density = bin index for every path."""
    rows = []
    anchors = {n_bins // 6, n_bins // 2, 5 * n_bins // 6}
    for run, low in (("a", 0.1), ("b", 0.3)):
        for path in ("random", "different_class", "same_class"):
            for ellipse in range(2):
                for b in range(n_bins):
                    jac = low if (b in anchors and path != "random") else 10.0
                    rows.append((run, path, ellipse, b, 2 * math.pi * b / n_bins, jac, float(b)))
    columns = ["run_id", "path", "ellipse", "bin", "angle", "jacobian_norm"]
    return pd.DataFrame(rows, columns=[*columns, "transition_density"])


def test_profile_summary_means_and_ranges_over_models():
    summary = profile_summary(_profiles()).set_index(["path", "bin"])
    row = summary.loc[("different_class", 2)]
    assert row["models"] == 2
    assert row["jacobian_mean"] == pytest.approx(0.2)
    assert (row["jacobian_min"], row["jacobian_max"]) == pytest.approx((0.1, 0.3))
    assert summary.loc[("random", 2), "jacobian_mean"] == pytest.approx(10.0)
    assert summary.loc[("same_class", 7), "density_mean"] == pytest.approx(7.0)


def test_manifold_contrasts_read_anchor_and_midway_bins():
    c = manifold_contrasts(_profiles())
    assert c["different_class_jacobian_anchors"] == pytest.approx(0.2)
    assert c["different_class_jacobian_midway"] == pytest.approx(10.0)
    assert c["random_jacobian_midway"] == pytest.approx(10.0)
    assert c["same_class_density_anchors"] == pytest.approx((2 + 6 + 10) / 3)
    assert c["same_class_density_midway"] == pytest.approx((0 + 4 + 8) / 3)


@pytest.mark.parametrize("n_bins", [9, 12, 15, 60])
def test_manifold_contrasts_find_the_anchor_bins_for_every_allowed_bin_count(n_bins):
    # With B ≡ 3 (mod 6) the centres sit half a bin off the 2πk/B grid (angle_bins); the
    # anchor at π is centre (B − 1)/2, which round(B/2) missed by one bin.
    _, centres = angle_bins(n_bins)
    angles = centres.numpy()
    anchors = np.array([math.pi / 3, math.pi, 5 * math.pi / 3])
    at_anchor = np.isclose(np.abs(angles[:, None] - anchors).min(axis=1), 0.0, atol=1e-9)
    assert at_anchor.sum() == 3
    frame = pd.DataFrame(
        {
            "run_id": "a",
            "path": "different_class",
            "ellipse": 0,
            "bin": np.arange(n_bins),
            "angle": angles,
            "jacobian_norm": np.where(at_anchor, 1.0, 100.0),
            "transition_density": np.where(at_anchor, 1.0, 3.0),
        }
    )
    c = manifold_contrasts(frame)
    assert c["different_class_jacobian_anchors"] == 1.0
    assert c["different_class_density_anchors"] == 1.0
    assert c["different_class_jacobian_midway"] == 100.0


def test_manifold_figure_draws_three_paths_on_a_log_axis_and_handles_empty():
    fig = manifold_profiles(_profiles())
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and len(top.get_lines()) == 3 + 3  # 3 paths + guides
    assert bottom.get_yscale() == "linear" and len(bottom.get_lines()) == 3 + 3
    empty = manifold_profiles(pd.DataFrame(columns=_profiles().columns))
    assert "no profiles measured" in [t.get_text() for t in empty.axes[0].texts]


def _half_plane_maps(resolution=32):
    cols = torch.arange(resolution).expand(resolution, resolution)
    trained = (cols >= resolution // 2).to(torch.int32)[None]  # one vertical boundary
    init = (torch.arange(resolution)[:, None] + cols) % 2  # a checkerboard: every pair differs
    anchors = torch.tensor([[[4.0, 4.0], [27.0, 4.0], [4.0, 27.0]]], dtype=torch.float64)
    return {"init": init.to(torch.int32)[None], "trained": trained, "anchors": anchors}


def test_boundary_table_on_known_maps():
    table = boundary_table({"r": _half_plane_maps()}).set_index("stage")
    assert table.loc["init", "near_points"] == 1.0 and table.loc["init", "elsewhere"] == 1.0
    assert table.loc["trained", "near_points"] == 0.0  # discs of radius 2 miss column 15|16
    # elsewhere: the 32 right-pairs across columns 15|16 differ, out of the 2·32·31 pairs
    # less those touching the three 13-pixel discs (at most 4 pairs per pixel)
    elsewhere = table.loc["trained", "elsewhere"]
    assert 32 / (2 * 32 * 31) <= elsewhere <= 32 / (2 * 32 * 31 - 3 * 13 * 4)
    assert boundary_contrast(boundary_table({"r": _half_plane_maps()})) == {
        "init": 1.0,
        "trained": 0.0,
    }


def test_region_figure_marks_points_and_handles_no_maps():
    fig = region_maps_figure(_half_plane_maps(), "t")
    assert len(fig.axes) == 2
    assert all(len(ax.collections) == 1 for ax in fig.axes)  # the three anchors
    none = {k: v[:0] for k, v in _half_plane_maps().items()}
    assert "no region maps" in region_maps_figure(none).texts[0].get_text()
    assert np.isfinite(boundary_table({"r": _half_plane_maps()})["elsewhere"]).all()


def test_the_fig3_claim_counts_the_planes_its_median_is_over():
    # The median runs over every (model, plane) map: 2 models of 3 planes are 6 maps.
    rows = [
        (run, plane, stage, 1.0, 1.0, ratio)
        for run in ("a", "b")
        for plane in range(3)
        for stage, ratio in (("init", 1.0 + plane), ("trained", 0.5))
    ]
    table = pd.DataFrame(
        rows, columns=["run_id", "plane", "stage", "near_points", "elsewhere", "ratio"]
    )
    (claim,) = geometry_claims(pd.DataFrame(), table, n_region_runs=2)
    assert "median over 6 plane(s) of 2 model(s): 2 at init, 0.5 after training" in claim.measured
    assert "6 of 6 maps below 1 (sign test p = 0.031)" in claim.measured
    assert "6 of 6 maps below their init ratio (sign test p = 0.031)" in claim.measured
    assert claim.holds is True


def _boundary_table(init: list[float], trained: list[float]) -> pd.DataFrame:
    rows = [
        (f"run{i}", 0, stage, 1.0, 1.0, ratio)
        for i, pair in enumerate(zip(init, trained, strict=True))
        for stage, ratio in zip(("init", "trained"), pair, strict=True)
    ]
    return pd.DataFrame(
        rows, columns=["run_id", "plane", "stage", "near_points", "elsewhere", "ratio"]
    )


@pytest.mark.parametrize(
    ("init", "trained", "holds"),
    [
        ([2.0] * 5, [0.5] * 5, None),  # 5 of 5 maps: p = 0.0625, no verdict on so few
        ([2.0] * 6, [0.5] * 6, True),
        ([2.0] * 6, [1.5] * 6, False),  # below init, but above 1 on every map
        ([0.5] * 6, [0.8] * 6, False),  # below 1, but above init on every map
        ([2.0] * 8, [0.5] * 4 + [1.5] * 4, None),  # half the maps on each side
    ],
)
def test_the_fig3_claim_is_a_sign_test_over_the_maps(init, trained, holds):
    # The median ratio alone decided: a 2-model study said "does not hold" on one number.
    (claim,) = geometry_claims(pd.DataFrame(), _boundary_table(init, trained), len(init))
    assert claim.holds is holds
