"""The optimisers' fused and unfused forms agree (issue 8: Adam and RMSprop in one pass), and
momentum's scaled accumulator is momentum."""

import pytest
import torch

from sensgen import optim
from sensgen.optim import OPTIMIZERS, OptimizerName

M = 3


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, 5, 4, generator=g, dtype=dtype)
    # The first layer of a minibatch pack is stored transposed (`minibatch_layout`).
    w0 = torch.randn(M, 6, 5, generator=g, dtype=dtype).transpose(1, 2).contiguous()
    return {"w0": w0.transpose(1, 2), "w": w, "b": torch.randn(M, 5, generator=g, dtype=dtype)}


def _grads(params, seed):
    """Random gradients, laid out as their parameters (as `train` allocates them)."""
    g = torch.Generator().manual_seed(seed)
    values = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    return {k: torch.empty_like(params[k]).copy_(v) for k, v in values.items()}


FORMS = {  # fused, unfused
    OptimizerName.ADAM: (optim._fused_adam_direction, optim._adam_direction_unfused),
    OptimizerName.RMSPROP: (optim._fused_rmsprop_direction, optim._rmsprop_direction_unfused),
}


def _steps(direction, dtype, n_steps=6, buffer_fill=0.0, optimizer=OptimizerName.ADAM):
    """Each step's s·u [M, ...] per tensor, from `direction` on a fresh optimiser state."""
    params = _params(dtype)
    state = OPTIMIZERS[optimizer].init(params)
    for buf in state["buf"].values():
        buf.fill_(buffer_fill)
    lr = torch.tensor([1e-3, 3e-2, 0.0], dtype=torch.float64)
    updates = []
    for t in range(n_steps):
        u, s = direction(_grads(params, seed=t + 1), state, lr, torch.full((M,), t))
        updates.append({k: optim.per_model(s, v) * v for k, v in u.items()})
    return updates


