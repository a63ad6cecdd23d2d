"""The written-out backward pass equals autograd, for every nonlinearity (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from sensgen.backprop import (
    ACTIVATIONS_INTO,
    Backprop,
    logits,
    minibatch_layout,
    probabilities_,
)
from sensgen.models import ACTIVATIONS, Nonlinearity
from sensgen.optim import MOMENTUM, OPTIMIZERS, OptimizerName
from sensgen.train import Member, PackShape, init_pack

M, B, D, C, WIDTH = 3, 9, 12, 4, 16


@pytest.fixture(autouse=True)
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _pack(nonlinearity, depth=2):
    shape = PackShape(D, C, WIDTH, depth, nonlinearity, OptimizerName.SGD, B, 1, 1, False)
    members = [Member(seed=s, lr=0.1, init_scale=1.0 + s / 2) for s in range(M)]
    return init_pack(shape, members)


def _batch(shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Spread of 3 so every piece of every nonlinearity (ReLU6's top, ELU's tail) is met.
    x = 3 * torch.randn((B, D) if shared else (M, B, D), generator=g)
    return x, torch.randint(0, C, (M, B), generator=g)


def _autograd(template, params, x, y):
    """vmap(grad(mean CE)) over functional_call: the reference gradient and loss."""

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(template, p, (xb,)), yb)

    xs = x if x.dim() == 3 else x.expand(M, -1, -1)
    return vmap(grad_and_value(loss))(params, xs, y)


def _empty_like(params):
    return {k: torch.full_like(v, torch.nan) for k, v in params.items()}


@pytest.mark.parametrize("shared", [False, True], ids=["own batches", "shared batch"])
@pytest.mark.parametrize("nonlinearity", list(Nonlinearity))
def test_gradient_and_loss_equal_autograd(nonlinearity, shared):
    template, params = _pack(nonlinearity)
    x, y = _batch(shared)
    expected_grads, expected_losses = _autograd(template, params, x, y)
    grads = _empty_like(params)  # β = 0 ignores what the buffers hold, NaN included
    losses = Backprop(nonlinearity).loss_and_grad(params, x, y, grads, scale=1 / B)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-13, atol=1e-15)
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probabilities_flush_only_what_is_below_e_times_tiny(dtype):
    # exp(log p) exactly where log p is above the floor ln(tiny) + 1; below it, 0, where
    # the exact value is at most e·tiny; NaN stays NaN (a diverging model stays visible).
    tiny = torch.finfo(dtype).tiny
    floor = math.log(tiny) + 1
    log_p = torch.tensor(
        [0.0, -1.5, -80.0, floor + 0.01, floor - 0.01, -88.0, -104.0, -800.0, -torch.inf],
        dtype=dtype,
    )
    log_p = torch.cat([log_p, torch.tensor([torch.nan], dtype=dtype)])
    exact = log_p.exp()
    p = probabilities_(log_p.clone())
    above = log_p > floor
    assert torch.equal(p[above], exact[above])
    assert (p[~above & ~log_p.isnan()] == 0).all()
    assert (exact[~above & ~log_p.isnan()] <= math.e * tiny).all()
    assert p[-1].isnan()


def test_confident_models_match_autograd_in_float32():
    # Logits hundreds apart: most log-probabilities are far below ln(tiny) = −87.3, where
    # the probabilities are flushed to 0; the gradient is autograd's up to float32 rounding.
    torch.set_default_dtype(torch.float32)
    template, params = _pack(Nonlinearity.RELU)
    x, y = _batch()
    x = 300 * x.float()
    log_p = torch.log_softmax(logits(Nonlinearity.RELU, params, x), dim=-1)
    assert (log_p < -88).float().mean() > 0.3  # the case this test is about
    expected_grads, expected_losses = _autograd(template, params, x, y)
    grads = _empty_like(params)
    losses = Backprop(Nonlinearity.RELU).loss_and_grad(params, x, y, grads, scale=1 / B)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5)
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-4)


def test_a_pack_without_a_hidden_layer_is_refused():
    # The layouts put the readout above the first layer (module docstring, "Layouts").
    params = {"layers.0.weight": torch.zeros(M, C, D), "layers.0.bias": torch.zeros(M, C)}
    x, y = _batch()
    with pytest.raises(ValueError, match="at least one hidden layer"):
        Backprop(Nonlinearity.RELU).loss_and_grad(params, x, y, _empty_like(params), scale=1)


@pytest.mark.parametrize("shared", [False, True], ids=["own batches", "shared batch"])
@pytest.mark.parametrize("nonlinearity", [Nonlinearity.TANH, Nonlinearity.ELU])
def test_one_hidden_layer_and_deeper_nets(nonlinearity, shared):
    # Depth 1: the readout reads the first layer's [M, B, n] activations; depth 4: layers
    # 2–4 read feature-major ones (module docstring, "Layouts"); ELU keeps h apart from a.
    for depth in (1, 4):
        template, params = _pack(nonlinearity, depth)
        x, y = _batch(shared)
        expected, _ = _autograd(template, params, x, y)
        grads = _empty_like(params)
        Backprop(nonlinearity).loss_and_grad(params, x, y, grads, scale=1 / B)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("nonlinearity", [Nonlinearity.ELU, Nonlinearity.RELU])
@pytest.mark.parametrize("split", [4, 1], ids=["chunks of 4", "a chunk of 1"])
def test_chunks_accumulate_to_the_whole_batch(nonlinearity, split):
    # Two chunks with s = 1/B and β = 1 for the second give the mean over all B examples
    # (ELU keeps h apart from φ(h); ReLU writes φ(h) over h; a chunk of 1 has B = 1).
    template, params = _pack(nonlinearity)
    x, y = _batch(shared=True)
    expected_grads, expected_losses = _autograd(template, params, x, y)
    backprop, grads = Backprop(nonlinearity), _empty_like(params)
    first = backprop.loss_and_grad(params, x[:split], y[:, :split], grads, scale=1 / B)
    second = backprop.loss_and_grad(params, x[split:], y[:, split:], grads, scale=1 / B, beta=1.0)
    torch.testing.assert_close(first + second, expected_losses, rtol=1e-13, atol=1e-15)
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-12, atol=1e-15)


def test_beta_and_gain_take_the_momentum_step_in_place():
    # Momentum's scaled accumulator: z ← z + g/c_k (β = 1, a gain ≤ 1 per model), so
    # that c_k·z is μ·v + g for v = c_{k−1}·z (`ScaledAccumulator`).
    template, params = _pack(Nonlinearity.RELU)
    x, y = _batch()
    grads, _ = _autograd(template, params, x, y)
    z = {
        k: torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
        for k, p in params.items()
    }
    steps = torch.tensor([0, 7, 15])  # per model: c_k = μ⁻¹⁵, μ⁻⁸, 1
    momentum = OPTIMIZERS[OptimizerName.MOMENTUM]
    c = momentum.scaled.scale(steps)
    torch.testing.assert_close(c, MOMENTUM ** torch.tensor([-15.0, -8.0, 0.0]), rtol=1e-15, atol=0)
    expected = {k: z[k] + grads[k] / c.view(-1, *[1] * (v.ndim - 1)) for k, v in z.items()}
    target, beta = momentum.gradient_target({"v": z}, None)
    assert target is z and beta == 1.0
    Backprop(Nonlinearity.RELU).loss_and_grad(
        params, x, y, target, scale=1 / B, beta=beta, gain=momentum.gain(steps)
    )
    for name in expected:
        torch.testing.assert_close(z[name], expected[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("beta", "gain"),
    [(0.0, None), (1.0, (0.5, 1.0, MOMENTUM**3))],
    ids=["gradient", "momentum's scaled accumulator"],
)
def test_first_layer_stored_transposed_gives_the_same_gradient_in_its_own_layout(beta, gain):
    template, params = _pack(Nonlinearity.RELU)
    laid_out = minibatch_layout(params)
    w0 = laid_out["layers.0.weight"]
    # Same shape and values; only the storage of W₀ is [M, n_in, n_out].
    assert w0.shape == params["layers.0.weight"].shape and not w0.is_contiguous()
    assert w0.transpose(1, 2).is_contiguous() and torch.equal(w0, params["layers.0.weight"])
    assert all(laid_out[k] is v for k, v in params.items() if k != "layers.0.weight")
    x, y = _batch()
    expected_grads, expected_losses = _autograd(template, params, x, y)
    start = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
        for k, v in params.items()
    }
    grads = {k: torch.empty_like(laid_out[k]).copy_(v) for k, v in start.items()}
    pointers = {k: v.data_ptr() for k, v in grads.items()}
    gains = None if gain is None else torch.tensor(gain)
    losses = Backprop(Nonlinearity.RELU).loss_and_grad(
        laid_out, x, y, grads, scale=1 / B, beta=beta, gain=gains
    )
    torch.testing.assert_close(losses, expected_losses, rtol=1e-13, atol=1e-15)
    for name, expected in expected_grads.items():
        # Written into the caller's buffers, in their layout (W₀'s stays transposed).
        assert grads[name].data_ptr() == pointers[name]
        assert grads[name].stride() == laid_out[name].stride()
        if gains is not None:
            expected = expected * gains.view(-1, *[1] * (expected.ndim - 1))
        torch.testing.assert_close(
            grads[name], beta * start[name] + expected, rtol=1e-12, atol=1e-15
        )


def test_optimisers_without_an_accumulator_need_a_gradient_buffer():
    adam = OPTIMIZERS[OptimizerName.ADAM]
    grads = {"w": torch.zeros(2)}
    assert adam.gradient_target(adam.init(grads), grads) == (grads, 0.0)
    with pytest.raises(ValueError, match="gradient buffer"):
        adam.gradient_target(adam.init(grads), None)


@pytest.mark.parametrize("layout", ["as is", "minibatch"])
@pytest.mark.parametrize("shared", [False, True], ids=["own batches", "shared batch"])
def test_logits_equal_each_model_s_forward(shared, layout):
    # (The fit check runs the shared training set through a minibatch pack's layout.)
    template, params = _pack(Nonlinearity.SIGMOID)
    if layout == "minibatch":
        params = minibatch_layout(params)
    x, _ = _batch(shared)
    out = logits(Nonlinearity.SIGMOID, params, x)
    assert out.shape == (M, B, C)
    for m in range(M):
        one = {k: v[m] for k, v in params.items()}
        xm = x[m] if x.dim() == 3 else x
        torch.testing.assert_close(out[m], functional_call(template, one, (xm,)))


@pytest.mark.parametrize("nonlinearity", list(Nonlinearity))
def test_activations_into_buffers_equal_the_models_activations(nonlinearity):
    """The out= kernels the pack uses give φ(h) bit for bit as `sensgen.models` does,
    at every breakpoint and for non-finite inputs too."""
    special = torch.tensor([-6.0, -3.0, -1.0, -0.0, 0.0, 1.0, 3.0, 6.0, torch.inf, -torch.inf])
    h = torch.cat([special, 4 * torch.randn(200, generator=torch.Generator().manual_seed(0))])
    out = torch.full_like(h, torch.nan)
    ACTIVATIONS_INTO[nonlinearity](h, out)
    assert torch.equal(out, ACTIVATIONS[nonlinearity](h))
    nan = torch.tensor([torch.nan])
    assert ACTIVATIONS_INTO[nonlinearity](nan, torch.zeros(1)).isnan().all()
    assert ACTIVATIONS[nonlinearity](nan).isnan().all()
