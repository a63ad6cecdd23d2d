"""Adam and RMSprop on θ in place by the fused kernel (`sensgen.fused_update`): the same step
as the direction form, stopped models untouched, and an a-priori step bound that holds and
is attained."""

import math

import pytest
import torch

from sensgen import optim
from sensgen.divergence import apply_update
from sensgen.fused_update import FUSED_UPDATES, step_bound
from sensgen.optim import OPTIMIZERS, OptimizerName

M = 3
FUSED = [OptimizerName.ADAM, OptimizerName.RMSPROP]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # The first layer of a minibatch pack is stored transposed (`minibatch_layout`); a
    # bias of 7 elements is not a multiple of the kernel's vector.
    w0 = torch.randn(M, 6, 5, generator=g, dtype=dtype).transpose(1, 2).contiguous()
    return {
        "w0": w0.transpose(1, 2),
        "w": torch.randn(M, 7, 4, generator=g, dtype=dtype),
        "b": torch.randn(M, 7, generator=g, dtype=dtype),
    }


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(v) for k, v in params.items()}


@pytest.mark.parametrize("optimizer", FUSED)
def test_the_in_place_step_is_the_direction_form_and_leaves_stopped_models_alone(optimizer):
    # Three models with their own learning rates (two equal: one kernel call for both),
    # model 2 stopped after step 3: its θ, m and v stay exactly as they were.
    fused, form = FUSED_UPDATES[optimizer], OPTIMIZERS[optimizer]
    params = _params(torch.float64)
    by_direction = {k: v.clone() for k, v in params.items()}
    in_place = {k: v.clone() for k, v in params.items()}
    grads = {k: torch.empty_like(v) for k, v in params.items()}
    state_a, state_b = form.init(by_direction), form.init(in_place)
    slices = fused.per_model(in_place, grads, state_b)
    assert fused.available(in_place, grads, state_b)
    lr = torch.tensor([1e-2, 1e-2, 3e-2], dtype=torch.float64)
    steps = torch.zeros(M, dtype=torch.int64)
    active = torch.ones(M, dtype=torch.bool)
    for step in range(6):
        if step == 4:
            active[2] = False
            frozen = [{k: v[2].clone() for k, v in d.items()} for d in _held(in_place, state_b)]
        rate = torch.where(active, lr, 0.0)
        for k, g in _grads(params, seed=step).items():
            grads[k].copy_(g)
        u, s = form.direction({k: g.clone() for k, g in grads.items()}, state_a, rate, steps)
        apply_update(by_direction, u, s)
        t = fused.step_count(step)  # the models still training have taken every step
        fused.apply(slices, rate.tolist(), t, active.nonzero().flatten().tolist())
        steps += active.long()
    for k in params:
        torch.testing.assert_close(in_place[k][:2], by_direction[k][:2], rtol=1e-13, atol=1e-15)
    for held, then in zip(_held(in_place, state_b), frozen, strict=True):
        assert all(torch.equal(held[k][2], then[k]) for k in params)  # θ, m (Adam) and v


def _held(params, state):
    """θ and the optimiser's own state (m and v for Adam, v for RMSprop; no scratch)."""
    return [params] + [state[name] for name in ("m", "v") if name in state]


@pytest.mark.parametrize("optimizer", FUSED)
def test_the_kernel_takes_only_tensors_laid_out_alike(optimizer):
    fused, form = FUSED_UPDATES[optimizer], OPTIMIZERS[optimizer]
    params = _params(torch.float32)
    grads = {k: torch.empty_like(v) for k, v in params.items()}
    assert fused.available(params, grads, form.init(params))
    plain = {**params, "w0": params["w0"].contiguous()}  # θ₀ not stored as its gradient is
    assert not fused.available(plain, grads, form.init(params))


def _adam_steps(gradients, beta1, beta2, eps, bias_corrected=True):
    """|u_t| of one scalar parameter over a gradient sequence, in float64, by the kernel."""
    fused = FUSED_UPDATES[OptimizerName.ADAM]
    fused = type(fused)(beta1, beta2, eps, "m", None if bias_corrected else 2.0**24)
    theta, g, m, v = (torch.zeros(1, 1, dtype=torch.float64) for _ in range(4))
    slices = [([theta[0]], [g[0]], [m[0]], [v[0]])]
    out = []
    for t, value in enumerate(gradients, start=1):
        g.fill_(value)
        before = theta.clone()
        fused.apply(slices, [1.0], fused.step_count(t - 1), [0])
        out.append(float((before - theta).abs()))
    return out


