"""The Jacobian norm is exact: closed forms, autodiff, finite differences (paper §2.1, §7)."""

import pytest
import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics import (
    jacobian_norm,
    jacobian_norm_estimate,
    jacobian_norms,
    softmax_jacobian_factor,
)
from sensgen.models import MLP, Nonlinearity

ALL_NONLINEARITIES = list(Nonlinearity)


def _mlp(nonlinearity, depth=2, *, d=9, c=4, width=7, seed=0, dtype=torch.float64):
    net = MLP(d, c, width, depth, nonlinearity, 2.0, generator=torch.Generator().manual_seed(seed))
    # Non-zero biases so breakpoints are not all at the origin.
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return net.to(dtype)


def _points(n, d, seed=1, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_linear_net_logits_norm_is_weight_norm():
    # Pitfall: a norm over the wrong axis. Non-square W with C >= 3: ‖J‖_F = ‖W‖_F per point.
    net = nn.Linear(11, 5).double()
    x = _points(6, 11)
    expected = torch.linalg.matrix_norm(net.weight.detach()).expand(6)
    torch.testing.assert_close(jacobian_norm(net, x, output="logits"), expected)


def test_linear_net_softmax_jacobian_is_S_times_W():
    # Pitfall: logits instead of softmax. J = (diag p − p pᵀ) W exactly.
    net = nn.Linear(11, 5).double()
    x = _points(6, 11)
    p = torch.softmax(net(x), -1).detach()
    s = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    expected = torch.linalg.matrix_norm(s @ net.weight.detach())
    torch.testing.assert_close(jacobian_norm(net, x), expected)


def test_mlp_in_its_linear_regime_is_product_of_weights():
    # hard_tanh with all |h| < 1 is the identity: J_z = W_2 W_1 for every point.
    net = _mlp("hard_tanh", depth=1, d=6, c=3, width=8)
    with torch.no_grad():
        net.layers[0].weight.mul_(0.01)
        net.layers[0].bias.zero_()
    x = _points(5, 6)
    product = net.layers[1].weight @ net.layers[0].weight
    got = jacobian_norm(net, x, output="logits", method="closed_form")
    torch.testing.assert_close(got, torch.linalg.matrix_norm(product.detach()).expand(5))


def _finite_difference_norm(net, x, output, h=1e-6):
    """‖J‖_F from float64 central differences, one column per input coordinate."""
    f = (lambda v: torch.softmax(net(v), -1)) if output == "softmax" else net
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        cols = [(f(x + h * e) - f(x - h * e)) / (2 * h) for e in eye]  # each [B, C]
    return torch.linalg.matrix_norm(torch.stack(cols, dim=-1))


BREAKPOINTS = {
    "relu": [0.0],
    "relu6": [0.0, 6.0],
    "hard_tanh": [-1.0, 1.0],
    "hard_sigmoid": [-3.0, 3.0],
}


def _far_from_breakpoints(net, x, margin=1e-3):
    """No pre-activation within `margin` of a kink, so differences see one linear piece."""
    breakpoints = torch.tensor(BREAKPOINTS.get(net.nonlinearity.value, []), dtype=torch.float64)
    if breakpoints.numel() == 0:
        return True
    hidden, _ = net.preactivations(x)
    distances = [(h.unsqueeze(-1) - breakpoints).abs().min() for h in hidden]
    return min(distances).item() > margin


@pytest.mark.parametrize("nonlinearity", ALL_NONLINEARITIES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_closed_form_autodiff_and_finite_differences_agree(nonlinearity, depth, output):
    net = _mlp(nonlinearity, depth, seed=depth)
    x = _points(12, 9, seed=depth)
    assert _far_from_breakpoints(net, x)
    closed = jacobian_norm(net, x, output=output, method="closed_form")
    auto = jacobian_norm(net, x, output=output, method="autodiff")
    fd = _finite_difference_norm(net, x, output)
    assert closed.shape == (12,) and closed.dtype == torch.float64
    # torch's hardsigmoid backward rounds its 1/6 slope, so autodiff is off by ~1e-7 there;
    # the finite differences side with the closed form.
    rtol_auto = 1e-6 if nonlinearity is Nonlinearity.HARD_SIGMOID else 1e-10
    torch.testing.assert_close(auto, closed, rtol=rtol_auto, atol=0)
    torch.testing.assert_close(fd, closed, rtol=1e-6, atol=0)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh", "hard_sigmoid"])
def test_float32_closed_form_and_autodiff_agree(nonlinearity):
    net = _mlp(nonlinearity, 3, d=30, c=10, width=40, dtype=torch.float32)
    x = _points(50, 30, dtype=torch.float32)
    closed = jacobian_norm(net, x, method="closed_form")
    auto = jacobian_norm(net, x, method="autodiff")
    torch.testing.assert_close(auto, closed, rtol=1e-4, atol=0)


def test_gram_trick_equals_direct_product():
    # width 40 < d = 50 uses the Gram trick; width 60 > d = 50 the direct product. Same net
    # function either way once padded: compare each against autodiff instead.
    for width in (40, 60):
        net = _mlp("relu", 2, d=50, c=6, width=width)
        x = _points(10, 50)
        torch.testing.assert_close(
            jacobian_norm(net, x, method="closed_form"),
            jacobian_norm(net, x, method="autodiff"),
            rtol=1e-10,
            atol=0,
        )


def test_confident_points_keep_their_accuracy_in_float32():
    # The float32 pitfall: p_y rounds to 1 and S_yy = p_y(1 − p_y) cancels.
    net32 = _mlp("relu", 2, d=20, c=10, width=32, seed=5, dtype=torch.float32)
    with torch.no_grad():
        net32.layers[-1].weight.mul_(10.0)  # very confident logits
    net64 = _mlp("relu", 2, d=20, c=10, width=32, seed=5)
    net64.load_state_dict({k: v.double() for k, v in net32.state_dict().items()})
    x32 = _points(400, 20, seed=9, dtype=torch.float32)
    reference = jacobian_norm(net64, x32.double())  # same weights and inputs, float64 maths
    got = jacobian_norm(net32, x32)
    tail = reference < 1e-4
    assert tail.sum() >= 20, "the test needs confident points"
    assert reference[tail].min() < 1e-8
    rel = ((got - reference).abs() / reference)[tail]
    assert rel.max() < 1e-4
    # A plain float32 softmax Jacobian loses these points entirely.
    p32 = torch.softmax(net32(x32), -1)
    assert (p32.max(-1).values == 1.0)[tail].any()


def test_softmax_factor_closed_form():
    logits = torch.tensor([[0.0, 1.0, 2.0], [40.0, 0.0, 0.0]], dtype=torch.float32)
    s = softmax_jacobian_factor(logits)
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(s[0], torch.diag(p[0]) - torch.outer(p[0], p[0]))
    # Confident row: S_00 = p_0 (p_1 + p_2) = 2e^{-40}/(1+2e^{-40})², not 0.
    eps = torch.exp(torch.tensor(-40.0, dtype=torch.float64))
    torch.testing.assert_close(s[1, 0, 0], 2 * eps / (1 + 2 * eps) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.sum(-1), torch.zeros(2, 3, dtype=torch.float64))


def test_chunking_and_batch_order_do_not_matter():
    net = _mlp("relu6", 3)
    x = _points(23, 9)  # 23 is not a multiple of any chunk size below
    full = jacobian_norm(net, x)
    for chunk in (1, 4, 7, 100):
        torch.testing.assert_close(jacobian_norm(net, x, chunk_size=chunk), full)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(jacobian_norm(net, x[perm]), full[perm])
    # Per point, not a batch statistic: each point alone gives the same value.
    singles = torch.cat([jacobian_norm(net, x[i : i + 1]) for i in range(23)])
    torch.testing.assert_close(singles, full)


class _TinyConvNet(nn.Module):
    """A user's own model: images in, logits out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_any_module_against_per_point_autograd():
    torch.manual_seed(0)
    net = _TinyConvNet().double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    got = jacobian_norm(net, x)
    for i in range(4):
        j = torch.autograd.functional.jacobian(lambda v: torch.softmax(net(v), -1), x[i : i + 1])
        torch.testing.assert_close(got[i], torch.linalg.norm(j.flatten()), rtol=1e-10, atol=0)


def test_model_and_its_gradients_are_untouched():
    net = _mlp("relu", 2, dtype=torch.float32)
    net.layers[0].weight.grad = torch.ones_like(net.layers[0].weight)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    jacobian_norm(net, _points(5, 9, dtype=torch.float32), method="autodiff")
    jacobian_norm(net, _points(5, 9, dtype=torch.float32), method="closed_form")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(net.layers[0].weight.grad, torch.ones_like(net.layers[0].weight))


def test_bad_arguments_are_user_errors():
    net = _mlp("relu", 1)
    x = _points(3, 9)
    with pytest.raises(UserError, match="'softmax', 'logits'"):
        jacobian_norm(net, x, output="probabilities")
    with pytest.raises(UserError, match="chunk_size"):
        jacobian_norm(net, x, chunk_size=0)
    with pytest.raises(UserError, match="closed_form"):
        jacobian_norm(nn.Linear(9, 3).double(), x, method="closed_form")
    assert jacobian_norm(net, x[:0]).shape == (0,)


def test_both_norms_from_one_pass_match_single_calls():
    net = _mlp("hard_tanh", 2)
    x = _points(10, 9)
    both = jacobian_norms(net, x)
    for output in ("softmax", "logits"):
        torch.testing.assert_close(both[output], jacobian_norm(net, x, output=output))
    # Softmax sensitivity is bounded by the logits': ‖S J_z‖_F ≤ ‖S‖_2 ‖J_z‖_F ≤ ½ ‖J_z‖_F.
    assert (both["softmax"] <= 0.5 * both["logits"] + 1e-12).all()


@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_random_projection_estimate_is_unbiased_within_its_stated_variance(output):
    # E‖vᵀJ‖² = ‖J‖_F² and the relative std of a k-sample mean is at most √(2/k).
    net = _mlp("relu", 2, d=30, c=100, width=40, seed=3)
    x = _points(6, 30, seed=4)
    exact = jacobian_norm(net, x, output=output) ** 2
    k = 4000
    g = torch.Generator().manual_seed(0)
    estimate = jacobian_norm_estimate(net, x, n_projections=k, generator=g, output=output)
    assert estimate.shape == (6,) and estimate.dtype == torch.float64
    assert ((estimate / exact - 1).abs() < 5 * (2 / k) ** 0.5).all()
    again = jacobian_norm_estimate(
        net, x, n_projections=k, generator=torch.Generator().manual_seed(0), output=output
    )
    torch.testing.assert_close(again, estimate, rtol=0, atol=0)


def test_random_projection_with_a_single_output():
    # C = 1, logits: vᵀJ = v·J_z with v ~ N(0, 1), so the estimate is mean(v²)·‖J_z‖².
    net = _mlp("tanh", 1, d=5, c=1, width=6)
    x = _points(3, 5)
    est = jacobian_norm_estimate(
        net, x, n_projections=20000, generator=torch.Generator().manual_seed(1), output="logits"
    )
    exact = jacobian_norm(net, x, output="logits") ** 2
    assert ((est / exact - 1).abs() < 5 * (2 / 20000) ** 0.5).all()
    with pytest.raises(UserError, match="n_projections"):
        jacobian_norm_estimate(net, x, n_projections=0, generator=torch.Generator())


@pytest.mark.parametrize("noisy", [nn.Dropout(0.5), nn.BatchNorm1d(8)])
def test_metrics_refuse_a_model_whose_output_depends_on_train_mode(noisy):
    # Dropout draws masks and batch norm uses (and updates) batch statistics: in train mode
    # the "function" changes between calls and points interact. The metrics say so up
    # front, touch nothing, and run once the model is in eval mode.
    from sensgen.metrics import transitions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), noisy, nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(6, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (
        lambda: jacobian_norm(model, x),
        lambda: jacobian_norm_estimate(
            model, x, n_projections=2, generator=torch.Generator().manual_seed(0)
        ),
        lambda: transitions(model, x, method="exact"),
        lambda: transitions(model, x, method="sampled"),
    ):
        with pytest.raises(UserError, match=r"train mode.*model\.eval\(\)"):
            call()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    first, second = jacobian_norm(model, x), jacobian_norm(model, x)
    assert torch.equal(first, second) and torch.equal(first[:2], jacobian_norm(model, x[:2]))
    assert transitions(model, x, method="exact") == transitions(model, x, method="exact")


@pytest.mark.parametrize("conv", [False, True])
def test_metrics_refuse_a_batch_norm_without_running_statistics(conv):
    # track_running_stats=False: torch normalises by the batch's statistics in eval mode
    # too, so a point's output depends on its batch. The metrics gave batch- and
    # chunk-dependent numbers (BatchNorm2d: a one-point Jacobian normalised over its own
    # pixels; sampled counts 16 or 136 by chunk size) or a ValueError from inside torch.
    from sensgen.metrics import activation_codes, transitions

    torch.manual_seed(0)
    if conv:
        norm = nn.BatchNorm2d(2, track_running_stats=False)
        layers = [nn.Unflatten(1, (1, 3, 3)), nn.Conv2d(1, 2, 2), norm, nn.ReLU(), nn.Flatten()]
        model = nn.Sequential(*layers, nn.Linear(8, 3))
    else:
        norm = nn.BatchNorm1d(8, track_running_stats=False)
        model = nn.Sequential(nn.Linear(9, 8), norm, nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    x = torch.randn(6, 9)
    with torch.no_grad():  # (the reason: the first two points' outputs depend on the rest)
        assert not torch.allclose(model(x)[:2], model(x[:2]))
    for call in (
        lambda: jacobian_norm(model, x),
        lambda: jacobian_norm_estimate(
            model, x, n_projections=2, generator=torch.Generator().manual_seed(0)
        ),
        lambda: activation_codes(model, x),
        lambda: transitions(model, x, method="exact"),
        lambda: transitions(model, x, method="sampled", chunk_size=2),
    ):
        with pytest.raises(UserError, match=r"BatchNorm.d \('\d'\).*track_running_stats=False"):
            call()


def test_inputs_are_checked_and_named():
    # Each mistake is a UserError naming x and the fix, not an error from inside torch.
    net = _mlp("relu", d=9, dtype=torch.float32)
    x = _points(6, 9, dtype=torch.float32)
    expected = jacobian_norm(net, x)
    assert torch.equal(jacobian_norm(net, x.numpy()), expected)  # NumPy is taken as is
    assert torch.equal(jacobian_norm(net, x.double()), expected)  # cast to the model's dtype
    cases = {
        r"batch of points .*x\.unsqueeze\(0\)": x[0],
        r"torch\.uint8.*floats": (x * 100).to(torch.uint8),
        r"shape \[3, 3\].*9 values.*x\.flatten\(1\)": x.reshape(6, 3, 3),
        "must be a tensor": object(),
    }
    for message, bad in cases.items():
        with pytest.raises(UserError, match=message):
            jacobian_norm(net, bad)
    for chunk_size in (0, 2.5, "4"):
        with pytest.raises(UserError, match="chunk_size must be a positive integer"):
            jacobian_norm(net, x, chunk_size=chunk_size)


def test_models_the_autodiff_path_cannot_take_are_named():
    torch.manual_seed(0)
    one_logit = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1))
    x = torch.randn(3, 4)
    with pytest.raises(UserError, match=r"one logit.*output='logits'.*\[0, z\]"):
        jacobian_norm(one_logit, x)
    assert jacobian_norm(one_logit, x, output="logits").shape == (3,)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(UserError, match="returned tuple"):
        jacobian_norm(Pair(), x)

    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(nn.functional.dropout(x, 0.5, self.training))

    with pytest.raises(UserError, match=r"vmap.*model\.eval\(\)"):
        jacobian_norm(FunctionalDropout().train(), x)
    assert jacobian_norm(FunctionalDropout().eval(), x).shape == (3,)


def test_the_autodiff_chunk_bounds_every_layers_jacobian():
    # jacrev makes [chunk, C, n] for every layer's output n: a wide hidden layer of a
    # narrow-input model must shrink the chunk (it was sized by the input alone).
    from sensgen.metrics.jacobian import _CHUNK_ELEMENTS, _MIN_CHUNK, Method, _default_chunk_size

    wide = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 10))
    chunk = _default_chunk_size(wide, torch.randn(5000, 16), Method.AUTODIFF)
    assert chunk == max(_MIN_CHUNK, _CHUNK_ELEMENTS // (10 * 4096))


def test_softmax_jacobian_times_a_vector_is_the_factor_times_it():
    # The estimator's O(B·C) S v against the dense S [B, C, C], confident points included.
    from sensgen.metrics.jacobian_estimate import softmax_jacobian_times

    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 40.0, 300.0):  # 40: p_top within 1e-17 of 1
        z = torch.randn(50, 7, generator=g, dtype=torch.float64) * scale
        v = torch.randn(50, 7, generator=g, dtype=torch.float64)
        dense = (softmax_jacobian_factor(z) @ v.unsqueeze(-1)).squeeze(-1)
        row_scale = dense.abs().amax(dim=-1, keepdim=True)
        assert ((softmax_jacobian_times(z, v) - dense).abs() <= 1e-13 * row_scale).all()


def test_closed_form_of_a_blown_up_net_is_not_nan_from_the_gram_trick():
    # Finite first-layer weights near 1e20 overflow G = W_1 W_1ᵀ in float32; with every
    # hidden unit dead the Jacobian is exactly 0, and 0·inf made it NaN (a run then stored
    # as diverged although it trained finite). The closed form must agree with autodiff.
    net = MLP(64, 10, 32, 1, "relu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.layers[0].weight.mul_(1e20)
        net.layers[0].bias.fill_(-1e30)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    closed = jacobian_norms(net, x)
    for output, norms in closed.items():
        assert torch.equal(norms, torch.zeros(5, dtype=torch.float64)), output
    # Live units, a tiny readout: G still overflows, the Jacobian (~1e7) does not.
    with torch.no_grad():
        net.layers[0].bias.zero_()
        net.layers[1].weight.mul_(1e-12)
    w1 = net.layers[0].weight
    assert not torch.isfinite(w1 @ w1.T).all()
    closed, auto = jacobian_norms(net, x), jacobian_norms(net, x, method="autodiff")
    assert torch.isfinite(closed["logits"]).all() and (closed["logits"] > 1e5).all()
    for output in closed:
        torch.testing.assert_close(closed[output], auto[output], rtol=1e-4, atol=0)
