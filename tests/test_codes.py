"""Activation codes: piece indices, sign codes, layers, and a user's own modules (paper §2.2)."""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics.codes import (
    BREAKPOINTS,
    activation_codes,
    hidden_preactivations,
    is_piecewise_linear,
    layer_activation_codes,
    piece_index,
)
from sensgen.models import ACTIVATIONS, MLP, Nonlinearity

PIECEWISE = ["relu", "relu6", "hard_tanh", "hard_sigmoid"]
SMOOTH = ["tanh", "sigmoid", "elu"]

# Hand values around every breakpoint and the piece each belongs to (a value exactly on a
# breakpoint belongs to the piece below it).
HAND_VALUES = {
    "relu": ([-5.0, -1e-9, 0.0, 1e-9, 5.0], [0, 0, 0, 1, 1]),
    "relu6": ([-1.0, 0.0, 1e-9, 5.999, 6.0, 6.001, 9.0], [0, 0, 1, 1, 1, 2, 2]),
    "hard_tanh": ([-2.0, -1.0, -0.999, 0.0, 1.0, 1.001], [0, 0, 1, 1, 1, 2]),
    "hard_sigmoid": ([-4.0, -3.0, -2.999, 0.0, 3.0, 3.001], [0, 0, 1, 1, 1, 2]),
    # Smooth φ: the sign code 1[h > 0], sensgen's extension.
    "tanh": ([-2.0, 0.0, 1e-12, 2.0], [0, 0, 1, 1]),
    "sigmoid": ([-2.0, 0.0, 1e-12, 2.0], [0, 0, 1, 1]),
    "elu": ([-2.0, 0.0, 1e-12, 2.0], [0, 0, 1, 1]),
}

MODULES = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hard_tanh": nn.Hardtanh,
    "hard_sigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
}


def _identity_net(nonlinearity, n):
    """depth-1 MLP whose first layer is the identity, so its pre-activations are the inputs."""
    net = MLP(n, 2, n, 1, nonlinearity).double()
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.eye(n))
    return net


