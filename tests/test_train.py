"""Packed training: a pack equals its members trained alone, and equals plain torch.optim."""

import pytest
import torch
import torch.nn.functional as F

from sensgen import backprop, optim, pack, train
from sensgen.backprop import logits as train_logits
from sensgen.models import MLP, Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.train import (
    Member,
    PackShape,
    derive_seed,
    fits_training_set,
    init_pack,
    predict_pack,
    train_pack,
    unstack,
)

N, D, C = 240, 12, 3


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable, 3 classes
    noisy = torch.randint(0, C, (N,), generator=g)
    return x, torch.stack([y, noisy, y])


def _shape(optimizer, *, max_steps=120, stop_at_fit=True, batch_size=32):
    return PackShape(
        D, C, 16, 2, Nonlinearity.RELU, optimizer, batch_size, max_steps, 20, stop_at_fit
    )


def _lr(optimizer):
    return {OptimizerName.SGD: 0.3, OptimizerName.MOMENTUM: 0.05}.get(optimizer, 0.01)


MEMBERS_LR_SCALE = (1.0, 0.5, 1.5)


def _members(optimizer):
    return [
        Member(seed=7 + i, lr=_lr(optimizer) * s, init_scale=1.0 + i / 2)
        for i, s in enumerate(MEMBERS_LR_SCALE)
    ]


@pytest.mark.parametrize("optimizer", list(OptimizerName))
def test_pack_equals_single_model_runs(optimizer):
    x, ys = _data()
    shape = _shape(optimizer, max_steps=400)
    members = _members(optimizer)
    pack = train_pack(shape, members, x, ys)
    # Returned in the usual layout, whatever the training used (`minibatch_layout`).
    assert all(v.is_contiguous() for v in pack.params.values())
    for i, member in enumerate(members):
        alone = train_pack(shape, [member], x, ys[i : i + 1])
        assert alone.steps[0] == pack.steps[i]
        for name, value in pack.params.items():
            torch.testing.assert_close(value[i], alone.params[name][0], rtol=1e-6, atol=1e-7)
    # The clean-label models stop early at 100% train accuracy; the noisy one cannot.
    assert pack.steps[1] == 400
    assert (pack.steps[[0, 2]] < 400).all()


def _reference_run(shape, member, x, y):
    """One model trained with nn.Module + torch.optim, the plain PyTorch way."""
    net = MLP(
        D,
        C,
        shape.width,
        shape.depth,
        shape.nonlinearity,
        member.init_scale,
        generator=torch.Generator().manual_seed(member.seed),
    )
    make = {
        OptimizerName.SGD: lambda p: torch.optim.SGD(p, lr=member.lr),
        OptimizerName.MOMENTUM: lambda p: torch.optim.SGD(p, lr=member.lr, momentum=0.9),
        OptimizerName.ADAM: lambda p: torch.optim.Adam(p, lr=member.lr),
        OptimizerName.RMSPROP: lambda p: torch.optim.RMSprop(p, lr=member.lr),
    }
    opt = make[shape.optimizer](net.parameters())
    order = torch.Generator().manual_seed(derive_seed(member.seed, "order"))
    perm, cursor = None, N
    for _ in range(shape.max_steps):
        if cursor + shape.batch_size > N:
            perm, cursor = torch.randperm(N, generator=order), 0
        idx = perm[cursor : cursor + shape.batch_size]
        cursor += shape.batch_size
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


