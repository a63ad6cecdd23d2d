"""Hand-computed checks of `sensgen.measures` on nets with weights set by hand."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from sensgen import measures as M
from sensgen.models import MLP, Nonlinearity


class OneLayer(nn.Module):
    """A single linear layer (L = 1) exposing `layers` like an MLP."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        w = torch.tensor(weight)
        self.layers = nn.ModuleList([nn.Linear(w.shape[1], w.shape[0])])
        with torch.no_grad():
            self.layers[0].weight.copy_(w)
            self.layers[0].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def set_weights(net: MLP, weights: list[list[list[float]]]) -> MLP:
    with torch.no_grad():
        for layer, w in zip(net.layers, weights, strict=True):
            layer.weight.copy_(torch.tensor(w))
    return net


def diagonal_net() -> MLP:
    """L = 2: W1 = diag(1, 2), W2 = diag(3, 4), biases b1 = (0.5, 0), b2 = 0."""
    net = MLP(2, 2, width=2, depth=1, generator=torch.Generator().manual_seed(0))
    set_weights(net, [[[1, 0], [0, 2]], [[3, 0], [0, 4]]])
    with torch.no_grad():
        net.layers[0].bias.copy_(torch.tensor([0.5, 0.0]))
    return net


def dense_net() -> MLP:
    """L = 3, non-square and non-diagonal: 3 → 2 → 2 → 1."""
    net = MLP(3, 1, width=2, depth=2, generator=torch.Generator().manual_seed(0))
    return set_weights(net, [[[1, 2, 0], [0, 1, 1]], [[1, -1], [2, 0]], [[1, 1]]])


def test_diagonal_net_by_hand():
    net = diagonal_net()
    # ‖W1‖_F² = 1 + 4 = 5, ‖W2‖_F² = 9 + 16 = 25; ‖W1‖_2² = 4, ‖W2‖_2² = 16.
    assert M.n_params(net) == 2 * 3 + 2 * 3
    assert M.frobenius_product(net) == pytest.approx(125.0, rel=1e-12)
    assert M.frobenius_sum(net) == pytest.approx(30.0, rel=1e-12)
    assert M.frobenius_geometric(net) == pytest.approx(2 * math.sqrt(125.0), rel=1e-12)
    assert M.spectral_product(net) == pytest.approx(64.0, rel=1e-12)
    assert M.spectral_geometric(net) == pytest.approx(2 * 8.0, rel=1e-12)
    assert M.spectral_frobenius(net) == pytest.approx(64 * (5 / 4 + 25 / 16), rel=1e-12)
    # 𝟙 → diag(1, 4)𝟙 = (1, 4) → diag(9, 16)(1, 4) = (9, 64) → 73.
    assert M.path_norm(net) == pytest.approx(73.0, rel=1e-12)


def test_dense_net_by_hand():
    net = dense_net()
    assert M.n_params(net) == 2 * 4 + 2 * 3 + 1 * 3
    # ‖W‖_F²: 1+4+1+1 = 7, 1+1+4 = 6, 2.
    assert M.frobenius_product(net) == pytest.approx(84.0, rel=1e-12)
    assert M.frobenius_sum(net) == pytest.approx(15.0, rel=1e-12)
    assert M.frobenius_geometric(net) == pytest.approx(3 * 84 ** (1 / 3), rel=1e-12)
    # ‖W1‖_2²: W1W1ᵀ = [[5,2],[2,2]], λ = 6, 1. ‖W2‖_2²: W2ᵀW2 = [[5,-1],[-1,1]],
    # λ = 3 ± √5. ‖W3‖_2² = 2.
    s1, s2, s3 = 6.0, 3 + math.sqrt(5), 2.0
    prod = s1 * s2 * s3
    assert M.spectral_product(net) == pytest.approx(prod, rel=1e-12)
    assert M.spectral_geometric(net) == pytest.approx(3 * prod ** (1 / 3), rel=1e-12)
    stable = 7 / s1 + 6 / s2 + 2 / s3
    assert M.spectral_frobenius(net) == pytest.approx(prod * stable, rel=1e-12)
    # 𝟙 → [[1,4,0],[0,1,1]]𝟙 = (5, 2) → [[1,1],[4,0]](5, 2) = (7, 20) → 7 + 20 = 27.
    assert M.path_norm(net) == pytest.approx(27.0, rel=1e-12)


