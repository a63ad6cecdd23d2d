"""The in-place update and its divergence guard: exact updates, copies only when at risk."""

import pytest
import torch

from sensgen.batches import Augmenter
from sensgen.data import Augmentation
from sensgen.divergence import DivergenceGuard, apply_update, is_finite, norms, safe_bound
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.train import Member, PackShape, _PackRun, init_pack

M = 4
NAN, INF = float("nan"), float("inf")


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(M, 5, 3, generator=gen), "b": torch.randn(M, 5, generator=gen)}


def _all(value: bool) -> torch.Tensor:
    return torch.full((M,), value)


def _update(guard, params, direction, scale, losses=None, active=None, live=None):
    losses = torch.zeros(M) if losses is None else losses
    active = _all(True) if active is None else active
    live = active if live is None else live
    return guard.update(params, direction, scale, losses, active, live)


def test_norms_bound_every_value_and_flag_non_finite_ones():
    params = _params()
    largest = torch.stack([v.flatten(1).abs().amax(1) for v in params.values()]).amax(0)
    assert (norms(params) >= largest.double()).all()
    params["w"][1, 0, 0] = NAN
    params["b"][2, 4] = -INF
    params["w"][3, 2, 2] = 1e20  # finite, but its square overflows: not a usable bound
    assert torch.isfinite(norms(params)).tolist() == [True, False, False, False]
    assert [is_finite(params, i) for i in range(M)] == [True, False, False, True]


def test_norms_read_a_transposed_layout_as_its_values():
    # The first layer of a minibatch pack is stored as [M, n_in, n_out] (`minibatch_layout`).
    params = _params()
    laid_out = {k: v.transpose(1, -1).contiguous().transpose(1, -1) for k, v in params.items()}
    assert not laid_out["w"].is_contiguous()
    torch.testing.assert_close(norms(laid_out), norms(params), rtol=1e-6, atol=0)


def test_healthy_steps_are_the_plain_update_with_no_copy_and_a_valid_bound():
    params = _params()
    guard = DivergenceGuard(params)
    scale = torch.tensor([0.1, 0.5, 0.0, 2.0], dtype=torch.float64)
    for step in range(20):
        direction = _params(seed=100 + step)
        expected = {
            k: torch.addcmul(p, scale.float().view(-1, *[1] * (p.ndim - 1)), direction[k], value=-1)
            for k, p in params.items()
        }
        newly, last_finite = _update(guard, params, direction, scale)
        assert newly is None and last_finite == {}
        for k in params:
            assert torch.equal(params[k], expected[k])  # bit for bit, in place
        largest = torch.stack([v.flatten(1).abs().amax(1) for v in params.values()]).amax(0)
        assert (guard.bound >= largest.double()).all()


def test_an_in_place_update_is_checked_only_where_its_bound_is_unknown():
    # `update_in_place` (Adam and RMSprop, `fused_update`): the update writes θ itself and
    # the guard gets r ≥ max |u| a priori. Models 0 and 3 have none (inf): both are copied
    # first and checked; model 0's update is NaN, so it diverges with its θ kept; model 3's
    # is finite, so it goes on, its bound b reset from θ, and is reported as checked.
    # Model 1 steps within its bound: no copy, b grows by 2·s·r. Model 2 is stopped
    # (s = 0, left alone by the update).
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    guard = DivergenceGuard(params)
    bound_before = guard.bound.clone()
    scale = torch.tensor([0.1, 0.1, 0.0, 0.5], dtype=torch.float64)
    r = torch.tensor([INF, 1.0, 7.0, INF], dtype=torch.float64)
    active = torch.tensor([True, True, False, True])

    def apply():
        params["w"][0].fill_(NAN)
        for i in (1, 3):  # |u| ≤ 1
            for v in params.values():
                v[i] -= float(scale[i]) * torch.sign(v[i])

    newly, last_finite, checked = guard.update_in_place(
        params, apply, scale, r, torch.zeros(M), active, _all(True)
    )
    assert newly.tolist() == [True, False, False, False]
    assert list(last_finite) == [0] and checked == [3]
    assert all(torch.equal(last_finite[0][k], before[k][0]) for k in params)
    assert all(torch.equal(params[k][2], before[k][2]) for k in params)
    assert (guard.bound - bound_before)[1:3].tolist() == pytest.approx([2 * 0.1 * 1.0, 0.0])
    assert guard.bound[3] == 2 * norms({k: v[3:4] for k, v in params.items()})[0]


