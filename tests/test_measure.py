"""Per-model measurements: the fixed training subset, the ellipses, exact vs sampled counts."""

from __future__ import annotations

import math

import pytest
import torch

from sensgen import measure
from sensgen.data import Dataset
from sensgen.errors import UserError
from sensgen.measure import (
    MEASURE_SEED,
    ellipse_anchor_indices,
    ellipse_transition_counts,
    measure_model,
    train_point_indices,
)
from sensgen.metrics import ellipse, ellipse_transitions_exact, jacobian_norm, transitions
from sensgen.models import MLP
from sensgen.study import Measurements

D, CLASSES = 12, 5
PIECEWISE = ["relu", "relu6", "hard_tanh", "hard_sigmoid"]
SMOOTH = ["tanh", "sigmoid", "elu"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(nonlinearity: str = "relu", *, seed: int = 0, width: int = 24, depth: int = 2) -> MLP:
    # init_scale 4 with random biases: many units switch along an ellipse
    net = MLP(D, CLASSES, width, depth, nonlinearity, init_scale=4.0, generator=_gen(seed))
    with torch.no_grad():
        for layer in net.layers:
            layer.bias.normal_(0.0, 0.5, generator=_gen(seed + 100))
    return net


def _test_set(n: int = 90, *, seed: int = 1) -> Dataset:
    labels = torch.arange(n) % CLASSES
    labels[: n // 3] = 0  # imbalanced: class 0 holds over a third of the points
    x = torch.randn(n, D, generator=_gen(seed))
    return Dataset("toy", "test", x, labels, CLASSES, (3, 2, 2))


X_TRAIN = torch.randn(200, D, generator=_gen(2))
TEST = _test_set()


def _config(train: int = 0, ellipses: int = 0, sides: int = 60) -> Measurements:
    return Measurements(
        jacobian_train_points=train, transition_ellipses=ellipses, transition_sides=sides
    )


def _measure(net: MLP, config: Measurements, **kwargs) -> dict[str, float]:
    kwargs = {"x_train": X_TRAIN, "test": TEST, "seed": MEASURE_SEED, **kwargs}
    return measure_model(net, config=config, **kwargs)


def _vertices(rows: torch.Tensor, sides: int) -> list[torch.Tensor]:
    """The polygon vertices z(2πi/sides) of each ellipse, built by hand in float64."""
    anchors = TEST.x[rows].double()  # [n, 3, D]
    return [ellipse(x1, x2, x3, n_points=sides) for x1, x2, x3 in anchors]


# -- jacobian_norm_train -------------------------------------------------------------------


def test_train_points_are_a_seeded_permutation_prefix() -> None:
    idx = train_point_indices(200, 50, seed=MEASURE_SEED)
    assert idx.shape == (50,) and idx.dtype == torch.int64
    assert len(set(idx.tolist())) == 50 and idx.min() >= 0 and idx.max() < 200
    assert torch.equal(idx, train_point_indices(200, 50, seed=MEASURE_SEED))  # deterministic
    assert torch.equal(train_point_indices(200, 10, seed=MEASURE_SEED), idx[:10])  # a prefix
    assert not torch.equal(train_point_indices(200, 50, seed=MEASURE_SEED + 1), idx)
    assert sorted(train_point_indices(7, 50, seed=MEASURE_SEED).tolist()) == list(range(7))


def test_jacobian_norm_train_is_the_mean_norm_on_the_fixed_subset() -> None:
    net = _net()
    subset = X_TRAIN[train_point_indices(len(X_TRAIN), 50, seed=MEASURE_SEED)]  # [50, D]
    expected = jacobian_norm(net, subset).mean().item()
    got = _measure(net, _config(train=50))
    assert got == {"jacobian_norm_train": pytest.approx(expected, rel=1e-12, abs=0)}
    everything = jacobian_norm(net, X_TRAIN).mean().item()
    assert _measure(net, _config(train=10_000))["jacobian_norm_train"] == pytest.approx(
        everything, rel=1e-12, abs=0
    )  # all points when fewer than asked


def test_every_model_of_a_dataset_is_measured_on_the_same_training_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[torch.Tensor] = []

    def spy(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return jacobian_norm(model, x)

    monkeypatch.setattr(measure, "jacobian_norm", spy)
    models = [_net(seed=3), _net("hard_tanh", seed=11, width=40, depth=3)]  # other runs
    values = [_measure(net, _config(train=30))["jacobian_norm_train"] for net in models]
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert values[0] != values[1]


def test_jacobian_norm_train_is_finite_at_confident_points() -> None:
    # Huge logits: p_y rounds to 1 in float32, the float32-cancellation pitfall (paper §2.1).
    net = _net(seed=4)
    with torch.no_grad():
        net.layers[-1].weight.mul_(1e3)
    value = _measure(net, _config(train=200))["jacobian_norm_train"]
    assert math.isfinite(value) and value >= 0


# -- ellipse anchors -----------------------------------------------------------------------


def test_anchor_indices_are_three_classes_in_range_and_deterministic() -> None:
    rows = ellipse_anchor_indices(TEST.y, 500, seed=MEASURE_SEED)
    assert rows.shape == (500, 3) and rows.dtype == torch.int64
    assert rows.min() >= 0 and rows.max() < len(TEST)
    classes = TEST.y[rows]  # [500, 3]
    assert (classes[:, 0] != classes[:, 1]).all() and (classes[:, 1] != classes[:, 2]).all()
    assert (classes[:, 0] != classes[:, 2]).all()
    assert set(classes.flatten().tolist()) == set(range(CLASSES))
    counts = torch.bincount(classes.flatten(), minlength=CLASSES)
    assert counts.min() > 0.8 * counts.float().mean()  # classes equally likely, not points
    assert torch.equal(rows, ellipse_anchor_indices(TEST.y, 500, seed=MEASURE_SEED))
    assert torch.equal(rows[:7], ellipse_anchor_indices(TEST.y, 7, seed=MEASURE_SEED))
    assert not torch.equal(rows, ellipse_anchor_indices(TEST.y, 500, seed=MEASURE_SEED + 1))


def test_anchor_indices_edge_cases() -> None:
    assert ellipse_anchor_indices(TEST.y, 0, seed=0).shape == (0, 3)
    assert ellipse_anchor_indices(torch.tensor([0, 1, 0, 1]), 0, seed=0).shape == (0, 3)
    three = ellipse_anchor_indices(torch.tensor([4, 2, 9]), 5, seed=0)
    assert (three.sort(dim=1).values == torch.arange(3)).all()
    with pytest.raises(UserError, match="three classes"):
        ellipse_anchor_indices(torch.tensor([0, 1, 1, 0]), 1, seed=0)


# -- transitions on ellipses ---------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", PIECEWISE)
def test_exact_bounds_sampled_on_every_ellipse(nonlinearity: str) -> None:
    rows = ellipse_anchor_indices(TEST.y, 6, seed=MEASURE_SEED)
    scale = 3.0 if nonlinearity == "hard_sigmoid" else 1.0  # its kinks are at ±3
    for sides in (6, 600):
        counts = ellipse_transition_counts(_net(nonlinearity), scale * TEST.x[rows], sides=sides)
        assert set(counts) == {"transitions", "transitions_sampled"}
        exact, sampled = counts["transitions"], counts["transitions_sampled"]
        assert exact.shape == sampled.shape == (6,)
        assert (sampled <= exact).all() and (exact > 0).all()
        if sides == 6:  # a coarse polygon undercounts: the bound is not vacuous
            assert (sampled < exact).any()


@pytest.mark.parametrize("nonlinearity", ["relu", "hard_tanh"])
def test_counts_equal_the_metrics_on_the_same_vertices_by_hand(nonlinearity: str) -> None:
    net, sides = _net(nonlinearity), 120
    rows = ellipse_anchor_indices(TEST.y, 3, seed=MEASURE_SEED)
    counts = ellipse_transition_counts(net, TEST.x[rows], sides=sides)
    net64 = _net(nonlinearity).double()
    for i, vertices in enumerate(_vertices(rows, sides)):
        x1, x2, x3 = TEST.x[rows[i]]
        by_polygon = ellipse_transitions_exact(net, x1, x2, x3, start_sides=sides, max_sides=sides)
        assert by_polygon == (counts["transitions"][i].item(), sides)
        assert transitions(net, vertices, method="exact") == counts["transitions"][i]
        sampled = transitions(net64, vertices, method="sampled")
        assert sampled == counts["transitions_sampled"][i]
    out = _measure(net, _config(ellipses=3, sides=sides))
    assert out == {
        "transitions": counts["transitions"].double().mean().item(),
        "transitions_sampled": counts["transitions_sampled"].double().mean().item(),
    }


@pytest.mark.parametrize("nonlinearity", SMOOTH)
def test_a_smooth_net_yields_the_sign_code_count_only(nonlinearity: str) -> None:
    net, sides = _net(nonlinearity), 90
    out = _measure(net, _config(train=20, ellipses=4, sides=sides))
    assert set(out) == {"jacobian_norm_train", "transitions_sign"}
    rows = ellipse_anchor_indices(TEST.y, 4, seed=MEASURE_SEED)
    net64 = _net(nonlinearity).double()
    by_hand = [transitions(net64, v, method="sampled") for v in _vertices(rows, sides)]
    assert out["transitions_sign"] == sum(by_hand) / 4 > 0
    with pytest.raises(UserError, match="piecewise-linear"):  # why it is sign-only
        transitions(net64, _vertices(rows, sides)[0], method="exact")


def test_every_model_of_a_dataset_sees_the_same_ellipses(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    real = measure.ellipse_transition_counts

    def spy(net: MLP, anchors: torch.Tensor, *, sides: int) -> dict[str, torch.Tensor]:
        seen.append(anchors.clone())
        return real(net, anchors, sides=sides)

    monkeypatch.setattr(measure, "ellipse_transition_counts", spy)
    for net in (_net(seed=5), _net("tanh", seed=6, width=8)):
        _measure(net, _config(ellipses=4, sides=24))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert seen[0].shape == (4, 3, D)


# -- the config decides the keys -----------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "ellipses", "keys"),
    [
        (0, 0, set()),
        (5, 0, {"jacobian_norm_train"}),
        (0, 2, {"transitions", "transitions_sampled"}),
        (5, 2, {"jacobian_norm_train", "transitions", "transitions_sampled"}),
    ],
)
def test_only_the_configured_keys_are_returned(train: int, ellipses: int, keys: set) -> None:
    out = _measure(_net(), _config(train=train, ellipses=ellipses, sides=24))
    assert set(out) == keys
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())


def test_measurement_is_deterministic_and_leaves_the_model_alone() -> None:
    net = _net("relu6")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    config = _config(train=40, ellipses=3, sides=48)
    assert _measure(net, config) == _measure(net, config)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert next(net.parameters()).dtype == torch.float32


@pytest.mark.parametrize(("nonlinearity", "keys"), [("relu", 3), ("tanh", 2)])
def test_a_non_finite_model_gets_nan_for_every_key(nonlinearity: str, keys: int) -> None:
    net = _net(nonlinearity)
    with torch.no_grad():
        net.layers[1].weight[0, 0] = float("nan")
    out = _measure(net, _config(train=5, ellipses=2, sides=24))
    assert len(out) == keys and all(math.isnan(v) for v in out.values())


def test_x_train_must_match_the_test_inputs() -> None:
    with pytest.raises(ValueError, match=r"x_train must be \[N, 12\]"):
        _measure(_net(), _config(train=5), x_train=torch.zeros(4, 7))
