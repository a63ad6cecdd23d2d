"""A user's own models through the public metrics API (audit of paper §2.1–§2.2 metrics).

Each test pins a defect found by measuring models that are not sensgen's own MLP: wrong
numbers (a second softmax, an MLP subclass read as if it were an MLP) or raw torch errors
where a UserError naming the fix is due.
"""

import pytest
import torch
from torch import nn

from sensgen.errors import UserError
from sensgen.metrics import (
    activation_codes,
    ellipse,
    ellipse_transitions_sampled,
    jacobian_norm,
    jacobian_norm_estimate,
    region_map,
    transitions,
)
from sensgen.models import MLP


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _accurate_softmax_norm(logits, jz):
    """‖(diag p − ppᵀ) J_z‖_F per point in float64, S_yy as p_y Σ_{j≠y} p_j (paper §2.1)."""
    z = logits.double()
    p = torch.softmax(z - z.amax(-1, keepdim=True), -1)
    s = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    eye = torch.eye(p.shape[-1], dtype=torch.bool)
    s.diagonal(dim1=-2, dim2=-1).copy_(p * p.unsqueeze(-2).masked_fill(eye, 0).sum(-1))
    return torch.linalg.matrix_norm(s @ jz.double())


def test_float32_keeps_points_far_beyond_float32_underflow():
    # Logit gaps of ~100s: 1 − p_y ~ 1e-60 in float64, below float32's range, and the
    # exact norm is ‖S W‖_F for a linear model.
    net = nn.Linear(20, 5)
    x = torch.randn(50, 20, generator=_gen(3)) * 100
    expected = _accurate_softmax_norm(net(x).detach(), net.weight.detach().expand(50, 5, 20))
    assert expected.min() < 1e-40
    got = jacobian_norm(net, x)
    assert ((got - expected) / expected).abs().max() < 1e-5


def test_a_model_that_returns_probabilities_is_not_softmaxed_twice():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    probabilities = nn.Sequential(linear, nn.Softmax(dim=-1))
    x = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(UserError, match=r"returns probabilities.*output='logits'"):
        jacobian_norm(probabilities, x)
    # output="logits" is the Jacobian of what it returns: here the paper's ‖∂p/∂x‖_F.
    torch.testing.assert_close(
        jacobian_norm(probabilities, x, output="logits"), jacobian_norm(linear, x)
    )
    log_probabilities = nn.Sequential(linear, nn.LogSoftmax(dim=-1))  # valid logits
    torch.testing.assert_close(jacobian_norm(log_probabilities, x), jacobian_norm(linear, x))


def test_data_parallel_is_measured_as_the_module_inside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 6)
    wrapped = nn.DataParallel(model)
    assert torch.equal(jacobian_norm(wrapped, x), jacobian_norm(model, x))
    estimate = [
        jacobian_norm_estimate(m, x, n_projections=3, generator=_gen(0)) for m in (wrapped, model)
    ]
    assert torch.equal(*estimate)
    # Codes and transitions too (DataParallel's forward hid the modules' hooks: "no
    # activation module"), and region maps.
    path = ellipse(*torch.randn(3, 6, generator=_gen(4)), n_points=64)
    for method in ("exact", "sampled"):
        assert transitions(wrapped, path, method=method) == transitions(model, path, method=method)
    assert torch.equal(activation_codes(wrapped, x), activation_codes(model, x))


def test_a_model_on_another_device_is_named():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to("meta")
    with pytest.raises(UserError, match=r"x is on cpu.*on meta.*x\.to\('meta'\)"):
        jacobian_norm(model, torch.randn(3, 6))


class _ScaledInput(MLP):
    """A user's MLP subclass with its own forward: f(x) = MLP(3x)."""

    def forward(self, x):
        return super().forward(3 * x)


def test_an_mlp_subclass_with_its_own_forward_is_not_read_as_an_mlp():
    net = _ScaledInput(5, 3, 8, 2, generator=_gen(0)).double()
    plain = MLP(5, 3, 8, 2, generator=_gen(0)).double()
    x = torch.randn(4, 5, dtype=torch.float64, generator=_gen(1))
    for output in ("softmax", "logits"):  # chain rule: ∂f/∂x = 3 J_MLP(3x)
        expected = 3 * jacobian_norm(plain, 3 * x, output=output)
        torch.testing.assert_close(jacobian_norm(net, x, output=output), expected)
    with pytest.raises(UserError, match=r"closed_form.*MLP's own forward"):
        jacobian_norm(net, x, method="closed_form")
    # Its F.relu cannot be hooked: refused, not counted on the layers of a different function.
    path = ellipse(*torch.randn(3, 5, dtype=torch.float64, generator=_gen(2)), n_points=60)
    for method in ("exact", "sampled"):
        with pytest.raises(UserError, match="no activation module"):
            transitions(net, path, method=method)