@pytest.mark.parametrize("optimizer", list(OptimizerName))
def test_pack_matches_plain_torch_optim(optimizer):
    x, ys = _data(1)
    shape = _shape(optimizer, max_steps=60, stop_at_fit=False)
    members = _members(optimizer)
    pack = train_pack(shape, members, x, ys)
    for i, member in enumerate(members):
        net = _reference_run(shape, member, x, ys[i])
        for name, value in net.state_dict().items():
            torch.testing.assert_close(pack.params[name][i], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_size", [32, None], ids=["minibatch", "full batch"])
def test_momentum_equals_torch_s_in_float64_across_renormalisations(batch_size):
    # The scaled accumulator (`optim.ScaledAccumulator`) is v ← μv + g: in float64, to
    # rounding, over 3 renormalisations, with models of different learning rates.
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, ys = _data(4)
        x = x.double()
        steps = 3 * optim.RESCALE_PERIOD + 3
        shape = _shape(
            OptimizerName.MOMENTUM, max_steps=steps, stop_at_fit=False, batch_size=batch_size
        )
        members = _members(OptimizerName.MOMENTUM)
        pack = train_pack(shape, members, x, ys)
        for i, member in enumerate(members):
            if batch_size is None:
                net = _full_batch_reference(shape, member, x, ys[i])
            else:
                net = _reference_run(shape, member, x, ys[i])
            for name, value in net.state_dict().items():
                torch.testing.assert_close(pack.params[name][i], value, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(before)


def _full_batch_reference(shape, member, x, y):
    net = MLP(D, C, shape.width, shape.depth, shape.nonlinearity, member.init_scale,
              generator=torch.Generator().manual_seed(member.seed))  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=member.lr, momentum=0.9)
    for _ in range(shape.max_steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_full_batch_is_exact_gradient_descent():
    x, ys = _data(2)
    shape = _shape(OptimizerName.SGD, max_steps=5, stop_at_fit=False, batch_size=None)
    member = Member(seed=3, lr=0.1, init_scale=2.0)
    pack = train_pack(shape, [member], x, ys[:1])
    net = MLP(D, C, 16, 2, "relu", 2.0, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), ys[0]).backward()
        opt.step()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(pack.params[name][0], value, rtol=1e-5, atol=1e-6)


def test_divergence_is_flagged_and_freezes_only_that_model():
    x, ys = _data(3)
    shape = _shape(OptimizerName.SGD, max_steps=50, stop_at_fit=False)
    members = [Member(1, 0.05, 1.0), Member(2, 1e30, 1.0)]
    out = train_pack(shape, members, x, ys[:2])
    assert out.diverged.tolist() == [False, True]
    assert out.steps[0] == 50 and out.steps[1] < 50
    assert all(torch.isfinite(v).all() for v in out.params.values())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_pack_draws_each_member_as_its_own_mlp(threads, dtype):
    # Drawn straight into the stacked slices, on one thread or several: each member's
    # weights are exactly those of MLP(seed), whatever its place in the pack.
    before, before_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    try:
        shape = _shape(OptimizerName.SGD)
        members = [Member(seed=s, lr=0.1, init_scale=0.5 + s) for s in (5, 0, 9, 2, 7)]
        template, params = init_pack(shape, members)
        assert template.init_scale == members[0].init_scale
        for i, m in enumerate(members):
            net = MLP(D, C, shape.width, shape.depth, shape.nonlinearity, m.init_scale,
                      generator=torch.Generator().manual_seed(m.seed))  # fmt: skip
            for name, value in net.state_dict().items():
                assert params[name].dtype == dtype and not params[name].requires_grad
                assert torch.equal(params[name][i], value), name
    finally:
        torch.set_default_dtype(before)
        torch.set_num_threads(before_threads)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_init_pack_rejects_a_bad_init_scale_on_any_member(bad):
    members = [Member(seed=0, lr=0.1, init_scale=1.0), Member(seed=1, lr=0.1, init_scale=bad)]
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        init_pack(_shape(OptimizerName.SGD), members)


def test_init_pack_on_threads_keeps_the_caller_s_inference_mode():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        members = [Member(seed=s, lr=0.1, init_scale=1.0) for s in range(4)]
        with torch.inference_mode():
            _, params = init_pack(_shape(OptimizerName.SGD), members)
        _, expected = init_pack(_shape(OptimizerName.SGD), members)
        assert all(torch.equal(params[k], expected[k]) for k in expected)
    finally:
        torch.set_num_threads(before)


def test_initialisation_statistics():
    shape = PackShape(2000, 10, 500, 1, Nonlinearity.RELU, OptimizerName.SGD, 32, 1, 1, True)
    _, params = init_pack(shape, [Member(0, 0.1, 4.0)])
    w = params["layers.0.weight"][0]
    assert w.shape == (500, 2000)
    # W ~ N(0, σ_w²/fan_in): the sample variance of 1e6 draws is within 1% of 4/2000.
    assert abs(w.var().item() / (4.0 / 2000) - 1) < 0.01
    assert (params["layers.0.bias"] == 0).all()


def test_predict_fit_and_unstack_agree():
    x, ys = _data(4)
    shape = _shape(OptimizerName.ADAM, max_steps=300)
    members = _members(OptimizerName.ADAM)
    template, _ = init_pack(shape, members)
    out = train_pack(shape, members, x, ys)
    logits = predict_pack(template, out.params, x, chunk_size=7)
    assert logits.shape == (3, N, C)
    for i in range(3):
        torch.testing.assert_close(unstack(template, out.params, i)(x), logits[i])
    fits = fits_training_set(template, out.params, x, ys)
    assert fits.tolist() == [(logits[i].argmax(-1) == ys[i]).all().item() for i in range(3)]


def test_fit_check_goes_chunk_by_chunk_and_stops_early(monkeypatch):
    x, _ = _data()
    shape = _shape(OptimizerName.SGD)
    template, params = init_pack(shape, _members(OptimizerName.SGD))
    own = predict_pack(template, params, x).argmax(-1)  # labels each model gets all right
    labels = own.clone()
    labels[1, -1] = (labels[1, -1] + 1) % C  # model 1 misses only the very last point
    labels[2, 0] = (labels[2, 0] + 1) % C  # model 2 misses the first point
    for chunk_size in (1, 7, N, 4 * N):
        fits = fits_training_set(template, params, x, labels, chunk_size=chunk_size)
        assert fits.tolist() == [True, False, False]
    both_miss = own.clone()
    both_miss[:, 0] = (both_miss[:, 0] + 1) % C  # nobody fits after the first chunk: stop
    calls = []
    monkeypatch.setattr(pack, "logits", lambda *args: calls.append(1) or train_logits(*args))
    assert not fits_training_set(template, params, x, both_miss, chunk_size=7).any()
    assert len(calls) == 1


def test_labels_shape_is_checked():
    x, ys = _data()
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        train_pack(_shape(OptimizerName.SGD), _members(OptimizerName.SGD), x, ys[:2])


def test_non_finite_update_is_divergence_and_keeps_the_last_finite_params():
    # A finite loss whose update overflows: the model stops at once, with its initial weights.
    x, ys = _data(5)
    shape = _shape(OptimizerName.SGD, max_steps=10, stop_at_fit=False)
    members = [Member(1, 0.05, 1.0), Member(2, float("inf"), 1.0)]
    _, initial = init_pack(shape, members)
    out = train_pack(shape, members, x, ys[:2])
    assert out.diverged.tolist() == [False, True]
    assert out.steps.tolist() == [10, 0]
    for name, value in out.params.items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value[1], initial[name][1], rtol=0, atol=0)


