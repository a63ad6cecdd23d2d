"""Angle bins, arc lengths and the along-ellipse Jacobian profile (paper §2.2, Study 2)."""

import math

import pytest
import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics.jacobian import jacobian_norm
from sensgen.metrics.profiles import (
    Profile,
    angle_bins,
    bin_arc_length,
    bin_by_angle,
    jacobian_profile,
)
from sensgen.metrics.trajectories import ellipse, ellipse_angles, ellipse_axes, ellipse_speed
from sensgen.models import MLP

F64 = torch.float64
ANCHOR_ANGLES = torch.tensor([math.pi / 3, math.pi, 5 * math.pi / 3], dtype=F64)


def _anchors(d=5, seed=0):
    return torch.randn(3, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("n_bins", [3, 6, 9, 60, 63])
def test_angle_bins_put_the_anchors_at_bin_centres(n_bins):
    edges, centres = angle_bins(n_bins)
    assert edges.shape == (n_bins + 1,) and centres.shape == (n_bins,)
    width = 2 * math.pi / n_bins
    torch.testing.assert_close(edges.diff(), torch.full((n_bins,), width, dtype=F64))
    torch.testing.assert_close(centres, (edges[1:] + edges[:-1]) / 2)
    assert math.isclose((edges[-1] - edges[0]).item(), 2 * math.pi, rel_tol=1e-14)
    assert bool((centres >= 0).all() and (centres < 2 * math.pi).all())
    distance = (centres[None, :] - ANCHOR_ANGLES[:, None]).abs().min(dim=1).values  # [3]
    torch.testing.assert_close(distance, torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)


def test_default_bins_have_a_half_bin_offset():
    edges, centres = angle_bins()
    assert centres.shape == (60,)
    torch.testing.assert_close(edges[0], torch.tensor(-math.pi / 60, dtype=F64))
    for index, anchor in zip([10, 30, 50], ANCHOR_ANGLES, strict=True):
        assert math.isclose(centres[index].item(), anchor.item(), abs_tol=1e-12)


@pytest.mark.parametrize("n_bins", [0, 4, 100, 60.0, True])
def test_angle_bins_need_a_multiple_of_three(n_bins):
    with pytest.raises(UserError, match="multiple of 3"):
        angle_bins(n_bins)


def test_bin_by_angle_mean_and_sum_by_hand():
    edges = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)  # spans 3 < 2π: others are dropped
    angles = torch.tensor([0.5, 0.2, 1.5, 2.9, 4.0, 2 * math.pi + 0.1, 1.0], dtype=F64)
    values = torch.tensor([1.0, 3.0, 10.0, 7.0, 100.0, 5.0, 20.0], dtype=F64)
    # bin 0: 0.5, 0.2, 0.1 (wrapped) → 1, 3, 5; bin 1: 1.5 and the edge 1.0 → 10, 20;
    # bin 2: 2.9 → 7; 4.0 lies outside every bin.
    torch.testing.assert_close(
        bin_by_angle(angles, values, edges, reduce="sum"), torch.tensor([9.0, 30.0, 7.0], dtype=F64)
    )
    torch.testing.assert_close(
        bin_by_angle(angles, values, edges), torch.tensor([3.0, 15.0, 7.0], dtype=F64)
    )


def test_bin_by_angle_wraps_around_the_full_circle_and_flags_empty_bins():
    edges, _ = angle_bins(6)  # edges −π/6 ... 11π/6; bin 0 straddles 0
    angles = torch.tensor([-0.1, 2 * math.pi - 0.1, 0.1, math.pi], dtype=F64)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    mean = bin_by_angle(angles, values, edges)
    assert mean[0].item() == 2.0 and mean[3].item() == 4.0
    assert bool(mean[[1, 2, 4, 5]].isnan().all())
    sums = bin_by_angle(angles, values, edges, reduce="sum")
    torch.testing.assert_close(sums, torch.tensor([6.0, 0, 0, 4.0, 0, 0], dtype=F64))
    counts = bin_by_angle(angles, torch.ones(4, dtype=torch.int64), edges, reduce="sum")
    assert counts.dtype == F64 and counts.sum().item() == 4


def test_ellipse_samples_on_bin_edges_fall_into_equal_counts():
    # 600 samples over 60 bins: samples 10k − 5 lie exactly on edges; each bin gets ten.
    edges, _ = angle_bins(60)
    angles = ellipse_angles(600)
    counts = bin_by_angle(angles, torch.ones(600, dtype=F64), edges, reduce="sum")
    torch.testing.assert_close(counts, torch.full((60,), 10.0, dtype=F64), rtol=0, atol=0)