def _mlp(nonlinearity, depth=3, *, d=5, width=6, seed=0):
    net = MLP(d, 3, width, depth, nonlinearity, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return net.double()


@pytest.mark.parametrize("nonlinearity", PIECEWISE + SMOOTH)
def test_piece_index_on_hand_values(nonlinearity):
    values, pieces = HAND_VALUES[nonlinearity]
    x = torch.tensor([values], dtype=torch.float64)
    codes = activation_codes(_identity_net(nonlinearity, len(values)), x)
    assert codes.dtype == torch.int8 and codes.shape == (1, len(values))
    assert codes[0].tolist() == pieces
    nl = Nonlinearity(nonlinearity)
    assert piece_index(x, BREAKPOINTS[nl])[0].tolist() == pieces


@pytest.mark.parametrize("nonlinearity", PIECEWISE)
def test_breakpoints_are_where_phi_bends(nonlinearity):
    # Independent check of the table: φ is affine within each piece and bends at each β.
    nl = Nonlinearity(nonlinearity)
    phi = ACTIVATIONS[nl]
    edges = [-20.0, *BREAKPOINTS[nl], 20.0]
    for lo, hi in itertools.pairwise(edges):
        h = torch.linspace(lo + 1e-3, hi - 1e-3, 50, dtype=torch.float64)
        second = phi(h[2:]) - 2 * phi(h[1:-1]) + phi(h[:-2])
        assert second.abs().max() < 1e-12
        assert piece_index(h, BREAKPOINTS[nl]).unique().numel() == 1
    for beta in BREAKPOINTS[nl]:
        h = torch.tensor([beta - 0.5, beta, beta + 0.5], dtype=torch.float64)
        assert abs(phi(h[2]) - 2 * phi(h[1]) + phi(h[0])) > 1e-3


def test_piecewise_linear_flag():
    assert [is_piecewise_linear(n) for n in PIECEWISE] == [True] * 4
    assert [is_piecewise_linear(n) for n in SMOOTH] == [False] * 3
    with pytest.raises(UserError, match="relu6"):
        is_piecewise_linear("softplus")


@pytest.mark.parametrize("nonlinearity", ["relu6", "tanh"])
def test_codes_concatenate_all_hidden_layers(nonlinearity):
    net = _mlp(nonlinearity, depth=3, width=6)
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    per_layer = layer_activation_codes(net, x)
    assert [c.shape for c in per_layer] == [(11, 6)] * 3
    hidden, _ = net.preactivations(x)
    breakpoints = BREAKPOINTS[net.nonlinearity]
    expected = torch.cat([piece_index(h, breakpoints) for h in hidden], dim=1)
    assert torch.equal(activation_codes(net, x), expected)
    assert activation_codes(net, x).shape == (11, 18)


def _as_sequential(net, module_cls):
    modules = []
    for layer in net.layers[:-1]:
        modules += [layer, module_cls()]
    return nn.Sequential(*modules, net.layers[-1])


@pytest.mark.parametrize("nonlinearity", PIECEWISE + SMOOTH)
def test_hooks_on_a_users_sequential_equal_the_mlp_path(nonlinearity):
    net = _mlp(nonlinearity, depth=3)
    user = _as_sequential(net, MODULES[nonlinearity])
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(activation_codes(user, x), activation_codes(net, x))
    layers = hidden_preactivations(user, x)
    assert [layer.piecewise_linear for layer in layers] == [is_piecewise_linear(nonlinearity)] * 3
    assert layers[0].breakpoints == BREAKPOINTS[net.nonlinearity]


def test_hooks_read_inplace_and_custom_hardtanh():
    lin1, lin2 = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    user = nn.Sequential(lin1, nn.ReLU(inplace=True), lin2, nn.Hardtanh(-0.25, 0.5))
    h1 = lin1(x)
    h2 = lin2(F.relu(h1))
    codes = activation_codes(user, x)
    expected = torch.cat([piece_index(h1, (0.0,)), piece_index(h2, (-0.25, 0.5))], dim=1)
    assert torch.equal(codes, expected)
    assert len(hidden_preactivations(user, x, n_layers=1)) == 1


def test_functional_activations_are_a_user_error():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return F.relu(self.fc(x))

    with pytest.raises(UserError, match="functional activations"):
        activation_codes(Functional(), torch.zeros(2, 3))


class _Hidden(nn.Module):
    """fc1, nn.ReLU, fc2, then `call` on fc2's output (a second hidden layer), fc3."""

    def __init__(self, call):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act, self.call = nn.ReLU(), call

    def forward(self, x):
        return self.fc3(self.call(self.fc2(self.act(self.fc1(x)))))


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (F.relu, "F.relu"),
        (lambda h: F.relu(h, inplace=True), "F.relu"),
        (torch.relu, "torch.relu"),
        (lambda h: h.relu(), "Tensor.relu"),
        (torch.tanh, "torch.tanh"),
        (torch.sigmoid, "torch.sigmoid"),
        (F.gelu, "F.gelu"),
        (lambda h: F.hardtanh(h, -1.0, 1.0), "F.hardtanh"),
        (F.leaky_relu, "F.leaky_relu"),
    ],
)
def test_an_activation_function_outside_modules_is_named(call, named):
    # The hooks see layer 1 only: layer 2's units would be missing from the code.
    with pytest.raises(
        UserError,
        match=f"hidden layer with {re.escape(named)} outside an activation",
    ):
        activation_codes(_Hidden(call), torch.randn(5, 3))


def test_an_activation_function_inside_another_module_is_refused():
    class Block(nn.Module):  # not an activation module: its F.relu has no hook
        def forward(self, h):
            return F.relu(h)

    with pytest.raises(UserError, match=r"with F\.relu outside"):
        activation_codes(_Hidden(Block()), torch.randn(5, 3))


