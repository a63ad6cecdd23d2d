"""Transitions: exact vs analytic vs dense sampling, and the counting pitfalls (paper §2.2, §7)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics.codes import BREAKPOINTS, activation_codes, hidden_preactivations
from sensgen.metrics.profiles import angle_bins, bin_arc_length, transition_profile
from sensgen.metrics.trajectories import ellipse_axes
from sensgen.metrics.transitions import (
    crossing_angles,
    ellipse_transitions_exact,
    ellipse_transitions_sampled,
    transition_details,
    transitions,
)
from sensgen.models import MLP

CENTRE = torch.tensor([0.3, -0.2], dtype=torch.float64)
RADIUS = 2.0


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _circle_net(nonlinearity, *, width=20, scale=1.0, seed=0):
    """1-hidden-layer net on R²: random weights and biases, unit n's lines w_n·x + b_n = β."""
    net = MLP(2, 3, width, 1, nonlinearity, generator=_gen(seed)).double()
    with torch.no_grad():
        net.layers[0].weight.normal_(0, scale, generator=_gen(seed + 1))
        net.layers[0].bias.normal_(0, scale, generator=_gen(seed + 2))
    return net


def _analytic_circle_count(net):
    """t = Σ_n Σ_β 2·1[|w_n·c + b_n − β| < r‖w_n‖], and the smallest relative margin."""
    w, b = net.layers[0].weight.detach(), net.layers[0].bias.detach()
    reach = RADIUS * w.norm(dim=1)  # [n]
    count, margin = 0, math.inf
    for beta in BREAKPOINTS[net.nonlinearity]:
        distance = (w @ CENTRE + b - beta).abs()  # [n]
        count += 2 * int((distance < reach).sum())
        margin = min(margin, ((distance - reach).abs() / w.norm(dim=1)).min().item())
    return count, margin


def _circle_anchors():
    """x1, x2, x3 at φ = π/3, π, 5π/3 on the circle, so the sensgen ellipse is the circle."""
    return [CENTRE + RADIUS * torch.tensor([math.cos(p), math.sin(p)]) for p in _ANCHOR_ANGLES]


_ANCHOR_ANGLES = (math.pi / 3, math.pi, 5 * math.pi / 3)


def _ellipse(x1, x2, x3, n):
    c = (x1 + x2 + x3) / 3
    a, b = c - x2, (x1 - x3) / math.sqrt(3)
    phi = torch.arange(n, dtype=torch.float64).unsqueeze(1) * (2 * math.pi / n)
    return c + torch.cos(phi) * a + torch.sin(phi) * b  # [n, D]


def _subdivide(vertices, m):
    """m equally spaced samples per edge of the closed polygon, vertices included: [k*m, D]."""
    s = torch.arange(m, dtype=torch.float64).reshape(1, m, 1) / m
    start, end = vertices.unsqueeze(1), torch.roll(vertices, -1, dims=0).unsqueeze(1)
    return (start + s * (end - start)).reshape(-1, vertices.shape[1])


@pytest.mark.parametrize(
    ("nonlinearity", "scale"),
    [("relu", 1.0), ("relu6", 3.0), ("hard_tanh", 1.0), ("hard_sigmoid", 2.0)],
)
def test_one_hidden_layer_on_a_circle_matches_the_analytic_count(nonlinearity, scale):
    net = _circle_net(nonlinearity, scale=scale)
    expected, margin = _analytic_circle_count(net)
    width, n_breakpoints = 20, len(BREAKPOINTS[net.nonlinearity])
    assert 0 < expected < 2 * width * n_breakpoints, "some lines must cut, some must miss"
    assert margin > 1e-3  # no line is nearly tangent, so a fine polygon sees the same cuts
    polygon = _ellipse(*_circle_anchors(), 4096)
    assert transitions(net, polygon) == expected
    count, sides = ellipse_transitions_exact(net, *_circle_anchors(), start_sides=48)
    assert count == expected and sides < 48 * 2**10
    # Dense sampling of the circle never exceeds the count and converges to it.
    sampled = [
        ellipse_transitions_sampled(net, *_circle_anchors(), n_points=n)
        for n in (12, 48, 192, 768, 100_000)
    ]
    assert sampled == sorted(sampled) and max(sampled) <= expected
    assert sampled[-1] == expected