@pytest.mark.parametrize("old_style", [False, True])
def test_spectral_norm_in_train_mode_is_refused(old_style):
    torch.manual_seed(0)
    linear = nn.Linear(5, 8)
    if old_style:
        linear = nn.utils.spectral_norm(linear)
    else:
        linear = nn.utils.parametrizations.spectral_norm(linear)
    model = nn.Sequential(linear, nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 5)
    with pytest.raises(UserError, match=r"(?i)spectral.?norm.*'0.*model\.eval\(\)"):
        jacobian_norm(model, x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = jacobian_norm(model, x)
    assert torch.equal(first, jacobian_norm(model, x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_estimate_checks_its_model_output_and_projection_count():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x), self.fc(x)

    x = torch.randn(4, 5)
    with pytest.raises(UserError, match="returned tuple"):
        jacobian_norm_estimate(Pair(), x, n_projections=2, generator=_gen(0))
    with pytest.raises(UserError, match="n_projections must be an integer >= 1"):
        jacobian_norm_estimate(nn.Linear(5, 3), x, n_projections=2.5, generator=_gen(0))


def test_points_of_the_wrong_width_for_an_mlp_are_named():
    net = MLP(4, 3, 8, 2, generator=_gen(0))
    wrong = torch.randn(16, 3, generator=_gen(1))
    for method in ("exact", "sampled"):
        with pytest.raises(UserError, match=r"path has points of shape \[3\].*4 values"):
            transitions(net, wrong, method=method)
    with pytest.raises(UserError, match=r"x has points of shape \[3\]"):
        activation_codes(net, wrong)
    with pytest.raises(UserError, match=r"points has points of shape \[3\]"):
        region_map(net, wrong, resolution=4)


def test_ellipse_sample_count_is_checked_by_name():
    net = MLP(4, 3, 8, 1, generator=_gen(0))
    x1, x2, x3 = torch.randn(3, 4, generator=_gen(1))
    for bad in ("10", 1, 2.5):
        with pytest.raises(UserError, match="n_points must be an integer >= 2"):
            ellipse_transitions_sampled(net, x1, x2, x3, n_points=bad)


def test_a_cnn_with_buffers_matches_per_point_autograd_for_any_chunk():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).double()
    with torch.no_grad():
        cnn[1].running_mean.normal_(generator=_gen(1))
        cnn[1].running_var.uniform_(0.5, 2.0, generator=_gen(2))
    cnn.eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=_gen(3)).transpose(2, 3)

    def softmax_of(point):
        return torch.softmax(cnn(point.unsqueeze(0)).squeeze(0), -1)

    expected = torch.stack(
        [torch.autograd.functional.jacobian(softmax_of, point).flatten(1).norm() for point in x]
    )
    for chunk_size in (None, 1, 2, 7):
        got = jacobian_norm(cnn, x, chunk_size=chunk_size)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_the_estimate_refuses_probabilities_too():
    # jacobian_norm refused a softmax head; the estimate applied a second softmax silently.
    torch.manual_seed(0)
    probs = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1))
    x = torch.randn(5, 6)
    with pytest.raises(UserError, match="returns probabilities"):
        jacobian_norm_estimate(probs, x, n_projections=2, generator=_gen(0))
    logits = jacobian_norm_estimate(probs, x, n_projections=2, generator=_gen(0), output="logits")
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_closed_must_be_a_boolean_and_anchors_must_not_coincide():
    # closed="no" is truthy: it closed the path. Three equal anchors gave NaN densities.
    from sensgen.metrics import transition_profile

    net = MLP(3, 2, width=8, depth=1, generator=_gen(0)).double()
    path = torch.randn(10, 3, generator=_gen(1), dtype=torch.float64)
    for method in ("exact", "sampled"):
        with pytest.raises(UserError, match="closed must be True or False, got 'no'"):
            transitions(net, path, method=method, closed="no")
    assert transitions(net, path, closed=False) <= transitions(net, path, closed=True)
    same = torch.ones(3, dtype=torch.float64)
    with pytest.raises(UserError, match="x1, x2 and x3 coincide"):
        transition_profile(net, same, same, same)
    assert (transition_profile(net, same, same, same, density="per_bin").values == 0).all()


def test_the_estimate_takes_an_empty_batch_and_inputs_that_require_grad():
    # An empty batch was refused as "returns probabilities" (an empty row is vacuously >= 0
    # and sums to 1); inputs requiring grad gave a result on the caller's autograd graph,
    # which .numpy() refuses. Logits W x + b: each draw is ‖vᵀW‖², in closed form.
    linear = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, generator=_gen(0), dtype=torch.float64).requires_grad_()
    for output in ("softmax", "logits"):
        empty = jacobian_norm_estimate(
            linear, x[:0], n_projections=2, generator=_gen(1), output=output
        )
        assert empty.shape == (0,) and empty.dtype == torch.float64
    got = jacobian_norm_estimate(linear, x, n_projections=3, generator=_gen(1), output="logits")
    assert not got.requires_grad
    g = _gen(1)
    draws = torch.stack([torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in "abc"])
    expected = (draws @ linear.weight.detach()).pow(2).sum(-1).mean(0)
    torch.testing.assert_close(torch.from_numpy(got.numpy()), expected, rtol=1e-12, atol=0)


def test_a_forward_that_mixes_the_points_has_no_per_point_jacobian():
    # f(x)_i = W (x_i − mean_j x_j): jacrev takes each point alone, where the centred input
    # is 0, and returned 0 for every point (the batch's own ∂f_i/∂x_i is (1 − 1/B) W),
    # paired with the batch's softmax. A fixed centre is per point: ‖S(p) W‖_F, closed form.
    class Centred(nn.Module):
        def __init__(self, centre=None):
            super().__init__()
            self.fc, self.centre = nn.Linear(5, 3).double(), centre

        def forward(self, x):
            return self.fc(x - (x.mean(0) if self.centre is None else self.centre))

    x = torch.randn(6, 5, generator=_gen(0), dtype=torch.float64)
    with pytest.raises(UserError, match="mixes the points"):
        jacobian_norm(Centred(), x)
    fixed = Centred(centre=x.mean(0))
    with torch.no_grad():
        logits, w = fixed(x), fixed.fc.weight
        expected = _accurate_softmax_norm(logits, w.expand(6, 3, 5))
    torch.testing.assert_close(jacobian_norm(fixed, x), expected, rtol=1e-12, atol=0)