def test_single_layer_by_hand():
    net = OneLayer([[3, 4], [0, 0], [0, 1]])  # L = 1, 2 → 3
    assert M.n_params(net) == 3 * 3
    assert M.frobenius_product(net) == pytest.approx(26.0, rel=1e-12)
    assert M.frobenius_geometric(net) == pytest.approx(26.0, rel=1e-12)
    # WᵀW = [[9,12],[12,17]], λ = 13 ± √160.
    assert M.spectral_product(net) == pytest.approx(13 + math.sqrt(160), rel=1e-12)
    assert M.path_norm(net) == pytest.approx(9 + 16 + 1, rel=1e-12)


def test_deep_large_net_geometric_is_finite():
    net = MLP(4, 4, width=4, depth=30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.fill_(1e6)
    # Each ‖W_l‖_F² = 16e12 and each ‖W_l‖_2² = (4e6)² = 16e12; 31 layers overflow.
    assert M.frobenius_product(net) == math.inf
    assert M.frobenius_geometric(net) == pytest.approx(31 * 16e12, rel=1e-10)
    assert M.spectral_geometric(net) == pytest.approx(31 * 16e12, rel=1e-10)
    assert math.isfinite(M.frobenius_sum(net))


def test_distance_from_init():
    init = diagonal_net()
    net = copy.deepcopy(init)
    zero = M.distance_from_init(net, init)
    assert zero == {"l2": 0.0, "frobenius": [0.0, 0.0], "spectral": [0.0, 0.0]}
    with torch.no_grad():
        net.layers[0].weight += torch.tensor([[3.0, 0.0], [0.0, 4.0]])
        net.layers[1].weight[1, 1] -= 12.0
        net.layers[1].bias[0] += 84.0
    out = M.distance_from_init(net, init.state_dict())  # a state dict works too
    # ‖θ − θ_0‖² = 9 + 16 + 144 + 84² = 7225 = 85².
    assert out["l2"] == pytest.approx(85.0, rel=1e-12)
    assert out["frobenius"] == pytest.approx([5.0, 12.0], rel=1e-12)
    assert out["spectral"] == pytest.approx([4.0, 12.0], rel=1e-12)


def identity_logits_net(c: int) -> MLP:
    """ReLU MLP with W1 = W2 = I and zero biases: logits = x for x ≥ 0."""
    net = MLP(c, c, width=c, depth=1, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(c).tolist()
    return set_weights(net, [eye, eye])


def margin_points(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative 3-class logits whose margin z_y − max_{j≠y} z_j is each given value."""
    x, y = [], []
    for i, m in enumerate(values):
        label = i % 3
        z = [5.0, 5.0, 5.0]
        z[(label + 1) % 3] = 5.0 - 2.0  # not the runner-up
        z[label] = 5.0 + m
        x.append(z)
        y.append(label)
    return torch.tensor(x), torch.tensor(y)


def test_margin_ten_points_interpolates():
    net = identity_logits_net(3)
    values = [7.0, 3.0, 1.0, 10.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0]
    x, y = margin_points(values)
    assert M.margins(net, x, y).tolist() == pytest.approx(values, abs=1e-12)
    # Sorted 1..10; the 10th percentile sits at position 0.1 · 9 = 0.9: 1 + 0.9 · 1 = 1.9.
    gamma = M.margin(net, x, y)
    assert gamma == pytest.approx(1.9, abs=1e-12)
    assert M.inverse_margin(gamma) == pytest.approx(1 / 1.9**2, rel=1e-12)
    assert M.normalised(125.0, gamma) == pytest.approx(125 / 3.61, rel=1e-12)


def test_margin_eleven_points_with_misclassified():
    net = identity_logits_net(3)
    values = [4.0, -3.0, 1.0, 10.0, 5.0, 2.0, 9.0, 3.0, 8.0, 6.0, 7.0]
    x, y = margin_points(values)
    # Sorted −3, 1, 2, ..., 10; position 0.1 · 10 = 1 → exactly the second smallest.
    assert M.margin(net, x, y) == pytest.approx(1.0, abs=1e-12)
    # Dropping the four smallest leaves 4..10 (7 points): position 0.6 → 4.6.
    keep = torch.tensor([v >= 4 for v in values])
    assert M.margin(net, x[keep], y[keep]) == pytest.approx(4.6, abs=1e-12)


def test_margin_single_layer_and_zero_margin():
    net = OneLayer([[1, 0], [0, 1]])
    x = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    assert M.margins(net, x, y).tolist() == [1.0, 0.0]
    assert M.margin(net, x, y) == pytest.approx(0.1, abs=1e-12)
    assert M.inverse_margin(0.0) == math.inf


def test_all_measures_consistent_and_pure():
    net = diagonal_net()
    init = copy.deepcopy(net)
    with torch.no_grad():
        init.layers[1].weight[0, 0] = 0.0  # W2 − W2⁰ = diag(3, 0)
    x, y = margin_points([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    x = x[:, :2] - 2.0  # 2 inputs; logits differ, but margins are what they are
    y = y % 2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = M.all_measures(net, init, x, y, seed=0)
    for k, v in net.state_dict().items():  # the net is untouched, still float32
        assert v.dtype == torch.float32
        assert torch.equal(v, before[k])
    assert out["n_params"] == 12.0
    assert out["frobenius_product"] == pytest.approx(125.0, rel=1e-12)
    assert out["path_norm"] == pytest.approx(73.0, rel=1e-12)
    assert out["distance_l2"] == pytest.approx(3.0, rel=1e-12)
    assert out["distance_frobenius"] == pytest.approx(9.0, rel=1e-12)
    assert out["distance_spectral"] == pytest.approx(9.0, rel=1e-12)
    gamma = M.margin(net, x, y)
    assert out["margin"] == gamma
    assert out["inverse_margin"] == pytest.approx(1 / gamma**2, rel=1e-12)
    for name in M.NORMALISED:
        # L = 2: the geometric means are normalised inside the mean, 2·(Π_l ‖W_l‖²/γ²)^{1/2}
        expected = out[name] / abs(gamma) if name in M.GEOMETRIC else out[name] / gamma**2
        assert out[f"{name}_normalised"] == pytest.approx(expected, rel=1e-12)
    assert all(isinstance(v, float) for v in out.values())


def pacbayes_problem() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    net = MLP(3, 3, width=6, depth=1, generator=g)
    x = torch.randn(30, 3, generator=g)
    y = M.logits64(net, x).argmax(1)  # labels the net gets right: accuracy 1
    return net, x, y


def test_pacbayes_flatness_bisection_brackets_the_threshold():
    net, x, y = pacbayes_problem()
    out = M.pacbayes_flatness(net, x, y, seed=3, n_draws=5, steps=30)
    sigma = out["sigma"]
    assert 0 < sigma < 1024 and out["flatness"] == pytest.approx(1 / sigma**2)
    assert out == M.pacbayes_flatness(net, x, y, seed=3, n_draws=5, steps=30)
    # Rebuild the same draws: σ meets acc ≥ 1 − 0.1, and σ + 1e-6 no longer does.
    gen = torch.Generator().manual_seed(3)
    noise = [
        {
            n: torch.randn(p.shape, generator=gen, dtype=torch.float64)
            for n, p in net.named_parameters()
        }
        for _ in range(5)
    ]
    assert M.perturbed_accuracy(net, x, y, sigma, noise) >= 0.9
    assert M.perturbed_accuracy(net, x, y, sigma + 1e-6, noise) < 0.9


@pytest.mark.parametrize("nonlinearity", [n.value for n in Nonlinearity])
def test_logits_into_buffers_are_the_modules_own_bit_for_bit(nonlinearity):
    # The flatness search's forward pass (kept buffers, φ in place) must give exactly
    # net(x), call after call (the buffers reused, their old contents overwritten) and
    # for another number of points; any other module is evaluated as itself.
    from sensgen.measures.flatness import _logits_into_buffers

    g = torch.Generator().manual_seed(7)
    net = MLP(5, 4, width=9, depth=3, nonlinearity=nonlinearity, generator=g).double()
    for layer in net.layers:  # non-zero biases, so that they are checked too
        nn.init.normal_(layer.bias, generator=g)
    logits = _logits_into_buffers(net)
    for n in (17, 17, 6):
        x = 3 * torch.randn(n, 5, generator=g, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(logits(x), net(x))

    class Other(MLP):
        def forward(self, x):
            return -super().forward(x)

    other = Other(5, 4, width=9, depth=1).double()
    assert _logits_into_buffers(other) is other


@pytest.mark.parametrize("magnitude_aware", [True, False])
def test_perturbed_accuracy_is_the_mean_over_independent_draws(magnitude_aware):
    # Each draw perturbs θ itself: acc(θ + s ∘ g_k), s_i = sqrt(σ²θ_i² + ε²) or σ, computed
    # here draw by draw with functional_call. (A draw must not start from the previous
    # draw's parameters: the perturbations would add up into a random walk.)
    net, x, y = pacbayes_problem()
    theta = {n: p.detach().double() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    noise = [
        {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in theta.items()}
        for _ in range(6)
    ]
    net64 = MLP(3, 3, width=6, depth=1).double()
    for sigma in (0.05, 0.4, 2.0):
        accuracies = []
        for g in noise:
            if magnitude_aware:
                params = {
                    n: t + (sigma**2 * t**2 + 1e-3**2).sqrt() * g[n] for n, t in theta.items()
                }
            else:
                params = {n: t + sigma * g[n] for n, t in theta.items()}
            z = torch.func.functional_call(net64, params, (x.double(),))
            accuracies.append(float((z.argmax(1) == y).double().mean()))
        mean = M.perturbed_accuracy(net, x, y, sigma, noise, magnitude_aware=magnitude_aware)
        assert mean == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-12)
        assert len(set(accuracies)) > 1 or sigma == 0.05  # the draws differ: a real check
    assert all(torch.equal(p.detach().double(), theta[n]) for n, p in net.named_parameters())


def scaled_readout(net: MLP, factor: float) -> MLP:
    """A copy of a 1-hidden-layer net whose last layer (weights and bias) is scaled by
    ``factor``: its logits scale by ``factor``, its decisions do not change."""
    big = copy.deepcopy(net)
    with torch.no_grad():
        big.layers[1].weight *= factor
        big.layers[1].bias *= factor
    return big


def test_pacbayes_flatness_scale_invariance_and_cap():
    net, x, y = pacbayes_problem()
    big = scaled_readout(net, 7.0)
    kw = {"seed": 0, "n_draws": 4, "eps": 0.0, "steps": 25}
    # Magnitude-aware with ε = 0: u_i = σθ_i g_i is relative, so σ is unchanged.
    s1 = M.pacbayes_flatness(net, x, y, **kw)["sigma"]
    s7 = M.pacbayes_flatness(big, x, y, **kw)["sigma"]
    assert s7 == pytest.approx(s1, abs=1e-6)
    # Labels the net always gets wrong: acc 0, the condition holds for every σ → the cap.
    wrong = (y + 1) % 3
    capped = M.pacbayes_flatness(net, x[:5], wrong[:5], seed=0, n_draws=2, sigma_max=64.0)
    assert capped == {"sigma": 64.0, "flatness": 1 / 64.0**2}


def test_norm_products_of_a_diverged_net_are_nan():
    # A NaN weight makes every norm measure NaN (not 0 from log(NaN) → −∞: that would rank
    # a diverged net as the "best" one).
    net = diagonal_net()
    with torch.no_grad():
        net.layers[0].weight[0, 0] = math.nan
    for measure in (M.frobenius_product, M.frobenius_geometric, M.frobenius_sum, M.path_norm):
        assert math.isnan(measure(net)), measure.__name__


def test_pacbayes_init_counts_the_whole_training_set():
    # m of pacbayes_init is the training-set size, not the number of points the searches
    # use: the bound moves by exactly log(m'/m) when only m changes.
    net = diagonal_net()
    init = copy.deepcopy(net)
    x, y = margin_points([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    x, y = x[:, :2] - 2.0, y % 2
    kw = {"seed": 0, "groups": ["distance", "flatness"]}
    subset = M.all_measures(net, init, x, y, **kw)["pacbayes_init"]
    whole = M.all_measures(net, init, x, y, n_train=6000, **kw)["pacbayes_init"]
    assert whole - subset == pytest.approx(math.log(6000 / len(x)), rel=1e-12)


def test_measures_take_the_model_in_eval_mode():
    # Dropout left in training mode must not make the measures random: they measure the
    # trained function (the copy is put in eval mode; the user's module is untouched).
    net = diagonal_net()
    noisy = nn.Sequential(net.layers[0], nn.ReLU(), nn.Dropout(0.5), net.layers[1])
    assert noisy.training
    x, y = margin_points([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    x, y = x[:, :2] - 2.0, y % 2
    plain = nn.Sequential(net.layers[0], nn.ReLU(), net.layers[1])
    assert M.margins(noisy, x, y).tolist() == M.margins(plain, x, y).tolist()
    flat = [M.pacbayes_flatness(m, x, y, seed=1, n_draws=3) for m in (noisy, noisy, plain)]
    assert flat[0] == flat[1] == flat[2]
    assert noisy.training


def test_a_study_stores_the_measures_of_each_done_model(tmp_path):
    """`measure.generalization_measures` stores all_measures per model; the stored values
    equal the measures recomputed from the stored weights and the seeded initialisation."""
    from sensgen import study as study_module
    from sensgen.runner import run
    from sensgen.store import open_results

    s = study_module.Study(
        name="m",
        base=dict(dataset="digits", width=16, depth=2, max_steps=40, eval_every=20),
        grid={"seed": [0, 1]},
        measure={"jacobian_train_points": 0, "generalization_measures": True,
                 "measure_points": 200},
    )  # fmt: skip
    run(s, tmp_path / "m", progress=False, report=False)
    with open_results(tmp_path / "m") as results:
        runs, stored = results.runs(), results.measures().set_index("run_id")
        assert sorted(stored.index) == sorted(runs["run_id"])
        for row in runs.itertuples():
            weights = results.load_weights(row.pack_id)
            net = MLP(64, 10, 16, 2)
            prefix = f"{row.run_id}."
            net.load_state_dict(
                {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
            )
            assert stored.loc[row.run_id, "n_params"] == row.n_params
            assert stored.loc[row.run_id, "frobenius_sum"] == pytest.approx(
                M.frobenius_sum(net), rel=1e-12
            )
            init = MLP(64, 10, 16, 2, generator=torch.Generator().manual_seed(row.seed))
            assert stored.loc[row.run_id, "distance_l2"] == pytest.approx(
                M.distance_from_init(net, init)["l2"], rel=1e-9
            )
            gamma = stored.loc[row.run_id, "margin"]  # L = 3 layers: inside the mean
            assert stored.loc[row.run_id, "frobenius_geometric_normalised"] == pytest.approx(
                3 * (M.frobenius_product(net) / gamma**2) ** (1 / 3), rel=1e-9
            )
    plain = study_module.Study(name="p", base=dict(dataset="digits", width=8, depth=1,
                                                   max_steps=5, eval_every=5))  # fmt: skip
    run(plain, tmp_path / "p", progress=False, report=False)
    assert list(open_results(tmp_path / "p").measures().columns) == ["run_id"]


def test_the_report_scores_every_stored_measure_against_the_gap(tmp_path):
    from sensgen import study as study_module
    from sensgen.analysis import write_report
    from sensgen.runner import run

    s = study_module.Study(
        name="r",
        base=dict(dataset="digits", depth=1, max_steps=60, eval_every=20, stop_at_fit=False),
        grid={"width": [8, 32], "lr": [0.001, 0.01], "seed": [0, 1]},
        measure={"jacobian_train_points": 20, "generalization_measures": True,
                 "measure_points": 100},
        inclusion={"apply": False},
    )  # fmt: skip
    run(s, tmp_path / "r", progress=False, report=False)
    index = write_report(tmp_path / "r", n_boot=100)
    summary = json.loads((index.parent / "summary.json").read_text())
    table = {row["measure"]: row for row in summary["measure_scores"]}
    assert {"jacobian_norm", "jacobian_norm_train", "n_params", "path_norm"} <= set(table)
    assert all(row["n"] == 8 for row in table.values())
    assert table["jacobian_norm"]["beats_jbar"] is False  # τ > τ is never true
    # width and lr form a 2 × 2 grid (seed is not an axis): Ψ and the CMI score are defined
    assert table["jacobian_norm"]["psi"] is not None
    assert table["frobenius_sum"]["cmi_pgdl"] is not None
    assert 'id="measure-scores"' in index.read_text(encoding="utf-8")


def sharpness_start(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The start v ~ U[−1, 1] that `M.sharpness` draws from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: 2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1
        for n, p in net.named_parameters()
    }


def test_sharpness_bisection_brackets_the_threshold_and_leaves_the_net_alone():
    net, x, y = pacbayes_problem()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = M.sharpness(net, x, y, seed=3, steps=30)
    for k, v in net.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    alpha = out["alpha"]
    assert 0 < alpha < 1024 and out["sharpness"] == pytest.approx(1 / alpha**2)
    assert out == M.sharpness(net, x, y, seed=3, steps=30)
    # The same start: α meets acc ≥ 1 − 0.1 after the ascent, 1.01 α no longer does.
    start = sharpness_start(net, 3)
    assert M.adversarial_accuracy(net, x, y, alpha, start) >= 0.9
    assert M.adversarial_accuracy(net, x, y, 1.01 * alpha, start) < 0.9
    # The ascent finds worse perturbations than its random start alone.
    assert M.adversarial_accuracy(net, x, y, alpha, start, ascent_steps=0) >= (
        M.adversarial_accuracy(net, x, y, alpha, start)
    )


def test_sharpness_scale_invariance_and_cap():
    net, x, y = pacbayes_problem()
    big = scaled_readout(net, 7.0)
    # Magnitude-aware with ε = 0: u_i = α|θ_i| v_i is relative, and the ascended margin
    # loss is homogeneous in the logits, so every ascent step and α are unchanged.
    a1 = M.sharpness(net, x, y, seed=0, eps=0.0, steps=25)["alpha"]
    a7 = M.sharpness(big, x, y, seed=0, eps=0.0, steps=25)["alpha"]
    assert a7 == pytest.approx(a1, abs=1e-6)
    wrong = (y + 1) % 3  # acc 0: the condition holds for every α → the cap
    capped = M.sharpness(net, x[:5], wrong[:5], seed=0, alpha_max=64.0, magnitude_aware=False)
    assert capped == {"alpha": 64.0, "sharpness": 1 / 64.0**2}


def test_pacbayes_init_by_hand():
    # ‖θ − θ_0‖ = 3, σ = 0.5, m = 100: 9/(4 · 0.25) + log(200) + 10 = 19 + log 200.
    assert M.pacbayes_init(3.0, 0.5, 100) == pytest.approx(19 + math.log(200), rel=1e-12)
    assert M.pacbayes_init(0.0, 1.0, 1) == 10.0
    assert M.pacbayes_init(3.0, 0.0, 100) == math.inf


def test_a_users_sequential_mlp_measures_like_the_same_sensgen_mlp():
    # Any module whose nn.Linear layers, in module order, are W_1..W_L: a plain
    # nn.Sequential with the same weights gives every measure of the sensgen MLP.
    g = torch.Generator().manual_seed(3)
    net = MLP(5, 3, width=7, depth=2, generator=g)
    init = MLP(5, 3, width=7, depth=2, generator=g)
    seq, seq_init = (
        nn.Sequential(
            nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3)
        )
        for _ in range(2)
    )
    for src, dst in ((net, seq), (init, seq_init)):
        linears = [m for m in dst if isinstance(m, nn.Linear)]
        for a, b in zip(src.layers, linears, strict=True):
            b.load_state_dict(a.state_dict())
    x = torch.randn(40, 5, generator=g)
    y = M.logits64(net, x).argmax(1)
    ours = M.all_measures(net, init, x, y, seed=4)
    theirs = M.all_measures(seq, seq_init.state_dict(), x, y, seed=4)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert theirs[key] == pytest.approx(ours[key], rel=1e-12), key
    assert ours["n_params"] == (5 + 1) * 7 + (7 + 1) * 7 + (7 + 1) * 3


def test_a_module_without_linear_layers_is_an_error():
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        M.frobenius_product(nn.Sequential(nn.ReLU()))


def test_groups_select_exactly_their_measures_with_the_same_values():
    net, x, y = pacbayes_problem()
    init = MLP(3, 3, width=6, depth=1, generator=torch.Generator().manual_seed(2))
    full = M.all_measures(net, init, x, y, seed=0)
    assert set(M.GROUPS) == {"norms", "distance", "margin", "flatness", "sharpness"}
    norms = {"n_params", *M.NORMALISED}
    expected = {
        ("norms",): norms,
        ("distance",): {"distance_l2", "distance_frobenius", "distance_spectral"},
        ("margin",): {"margin", "inverse_margin"},
        ("norms", "margin"): norms
        | {"margin", "inverse_margin"}
        | {f"{n}_normalised" for n in M.NORMALISED},
        ("flatness",): {"pacbayes_mag_flatness", "pacbayes_init"},
        ("sharpness",): {"sharpness_mag"},
    }
    for groups, keys in expected.items():
        part = M.all_measures(net, init, x, y, seed=0, groups=groups)
        assert set(part) == keys, groups
        assert all(part[k] == full[k] for k in keys)
    assert set(full) == set().union(*expected.values())
    with pytest.raises(ValueError, match="unknown measure groups"):
        M.all_measures(net, init, x, y, seed=0, groups=["norm"])


def test_study_file_selects_groups_and_rejects_unknown_ones(tmp_path):
    from sensgen.errors import UserError
    from sensgen.study import Measurements, load

    assert Measurements(generalization_measures=True).measure_groups() == M.GROUPS
    assert Measurements().measure_groups() == ()
    chosen = Measurements(generalization_measures=["margin", "norms"])
    assert chosen.measure_groups() == ("norms", "margin")
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[base]\ndataset = "digits"\n'
                    '[measure]\ngeneralization_measures = ["norms", "flatnes"]\n')  # fmt: skip
    with pytest.raises(UserError, match=r"measure\.generalization_measures.*'flatnes'"):
        load(path)


@pytest.mark.parametrize("magnitude_aware", [True, False])
def test_early_stops_do_not_change_the_searches(monkeypatch, magnitude_aware):
    # The searches stop a criterion's evaluation once its answer is settled (the rest of
    # the draws, or of the ascent, cannot change it). Without the early stops they must
    # return exactly the same σ and α.
    from sensgen.measures import flatness

    net, x, y = pacbayes_problem()
    kw = {"seed": 5, "magnitude_aware": magnitude_aware}
    early = (M.pacbayes_flatness(net, x, y, n_draws=7, **kw), M.sharpness(net, x, y, **kw))
    calls = {"settled": 0, "stopped": 0}
    full_mean, full_ascent = flatness.perturbed_accuracy, flatness.adversarial_accuracy

    def every_draw(*args, settle=None, **options):
        calls["settled"] += settle is not None
        return full_mean(*args, **options)

    def whole_ascent(*args, stop_below=None, **options):
        calls["stopped"] += stop_below is not None
        return full_ascent(*args, **options)

    monkeypatch.setattr(flatness, "perturbed_accuracy", every_draw)
    monkeypatch.setattr(flatness, "adversarial_accuracy", whole_ascent)
    full = (M.pacbayes_flatness(net, x, y, n_draws=7, **kw), M.sharpness(net, x, y, **kw))
    assert early == full
    assert calls["settled"] > 10 and calls["stopped"] > 10  # every criterion asked to settle


def test_settled_mean_is_on_the_same_side_of_the_threshold():
    net, x, y = pacbayes_problem()
    gen = torch.Generator().manual_seed(2)
    noise = [
        {
            n: torch.randn(p.shape, generator=gen, dtype=torch.float64)
            for n, p in net.named_parameters()
        }
        for _ in range(6)
    ]
    for sigma in (0.01, 0.3, 1.0, 3.0, 30.0):
        mean = M.perturbed_accuracy(net, x, y, sigma, noise)
        for threshold in (0.05, 0.5, mean, 0.95):
            settled = M.perturbed_accuracy(net, x, y, sigma, noise, settle=threshold)
            assert (settled >= threshold) == (mean >= threshold)
        start = sharpness_start(net, 4)
        worst = M.adversarial_accuracy(net, x, y, sigma, start)
        for threshold in (0.05, 0.5, worst, 0.95):
            stopped = M.adversarial_accuracy(net, x, y, sigma, start, stop_below=threshold)
            assert (stopped >= threshold) == (worst >= threshold)


def test_labels_that_do_not_fit_the_model_are_user_errors():
    # A label out of range made the searches' accuracy 0, so flatness returned its cap
    # (σ = 1024) without a word; margin raised torch's index error.
    from sensgen.errors import UserError

    net, x, y = pacbayes_problem()
    bad = {
        r"labels must lie in \[0, 2\]": y + 5,
        r"shape \[30\], got \[30, 1\].*argmax": y[:, None],
        r"shape \[30\], got \[29\]": y[:-1],
        "integer class indices": y.double() + 0.5,
    }
    for message, labels in bad.items():
        for measure in (M.margin, M.pacbayes_flatness, M.sharpness):
            kw = {} if measure is M.margin else {"seed": 0}
            with pytest.raises(UserError, match=message):
                measure(net, x, labels, **kw)
    with pytest.raises(UserError, match="no points"):
        M.margin(net, x[:0], y[:0])
    assert M.margin(net, x, y.int()) == M.margin(net, x, y.double()) == M.margin(net, x, y)
    one_logit = nn.Sequential(nn.Linear(3, 1))
    with pytest.raises(UserError, match=r"C >= 2 .*\[0, z\]"):
        M.margin(one_logit, x, torch.zeros(30, dtype=torch.long))


def test_groups_may_be_one_name():
    net, x, y = pacbayes_problem()
    init = MLP(3, 3, width=6, depth=1, generator=torch.Generator().manual_seed(2))
    one = M.all_measures(net, init, x, y, seed=0, groups="norms")
    assert one == M.all_measures(net, init, x, y, seed=0, groups=["norms"])


def test_weights_the_norms_cannot_see_are_named():
    # A conv net's conv weights used to be left out of every product without a word.
    from sensgen.errors import UserError

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    for measure in (M.frobenius_product, M.spectral_product, M.path_norm):
        with pytest.raises(UserError, match=r"Conv2d \('0'\)"):
            measure(conv)
    # Batch norm's scale and shift are not weight matrices: the MLP's norms stand, and its
    # state dict (running statistics included) is a valid init.
    bn = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).eval()
    init = {k: v.clone() for k, v in bn.state_dict().items()}
    with torch.no_grad():
        bn[0].weight.add_(1.0)
    assert M.distance_from_init(bn, init)["frobenius"][0] == pytest.approx(math.sqrt(35))
    assert M.frobenius_sum(bn) > 0
    # Every parameter counts, trainable now or not.
    frozen = MLP(5, 3, width=7, depth=1).requires_grad_(False)
    assert M.n_params(frozen) == (5 + 1) * 7 + (7 + 1) * 3


def test_mlps_with_prelu_or_a_parametrized_linear_keep_their_norms():
    # Only layers with weights of their own are refused, not a PReLU's slopes or a
    # weight-normed Linear's factors.
    torch.manual_seed(0)
    prelu = nn.Sequential(nn.Linear(5, 7), nn.PReLU(), nn.Linear(7, 3))
    normed = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    nn.utils.parametrizations.weight_norm(normed[0])
    for net in (prelu, normed):
        assert M.frobenius_sum(net) > 0 and M.path_norm(net) > 0


def test_the_geometric_means_of_an_older_directory_read_as_now():
    # Directories measured before the fix stored L·(Π‖W_l‖²)^{1/L}/γ²: reading derives the
    # values from the stored mean and margin, so old and new runs rank alike.
    import numpy as np
    import pandas as pd

    from sensgen.results import geometric_normalised

    geometric, gamma = np.array([6.0, 2.5]), np.array([0.5, 2.0])
    old = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "margin": gamma,
            "frobenius_geometric": geometric,
            "frobenius_geometric_normalised": geometric / gamma**2,  # the old definition
            "frobenius_product": [1.0, 2.0],
            "frobenius_product_normalised": [4.0, 0.5],
        }
    )
    new = geometric_normalised(old.copy(), np.array([3, 2]))
    expected = geometric * (1 / gamma**2) ** (1 / np.array([3, 2]))
    np.testing.assert_allclose(new["frobenius_geometric_normalised"], expected, rtol=1e-14)
    assert new["frobenius_product_normalised"].tolist() == [4.0, 0.5]  # product: / γ², as stored
    no_margin = old.drop(columns="margin")
    assert geometric_normalised(no_margin.copy(), np.array([3, 2])).equals(no_margin)