def test_crossing_locations_lie_on_the_breakpoints():
    net = _deep_net(depth=3, d=8)
    x1, x2, x3 = torch.randn(3, 8, generator=_gen(7), dtype=torch.float64)
    vertices = _ellipse(x1, x2, x3, 300)
    found = transition_details(net, vertices)
    assert found.count == sum(found.per_layer) == len(found.edge) > 50
    assert all(n > 0 for n in found.per_layer)
    points = vertices[found.edge] + found.fraction.unsqueeze(1) * (
        torch.roll(vertices, -1, dims=0)[found.edge] - vertices[found.edge]
    )
    hidden, _ = net.preactivations(points)
    h = torch.stack(hidden)[found.layer, torch.arange(found.count), found.unit]  # [count]
    distance = (h.unsqueeze(1) - torch.tensor(BREAKPOINTS[net.nonlinearity])).abs().min(1)
    assert distance.values.max() < 1e-9
    position = found.edge + found.fraction
    assert torch.all(position[1:] >= position[:-1])
    # Chunking changes nothing.
    chunked = transition_details(net, vertices, chunk_size=7)
    assert torch.equal(chunked.edge, found.edge) and torch.equal(chunked.unit, found.unit)
    torch.testing.assert_close(chunked.fraction, found.fraction, rtol=0, atol=1e-12)


def test_crossing_angles_on_a_circle_match_the_lines():
    net = _circle_net("relu")
    w, b = net.layers[0].weight.detach(), net.layers[0].bias.detach()
    # w·(c + r(cos φ, sin φ)) + b = 0  ⇔  cos(φ − θ) = −(w·c + b)/(r‖w‖), θ = atan2(w_y, w_x).
    ratio = -(w @ CENTRE + b) / (RADIUS * w.norm(dim=1))
    cuts = ratio.abs() < 1
    theta, spread = torch.atan2(w[cuts, 1], w[cuts, 0]), torch.acos(ratio[cuts])
    expected = torch.cat([theta + spread, theta - spread]) % (2 * math.pi)
    got = crossing_angles(net, *_circle_anchors(), sides=2048)
    torch.testing.assert_close(got, expected.sort().values, rtol=0, atol=1e-5)


def _deep_net(nonlinearity="relu", *, depth=3, width=64, d=64, seed=0):
    net = MLP(d, 10, width, depth, nonlinearity, generator=_gen(seed)).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_(0, 0.5, generator=_gen(seed + 1))
    return net


@pytest.mark.parametrize("nonlinearity", ["relu", "hard_sigmoid"])
def test_sampling_is_below_exact_and_grows_under_refinement(nonlinearity):
    net = _deep_net(nonlinearity, depth=3, width=32, d=16)
    x1, x2, x3 = torch.randn(3, 16, generator=_gen(5), dtype=torch.float64) * 2
    exact, sides = ellipse_transitions_exact(net, x1, x2, x3, start_sides=150)
    previous = 0
    for k in (150 * 2**j for j in range(7)):  # each sample set contains the previous one
        polygon = _ellipse(x1, x2, x3, k)
        t_k = transitions(net, polygon, method="sampled")
        assert previous <= t_k <= transitions(net, polygon)  # t_k ≤ t_exact, same vertices
        assert t_k <= exact
        previous = t_k
    assert previous == exact and sides <= 150 * 2**6
    # Chunked sampling carries the last code across chunk boundaries: chunking changes nothing.
    polygon = _ellipse(x1, x2, x3, 600)
    t_600 = transitions(net, polygon, method="sampled")
    assert transitions(net, polygon, method="sampled", chunk_size=7) == t_600
    assert ellipse_transitions_sampled(net, x1, x2, x3, n_points=600, chunk_size=37) == t_600


def test_deep_net_exact_equals_a_million_samples():
    net = _deep_net(depth=3, width=64, d=64).float()
    x1, x2, x3 = torch.randn(3, 64, generator=_gen(6), dtype=torch.float64) * 3
    vertices = _ellipse(x1, x2, x3, 60)  # a coarse polygon: long edges, many crossings each
    exact = transitions(net, vertices)
    dense = _subdivide(vertices, 16_700)  # 1,002,000 samples on the same polygon
    assert len(dense) > 10**6
    sampled = transitions(net, dense.float(), method="sampled", chunk_size=65_536)
    assert exact > 300 and sampled == exact
    assert transitions(net, vertices, method="sampled") < exact


def test_l1_counts_two_crossings_between_two_samples():
    # The pitfall: a relu6 unit going from h = −1 to h = 7 crosses 0 and 6 in one step.
    net = MLP(1, 1, 1, 1, "relu6").double()
    with torch.no_grad():
        net.layers[0].weight.fill_(1.0)
        net.layers[0].bias.zero_()
    path = torch.tensor([[-1.0], [7.0]], dtype=torch.float64)
    codes = activation_codes(net, path)
    pairs_that_differ = int((codes[1:] != codes[:-1]).any(dim=1).sum())
    assert pairs_that_differ == 1
    assert transitions(net, path, method="sampled", closed=False) == 2
    assert transitions(net, path, method="sampled", closed=False, distance="hamming") == 1
    assert transitions(net, path, closed=False) == 2
    assert transitions(net, path, method="sampled") == transitions(net, path) == 4  # closed