def test_a_non_finite_direction_diverges_and_keeps_the_parameters_before_the_step():
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    guard = DivergenceGuard(params)
    direction = _params(seed=1)
    direction["w"][1, 2, 1] = NAN
    scale = torch.full((M,), 0.1, dtype=torch.float64)
    newly, last_finite = _update(guard, params, direction, scale)
    assert newly.tolist() == [False, True, False, False]
    assert set(last_finite) == {1}
    for k in params:
        assert torch.equal(last_finite[1][k], before[k][1])
        others = [0, 2, 3]
        lr = scale.float()[others].view(-1, *[1] * (params[k].ndim - 1))
        expected = torch.addcmul(before[k][others], lr, direction[k][others], value=-1)
        assert torch.equal(params[k][others], expected)


def test_a_non_finite_loss_diverges_even_when_the_update_is_finite():
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    guard = DivergenceGuard(params)
    losses = torch.tensor([0.0, 0.0, INF, 0.0])
    newly, last_finite = _update(guard, params, _params(1), torch.ones(M), losses=losses)
    assert newly.tolist() == [False, False, True, False]
    assert all(torch.equal(last_finite[2][k], before[k][2]) for k in params)


def test_an_overflowing_update_of_finite_values_diverges():
    params = _params()
    params["w"][0, 0, 0] = 3e38
    before = params["w"][0].clone()
    guard = DivergenceGuard(params)  # its bound is already inf: model 0 is at risk
    direction = {k: torch.zeros_like(v) for k, v in params.items()}
    direction["w"][0, 0, 0] = -1e38  # θ' = 3e38 + 1e38 overflows to inf
    newly, last_finite = _update(guard, params, direction, torch.ones(M))
    assert newly.tolist() == [True, False, False, False]
    assert torch.equal(last_finite[0]["w"], before)


def test_a_huge_but_finite_step_is_checked_and_goes_on():
    # u's norm overflows (1e20² > float32's max), so the bound says nothing: the model is
    # copied and checked exactly; θ' is finite, so it trains on with a fresh bound.
    params = _params()
    guard = DivergenceGuard(params)
    direction = {k: torch.zeros_like(v) for k, v in params.items()}
    direction["w"][2, 1, 1] = 1e20
    scale = torch.full((M,), 1e-10, dtype=torch.float64)
    newly, last_finite = _update(guard, params, direction, scale)
    assert newly is None and last_finite == {}
    assert params["w"][2, 1, 1].abs() > 9e9
    assert torch.isfinite(guard.bound).all() and guard.bound[2] >= 9e9


def test_a_bound_near_overflow_forces_the_exact_check(monkeypatch):
    params = _params()
    guard = DivergenceGuard(params)
    guard.bound[3] = safe_bound(torch.float32)
    checked = []
    monkeypatch.setattr(
        "sensgen.divergence.is_finite", lambda p, i: checked.append(i) or is_finite(p, i)
    )
    newly, _ = _update(guard, params, _params(1), torch.ones(M))
    assert newly is None and checked == [3]
    assert guard.bound[3] < 1e3  # reset from the parameters themselves


