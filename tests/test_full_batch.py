"""Full-batch training accumulates its gradient over fixed chunks of the training set.

`FULL_BATCH_CHUNK` is monkeypatched down to 37 examples, so N = 100 makes chunks of
37 + 37 + 26 (uneven weights 0.37, 0.37, 0.26) and the tests stay fast.
"""

import pytest
import torch
import torch.nn.functional as F

from sensgen import train
from sensgen.data import Augmentation
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.planner import model_memory_bytes
from sensgen.spec import RunSpec
from sensgen.train import Member, PackShape, init_pack, train_pack

N, C, CHUNK = 100, 3, 37
AUG = Augmentation((1, 4, 4), max_shift=1, flip=True, fill=(0.0,))
D = AUG.dim


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(train, "FULL_BATCH_CHUNK", CHUNK)


def _data(seed=0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype or torch.get_default_dtype())
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    noisy = torch.randint(0, C, (N,), generator=g)
    return x, torch.stack([y, noisy, y])


def _shape(optimizer=OptimizerName.SGD, max_steps=8, augmentation=None):
    return PackShape(
        D, C, 16, 2, Nonlinearity.TANH, optimizer, None, max_steps, 4, False, augmentation
    )


MEMBERS = [Member(1, 0.05, 1.0), Member(2, 0.02, 2.0), Member(3, 0.1, 1.5)]


def _assert_params_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol)