@pytest.mark.parametrize("optimizer", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_step_equals_the_unfused_form(dtype, optimizer):
    tol = {torch.float32: 1e-5, torch.float64: 1e-14}[dtype]  # a few roundings apart
    fused_form, unfused_form = FORMS[optimizer]
    fused = _steps(fused_form, dtype, optimizer=optimizer)
    plain = _steps(unfused_form, dtype, optimizer=optimizer)
    for a, b in zip(fused, plain, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol * 1e-3)
    # A real step: η = 3e-2 and |m̂/√v̂| = 1 (Adam), |g|/√((1−α)g²) = 10 (RMSprop).
    assert (plain[0]["w"][1].abs() > 1e-2).all()


def test_rmsprop_by_the_fused_kernel_is_torch_s_rmsprop():
    # The kernel's bias corrections at t = 2²⁴ are exactly 1 (optim.NO_BIAS_CORRECTION_STEP).
    params = _params(torch.float64)
    state = OPTIMIZERS[OptimizerName.RMSPROP].init(params)
    lr = torch.full((M,), 1e-2, dtype=torch.float64)
    copies = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    reference = torch.optim.RMSprop(list(copies.values()), lr=1e-2)
    for t in range(5):
        grads = _grads(params, seed=t + 1)
        u, s = optim._fused_rmsprop_direction(grads, state, lr, torch.full((M,), t))
        for k in params:
            params[k] = params[k] - optim.per_model(s, u[k]) * u[k]
            copies[k].grad = grads[k].clone()
        reference.step()
    for k in params:
        torch.testing.assert_close(params[k], copies[k].detach(), rtol=1e-14, atol=1e-15)


def test_fused_rmsprop_at_the_edges_of_float32_is_torch_s_rmsprop():
    # Gradients whose squares overflow (v = inf: step 0), flip sign near FLT_MAX, underflow
    # or are exactly 0: element by element the step torch.optim.RMSprop takes.
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    lr = torch.full((1,), 1e-2, dtype=torch.float64)
    w = torch.zeros(1, 6)
    state = OPTIMIZERS[OptimizerName.RMSPROP].init({"w": w})
    ref = w.clone().requires_grad_()
    reference = torch.optim.RMSprop([ref], lr=1e-2)
    for t in range(4):
        g = torch.tensor([[3e38, 1e20, 1e-30, 0.0, 0.5, -2.0]]) * signs**t
        grads = {"w": g.clone()}
        u, s = optim._fused_rmsprop_direction(grads, state, lr, torch.full((1,), t))
        assert torch.equal(grads["w"], g)  # the gradient, written back over itself
        w = w - optim.per_model(s, u["w"]) * u["w"]
        ref.grad = g.clone()
        reference.step()
        torch.testing.assert_close(w, ref.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("optimizer", list(FORMS))
def test_the_fused_step_overwrites_whatever_its_buffer_held(optimizer):
    fused_form, _ = FORMS[optimizer]
    zero = _steps(fused_form, torch.float64, optimizer=optimizer)
    junk = _steps(fused_form, torch.float64, buffer_fill=123.0, optimizer=optimizer)
    for a, b in zip(zero, junk, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_fused_adam_takes_the_step_count_of_the_models_still_training():
    # Model 2 stopped at step 3 (lr 0 since); the others are at step 7: their bias
    # corrections use t = 8, as in the unfused form.
    params = _params(torch.float64)
    grads = _grads(params, seed=1)
    lr = torch.tensor([1e-3, 2e-3, 0.0], dtype=torch.float64)
    steps = torch.tensor([7, 7, 3])
    results = []
    for direction in (optim._fused_adam_direction, optim._adam_direction_unfused):
        state = OPTIMIZERS[OptimizerName.ADAM].init(params)
        u, s = direction(grads, state, lr, steps)
        results.append({k: optim.per_model(s, v) * v for k, v in u.items()})
    for k in params:
        torch.testing.assert_close(results[0][k][:2], results[1][k][:2], rtol=1e-14, atol=0)
        assert (results[0][k][2] == 0).all()  # lr 0: no step


def test_fused_adam_only_takes_tensors_laid_out_alike():
    params = _params(torch.float32)
    state = OPTIMIZERS[OptimizerName.ADAM].init(params)
    grads = _grads(params, seed=1)
    assert optim.fused_adam_available(grads, state)
    mixed = {**grads, "w0": grads["w0"].contiguous()}  # W₀'s gradient, not transposed
    assert not optim.fused_adam_available(mixed, state)
    strided = {**grads, "w": torch.randn(M, 5, 8)[:, :, ::2]}  # a view with gaps
    sliced_state = {**state, "m": {**state["m"], "w": torch.zeros(M, 5, 8)[:, :, ::2]}}
    sliced_state["v"] = {**state["v"], "w": torch.zeros(M, 5, 8)[:, :, ::2]}
    sliced_state["buf"] = {**state["buf"], "w": torch.zeros(M, 5, 8)[:, :, ::2]}
    assert not optim.fused_adam_available(strided, sliced_state)
    # Mixed layouts go the unfused way, which reads each element where it is.
    u, s = OPTIMIZERS[OptimizerName.ADAM].direction(mixed, state, torch.ones(M), torch.zeros(M))
    expected = -torch.sign(mixed["w0"])  # the first step is −sign(g) (m̂ = g, √v̂ = |g|)
    torch.testing.assert_close(optim.per_model(-s, u["w0"]) * u["w0"], expected)


def test_adam_falls_back_to_the_unfused_form_without_the_fused_kernel(monkeypatch):
    params = _params(torch.float32)
    state = OPTIMIZERS[OptimizerName.ADAM].init(params)
    assert optim.fused_adam_available(_grads(params, seed=1), state)
    monkeypatch.delattr(torch, "_fused_adamw_")
    assert not optim.fused_adam_available(_grads(params, seed=1), state)
    fallback = _steps(OPTIMIZERS[OptimizerName.ADAM].direction, torch.float32)
    plain = _steps(optim._adam_direction_unfused, torch.float32)
    for a, b in zip(fallback, plain, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_momentum_s_scaled_accumulator_is_v_from_mu_v_plus_g():
    # z ← z + g/c_k, direction c_k·z, renormalised every K steps: v ← μv + g for 3K + 5
    # steps, and |z| ≤ |v| (no earlier overflow). Model 2 stops at step 20: from then on
    # its count stands still and its z is left alone.
    momentum = OPTIMIZERS[OptimizerName.MOMENTUM]
    period, mu = optim.RESCALE_PERIOD, optim.MOMENTUM
    params = _params(torch.float64)
    state = momentum.init(params)
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    steps = torch.zeros(M, dtype=torch.int64)
    active = torch.ones(M, dtype=torch.bool)
    lr = torch.tensor([0.1, 1.0, 2.0], dtype=torch.float64)
    for step in range(3 * period + 5):
        if step == 20:
            active[2] = False
        grads = _grads(params, seed=step)
        gain = momentum.gain(steps)
        assert (gain <= 1.0).all() and (gain >= mu ** (period - 1) * (1 - 1e-12)).all()
        for k, z in state["v"].items():
            z.add_(grads[k] * optim.per_model(gain, z))  # what the backward pass does
            v[k] = torch.where(active.view(-1, *[1] * (z.ndim - 1)), mu * v[k] + grads[k], v[k])
        u, s = momentum.direction(None, state, lr, steps)
        for k in v:  # the step the update takes, s·u, is η·v
            torch.testing.assert_close(
                (u[k] * optim.per_model(s, u[k]))[:2], (v[k] * optim.per_model(lr, v[k]))[:2],
                rtol=1e-12, atol=1e-14,
            )  # fmt: skip
            assert (u[k][:2].abs() <= v[k][:2].abs() * (1 + 1e-12) + 1e-300).all()
        stopped_z = {k: z[2].clone() for k, z in state["v"].items()}
        factor = momentum.renormalise(state, steps, active, step)
        if step % period == period - 1:
            assert factor.tolist() == [mu**period, mu**period, 1.0 if step > 20 else mu**period]
        else:
            assert factor is None
        if step > 20:
            assert all(torch.equal(z[2], stopped_z[k]) for k, z in state["v"].items())
        steps += active.long()


def test_the_scaled_accumulator_s_tables_are_its_powers():
    # scale and gain are looked up per step (`ScaledAccumulator._table`): the values of
    # c_k = μ^(k mod K + 1 − K) computed at each step, and their inverses, bit for bit,
    # at any step count (also past many periods) and for models at different counts.
    acc = optim.ScaledAccumulator(optim.MOMENTUM, optim.RESCALE_PERIOD)
    steps = torch.tensor([0, 1, 15, 16, 17, 31, 32, 1000, 123_457])
    exponent = (steps % optim.RESCALE_PERIOD + (1 - optim.RESCALE_PERIOD)).to(torch.float64)
    expected = torch.pow(optim.MOMENTUM, exponent)
    assert torch.equal(acc.scale(steps), expected)
    assert torch.equal(acc.gain(steps), 1 / expected)
    assert acc.scale(steps).dtype == torch.float64
    assert acc.scale(torch.tensor([optim.RESCALE_PERIOD - 1])).item() == 1.0  # c = 1: z = v


def test_only_momentum_keeps_a_scaled_accumulator():
    adam = OPTIMIZERS[OptimizerName.ADAM]
    steps = torch.full((2,), optim.RESCALE_PERIOD - 1)
    assert adam.scaled is None and adam.gain(steps) is None
    state = adam.init({"w": torch.ones(2, 3)})
    active = torch.ones(2, dtype=torch.bool)
    assert adam.renormalise(state, steps, active, optim.RESCALE_PERIOD - 1) is None
