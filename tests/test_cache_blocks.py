"""Cache blocks: how a pack is cut into blocks, and that blocks change no result."""

import math

import pytest
import torch

from sensgen import cache_blocks, train
from sensgen.cache_blocks import block_sizes, model_step_bytes
from sensgen.data import Augmentation
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.train import Member, PackShape, train_pack

N, D, C = 240, 12, 3


def test_a_model_s_step_bytes_count_its_copies_and_its_batch():
    # The reference pack's model (issue 8): 784-256-256-10, batch 128.
    n_params = (784 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert n_params == 269_322
    batch = 128 * (784 + 4 * 256 * 2 + 2 * 10)
    # Momentum: θ and its accumulator (the gradient goes into it). SGD: θ and the gradient.
    # Adam: θ, the gradient, m and v. RMSprop: θ, the gradient and v.
    copies = {
        OptimizerName.MOMENTUM: 2,
        OptimizerName.SGD: 2,
        OptimizerName.ADAM: 4,
        OptimizerName.RMSPROP: 3,
    }
    for optimizer, n in copies.items():
        got = model_step_bytes(784, 10, 256, 2, optimizer, 128)
        assert got == 4 * (n * n_params + batch), optimizer


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_blocks_cover_the_pack_evenly_and_never_leave_a_model_alone(threads):
    for n_models in range(1, 70):
        for per_model in (1, 3, 7, 10, 40):  # budget 40: 40 models down to 1
            sizes = block_sizes(n_models, per_model, threads, budget=40)
            per_block = max(2, threads, threads * round(40 / per_model / threads))
            case = (n_models, per_model, sizes)
            assert sum(sizes) == n_models, case
            assert min(sizes) >= 2 or sizes == [1], case
            # As few blocks as blocks of per_block allow (one fewer where a last block of
            # one joined its neighbour), none much above per_block.
            assert len(sizes) in (
                math.ceil(n_models / per_block),
                math.ceil(n_models / per_block) - 1,
            )
            assert max(sizes) <= per_block + threads + 1, case
            # Whole multiples of the threads but the last (which takes the remainder).
            assert all(s % threads == 0 for s in sizes[:-1]), case
            assert max(sizes[:-1], default=0) - min(sizes[:-1], default=0) <= threads, case


def test_the_reference_packs_are_cut_as_measured(monkeypatch):
    # docs/benchmarks.md, "Cache blocks": on 2 threads, the reference pack (momentum) in two
    # blocks of 16, its Adam twin in blocks of 10-12, 8 models of 784-512³-10 in two of 4,
    # the small models (width 64) whole.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu = torch.device("cpu")

    def blocks(optimizer, width, depth, batch, n_models):
        shape = PackShape(784, 10, width, depth, Nonlinearity.RELU, optimizer, batch, 1, 1, False)
        return cache_blocks.cache_blocks(shape, n_models, cpu)

    assert blocks(OptimizerName.MOMENTUM, 256, 2, 128, 32) == [16, 16]
    assert blocks(OptimizerName.ADAM, 256, 2, 128, 32) == [12, 10, 10]
    assert blocks(OptimizerName.ADAM, 512, 3, 128, 8) == [4, 4]
    assert blocks(OptimizerName.MOMENTUM, 64, 2, 32, 32) == [32]


def test_a_gpu_pack_and_a_full_batch_pack_are_one_block():
    def shape(batch_size):
        return PackShape(784, 10, 512, 3, Nonlinearity.RELU, OptimizerName.ADAM, batch_size,
                         1, 1, False)  # fmt: skip

    assert cache_blocks.cache_blocks(shape(128), 64, torch.device("cuda")) == [64]
    assert cache_blocks.cache_blocks(shape(None), 64, torch.device("cpu")) == [64]
    assert cache_blocks.cache_blocks(shape(128), 64, torch.device("cpu")) != [64]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable, 3 classes
    noisy = torch.randint(0, C, (N,), generator=g)
    return x, y, noisy


@pytest.mark.parametrize("optimizer", list(OptimizerName))
def test_a_pack_in_blocks_ends_bit_for_bit_as_one_block(optimizer):
    # Seven models: some fit and stop early, one diverges, one has noisy labels, two augment,
    # learning rates and init scales differ. In blocks of 2, 3 and 2 every model ends with
    # the same parameters, steps and divergence flag as in one block, in pack order.
    x, y, noisy = _data()
    lr = {OptimizerName.SGD: 0.3, OptimizerName.MOMENTUM: 0.05}.get(optimizer, 0.01)
    members = [
        Member(seed=10 + i, lr=lr * (0.5 + i / 4), init_scale=1.0 + i / 8, augment=i in (2, 5))
        for i in range(7)
    ]
    members[4] = Member(seed=14, lr=1e30, init_scale=1.0)
    labels = torch.stack([noisy if i == 3 else y for i in range(7)])
    shape = PackShape(
        D, C, 16, 2, Nonlinearity.RELU, optimizer, 32, 200, 20, True,
        augmentation=Augmentation((1, 3, 4), max_shift=1, flip=True, fill=(0.0,)),
    )  # fmt: skip
    whole = train_pack(shape, members, x, labels, blocks=[7])
    blocked = train_pack(shape, members, x, labels, blocks=[2, 3, 2])
    assert whole.diverged.tolist() == [i == 4 for i in range(7)]
    assert (whole.steps < 200).any() and whole.steps[3] == 200  # stops at different steps
    assert torch.equal(blocked.steps, whole.steps)
    assert torch.equal(blocked.diverged, whole.diverged)
    assert blocked.params.keys() == whole.params.keys()
    for name, value in whole.params.items():
        assert torch.equal(blocked.params[name], value), name
        assert blocked.params[name].is_contiguous()


@pytest.mark.parametrize("optimizer", [OptimizerName.MOMENTUM, OptimizerName.ADAM])
def test_at_the_reference_shapes_blocks_end_bit_for_bit_as_one_block(optimizer):
    # Real sizes (784-256-256-10, batch 128), where MKL's batched product has paths that
    # the tiny shapes above never take: blocks of 2 and 4 against one block of 6, each
    # model its own data order.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 784, generator=g), torch.randint(0, 10, (6, 512), generator=g)
    shape = PackShape(784, 10, 256, 2, Nonlinearity.RELU, optimizer, 128, 4, 4, False)
    lr = 1e-3 if optimizer is OptimizerName.ADAM else 0.01
    members = [Member(seed=i, lr=lr, init_scale=1.0) for i in range(6)]
    whole = train_pack(shape, members, x, y, blocks=[6])
    blocked = train_pack(shape, members, x, y, blocks=[2, 4])
    for name, value in whole.params.items():
        assert torch.equal(blocked.params[name], value), name


def test_a_pack_in_blocks_ticks_once_per_step_of_the_pack():
    x, y, _ = _data()
    shape = PackShape(D, C, 16, 2, Nonlinearity.RELU, OptimizerName.SGD, 32, 30, 10, False)
    members = [Member(seed=i, lr=0.1, init_scale=1.0) for i in range(6)]
    ticks = []
    train_pack(shape, members, x, y.expand(6, -1), on_step=ticks.append, blocks=[2, 2, 2])
    assert ticks == list(range(30))


@pytest.mark.parametrize("blocks", [[2, 2], [2, 2, 3], [0, 5], [6, -1]])
def test_blocks_that_do_not_cut_the_pack_are_refused(blocks):
    x, y, _ = _data()
    shape = PackShape(D, C, 16, 2, Nonlinearity.RELU, OptimizerName.SGD, 32, 3, 3, False)
    members = [Member(seed=i, lr=0.1, init_scale=1.0) for i in range(5)]
    with pytest.raises(ValueError, match="blocks must be positive and sum to 5"):
        train_pack(shape, members, x, y.expand(5, -1), blocks=blocks)


def test_the_trainer_cuts_a_large_pack_into_blocks(monkeypatch):
    # Through the real sizing: a budget of about two of these models per thread.
    x, y, _ = _data()
    shape = PackShape(D, C, 16, 2, Nonlinearity.RELU, OptimizerName.MOMENTUM, 32, 25, 25, False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    per_model = model_step_bytes(D, C, 16, 2, OptimizerName.MOMENTUM, 32)
    monkeypatch.setattr(cache_blocks, "BYTES_PER_THREAD", 2 * per_model)
    packs = []

    class Recording(train.Backprop):
        def loss_and_grad(self, params, *args, **kwargs):
            packs.append(params["layers.0.weight"].shape[0])
            return super().loss_and_grad(params, *args, **kwargs)

    monkeypatch.setattr(train, "Backprop", Recording)
    members = [Member(seed=i, lr=0.05, init_scale=1.0) for i in range(5)]
    blocked = train_pack(shape, members, x, y.expand(5, -1))
    assert packs == [2] * 25 + [3] * 25  # blocks of 2 and 3, one after the other
    monkeypatch.setattr(cache_blocks, "BYTES_PER_THREAD", 100 * per_model)
    packs.clear()
    whole = train_pack(shape, members, x, y.expand(5, -1))
    assert packs == [5] * 25
    for name, value in whole.params.items():
        assert torch.equal(blocked.params[name], value), name


@pytest.mark.parametrize("nonlinearity", list(Nonlinearity))
def test_blocks_end_bit_for_bit_as_one_block_for_every_nonlinearity_and_odd_sizes(nonlinearity):
    # A model's slice of 7 examples by 5 units (35 values) fills no whole vector: the
    # elementwise kernels of φ and φ' take its last values, or all of them, in their scalar
    # loop, which for sigmoid and ELU rounds differently from the vectorised one. Where a
    # slice sits in the pack's buffer must not decide which loop it gets.
    x, y, _ = _data()
    shape = PackShape(D, C, 5, 2, nonlinearity, OptimizerName.SGD, 7, 60, 1000, False)
    members = [Member(seed=20 + i, lr=0.2, init_scale=1.0 + i / 4) for i in range(7)]
    labels = y.expand(7, N).contiguous()
    whole = train_pack(shape, members, x, labels, blocks=[7])
    blocked = train_pack(shape, members, x, labels, blocks=[2, 3, 2])
    for name, value in whole.params.items():
        assert torch.equal(blocked.params[name], value), name