def test_knot_exactly_on_a_breakpoint_keeps_t_k_below_exact():
    # h = x passes −1, 0, 1 with a vertex exactly on β = 0: both counts say 1 crossing.
    net = MLP(1, 1, 1, 1, "relu").double()
    with torch.no_grad():
        net.layers[0].weight.fill_(1.0)
        net.layers[0].bias.zero_()
    path = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)
    assert transitions(net, path, closed=False) == 1
    assert transitions(net, path, method="sampled", closed=False) == 1


def test_open_path_and_a_users_sequential():
    net = _deep_net("relu6", depth=2, width=16, d=6)
    user = nn.Sequential(net.layers[0], nn.ReLU6(), net.layers[1], nn.ReLU6(), net.layers[2])
    path = torch.randn(40, 6, generator=_gen(8), dtype=torch.float64) * 3
    for closed in (True, False):
        mine = transition_details(net, path, closed=closed)
        theirs = transition_details(user, path, closed=closed)
        assert mine.count == theirs.count > 0 and mine.per_layer == theirs.per_layer
        assert torch.equal(mine.unit, theirs.unit)
    assert transitions(net, path, closed=False) <= transitions(net, path)
    assert len(hidden_preactivations(user, path)) == 2


def _mixed(layer_1: str) -> nn.Module:
    """fc1, then `layer_1` ("functional": F.relu in the forward; "square": h², neither a
    module nor affine), fc2, nn.ReLU, fc3."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            h = self.fc1(x)
            a = F.relu(h) if layer_1 == "functional" else h * h  # invisible to hooks
            return self.fc3(self.act(self.fc2(a)))

    torch.manual_seed(0)
    return Mixed().double()


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_hidden_functional_activation_is_refused_by_both_methods(method):
    with pytest.raises(UserError, match=r"hidden layer with F\.relu outside an activation"):
        transitions(_mixed("functional"), _ellipse(*_circle_anchors(), 64), method=method)


def test_exact_refuses_a_layer_that_is_not_affine_between_modules():
    # No activation function to name (h² is no activation), but the recorded
    # pre-activations are not affine between crossings: the exact method's own check.
    path = _ellipse(*_circle_anchors(), 64)
    with pytest.raises(UserError, match="not affine"):
        transitions(_mixed("square"), path)
    assert transitions(_mixed("square"), path, method="sampled") >= 0  # (its codes: 1 layer)


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_functional_activation_after_the_last_module_is_refused(method):
    # After the last activation module no recorded pre-activation shows it: before the
    # function spy, both methods left layer 2 out without a word.
    class After(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))

    torch.manual_seed(0)
    with pytest.raises(UserError, match=r"with F\.relu outside an activation module"):
        transitions(After().double(), _ellipse(*_circle_anchors(), 64), method=method)


def _leaky_sequential(activation: nn.Module, seed: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), activation, nn.Linear(16, 3)
    ).double()


@pytest.mark.parametrize("activation", [nn.LeakyReLU(0.1), nn.PReLU(16), nn.RReLU()])
def test_leaky_relus_are_coded_at_their_kink(activation):
    # A leaky ReLU's second layer is part of the code: exact equals a dense sampling of the
    # same polygon (which sees both layers), and the second layer has crossings.
    net = _leaky_sequential(activation).eval()
    vertices = torch.randn(12, 6, generator=_gen(9), dtype=torch.float64) * 3
    details = transition_details(net, vertices)
    dense = transitions(net, _subdivide(vertices, 4_000), method="sampled")
    assert details.count == dense and details.per_layer[1] > 0
    assert activation_codes(net, vertices).shape == (12, 32)


def test_rrelu_in_train_mode_is_refused():
    net = _leaky_sequential(nn.RReLU()).train()
    with pytest.raises(UserError, match=r"RReLU .*model\.eval\(\)"):
        transitions(net, torch.randn(5, 6, dtype=torch.float64))


@pytest.mark.parametrize("activation", [nn.GELU(), nn.SiLU(), nn.Softplus(), nn.Mish()])
def test_activations_that_cannot_be_coded_are_named(activation):
    # Before, their layer was silently left out of the code: counts too low.
    net = _leaky_sequential(activation)
    path = torch.randn(8, 6, dtype=torch.float64)
    name = type(activation).__name__
    for method in ("exact", "sampled"):
        with pytest.raises(UserError, match=rf"nn\.{name} \('3'\).*Use one of nn\.ReLU6"):
            transitions(net, path, method=method)
    with pytest.raises(UserError, match=name):
        activation_codes(net, path)


def test_a_smooth_readout_is_not_a_hidden_layer():
    # A softmax module, F.log_softmax or a normalisation after the last activation adds
    # no region: the same count as the bare net.
    net = _deep_net("relu", depth=2, width=16, d=6)
    body = [net.layers[0], nn.ReLU(), net.layers[1], nn.ReLU()]

    class LogSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Sequential(*body), net.layers[2]

        def forward(self, x):
            return F.log_softmax(self.head(self.body(x)), dim=1)

    path = torch.randn(30, 6, generator=_gen(4), dtype=torch.float64) * 3
    count = transitions(net, path)
    assert count > 0
    assert transitions(nn.Sequential(*body, net.layers[2], nn.Softmax(dim=1)), path) == count
    assert transitions(LogSoftmax(), path) == count
    normed = nn.Sequential(*body, nn.LayerNorm(16).double(), net.layers[2])
    assert transition_details(normed, path).per_layer == transition_details(net, path).per_layer


def test_user_errors():
    smooth = _deep_net("tanh", depth=1, width=4, d=2)
    path = _ellipse(*_circle_anchors(), 12)
    with pytest.raises(UserError, match="method='sampled'"):
        transitions(smooth, path)
    assert transitions(smooth, path, method="sampled") >= 0
    with pytest.raises(UserError, match="'exact', 'sampled'"):
        transitions(smooth, path, method="fast")
    with pytest.raises(UserError, match="'l1', 'hamming'"):
        transitions(smooth, path, method="sampled", distance="l2")
    with pytest.raises(UserError, match="sampled"):
        transitions(smooth, path, distance="l1")
    with pytest.raises(UserError, match="at least 2 points"):
        transitions(smooth, path[:1])


def test_user_model_is_untouched():
    net = _deep_net(depth=2, width=8, d=2).float()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    transitions(net, _ellipse(*_circle_anchors(), 24))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())


@pytest.mark.parametrize("density", ["per_bin", "per_radian", "arc_length"])
def test_transition_profile_redistributes_the_exact_count(density):
    # Summing density × normaliser over the bins recovers every crossing on the circle.
    net = _circle_net("relu")
    anchors = _circle_anchors()
    profile = transition_profile(net, *anchors, sides=2048, n_bins=60, density=density)
    exact, _ = _analytic_circle_count(net)
    edges, _ = angle_bins(60)
    if density == "per_bin":
        scale = torch.ones(60, dtype=torch.float64)
    elif density == "per_radian":
        scale = edges[1:] - edges[:-1]
    else:
        scale = bin_arc_length(*ellipse_axes(*anchors), edges)
        # On a circle of radius r a bin's arc is r·Δφ.
        torch.testing.assert_close(scale, RADIUS * (edges[1:] - edges[:-1]))
    assert profile.values.shape == (60,) and len(profile.angles) == exact
    assert round(float((profile.values * scale).sum())) == exact


def test_transition_profile_rejects_unknown_density():
    with pytest.raises(UserError, match="arc_length"):
        transition_profile(_circle_net("relu"), *_circle_anchors(), density="per_metre")


def test_paths_and_chunks_are_checked():
    net = _deep_net(depth=1, width=8, d=2)
    path = _ellipse(*_circle_anchors(), 24)
    assert transitions(net, path.numpy()) == transitions(net, path)
    with_nan = path.clone()
    with_nan[5, 0] = float("nan")
    for method in ("exact", "sampled"):
        with pytest.raises(UserError, match="NaN or infinite"):
            transitions(net, with_nan, method=method)
        for chunk_size in (0, -1, 2.5):
            with pytest.raises(UserError, match="chunk_size must be a positive integer"):
                transitions(net, path, method=method, chunk_size=chunk_size)


def test_sides_are_checked_under_their_own_names():
    net = _deep_net(depth=1, width=8, d=2)
    anchors = _circle_anchors()
    with pytest.raises(UserError, match="sides must be an integer >= 3, got 0"):
        transition_profile(net, *anchors, sides=0)
    with pytest.raises(UserError, match=r"start_sides must be an integer >= 3, got 1\.5"):
        ellipse_transitions_exact(net, *anchors, start_sides=1.5)
    import numpy as np

    count, sides = ellipse_transitions_exact(net, *anchors, start_sides=np.int64(60))
    assert (count, sides) == ellipse_transitions_exact(net, *anchors, start_sides=60)