def test_augmenting_members_need_the_pack_augmentation():
    x, ys = _data()
    member = Member(seed=1, lr=0.1, init_scale=1.0, augment=True)
    with pytest.raises(ValueError, match="no augmentation"):
        train_pack(_shape(OptimizerName.SGD), [member], x, ys[:1])


def test_a_diverged_member_leaves_its_pack_mates_bit_for_bit_alone():
    # After divergence a model's slice may hold NaN while the pack trains on; the others
    # must not notice: model 0 ends exactly as when trained alone.
    x, ys = _data(3)
    shape = _shape(OptimizerName.ADAM, max_steps=40, stop_at_fit=False)
    healthy, wild = Member(1, 0.01, 1.0), Member(2, 1e30, 1.0)
    pack = train_pack(shape, [healthy, wild], x, ys[:2])
    alone = train_pack(shape, [healthy], x, ys[:1])
    assert pack.diverged.tolist() == [False, True]
    for name, value in alone.params.items():
        assert torch.equal(pack.params[name][0], value[0])
        assert torch.isfinite(pack.params[name][1]).all()


@pytest.mark.parametrize("optimizer", [OptimizerName.ADAM, OptimizerName.RMSPROP])
@pytest.mark.parametrize("width", [17, 64], ids=["per-model slices", "whole tensors"])
def test_fused_step_members_end_bit_for_bit_as_alone(width, optimizer):
    # The fused kernel rounds a tensor's last elements apart (`optim`): a model must end
    # exactly as alone whatever its place in the pack and the sizes of its layers.
    x, ys = _data(3)
    shape = PackShape(D, C, width, 2, Nonlinearity.RELU, optimizer, 32, 40, 20, False)
    members = [Member(1, 0.01, 1.0), Member(2, 0.02, 1.5), Member(3, 0.005, 1.0)]
    pack = train_pack(shape, members, x, ys)
    for i, member in enumerate(members):
        alone = train_pack(shape, [member], x, ys[i : i + 1])
        for name, value in alone.params.items():
            assert torch.equal(pack.params[name][i], value[0]), (i, name)


@pytest.mark.parametrize("optimizer", list(OptimizerName))
def test_a_compacted_pack_keeps_the_fast_layout_and_the_fused_step(optimizer):
    x, ys = _data()
    members = _members(optimizer)
    _, params = init_pack(_shape(optimizer), members)
    run = train._PackRun(_shape(optimizer), members, params, x, ys, None)
    for _ in range(3):
        run.step(x)
    run.stop(torch.tensor([False, True, False]))
    run.compact()
    assert run.params["layers.0.weight"].shape[0] == 2
    buffers = [run.params, *run.state.values()] + ([run.grads] if run.grads else [])
    for tensors in buffers:
        assert backprop._stored_transposed(tensors["layers.0.weight"])
        assert tensors["layers.1.weight"].is_contiguous()
    if optimizer in (OptimizerName.ADAM, OptimizerName.RMSPROP):
        assert run.fused is not None and len(run.fused_slices) == 2  # θ updated in place
        assert "buf" not in run.state  # no direction is written: no scratch for one
    run.step(x)
    assert all(torch.isfinite(v).all() for v in run.params.values())