def test_adam_s_step_bound_holds_and_is_attained():
    beta1, beta2 = optim.ADAM_BETAS
    assert step_bound(beta1, beta2, 1) == 1.0  # u = g/(|g| + ε)
    limit = (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1**2 / beta2))
    assert step_bound(beta1, beta2, 10**6) == pytest.approx(limit) and 7.2 < limit < 7.3
    # Gradients growing as (β₂/β₁)ᵏ make Cauchy–Schwarz an equality: the bound is reached.
    growing = [(beta2 / beta1) ** k for k in range(60)]
    steps = _adam_steps(growing, beta1, beta2, eps=0.0)
    for t, u in enumerate(steps, start=1):
        assert u <= step_bound(beta1, beta2, t) * (1 + 1e-12)
    assert steps[-1] == pytest.approx(step_bound(beta1, beta2, 60), rel=1e-9)
    # Random, sign-flipping, bursty and vanishing gradients stay within it too.
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-20, 1.0, 1e20):
        noise = (torch.randn(300, generator=gen, dtype=torch.float64) * scale).tolist()
        bursty = [scale * (1e3 if k % 37 == 0 else 1e-3) for k in range(300)]
        for gradients in (noise, bursty):
            for t, u in enumerate(_adam_steps(gradients, beta1, beta2, optim.ADAM_EPS), 1):
                assert u <= step_bound(beta1, beta2, t) * (1 + 1e-12)


def test_rmsprop_s_step_bound_is_one_over_root_one_minus_alpha():
    # RMSprop is the kernel with β₁ = 0 at t = 2²⁴ (`optim`): u = g/(√v + ε) ≤ 1/√(1 − α),
    # reached by a gradient after zeros.
    alpha = optim.RMSPROP_ALPHA
    fused = FUSED_UPDATES[OptimizerName.RMSPROP]
    assert fused.step_bound(fused.step_count(5)) == pytest.approx(10.0)
    eps = optim.RMSPROP_EPS  # (0/0 for the zero gradients without it)
    steps = _adam_steps([0.0] * 5 + [1.0, 1e-3], 0.0, alpha, eps, bias_corrected=False)
    assert steps[5] == pytest.approx(1 / math.sqrt(1 - alpha), rel=1e-6)
    assert max(steps) <= 10.0 * (1 + 1e-12)


def test_no_bound_without_beta1_squared_below_beta2():
    with pytest.raises(ValueError, match="β₁² < β₂"):
        step_bound(0.99, 0.9, 10)


def _within(optimizer, grad, moment, lr, t=1.0):
    fused = FUSED_UPDATES[optimizer]
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    within, next_moment = fused.within_bound(f64(grad), f64(moment), f64(lr), t, torch.float32)
    return bool(within), float(next_moment)


def test_the_bound_is_used_only_where_nothing_overflows_on_the_way():
    # The kernel forms (η/(1−β₁ᵗ))·m before dividing by √v̂ + ε, and m holds past
    # gradients: cases where the true step η·|u| is small but the kernel overflows.
    adam, rmsprop = OptimizerName.ADAM, OptimizerName.RMSPROP
    assert _within(adam, 1.0, 0.0, 1e-3) == (True, pytest.approx(0.1))
    assert _within(adam, 1.0, 2.0, 1e-3) == (True, pytest.approx(1.9))  # 0.9·2 + 0.1·1
    assert _within(rmsprop, 3.0, 0.0, 1e-3) == (True, 3.0)  # RMSprop's m is g
    assert not _within(adam, 1e10, 0.0, 1e30)[0]  # (η/0.1)·0.1·1e10 = 1e40
    assert not _within(adam, 0.0, 0.0, 3.5e37)[0]  # η/(1−β₁) = 3.5e38: inf in float32
    assert not _within(adam, 8e37, 0.0, 5.0)[0]  # a gradient within the limit, but 50·8e36
    assert not _within(adam, 1.0, 3.4e38, 1e-3)[0]  # m from an at-risk step: g − m overflows
    assert not _within(rmsprop, 1e35, 0.0, 1e5)[0]  # η·g = 1e40
    assert not _within(adam, 1e10, 0.0, -1e30)[0]  # a negative η overflows alike
    assert _within(rmsprop, 1.0, math.inf, 1e-3)[0]  # RMSprop's m has no history
    for bad in (math.inf, math.nan):
        assert not _within(adam, bad, 0.0, 1e-3)[0]
        assert not _within(adam, 1.0, bad, 1e-3)[0]
        assert not _within(adam, 1.0, 0.0, bad)[0]


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("optimizer", FUSED)
@pytest.mark.parametrize("batch_size", [16, None], ids=["minibatch", "full batch"])
def test_huge_learning_rates_diverge_with_their_last_finite_parameters(optimizer, batch_size, sign):
    # Inputs of 1e4 and learning rates of ±1e35 and ±1e36 (`train_pack` takes any sign):
    # the kernel's step size times m overflows at the first step although |η|·|u| ≤ |η|·C
    # is below float32's largest value.
    # The guard must see it coming: those models diverge at once, keeping their initial
    # parameters, and the healthy one trains on as alone; no live θ is ever non-finite.
    from sensgen.models import Nonlinearity
    from sensgen.train import Member, PackShape, _PackRun, init_pack, train_pack

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 8, generator=gen) * 1e4
    y = torch.randint(0, 3, (1, 64), generator=gen).repeat(3, 1)
    shape = PackShape(8, 3, 16, 1, Nonlinearity.RELU, optimizer, batch_size, 3, 3, False)
    lrs = [1e-3, sign * 1e35, sign * 1e36]
    members = [Member(seed=i, lr=lr, init_scale=1.0) for i, lr in enumerate(lrs)]
    _, params = init_pack(shape, members)
    initial = {k: v.clone() for k, v in params.items()}
    run = _PackRun(shape, members, params, x, y, None)
    assert run.fused is not None
    for _ in range(3):
        run.step(x)
        assert run.diverged.tolist() == [False, True, True]
        assert all(torch.isfinite(v[0]).all() for v in run.params.values())
    for i in (1, 2):
        assert all(torch.equal(run.last_finite[i][k], initial[k][i]) for k in initial)
    outcome = train_pack(shape, members, x, y)
    assert outcome.diverged.tolist() == [False, True, True]
    assert all(torch.isfinite(v).all() for v in outcome.params.values())


