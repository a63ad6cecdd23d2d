"""Trajectories through input space: ellipses, segments, polygons, plane grids (paper §2.2)."""

import math

import pytest
import torch

from sensgen.errors import UserError
from sensgen.metrics.trajectories import (
    ellipse,
    ellipse_angles,
    ellipse_axes,
    ellipse_speed,
    plane_grid,
    polygon,
    random_anchors,
    random_ellipse,
    segment,
)

F64 = torch.float64


def _anchors(d=7, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, d, generator=g, dtype=dtype)


def _equilateral(d=4, r=2.5, seed=3):
    """Three points 120° apart on a circle of radius r in a random 2-D plane of R^d."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=F64))
    centre = torch.randn(d, generator=g, dtype=F64)
    thetas = torch.tensor([0.3, 0.3 + 2 * math.pi / 3, 0.3 + 4 * math.pi / 3], dtype=F64)
    return [centre + r * (t.cos() * q[:, 0] + t.sin() * q[:, 1]) for t in thetas], centre


def _formula(c, a, b, phi):
    return c + torch.outer(phi.cos(), a) + torch.outer(phi.sin(), b)


def test_axes_give_the_centroid_and_pass_through_the_anchors():
    x1, x2, x3 = _anchors()
    c, a, b = ellipse_axes(x1, x2, x3)
    torch.testing.assert_close(c, (x1 + x2 + x3) / 3, rtol=0, atol=1e-15)
    phi = torch.tensor([math.pi / 3, math.pi, 5 * math.pi / 3], dtype=F64)
    torch.testing.assert_close(
        _formula(c, a, b, phi), torch.stack([x1, x2, x3]), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("n", [6, 60, 600, 1206])
def test_ellipse_hits_the_anchors_at_pi_over_3_pi_5pi_over_3(n):
    x1, x2, x3 = _anchors(d=11)
    path = ellipse(x1, x2, x3, n_points=n)
    assert path.shape == (n, 11) and path.dtype == F64
    for index, anchor in [(n // 6, x1), (n // 2, x2), (5 * n // 6, x3)]:
        torch.testing.assert_close(path[index], anchor, rtol=0, atol=1e-12)


def test_ellipse_is_closed_periodic_and_follows_the_formula():
    x1, x2, x3 = _anchors()
    c, a, b = ellipse_axes(x1, x2, x3)
    n = 60
    path = ellipse(x1, x2, x3, n_points=n)
    angles = ellipse_angles(n)
    torch.testing.assert_close(angles, 2 * math.pi * torch.arange(n, dtype=F64) / n)
    torch.testing.assert_close(path, _formula(c, a, b, angles), rtol=0, atol=1e-13)
    # Closed: the first point is not repeated, and z(2π) closes the loop onto it.
    assert not torch.allclose(path[-1], path[0])
    torch.testing.assert_close(_formula(c, a, b, angles + 2 * math.pi), path, rtol=0, atol=1e-12)
    # Doubling n keeps the old samples as the even ones.
    torch.testing.assert_close(ellipse(x1, x2, x3, n_points=2 * n)[::2], path, rtol=0, atol=1e-13)


def test_circle_through_equilateral_anchors_has_constant_speed():
    (x1, x2, x3), centre = _equilateral(r=2.5)
    c, a, b = ellipse_axes(x1, x2, x3)
    torch.testing.assert_close(c, centre, rtol=0, atol=1e-13)
    speed = ellipse_speed(c, a, b, torch.linspace(0, 2 * math.pi, 97, dtype=F64))
    torch.testing.assert_close(speed, torch.full((97,), 2.5, dtype=F64), rtol=0, atol=1e-12)
    # Equal chords between consecutive samples, the closing one included.
    path = ellipse(x1, x2, x3, n_points=36)
    chords = (path.roll(-1, dims=0) - path).norm(dim=1)  # [36]
    expected = 2 * 2.5 * math.sin(math.pi / 36)
    torch.testing.assert_close(chords, torch.full((36,), expected, dtype=F64), rtol=0, atol=1e-12)


def test_speed_matches_a_central_difference_of_the_path():
    c, a, b = ellipse_axes(*_anchors())
    phi = torch.linspace(0.1, 6.0, 13, dtype=F64)
    h = 1e-6
    numeric = (_formula(c, a, b, phi + h) - _formula(c, a, b, phi - h)).norm(dim=1) / (2 * h)
    speed = ellipse_speed(c, a, b, phi)
    assert speed.shape == phi.shape and speed.dtype == F64
    torch.testing.assert_close(speed, numeric, rtol=1e-8, atol=0)
    assert ellipse_speed(c, a, b, 0.5).shape == ()


def test_float32_anchors_give_float32_paths():
    x1, x2, x3 = _anchors(dtype=torch.float32)
    assert ellipse(x1, x2, x3, n_points=12).dtype == torch.float32
    assert segment(x1, x2, n_points=4).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in ellipse_axes(x1, x2, x3))


def test_bad_anchors_and_counts_raise_user_errors():
    x1, x2, x3 = _anchors()
    with pytest.raises(UserError, match="flatten"):
        ellipse(x1.reshape(1, -1), x2, x3, n_points=6)
    with pytest.raises(UserError, match="same length"):
        ellipse(x1, x2[:3], x3, n_points=6)
    with pytest.raises(UserError, match="n_points"):
        ellipse(x1, x2, x3, n_points=2)
    with pytest.raises(UserError, match="n_points"):
        segment(x1, x2, n_points=1)


def test_random_ellipse_is_deterministic_per_seed():
    mean = torch.arange(5, dtype=F64)
    draw = lambda seed: random_ellipse(  # noqa: E731
        mean, 0.7, n_points=30, generator=torch.Generator().manual_seed(seed)
    )
    assert draw(0).shape == (30, 5) and draw(0).dtype == F64
    torch.testing.assert_close(draw(0), draw(0), rtol=0, atol=0)
    assert not torch.allclose(draw(0), draw(1))
    anchors = random_anchors(mean, 0.7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw(0), ellipse(*anchors, n_points=30), rtol=0, atol=0)


@pytest.mark.parametrize("var", [0.7, torch.tensor([0.5, 2.0, 1.0, 0.1])])
def test_random_anchor_statistics_match_mean_and_variance(var):
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    g = torch.Generator().manual_seed(0)
    samples = torch.cat([random_anchors(mean, var, generator=g) for _ in range(4000)])  # [12000, 4]
    expected_var = torch.as_tensor(var, dtype=F64).expand(4)
    torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=0.05)
    torch.testing.assert_close(samples.var(0), expected_var, rtol=0.05, atol=0)


def test_random_anchors_reject_bad_variances():
    mean = torch.zeros(4, dtype=F64)
    with pytest.raises(UserError, match=">= 0"):
        random_anchors(mean, -1.0)
    with pytest.raises(UserError, match="per-feature"):
        random_anchors(mean, torch.ones(3))


def test_segment_endpoints_and_spacing():
    x1, x2, _ = _anchors()
    path = segment(x1, x2, n_points=5)
    assert path.shape == (5, 7)
    assert torch.equal(path[0], x1) and torch.equal(path[-1], x2)
    torch.testing.assert_close(path[2], (x1 + x2) / 2, rtol=0, atol=1e-15)
    torch.testing.assert_close(path.diff(dim=0), ((x2 - x1) / 4).expand(4, -1), rtol=0, atol=1e-15)


def test_closed_polygon_counts_and_vertices():
    vertices = _anchors(d=5)  # a triangle [3, 5]
    path = polygon(vertices, points_per_edge=4)
    assert path.shape == (12, 5)
    for j in range(3):
        torch.testing.assert_close(path[4 * j], vertices[j], rtol=0, atol=0)
    # The last edge runs back to the first vertex without repeating it.
    torch.testing.assert_close(path[-2], (vertices[2] + vertices[0]) / 2, rtol=0, atol=1e-15)
    assert not torch.allclose(path[-1], vertices[0])
    torch.testing.assert_close(polygon(vertices, points_per_edge=1), vertices, rtol=0, atol=0)


def test_open_polygon_ends_at_the_last_vertex():
    vertices = _anchors(d=5)
    path = polygon(vertices, points_per_edge=4, closed=False)
    assert path.shape == (2 * 4 + 1, 5)
    assert torch.equal(path[0], vertices[0]) and torch.equal(path[-1], vertices[-1])
    torch.testing.assert_close(path[4], vertices[1], rtol=0, atol=0)
    with pytest.raises(UserError, match="K >= 2"):
        polygon(vertices[:1], points_per_edge=3)
    with pytest.raises(UserError, match="points_per_edge"):
        polygon(vertices, points_per_edge=0)


def test_plane_grid_basis_anchors_and_extent():
    x1, x2, x3 = _anchors(d=20)
    grid = plane_grid(x1, x2, x3, resolution=33)
    torch.testing.assert_close(
        grid.basis @ grid.basis.T, torch.eye(2, dtype=F64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(grid.origin, (x1 + x2 + x3) / 3, rtol=0, atol=1e-15)
    # Gram–Schmidt of (x2 − x1, x3 − x1): u is along x2 − x1.
    torch.testing.assert_close(grid.basis[0], (x2 - x1) / (x2 - x1).norm(), rtol=0, atol=1e-15)
    reconstructed = grid.origin + grid.anchor_coords @ grid.basis
    torch.testing.assert_close(reconstructed, torch.stack([x1, x2, x3]), rtol=0, atol=1e-12)
    torch.testing.assert_close(grid.embed(grid.anchor_coords), reconstructed, rtol=0, atol=0)
    # The square spans 1.5× the anchors' extent about the centroid and holds them inside.
    reach = grid.anchor_coords.abs().max()
    for coords in (grid.u_coords, grid.v_coords):
        assert coords.shape == (33,)
        torch.testing.assert_close(coords[[0, -1]], torch.stack([-1.5 * reach, 1.5 * reach]))
    assert bool((grid.anchor_coords.abs() < 1.5 * reach).all())


def test_plane_grid_points_are_row_major_over_v_then_u():
    x1, x2, x3 = _anchors(d=6)
    grid = plane_grid(x1, x2, x3, resolution=4, extent=2.0)
    points = grid.points
    assert points.shape == (16, 6) and grid.resolution == 4
    for r in range(4):
        for k in range(4):
            expected = (
                grid.origin + grid.u_coords[k] * grid.basis[0] + grid.v_coords[r] * grid.basis[1]
            )
            torch.testing.assert_close(points[4 * r + k], expected, rtol=0, atol=1e-13)


def test_plane_grid_rejects_collinear_anchors():
    x1, x2, _ = _anchors()
    with pytest.raises(UserError, match="collinear"):
        plane_grid(x1, x2, 0.3 * x1 + 0.7 * x2, resolution=8)
    with pytest.raises(UserError, match="collinear"):
        plane_grid(x1, x1.clone(), x2, resolution=8)
    with pytest.raises(UserError, match="extent"):
        plane_grid(*_anchors(), resolution=8, extent=0.0)
