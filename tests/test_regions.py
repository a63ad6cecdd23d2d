"""Region maps and boundary density on a 2-D slice (paper §3, Study 3)."""

import pytest
import torch

from sensgen.errors import UserError
from sensgen.metrics.codes import layer_activation_codes
from sensgen.metrics.regions import boundary_density, disc_mask, region_map
from sensgen.models import MLP


def _net(depth, *, width=12, seed=0):
    net = MLP(2, 3, width, depth, "relu", generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return net


def _grid(resolution, extent=2.0):
    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2)  # row r, column c at r*R + c


@pytest.mark.parametrize("layer", [0, -1])
def test_equal_codes_iff_equal_ids(layer):
    net, points = _net(depth=2), _grid(16)
    ids = region_map(net, points, resolution=16, layer=layer, chunk_size=37).flatten()
    codes = layer_activation_codes(net, points)[layer]  # [256, 12]
    same_code = (codes.unsqueeze(0) == codes.unsqueeze(1)).all(-1)  # [256, 256]
    assert torch.equal(ids.unsqueeze(0) == ids.unsqueeze(1), same_code)
    assert 1 < ids.unique().numel() < 256
    assert torch.equal(ids.unique(), torch.arange(ids.max() + 1))


def test_region_map_accepts_float64_grid_on_float32_model():
    net = _net(depth=2)
    ids64 = region_map(net, _grid(8), resolution=8)
    ids32 = region_map(net.float(), _grid(8), resolution=8)
    assert ids32.dtype == torch.int64 and torch.equal(ids32, ids64)


def test_boundary_density_by_hand():
    assert boundary_density(torch.full((5, 7), 3)) == 0.0
    ids = torch.tensor([[0, 0, 1], [0, 2, 1]])
    # right pairs: 0|0 same, 0|1 diff, 0|2 diff, 2|1 diff; down: 0/0 same, 0/2 diff, 1/1 same
    assert boundary_density(ids) == pytest.approx(4 / 7)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert boundary_density(ids, mask) == pytest.approx(2 / 4)  # 0|0, 0|2, 0/0, 0/2
    with pytest.raises(UserError, match="no pair"):
        boundary_density(ids, torch.eye(2, 3, dtype=torch.bool))


def test_disc_mask():
    mask = disc_mask(5, (2.0, 2.0), 1.0)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2, 1:4] = expected[1:4, 2] = True
    assert torch.equal(mask, expected)
    assert disc_mask(64, (10.5, 40.0), 8.0).sum().item() == pytest.approx(3.14159 * 64, rel=0.05)


def test_one_hidden_layer_boundaries_lie_along_the_units_lines():
    resolution = 48
    net, points = _net(depth=1), _grid(resolution)
    ids = region_map(net, points, resolution=resolution)
    w, b = net.layers[0].weight.detach(), net.layers[0].bias.detach()
    side = (points @ w.T + b > 0).reshape(resolution, resolution, -1)  # [R, R, n]
    # A neighbouring pair is a boundary iff some unit's line w·x + b = 0 passes between them.
    crosses_right = (side[:, 1:] != side[:, :-1]).any(-1)
    crosses_down = (side[1:] != side[:-1]).any(-1)
    assert torch.equal(ids[:, 1:] != ids[:, :-1], crosses_right)
    assert torch.equal(ids[1:] != ids[:-1], crosses_down)
    # And every boundary pair's midpoint is within one grid step of a line.
    step = 4.0 / (resolution - 1)
    grid = points.reshape(resolution, resolution, 2)
    midpoints = (grid[:, 1:] + grid[:, :-1])[crosses_right] / 2  # [m, 2]
    distance = ((midpoints @ w.T + b).abs() / w.norm(dim=1)).min(-1).values
    assert crosses_right.any() and distance.max() <= step
    assert 0 < boundary_density(ids) < 0.5


def test_region_map_user_errors():
    net = _net(depth=2)
    with pytest.raises(UserError, match="resolution"):
        region_map(net, _grid(4), resolution=5)
    with pytest.raises(UserError, match="hidden layers"):
        region_map(net, _grid(4), resolution=4, layer=2)


def test_region_map_takes_a_plane_grid_and_checks_its_resolution():
    from sensgen.errors import UserError
    from sensgen.metrics import plane_grid, region_map
    from sensgen.models import MLP

    net = MLP(3, 2, width=8, depth=1, generator=torch.Generator().manual_seed(0))
    grid = plane_grid(*torch.eye(3), resolution=8)
    assert torch.equal(
        region_map(net, grid, resolution=8), region_map(net, grid.points, resolution=8)
    )
    for bad in (16.0, 0):
        with pytest.raises(UserError, match="resolution must be an integer >= 1"):
            region_map(net, grid.points, resolution=bad)


def test_float32_anchors_on_one_line_are_collinear():
    # float32 rounding puts a + 2d about 1e-6 off the line through a and a + d: that is no
    # plane (its second axis would be rounding noise).
    from sensgen.errors import UserError
    from sensgen.metrics import plane_grid

    g = torch.Generator().manual_seed(3)
    a, d = torch.randn(784, generator=g), torch.randn(784, generator=g)
    with pytest.raises(UserError, match="collinear"):
        plane_grid(a, a + d, a + 2 * d, resolution=8)
    assert plane_grid(a, a + d, a + torch.randn(784, generator=g), resolution=8).points.shape == (
        64,
        784,
    )