def test_the_bound_on_m_is_carried_from_step_to_step():
    # m holds past gradients: after 40 zero gradients, a constant 5e8 in one weight makes
    # (η/(1−β₁ᵗ))·m grow past float32's range over the next steps (η = 1e30) while each
    # step's own gradient looks harmless. The carried bound on |m| sees it coming: the
    # model is at risk in time and diverges with finite parameters kept; no step leaves
    # it with a non-finite θ unnoticed.
    from sensgen.models import Nonlinearity
    from sensgen.train import Member, PackShape, _PackRun, init_pack

    shape = PackShape(4, 3, 5, 1, Nonlinearity.RELU, OptimizerName.ADAM, None, 100, 100, False)
    members = [Member(seed=0, lr=1e30, init_scale=1.0)]
    _, params = init_pack(shape, members)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 4, generator=gen), torch.randint(0, 3, (1, 8), generator=gen)
    run = _PackRun(shape, members, params, x, y, None)
    for step in range(70):
        for g in run.grads.values():  # the step's gradient, as the backward pass leaves it
            g.zero_()
            g.view(-1)[0] = 0.0 if step < 40 else 5e8
        m = max(float(t.abs().max()) for t in run.state["m"].values())
        assert m <= float(run.moment_bound[0]) * (1 + 1e-6)
        newly, last_finite = run._fused_update(torch.zeros(1))
        if newly is not None:
            break
        assert all(torch.isfinite(v).all() for v in run.params.values()), step
        run.steps += 1
        run.taken += 1
    assert newly is not None and 40 < step < 70
    assert all(torch.isfinite(v).all() for v in last_finite[0].values())


def test_the_bound_on_m_follows_its_models_through_compaction():
    # After steps on real data, each model's carried bound holds its own m; when a model
    # leaves the pack, the others keep their bounds (and their m), in order.
    from sensgen.models import Nonlinearity
    from sensgen.train import Member, PackShape, _PackRun, init_pack

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (1, 40), generator=gen)
    shape = PackShape(6, 3, 5, 1, Nonlinearity.RELU, OptimizerName.ADAM, 8, 20, 20, False)
    members = [Member(seed=i, lr=10.0 ** -(i + 1), init_scale=1.0) for i in range(3)]
    _, params = init_pack(shape, members)
    run = _PackRun(shape, members, params, x, y.repeat(3, 1), None)

    def largest_m():
        return torch.stack([m.flatten(1).abs().amax(1) for m in run.state["m"].values()])

    for _ in range(6):
        run.step(x)
        assert (largest_m().amax(0).double() <= run.moment_bound * (1 + 1e-6)).all()
    kept = run.moment_bound[[0, 2]].clone()
    run.stop(torch.tensor([False, True, False]))
    run.compact()
    assert torch.equal(run.moment_bound, kept) and run.lr.tolist() == [1e-1, 1e-3]
    run.step(x)
    assert (largest_m().amax(0).double() <= run.moment_bound * (1 + 1e-6)).all()