def test_the_readout_and_activation_modules_own_calls_are_allowed():
    # nn.ReLU calls F.relu itself, inside the module; log-softmax and softmax are readouts.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=gen)
    net = _Hidden(nn.ReLU(inplace=True))
    readout = nn.Sequential(net, nn.LogSoftmax(dim=1))

    class SoftmaxInForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return F.softmax(self.net(x), dim=1)

    expected = activation_codes(net, x)
    h1 = net.fc1(x)
    h2 = net.fc2(F.relu(h1))
    assert torch.equal(expected, torch.cat([piece_index(h1, (0.0,)), piece_index(h2, (0.0,))], 1))
    assert torch.equal(activation_codes(readout, x), expected)
    assert torch.equal(activation_codes(SoftmaxInForward(), x), expected)


def test_only_the_layers_asked_for_are_checked():
    # n_layers=1 stops the forward at layer 1's module: the F.relu after it never runs.
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    net = _Hidden(F.relu)
    assert len(hidden_preactivations(net, x, n_layers=1)) == 1
    with pytest.raises(UserError, match=r"with F\.relu outside"):
        hidden_preactivations(net, x)


class _NotHidden(nn.Module):
    """fc1, nn.ReLU, a gate σ(g) (a parameter: no input dependence) on the units, fc2, then
    logits / softplus(t) (a learnt temperature) and a sigmoid over them: activation
    functions, none of them a hidden layer of the code."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(3, 4), nn.Linear(4, 2), nn.ReLU()
        self.g, self.t = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.ones(()))

    def forward(self, x):
        a = self.act(self.fc1(x)) * torch.sigmoid(self.g)
        return torch.sigmoid(self.fc2(a) / F.softplus(self.t))


def test_activation_functions_that_make_no_hidden_layer_are_allowed():
    # The spy refused these at first: an activation function counts only where it acts on
    # something that depends on x and its result then enters a linear map.
    torch.manual_seed(0)
    net = _NotHidden()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(activation_codes(net, x), piece_index(net.fc1(x), (0.0,)))


class _Written(nn.Module):
    """fc1, nn.ReLU, fc2, then layer 2 made by a function in one of the ways no returned
    value shows: written into a buffer's slice, in place on a slice, in place under a view
    taken before, or summed into the output (a readout that is no Linear)."""

    def __init__(self, how):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act, self.how = nn.ReLU(), how

    def forward(self, x):
        a = self.fc2(self.act(self.fc1(x)))
        if self.how == "setitem":
            h = torch.empty_like(a)
            h[:, :2], h[:, 2:] = F.relu(a[:, :2]), torch.tanh(a[:, 2:])
            return self.fc3(h)
        if self.how == "in place on a slice":
            F.relu(a[:, :2], inplace=True)
            return self.fc3(a)
        if self.how == "in place under a view":
            flat = a.view(len(a), -1)
            a.relu_()
            return self.fc3(flat)
        return F.relu(a).sum(-1, keepdim=True)  # f = Σ_j relu(a_j): still a hidden layer


@pytest.mark.parametrize(
    "how", ["setitem", "in place on a slice", "in place under a view", "sum readout"]
)
def test_a_function_made_layer_is_found_through_writes_views_and_reductions(how):
    # Found by a review: the layer was missing from the code (4 units instead of 8).
    with pytest.raises(UserError, match="makes a hidden layer with"):
        activation_codes(_Written(how), torch.randn(5, 3))


def test_a_module_is_checked_at_every_public_call():
    # One clean call does not excuse the next: a module may change between calls.
    net = _Hidden(nn.ReLU())
    x = torch.randn(5, 3)
    activation_codes(net, x)
    del net.call  # (a submodule: replaced by a function)
    net.call = F.relu
    with pytest.raises(UserError, match=r"with F\.relu outside"):
        activation_codes(net, x)
