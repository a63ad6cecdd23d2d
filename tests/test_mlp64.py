"""`BufferedMLP` and the sharpness ascent built on it: bit for bit what autograd computes.

The sharpness ascent follows the signs of its gradients, so a difference in the last bit
of one gradient entry (or the sign of a zero) could change a step and so the measure.
Everything here is compared bit for bit (the float64 bit patterns, which also tell −0
from +0), against autograd's own backward pass through the module.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sensgen import measures as M
from sensgen.measures import flatness
from sensgen.measures.mlp64 import BufferedMLP
from sensgen.measures.norms import _params
from sensgen.models import MLP, Nonlinearity

NONLINEARITIES = [n.value for n in Nonlinearity]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int64)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def random_net(nonlinearity: str, seed: int = 3) -> tuple[MLP, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    net = MLP(20, 5, width=16, depth=3, nonlinearity=nonlinearity, generator=g).double()
    for layer in net.layers:  # non-zero biases, so that they are checked too
        nn.init.normal_(layer.bias, generator=g)
    return net, g


class Generic(MLP):
    """An MLP subclass: the measures run it as any module (autograd), not buffered."""


def as_generic(net: MLP) -> Generic:
    other = Generic(20, 5, width=16, depth=3, nonlinearity=net.nonlinearity).double()
    other.load_state_dict(net.state_dict())
    return other


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_gradients_are_autograds_bit_for_bit(nonlinearity):
    # ∂ℓ/∂θ for ℓ = Σ g_z ∘ z, with g_z holding exact zeros (as the ascent's does), call
    # after call on reused buffers and for another number of points.
    net, g = random_net(nonlinearity)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    buffered = BufferedMLP.of(net)
    out = {k: torch.full_like(p, float("nan")) for k, p in params.items()}
    for n in (40, 40, 9):
        x = 3 * torch.randn(n, 20, generator=g, dtype=torch.float64)
        grad_z = torch.randn(n, 5, generator=g, dtype=torch.float64)
        grad_z[torch.rand(n, 5, generator=g) < 0.5] = 0.0
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        z = torch.func.functional_call(net, leaves, (x,))
        expected = torch.autograd.grad(z, list(leaves.values()), grad_z)
        with torch.no_grad():
            assert same_bits(buffered.logits(params, x), z)
            buffered.gradients(params, grad_z, out)
        for (name, got), want in zip(out.items(), expected, strict=True):
            assert same_bits(got, want), name
    assert all(got.abs().sum() > 0 for got in out.values())  # (not trivially equal)


def test_any_other_module_is_not_buffered():
    net, _ = random_net("relu")
    assert BufferedMLP.applies_to(net) and BufferedMLP.of(net) is not None
    assert BufferedMLP.of(as_generic(net)) is None
    assert BufferedMLP.of(nn.Sequential(nn.Linear(2, 2))) is None
    # A sensgen MLP changed after it was built computes something else, or names its
    # parameters otherwise: it runs as a module (autograd), as before.
    hooked = copy.deepcopy(net)
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    layer_hooked = copy.deepcopy(net)
    layer_hooked.layers[1].register_forward_pre_hook(lambda module, args: (-args[0],))
    parametrized = copy.deepcopy(net)
    nn.utils.parametrizations.weight_norm(parametrized.layers[0])
    no_bias = copy.deepcopy(net)
    no_bias.layers[2] = nn.Linear(16, 16, bias=False).double()
    for changed in (hooked, layer_hooked, parametrized, no_bias):
        assert not BufferedMLP.applies_to(changed)
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        assert not BufferedMLP.applies_to(net)  # a hook for every module
    finally:
        handle.remove()
    assert BufferedMLP.applies_to(net)


def test_a_changed_mlp_measures_as_the_module_it_is():
    # A hook that shifts one logit changes the function: a hooked sensgen MLP must measure
    # as the same hooked net run as any module (autograd), not as the net without it.
    net, g = random_net("relu")
    x = torch.randn(60, 20, generator=g, dtype=torch.float64)
    y = M.logits64(net, x).argmax(1)
    shift = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    hooked, hooked_generic = copy.deepcopy(net), as_generic(net)
    for module in (hooked, hooked_generic):
        module.register_forward_hook(lambda module, args, out: out + shift)
    kw = {"seed": 1}
    alpha = M.sharpness(hooked, x, y, **kw)
    assert alpha == M.sharpness(hooked_generic, x, y, **kw)
    assert alpha != M.sharpness(net, x, y, **kw)
    sigma = M.pacbayes_flatness(hooked, x, y, n_draws=3, **kw)  # (its forward passes too)
    assert sigma == M.pacbayes_flatness(hooked_generic, x, y, n_draws=3, **kw)
    assert sigma != M.pacbayes_flatness(net, x, y, n_draws=3, **kw)


def ascent_problem(
    case: str, nonlinearity: str
) -> tuple[MLP, torch.Tensor, torch.Tensor, torch.Generator]:
    """(net, x, y) for the ascent comparisons, float64, and a generator for the start."""
    g = torch.Generator().manual_seed(5)
    if case == "deep":  # labels the net gets right at θ: the ascent can only lower that
        net, g = random_net(nonlinearity)
        x = torch.randn(200, 20, generator=g, dtype=torch.float64)
        return net, x, M.logits64(net, x).argmax(1), g
    if case in ("one class", "two classes, one point"):
        classes, n = (1, 7) if case == "one class" else (2, 1)
        net = MLP(4, classes, width=5, depth=1, nonlinearity=nonlinearity, generator=g)
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        return net.double(), x, torch.zeros(n, dtype=torch.long), g
    if case == "rivals at -inf":  # a diverged readout: every rival logit is −inf
        net = MLP(4, 3, width=5, depth=1, nonlinearity=nonlinearity, generator=g).double()
        with torch.no_grad():
            net.layers[-1].bias[1:] = -math.inf
        x = torch.randn(9, 4, generator=g, dtype=torch.float64)
        return net, x, torch.zeros(9, dtype=torch.long), g
    raise AssertionError(case)


@pytest.mark.parametrize("magnitude_aware", [True, False])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("case", ["deep", "one class", "two classes, one point", "rivals at -inf"])
def test_buffered_ascent_takes_autograds_steps_bit_for_bit(case, nonlinearity, magnitude_aware):
    # Every iterate v of the ascent and the accuracy at it, through 10 steps.
    net, x, y, g = ascent_problem(case, nonlinearity)
    theta = _params(net)
    alpha = 0.3
    bound = {
        k: alpha * t.abs() + 1e-3 if magnitude_aware else torch.full_like(t, alpha)
        for k, t in theta.items()
    }
    start = {
        k: 2 * torch.rand(t.shape, generator=g, dtype=torch.float64) - 1 for k, t in theta.items()
    }
    v_auto = {k: s.clone() for k, s in start.items()}
    v_buf = {k: s.clone() for k, s in start.items()}
    iterates = zip(
        flatness._autograd_ascent(net, theta, bound, v_auto, x, y, 10, 0.25),
        flatness._buffered_ascent(net, theta, bound, v_buf, x, y, 10, 0.25),
        strict=True,
    )
    accuracies = []
    for acc_auto, acc_buf in iterates:
        assert acc_auto == acc_buf
        assert all(same_bits(v_auto[k], v_buf[k]) for k in start)
        accuracies.append(acc_buf)
    assert len(accuracies) == 11
    if case == "deep":
        assert not all(same_bits(v_buf[k], start[k]) for k in start)  # the ascent moved
        assert min(accuracies) < accuracies[0]  # and found a worse perturbation


def test_no_points_measure_as_before():
    net, _ = random_net("relu")
    x, y = torch.empty(0, 20), torch.empty(0, dtype=torch.long)
    start = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for module in (net, as_generic(net)):
        assert M.adversarial_accuracy(module, x, y, 0.5, start) == math.inf


@pytest.mark.parametrize("nonlinearity", ["relu", "elu"])
def test_sharpness_of_an_mlp_is_that_of_the_generic_path(nonlinearity):
    # The public measure: a sensgen MLP (buffered) and the same net as another module
    # (autograd) give the same α, bit for bit, early stops included.
    g = torch.Generator().manual_seed(1)
    net = MLP(3, 3, width=6, depth=2, nonlinearity=nonlinearity, generator=g)
    x = torch.randn(40, 3, generator=g)
    y = M.logits64(net, x).argmax(1)
    generic = Generic(3, 3, width=6, depth=2, nonlinearity=nonlinearity)
    generic.load_state_dict(net.state_dict())
    for magnitude_aware in (True, False):
        kw = {"seed": 2, "magnitude_aware": magnitude_aware}
        buffered = M.sharpness(net, x, y, **kw)
        assert 0 < buffered["alpha"] < 1024
        assert buffered == M.sharpness(generic, x, y, **kw)