def test_accumulated_gradient_is_the_full_batch_gradient(float64, small_chunks):
    # One SGD step with lr = 1 from θ0 gives θ1 = θ0 − g: compare g with plain autograd on
    # the mean loss over all N examples at once (float64, so only rounding can differ).
    x, ys = _data(1)
    members = [Member(5 + i, 1.0, 1.5) for i in range(3)]
    shape = _shape(max_steps=1)
    template, initial = init_pack(shape, members)
    out = train_pack(shape, members, x, ys)
    assert out.params["layers.0.weight"].dtype == torch.float64
    for i in range(len(members)):
        net = train.unstack(template, initial, i)
        F.cross_entropy(net(x), ys[i]).backward()
        for name, p in net.named_parameters():
            step = initial[name][i] - out.params[name][i]
            torch.testing.assert_close(step, p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", [OptimizerName.SGD, OptimizerName.ADAM])
def test_chunked_training_matches_one_shot_training(float64, monkeypatch, optimizer):
    x, ys = _data(2)
    shape = _shape(optimizer)
    one_shot = train_pack(shape, MEMBERS, x, ys)  # N = 100 ≤ 4096: a single chunk
    monkeypatch.setattr(train, "FULL_BATCH_CHUNK", CHUNK)
    chunked = train_pack(shape, MEMBERS, x, ys)
    assert torch.equal(chunked.steps, one_shot.steps) and not chunked.diverged.any()
    _assert_params_close(chunked.params, one_shot.params, rtol=1e-10, atol=1e-12)
    moved = chunked.params["layers.0.weight"] - init_pack(shape, MEMBERS)[1]["layers.0.weight"]
    assert moved.abs().max() > 1e-3  # the models did train


def test_one_chunk_of_exactly_n_is_the_one_shot_step(monkeypatch):
    x, ys = _data(3)
    shape = _shape(OptimizerName.ADAM)
    one_shot = train_pack(shape, MEMBERS, x, ys)
    monkeypatch.setattr(train, "FULL_BATCH_CHUNK", N)
    exact = train_pack(shape, MEMBERS, x, ys)
    for name, value in exact.params.items():
        assert torch.equal(value, one_shot.params[name])  # bitwise: the very same step


@pytest.mark.parametrize("optimizer", [OptimizerName.SGD, OptimizerName.ADAM])
def test_chunked_pack_equals_each_model_alone(small_chunks, optimizer):
    # Every member sees the same chunks and weights in the same order in a pack or alone,
    # and augmenting members draw from their own generators only. Compared with the same
    # float32 tolerance as the minibatch test in test_train.py: a pack's matmuls
    # are batched over M, and torch does not promise the same rounding for every M.
    x, ys = _data(4, dtype=torch.float32)
    members = [Member(1, 0.01, 1.0, augment=True), Member(2, 0.02, 2.0), Member(3, 0.01, 1.5, True)]
    shape = _shape(optimizer, max_steps=12, augmentation=AUG)
    before = x.clone()
    pack = train_pack(shape, members, x, ys)
    assert torch.equal(x, before)  # augmentation never touches the shared inputs
    for i, member in enumerate(members):
        alone = train_pack(shape, [member], x, ys[i : i + 1])
        assert alone.steps[0] == pack.steps[i]
        for name, value in pack.params.items():
            torch.testing.assert_close(value[i], alone.params[name][0], rtol=1e-6, atol=1e-7)


def test_chunked_augmentation_is_seeded_and_changes_training(small_chunks):
    x, ys = _data(5, dtype=torch.float32)
    shape = _shape(OptimizerName.ADAM, augmentation=AUG)
    augmenting = [Member(m.seed, m.lr, m.init_scale, augment=True) for m in MEMBERS]
    first = train_pack(shape, augmenting, x, ys)
    again = train_pack(shape, augmenting, x, ys)
    plain = train_pack(shape, MEMBERS, x, ys)
    for name, value in first.params.items():
        assert torch.equal(value, again.params[name])
        assert not torch.allclose(value, plain.params[name])


def test_chunked_augmentation_augments_each_chunk_s_own_images(small_chunks):
    # An augmentation that moves nothing (no shift, no flip) must leave training as it is.
    x, ys = _data(6, dtype=torch.float32)
    still = Augmentation(AUG.image_shape, max_shift=0, flip=False, fill=AUG.fill)
    augmenting = [Member(m.seed, m.lr, m.init_scale, augment=True) for m in MEMBERS]
    out = train_pack(_shape(augmentation=still), augmenting, x, ys)
    plain = train_pack(_shape(), MEMBERS, x, ys)
    _assert_params_close(out.params, plain.params, rtol=1e-6, atol=1e-7)


def _full_batch_memory(train_subset):
    spec = RunSpec(
        dataset="cifar10", width=256, depth=2, batch_size=None, train_subset=train_subset
    )
    return model_memory_bytes(spec)


def test_full_batch_memory_stops_growing_at_the_chunk():
    chunk = train.FULL_BATCH_CHUNK
    assert _full_batch_memory(1000) < _full_batch_memory(chunk)  # below it, grows with N
    beyond = {_full_batch_memory(n) for n in (chunk + 1, 20_000, None)}  # None: all 50,000
    # One chunk's activations (float32: input, 4 per hidden unit and layer, 2 for the first
    # layer's pack-wide products, 2 per class) and 5 copies of the parameters for Adam
    # (the parameters, gradient, m, v and its scratch buffer).
    n_params = (3072 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    activations = chunk * (3072 + 4 * 256 * 2 + 2 * 256 + 2 * 10)
    assert beyond == {4 * (5 * n_params + activations)}


@pytest.mark.parametrize(
    ("optimizer", "copies"),
    [("sgd", 2), ("momentum", 2), ("rmsprop", 4), ("adam", 5)],
)
def test_memory_counts_the_trainer_s_parameter_copies(optimizer, copies):
    spec = RunSpec(dataset="digits", width=64, depth=1, batch_size=10, optimizer=optimizer)
    n_params = 64 * (64 + 1) + 10 * (64 + 1)
    activations = 10 * (64 + 4 * 64 + 2 * 10)
    assert model_memory_bytes(spec) == 4 * (copies * n_params + activations)


def test_full_batch_memory_follows_the_chunk_constant(monkeypatch):
    monkeypatch.setattr(train, "FULL_BATCH_CHUNK", 100)
    spec = RunSpec(dataset="digits", width=64, depth=1, batch_size=None)  # N = 1,437
    minibatch = spec.model_copy(update={"batch_size": 100})
    # The same chunk of 100 examples, plus the first layer's pack-wide products.
    assert model_memory_bytes(spec) == model_memory_bytes(minibatch) + 4 * 100 * 2 * 64