def test_bin_by_angle_rejects_bad_input():
    edges, _ = angle_bins(6)
    angles = torch.zeros(3, dtype=F64)
    with pytest.raises(UserError, match="'mean', 'sum'"):
        bin_by_angle(angles, angles, edges, reduce="median")
    with pytest.raises(UserError, match="increasing"):
        bin_by_angle(angles, angles, edges.flip(0))
    with pytest.raises(UserError, match="2π"):
        bin_by_angle(angles, angles, torch.tensor([0.0, 7.0]))
    with pytest.raises(UserError, match="one length"):
        bin_by_angle(angles, angles[:2], edges)


def test_bin_arc_length_on_a_circle_is_radius_times_angle():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=F64))
    r = 1.7
    c, a, b = torch.randn(5, generator=g, dtype=F64), r * q[:, 0], r * q[:, 1]
    edges, _ = angle_bins(60)
    lengths = bin_arc_length(c, a, b, edges)
    assert lengths.shape == (60,) and lengths.dtype == F64
    torch.testing.assert_close(lengths, r * edges.diff(), rtol=1e-13, atol=0)
    uneven = torch.tensor([0.0, 0.1, 1.0, 2.5, 6.0], dtype=F64)
    torch.testing.assert_close(
        bin_arc_length(c, a, b, uneven), r * uneven.diff(), rtol=1e-13, atol=0
    )


def test_bin_arc_lengths_sum_to_the_perimeter_of_a_thin_ellipse():
    c, a, b = ellipse_axes(*_anchors(d=9, seed=4))
    b = a + 0.05 * b  # far from a circle: a and b nearly parallel, a strongly varying speed
    edges, _ = angle_bins(60)
    lengths = bin_arc_length(c, a, b, edges)
    phi = torch.linspace(0, 2 * math.pi, 2**18 + 1, dtype=F64)
    points = c + torch.outer(phi.cos(), a) + torch.outer(phi.sin(), b)
    perimeter = points.diff(dim=0).norm(dim=1).sum()  # inscribed polygon, error ~1e-10
    torch.testing.assert_close(lengths.sum(), perimeter, rtol=1e-9, atol=0)
    # Per bin against a fine trapezoid rule on the speed.
    for k in (0, 17, 59):
        grid = torch.linspace(edges[k].item(), edges[k + 1].item(), 20001, dtype=F64)
        trapezoid = torch.trapezoid(ellipse_speed(c, a, b, grid), grid)
        torch.testing.assert_close(lengths[k], trapezoid, rtol=1e-9, atol=0)


def _mlp(seed=0):
    net = MLP(
        5, 3, width=8, depth=2, nonlinearity="relu", generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return net.double()


def test_jacobian_profile_equals_binning_by_hand():
    net, (x1, x2, x3) = _mlp(), _anchors()
    profile = jacobian_profile(net, x1, x2, x3, n_points=120)
    assert isinstance(profile, Profile)
    assert profile.values.shape == (60,) and profile.bin_centres.shape == (60,)
    assert profile.angles.shape == (120,) and profile.per_point.shape == (120,)
    norms = jacobian_norm(net, ellipse(x1, x2, x3, n_points=120))
    torch.testing.assert_close(profile.per_point, norms, rtol=0, atol=0)
    torch.testing.assert_close(profile.angles, ellipse_angles(120), rtol=0, atol=0)
    torch.testing.assert_close(profile.bin_centres, angle_bins(60)[1], rtol=0, atol=0)
    # Bin k spans ((k − ½)w, (k + ½)w) with w = 2π/60: samples 2k − 1 (its lower edge) and 2k.
    by_hand = torch.stack([(norms[(2 * k - 1) % 120] + norms[2 * k]) / 2 for k in range(60)])
    torch.testing.assert_close(profile.values, by_hand, rtol=1e-15, atol=0)
    assert bool(profile.values.isfinite().all()) and bool((profile.values > 0).all())


def test_jacobian_profile_of_a_linear_model_is_flat():
    # Logits of a linear map: J = W everywhere, so every bin holds ‖W‖_F.
    net = nn.Linear(5, 4).double()
    profile = jacobian_profile(net, *_anchors(), n_points=36, n_bins=9, output="logits")
    expected = torch.linalg.matrix_norm(net.weight.detach()).expand(9)
    torch.testing.assert_close(profile.values, expected, rtol=1e-12, atol=0)


def test_jacobian_profile_rejects_bad_arguments():
    net, anchors = _mlp(), _anchors()
    with pytest.raises(UserError, match="n_points"):
        jacobian_profile(net, *anchors, n_points=30)
    with pytest.raises(UserError, match="output"):
        jacobian_profile(net, *anchors, n_points=60, output="probabilities")
    with pytest.raises(UserError, match="multiple of 3"):
        jacobian_profile(net, *anchors, n_points=60, n_bins=50)
