"""Audit of `sensgen.measures` against closed forms, independent implementations and JNMKB.

Each test derives the value on a tiny network by hand or by a second implementation (the
log-space formulas of the public JNMKB reimplementations, exact flip thresholds of a linear
model, the worst corner of a box) and compares.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sensgen import measures as M
from sensgen.errors import UserError
from sensgen.models import MLP


def bias_free_net(seed: int = 0) -> MLP:
    """A float64 3 → 5 → 5 → 3 ReLU MLP without biases: scaling every layer by c > 0 scales
    its logits by c^L (L = 3) and changes none of its decisions."""
    net = MLP(3, 3, width=5, depth=2, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.zero_()
    return net


def scaled(net: MLP, c: float) -> MLP:
    out = copy.deepcopy(net)
    with torch.no_grad():
        for layer in out.layers:
            layer.weight.mul_(c)
    return out


def points(net: nn.Module, n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, M.logits64(net, x).argmax(1)


def test_geometric_means_are_normalised_inside_the_mean_as_jnmkb():
    # JNMKB's "sum.fro/margin" is d·(Π_l ‖W_l‖_F²/γ²)^{1/d}: in log space (as the public
    # reimplementations compute it) log d + (1/d)(Σ_l log ‖W_l‖_F² − 2 log γ). It was
    # stored as d·(Π_l ‖W_l‖_F²)^{1/d}/γ², which ranks models differently across margins.
    net = bias_free_net()
    x, y = points(net)
    out = M.all_measures(net, net, x, y, seed=0, groups=["norms", "margin"])
    ws = [layer.weight.detach().numpy() for layer in net.layers]
    d, gamma = len(ws), out["margin"]
    log_fro = sum(math.log(np.sum(w**2)) for w in ws)
    log_spec = sum(2 * math.log(np.linalg.svd(w, compute_uv=False)[0]) for w in ws)
    expected = {
        "frobenius_geometric_normalised": math.exp(
            math.log(d) + (log_fro - 2 * math.log(gamma)) / d
        ),
        "spectral_geometric_normalised": math.exp(
            math.log(d) + (log_spec - 2 * math.log(gamma)) / d
        ),
        "frobenius_product_normalised": math.exp(log_fro - 2 * math.log(gamma)),
        "spectral_product_normalised": math.exp(log_spec - 2 * math.log(gamma)),
    }
    for name, value in expected.items():
        assert out[name] == pytest.approx(value, rel=1e-10), name


@pytest.mark.parametrize("c", [3.0, 0.25])
def test_margin_normalised_measures_do_not_see_a_global_rescaling(c):
    # Scaling every layer of a bias-free ReLU net by c scales Π_l ‖W_l‖² by c^{2L} and γ by
    # c^L: every JNMKB "/margin" measure is unchanged (the geometric ones included, which
    # moved by c^{2 − 2L} before), while the raw norms and 1/γ² move by the known powers.
    net, L = bias_free_net(), 3
    x, y = points(net)
    groups = ["norms", "margin"]
    base = M.all_measures(net, net, x, y, seed=0, groups=groups)
    big = M.all_measures(scaled(net, c), net, x, y, seed=0, groups=groups)
    for name in M.NORMALISED:
        if name != "frobenius_sum":  # Σ_l ‖W_l‖² / γ² is no JNMKB measure and is not invariant
            key = f"{name}_normalised"
            assert big[key] == pytest.approx(base[key], rel=1e-10), key
    assert big["margin"] == pytest.approx(c**L * base["margin"], rel=1e-10)
    assert big["inverse_margin"] == pytest.approx(base["inverse_margin"] / c ** (2 * L), rel=1e-10)
    assert big["frobenius_product"] == pytest.approx(c ** (2 * L) * base["frobenius_product"])
    assert big["frobenius_geometric"] == pytest.approx(c**2 * base["frobenius_geometric"])
    assert big["path_norm"] == pytest.approx(c ** (2 * L) * base["path_norm"], rel=1e-10)


def test_relu_rescaling_between_layers():
    # W_1, b_1 → 3·W_1, 3·b_1 and W_2 → W_2/3 leave the function alone: products, path norm,
    # stable ranks, margin and the magnitude-aware searches with ε = 0 are invariant; the
    # sum of squares and the plain (absolute-noise) flatness are not (Dinh et al. 2017).
    net = MLP(3, 3, width=6, depth=1, generator=torch.Generator().manual_seed(1)).double()
    x, y = points(net, n=30)
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.layers[0].weight.mul_(3.0)
        other.layers[0].bias.mul_(3.0)
        other.layers[1].weight.div_(3.0)
    for fn in (M.frobenius_product, M.spectral_product, M.spectral_frobenius, M.path_norm):
        assert fn(other) == pytest.approx(fn(net), rel=1e-10), fn.__name__
    assert M.frobenius_sum(other) != pytest.approx(M.frobenius_sum(net), rel=1e-3)
    assert M.margin(other, x, y) == pytest.approx(M.margin(net, x, y), rel=1e-10)
    kw = {"seed": 0, "eps": 0.0, "n_draws": 4, "steps": 12}
    assert M.pacbayes_flatness(other, x, y, **kw) == M.pacbayes_flatness(net, x, y, **kw)
    sharp = {"seed": 0, "eps": 0.0, "steps": 12}
    assert M.sharpness(other, x, y, **sharp) == M.sharpness(net, x, y, **sharp)
    plain = {**kw, "magnitude_aware": False}
    assert M.pacbayes_flatness(other, x, y, **plain) != M.pacbayes_flatness(net, x, y, **plain)


def test_spectral_measures_of_a_non_finite_net():
    # A NaN weight made the SVD raise (LinAlgError) where the Frobenius measures give NaN; an
    # infinite one made ‖W‖_2 NaN where ‖W‖_F is ∞.
    net = bias_free_net()
    init = copy.deepcopy(net)
    with torch.no_grad():
        net.layers[1].weight[0, 0] = math.nan
    for fn in (M.spectral_product, M.spectral_geometric, M.spectral_frobenius):
        assert math.isnan(fn(net)), fn.__name__
    assert math.isnan(M.distance_from_init(net, init)["spectral"][1])
    with torch.no_grad():
        net.layers[0].weight.zero_()  # a zero layer first must not hide the NaN
    assert math.isnan(M.spectral_frobenius(net))
    with torch.no_grad():
        net.layers[1].weight[0, 0] = math.inf
        net.layers[0].weight.fill_(1.0)
    assert M.spectral_product(net) == math.inf == M.spectral_frobenius(net)


def test_huge_and_tiny_weights_give_numbers_not_exceptions():
    # Python's float ** raises OverflowError where a product rounds to ∞, and 1/γ² with γ²
    # rounded to 0 raised ZeroDivisionError: finite nets crashed the norms, distance and
    # margin groups. The scale-free JNMKB ratios stay what they are at scale 1.
    net = bias_free_net()
    x, y = points(net)
    groups = ["norms", "distance", "margin"]
    base = M.all_measures(net, net, x, y, seed=0, groups=groups)
    for c in (1e55, 1e-40):  # γ ≈ c³·γ_1: γ² beyond the float range either way
        out = M.all_measures(scaled(net, c), net, x, y, seed=0, groups=groups)
        for key in ("frobenius_geometric_normalised", "spectral_geometric_normalised"):
            assert out[key] == pytest.approx(base[key], rel=1e-9), (c, key)
        assert out["margin"] == pytest.approx(c**3 * base["margin"], rel=1e-9)
    huge = M.all_measures(scaled(net, 1e160), net, x, y, seed=0, groups=["norms", "distance"])
    assert huge["spectral_product"] == huge["spectral_frobenius"] == math.inf
    assert huge["distance_spectral"] == huge["distance_frobenius"] == math.inf
    assert M.inverse_margin(1e200) == 0.0 and M.inverse_margin(-1e-200) == math.inf
    assert M.pacbayes_init(1e200, 0.5, 10) == math.inf


def test_distance_from_init_refuses_another_architecture():
    # The differences broadcast: a width-7 net against a width-1 init gave numbers.
    net = MLP(5, 3, width=7, depth=1, generator=torch.Generator().manual_seed(0))
    init = MLP(5, 3, width=1, depth=1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"layers\.0\.weight: \[1, 5\] in init, \[7, 5\] in net"):
        M.distance_from_init(net, init)
    with pytest.raises(UserError, match="shapes"):
        M.all_measures(net, init.state_dict(), torch.zeros(4, 5), torch.zeros(4), seed=0)


def test_a_diverged_net_is_not_the_flattest():
    # A NaN weight gives every logit row the same argmax, perturbed or not: the criterion held
    # at every σ and α, and the searches returned the cap, the flattest value possible.
    net = MLP(3, 3, width=6, depth=1, generator=torch.Generator().manual_seed(1))
    x, y = points(net, n=30)
    with torch.no_grad():
        net.layers[0].weight[0, 0] = math.nan
    flat = M.pacbayes_flatness(net, x, y, seed=0, n_draws=2)
    sharp = M.sharpness(net, x, y, seed=0)
    assert math.isnan(flat["sigma"]) and math.isnan(flat["flatness"])
    assert math.isnan(sharp["alpha"]) and math.isnan(sharp["sharpness"])
    out = M.all_measures(net, net, x, y, seed=0, groups=["flatness", "sharpness"])
    assert all(math.isnan(v) for v in out.values()), out


def linear_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 2-class linear model z = Wx + b, 10 points x ∈ [0, 1]³ all of class 0, all right."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(
            torch.tensor([[1.0, 0.5, 2.0], [-0.5, 0.25, 0.0]], dtype=torch.float64)
        )
        model[0].bias.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    x = torch.rand(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return model, x, torch.zeros(10, dtype=torch.long)


def hand_margins(x: torch.Tensor) -> np.ndarray:
    """z_0 − z_1 of `linear_problem`, by hand: (1.5, 0.25, 2)·x + 0.5."""
    return x.numpy() @ np.array([1.5, 0.25, 2.0]) + 0.5


@pytest.mark.parametrize("seed", [4, 7, 12, 0])
def test_plain_flatness_of_a_linear_model_is_the_exact_flip_threshold(seed):
    # Under u = σg the margin of point i in draw k is m_i + σ·d_ik, d_ik = (g_W0 − g_W1)·x_i +
    # g_b0 − g_b1: it flips for σ > m_i/(−d_ik) if d_ik < 0. acc ≥ 1 − 0.1 over n draws of 10
    # points ⇔ at most n flips, so σ' is the (n + 1)-th smallest threshold. At an exact tie
    # (n flips: mean 0.9) the float mean fell 1e-16 short and σ' stopped one flip early
    # (seed 7: 1.833 instead of 1.950).
    model, x, y = linear_problem()
    margins = hand_margins(x)
    assert M.margins(model, x, y).numpy() == pytest.approx(margins, rel=1e-12)
    n = 6
    gen = torch.Generator().manual_seed(seed)  # the draws the search takes from the seed
    draws = [
        {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in
         model.named_parameters()}
        for _ in range(n)
    ]  # fmt: skip
    thresholds = []
    for g in draws:
        dw, db = (
            (g["0.weight"][0] - g["0.weight"][1]).numpy(),
            float(g["0.bias"][0] - g["0.bias"][1]),
        )
        shift = x.numpy() @ dw + db
        thresholds += [m / -s for m, s in zip(margins, shift, strict=True) if s < 0]
    exact = min(sorted(thresholds)[n], 1024.0)
    sigma = M.pacbayes_flatness(model, x, y, seed=seed, magnitude_aware=False, n_draws=n)["sigma"]
    assert sigma == pytest.approx(exact, abs=4e-6 * max(1.0, exact))


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_sharpness_of_a_linear_model_is_the_worst_corner(magnitude_aware):
    # Every point is class 0 with x ≥ 0, so one corner of the box lowers every margin the most
    # at once: u = −b on row 0, +b on row 1, a drop of Σ_j (b_0j + b_1j) x_j + b_0 + b_1
    # (b = α|θ| + ε, or α). The sign ascent reaches that corner within its 10 steps of 1/4;
    # α' is where the second point flips (acc ≥ 0.9 allows one of 10).
    model, x, y = linear_problem()
    margins, eps = hand_margins(x), 1e-3
    xs = x.numpy()
    if magnitude_aware:
        w, b = model[0].weight.detach().abs().numpy(), model[0].bias.detach().abs().numpy()
        per_alpha = xs @ (w[0] + w[1]) + b.sum()
        fixed = eps * (2 * xs.sum(1) + 2)
        thresholds = (margins - fixed) / per_alpha
    else:
        thresholds = margins / (2 * (xs.sum(1) + 1))
    exact = np.sort(thresholds)[1]
    out = M.sharpness(model, x, y, seed=0, magnitude_aware=magnitude_aware, eps=eps)
    assert out["alpha"] == pytest.approx(exact, abs=2e-6)