@pytest.mark.parametrize("optimizer", [OptimizerName.ADAM, OptimizerName.RMSPROP])
def test_a_pack_with_the_fused_update_never_allocates_the_directions_scratch(
    monkeypatch, optimizer
):
    # The fused update writes no direction: the pack's state holds what is carried from
    # step to step (m, v) and nothing else is ever made for it, not even for a moment at
    # set-up (a copy of the pack fewer at its peak).
    made = []
    zeros_like = optim._zeros_like
    monkeypatch.setattr(optim, "_zeros_like", lambda p: made.append(p) or zeros_like(p))
    x, ys = _data()
    members = _members(optimizer)
    _, params = init_pack(_shape(optimizer), members)
    run = train._PackRun(_shape(optimizer), members, params, x, ys, None)
    run.step(x)
    carried = optim.OPTIMIZERS[optimizer].carried
    assert run.fused is not None and set(run.state) == set(carried)
    assert len(made) == len(carried)  # one dict of zeros per carried state, no scratch
    assert set(optim.OPTIMIZERS[optimizer].init(params)) == {*carried, "buf"}


@pytest.mark.parametrize("optimizer", [OptimizerName.ADAM, OptimizerName.RMSPROP])
def test_a_pack_that_loses_the_fused_update_falls_back_to_directions(monkeypatch, optimizer):
    # Should a compacted pack's tensors no longer suit the fused kernel, its steps go the
    # direction way (`optim`), whose scratch is made again, and it trains on; its bound on
    # |m| is then unknown (inf), should the kernel come back.
    x, ys = _data()
    members = _members(optimizer)
    _, params = init_pack(_shape(optimizer), members)
    run = train._PackRun(_shape(optimizer), members, params, x, ys, None)
    run.step(x)
    assert run.fused is not None and "buf" not in run.state
    monkeypatch.setattr(type(run.fused), "available", lambda *args: False)
    run.stop(torch.tensor([False, True, False]))
    run.compact()
    assert run.fused is None and "buf" in run.state
    assert torch.isinf(run.moment_bound).all()
    before = {k: v.clone() for k, v in run.params.items()}
    run.step(x)
    assert all(torch.isfinite(v).all() for v in run.params.values())
    assert any(not torch.equal(v, before[k]) for k, v in run.params.items())


def test_stopped_models_leave_the_pack_and_the_rest_train_on_as_alone(monkeypatch):
    # Clean-label models fit and a wild one diverges; at the next check (every 20 steps)
    # they leave, and the noisy-label model trains on alone in a pack of one. Every model
    # ends as when trained alone, in pack order.
    sizes = []

    class Recording(train.Backprop):
        def loss_and_grad(self, params, *args, **kwargs):
            sizes.append(params["layers.0.weight"].shape[0])
            return super().loss_and_grad(params, *args, **kwargs)

    monkeypatch.setattr(train, "Backprop", Recording)
    x, ys = _data()
    shape = _shape(OptimizerName.MOMENTUM, max_steps=400)
    members = [*_members(OptimizerName.MOMENTUM), Member(seed=9, lr=1e30, init_scale=1.0)]
    labels = torch.cat([ys, ys[:1]])
    pack = train_pack(shape, members, x, labels)
    assert pack.diverged.tolist() == [False, False, False, True]
    assert sizes[:20] == [4] * 20 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert sizes[20] <= 3  # the wild model left at the first check
    assert len(sizes) == 400  # the noisy model runs its whole budget
    for i, member in enumerate(members):
        alone = train_pack(shape, [member], x, labels[i : i + 1])
        assert alone.steps[0] == pack.steps[i]
        for name, value in pack.params.items():
            torch.testing.assert_close(value[i], alone.params[name][0], rtol=1e-6, atol=1e-7)


def test_a_batch_larger_than_the_training_set_is_refused():
    # The batch buffer was left partly uninitialised: the models trained on garbage.
    x, ys = _data()
    shape = _shape(OptimizerName.SGD, batch_size=N + 1)
    with pytest.raises(ValueError, match=f"batch_size {N + 1} exceeds the {N} training"):
        train_pack(shape, _members(OptimizerName.SGD), x, ys)
    assert train_pack(_shape(OptimizerName.SGD, batch_size=N, max_steps=2), _members("sgd"), x, ys)