@pytest.mark.parametrize(
    "scale",
    [1e39, -1e39, -1e30],  # beyond float32 (inf once applied), and negative
)
def test_a_scale_out_of_the_usual_range_is_at_risk_and_checked(scale):
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    guard = DivergenceGuard(params)
    direction = {k: torch.full_like(v, 1e10) for k, v in params.items()}
    direction["w"][2] = 0.0  # with u = 0 too: an inf s times 0 is NaN
    direction["b"][2] = 0.0
    scales = torch.tensor([0.1, scale, scale, 0.1], dtype=torch.float64)
    newly, last_finite = _update(guard, params, direction, scales)
    assert newly.tolist() == [False, True, abs(scale) > 3.5e38, False]
    for i in last_finite:
        assert all(torch.equal(last_finite[i][k], before[k][i]) for k in params)
    assert (guard.bound[[0, 3]] > 0).all()


@pytest.mark.parametrize("bad", [NAN, INF])
def test_stopped_models_keep_their_parameters_and_diverged_ones_are_left_alone(bad):
    # Model 0 stopped (fitted): s = 0 must leave θ as it is, even against a non-finite u.
    # Model 1 diverged earlier: its slice may hold anything, and is neither copied nor fixed.
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    guard = DivergenceGuard(params)
    direction = _params(1)
    direction["b"][0, 0] = bad
    direction["b"][1, 0] = bad
    scale = torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)
    active = torch.tensor([False, False, True, True])
    live = torch.tensor([True, False, True, True])
    newly, last_finite = _update(guard, params, direction, scale, active=active, live=live)
    assert newly is None and last_finite == {}
    assert all(torch.equal(params[k][0], before[k][0]) for k in params)
    assert not is_finite(params, 1)


def test_apply_update_with_zero_scale_is_the_identity():
    params = _params()
    before = {k: v.clone() for k, v in params.items()}
    apply_update(params, _params(1), torch.zeros(M, dtype=torch.float64))
    assert all(torch.equal(params[k], before[k]) for k in params)


@pytest.mark.parametrize("optimizer", [OptimizerName.SGD, OptimizerName.MOMENTUM])
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_the_first_layer_bound_from_the_backward_pass_holds_along_training(optimizer, augment):
    # SGD and momentum minibatches: the guard bounds the first layer's direction by
    # V ← β·V + ‖δ_0‖‖x‖ instead of a pass over it; V must stay ≥ max |u| at every step.
    gen = torch.Generator().manual_seed(0)
    side, n = 4, 64
    x = torch.rand(n, side * side, generator=gen)
    y = torch.randint(0, 3, (3, n), generator=gen)
    aug = Augmentation((1, side, side), 1, True, (-2.0,)) if augment else None
    shape = PackShape(side * side, 3, 8, 2, Nonlinearity.RELU, optimizer, 8, 30, 30, False, aug)
    members = [Member(seed=i, lr=lr, init_scale=1.0, augment=augment) for i, lr in
               enumerate([0.05, 0.5, 3.0])]  # fmt: skip
    _, params = init_pack(shape, members)
    run = _PackRun(shape, members, params, x, y, Augmenter.for_pack(
        aug, [augment] * 3, [m.seed for m in members], x))  # fmt: skip
    assert run._tracks_first_layer()
    for _ in range(30):
        run.step(x)
        direction, _ = run.optimizer.direction(run.grads, run.state, run.lr, run.steps)
        largest = direction["layers.0.weight"].flatten(1).abs().amax(1).double()
        tracked = run.guard.tracked["layers.0.weight"]
        live = ~run.diverged
        # V is an exact float64 sum, u a float32 one: V may fall short by rounding (a
        # relative 1e-7 where Cauchy–Schwarz is tight), which the guard's factor 2 covers.
        assert (tracked[live] * (1 + 1e-6) >= largest[live]).all()
        assert (tracked[live] <= 1e6 * largest[live] + 1e-6).all()  # a bound, not a blanket


def test_full_batch_takes_the_pass_over_every_direction_and_adam_bounds_its_step():
    # Full batch: no bound from the backward pass (a pass over every direction instead).
    # Adam and RMSprop by the fused update: no direction at all, the step's bound is a
    # priori, and only the gradient's size is checked (the first layer's from δ_0).
    x = torch.rand(20, 4)
    y = torch.zeros(1, 20, dtype=torch.long)
    for optimizer, batch, tracks in (
        (OptimizerName.MOMENTUM, None, False),
        (OptimizerName.ADAM, None, False),
        (OptimizerName.ADAM, 4, True),
        (OptimizerName.RMSPROP, 4, True),
    ):
        shape = PackShape(4, 2, 3, 1, Nonlinearity.RELU, optimizer, batch, 2, 2, False)
        members = [Member(seed=0, lr=0.1, init_scale=1.0)]
        _, params = init_pack(shape, members)
        run = _PackRun(shape, members, params, x, y, None)
        run.step(x)
        assert run._tracks_first_layer() == tracks and run.guard.tracked == {}
        assert (run.fused is not None) == (optimizer != OptimizerName.MOMENTUM)


def _extreme_run(optimizer, lrs, layer1, xval=1e30, steps=5):
    # Inputs of 1e30 and first weights of 1/xval: the first layer's gradient δ_0ᵀx can
    # overflow float32 while ‖δ_0‖ is small, or be large while δ_0's squares underflow.
    d = 4
    x = torch.full((2, d), xval)
    y = torch.zeros(len(lrs), 2, dtype=torch.long)
    shape = PackShape(d, 2, 2, 1, Nonlinearity.RELU, optimizer, 2, steps, steps, False)
    members = [Member(seed=i, lr=lr, init_scale=1.0) for i, lr in enumerate(lrs)]
    _, params = init_pack(shape, members)
    params["layers.0.weight"].fill_(1.0 / xval)
    params["layers.0.bias"].zero_()
    params["layers.1.bias"].zero_()
    for i, w in enumerate(layer1):
        params["layers.1.weight"][i] = torch.tensor(w)
    initial = {k: v.clone() for k, v in params.items()}
    return _PackRun(shape, members, params, x, y, None), x, initial


@pytest.mark.parametrize("optimizer", list(OptimizerName))
def test_a_first_layer_gradient_beyond_float32_is_caught_not_bounded(optimizer):
    # V = ‖δ_0‖‖x‖ ≈ 6e40 is finite in float64 while u_0 is inf in float32: the guard must
    # not trust it, even for a small learning rate (and for a stopped model, lr 0). For
    # Adam and RMSprop (`fused_update`) the step's a-priori bound needs a finite gradient
    # below the limit: 6e40 is not, so the model is checked, and diverges (u = inf/inf).
    c = 4e10
    run, x, initial = _extreme_run(optimizer, [1e-5, 0.1], [[[c, 0.0], [0.0, c]]] * 2)
    run.stop(torch.tensor([False, True]))  # model 1 stopped but not diverged: θ must stay
    run.step(x)
    assert run.diverged.tolist() == [True, False]
    assert all(torch.equal(run.last_finite[0][k], initial[k][0]) for k in initial)
    assert all(torch.equal(run.params[k][1], initial[k][1]) for k in initial)


@pytest.mark.parametrize("optimizer", [OptimizerName.SGD, OptimizerName.MOMENTUM])
def test_underflowing_errors_still_bound_the_first_layer_gradient(optimizer):
    # δ_0 ≈ 1e-26 (a margin of 60): its float32 squares vanish, yet δ_0ᵀx ≈ 1e5 for x of
    # 1e30; with lr 1e34 the step overflows, and the guard must see it coming.
    run, x, initial = _extreme_run(optimizer, [1e34], [[[7.5, 7.5], [10.0, -10.0]]])
    run.step(x)
    direction, _ = run.optimizer.direction(run.grads, run.state, run.lr, run.steps)
    assert run.guard.tracked["layers.0.weight"][0] >= direction["layers.0.weight"].abs().max()
    assert run.diverged.tolist() == [True]
    assert all(torch.equal(run.last_finite[0][k], initial[k][0]) for k in initial)
