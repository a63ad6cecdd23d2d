"""Augmentation: exact translations and flips, per-seed draws, and packed training with them."""

import math

import pytest
import torch

from sensgen import data
from sensgen.data import (
    Augmentation,
    Dataset,
    apply_augmentation,
    augment,
    augmentation_for,
    draw_augmentation,
)
from sensgen.execute import execute_pack
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.store import Status
from sensgen.study import RunSpec
from sensgen.train import Member, PackShape, init_pack, predict_pack, train_pack

CIFAR = Augmentation((3, 32, 32), max_shift=4, flip=True, fill=(-1.5, -2.0, -2.5))
MNIST = Augmentation((1, 28, 28), max_shift=2, flip=False, fill=(-0.4,))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(aug, n, seed=0, dtype=torch.float32):
    return torch.randn(n, aug.dim, generator=_gen(seed), dtype=dtype)


def _pad_then_crop(x, aug, shifts, flips):
    """The paper's recipe, one image at a time: flip, pad s px with the fill, crop H x W."""
    c, h, w = aug.image_shape
    s = aug.max_shift
    out = []
    for image, (dy, dx), flip in zip(
        x.view(-1, c, h, w), shifts.tolist(), flips.tolist(), strict=True
    ):
        image = image.flip(-1) if flip else image
        padded = torch.tensor(aug.fill, dtype=x.dtype).view(c, 1, 1).repeat(1, h + 2 * s, w + 2 * s)
        padded[:, s : s + h, s : s + w] = image
        top, left = s - dy, s - dx
        out.append(padded[:, top : top + h, left : left + w].reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("aug", [CIFAR, MNIST], ids=["cifar", "mnist"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorised_equals_pad_then_crop_reference(aug, dtype):
    x = _images(aug, 64, dtype=dtype)
    shifts, flips = draw_augmentation(aug, 64, generator=_gen(1))
    got = apply_augmentation(x, aug, shifts, flips)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, _pad_then_crop(x, aug, shifts, flips), rtol=0, atol=0)
    # augment() is exactly draw + apply with the same generator
    torch.testing.assert_close(augment(x, aug, generator=_gen(1)), got, rtol=0, atol=0)


def _bright_pixel(aug, h0, w0, channel=0):
    c, h, w = aug.image_shape
    image = torch.tensor(aug.fill).view(c, 1, 1).repeat(1, h, w)
    image[channel, h0, w0] = 10.0
    return image.reshape(1, -1)


def _where_bright(out, aug):
    """(channel, row, column) of the bright pixel in each output image: [B, 3]."""
    hits = (out.view(-1, *aug.image_shape) == 10.0).nonzero()  # [B, 4]: image, c, h, w
    assert torch.equal(hits[:, 0], torch.arange(out.shape[0])), "exactly one bright pixel each"
    return hits[:, 1:]


def test_a_bright_pixel_moves_by_exactly_the_shift():
    s = MNIST.max_shift
    grid = torch.tensor([(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)])
    x = _bright_pixel(MNIST, 10, 12).expand(len(grid), -1)
    out = apply_augmentation(x, MNIST, grid, torch.zeros(len(grid), dtype=torch.bool))
    where = _where_bright(out, MNIST)
    assert torch.equal(where[:, 1:], torch.tensor([10, 12]) + grid)
    # everything else is background
    assert ((out == 10.0) | (out == MNIST.fill[0])).all()


def test_a_flip_mirrors_the_columns_before_the_shift():
    x = _bright_pixel(CIFAR, 3, 5, channel=2).expand(2, -1)
    shifts = torch.tensor([[1, 2], [1, 2]])
    out = apply_augmentation(x, CIFAR, shifts, torch.tensor([False, True]))
    assert _where_bright(out, CIFAR).tolist() == [[2, 4, 7], [2, 4, 32 - 1 - 5 + 2]]


def test_vacated_border_is_filled_per_channel():
    x = _images(CIFAR, 1)
    out = apply_augmentation(x, CIFAR, torch.tensor([[2, -3]]), torch.tensor([False]))
    out, image = out.view(3, 32, 32), x.view(3, 32, 32)
    for c, fill in enumerate(CIFAR.fill):
        assert (out[c, :2] == fill).all() and (out[c, :, -3:] == fill).all()
    assert torch.equal(out[:, 2:, :-3], image[:, :-2, 3:])


def test_zero_shift_without_flip_is_identity_and_input_is_untouched():
    x = _images(CIFAR, 5)
    before = x.clone()
    same = apply_augmentation(x, CIFAR, torch.zeros(5, 2, dtype=torch.int64), torch.zeros(5) > 0)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    out = augment(x, CIFAR, generator=_gen(0))
    assert torch.equal(x, before) and not torch.equal(out, x)
    still = Augmentation((3, 32, 32), max_shift=0, flip=False, fill=CIFAR.fill)
    assert torch.equal(augment(x, still, generator=_gen(0)), x)


@pytest.mark.parametrize("aug", [CIFAR, MNIST], ids=["cifar", "mnist"])
def test_shifts_stay_in_range_and_every_shift_occurs(aug):
    n, s = 4000, aug.max_shift
    x = _bright_pixel(aug, 12, 5).expand(n, -1)
    where = _where_bright(augment(x, aug, generator=_gen(3)), aug)
    flipped = where[:, 2] > aug.image_shape[2] // 2  # column 5 ± 4 or 26 ± 4: never ambiguous
    dy = where[:, 1] - 12
    dx = torch.where(flipped, where[:, 2] - (aug.image_shape[2] - 1 - 5), where[:, 2] - 5)
    offsets = set(zip(dy.tolist(), dx.tolist(), strict=True))
    assert offsets == {(a, b) for a in range(-s, s + 1) for b in range(-s, s + 1)}
    if aug.flip:
        assert abs(flipped.double().mean().item() - 0.5) < 0.03  # 4000 draws: sd 0.008
    else:
        assert not flipped.any()


def test_draws_are_deterministic_per_seed():
    x = _images(CIFAR, 32)
    a, b = (augment(x, CIFAR, generator=_gen(5)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, CIFAR, generator=_gen(6)))


def test_bad_shapes_and_settings_are_rejected():
    with pytest.raises(ValueError, match="max_shift"):
        Augmentation((1, 4, 4), max_shift=4, flip=False, fill=(0.0,))
    with pytest.raises(ValueError, match="one value per channel"):
        Augmentation((3, 4, 4), max_shift=1, flip=False, fill=(0.0,))
    with pytest.raises(ValueError, match=r"x \[B, 784\]"):
        augment(torch.zeros(2, 783), MNIST, generator=_gen(0))


def test_augmentation_for_registered_sets_pads_with_black():
    train = data.load("mnist_sample", split="train")
    aug = augmentation_for(train)
    assert (aug.image_shape, aug.max_shift, aug.flip) == ((1, 28, 28), 2, False)
    spec = data._registry.REGISTRY["mnist_sample"]
    folder = data.locate("mnist_sample")
    loaded = data._read(spec, folder, data._signature(spec, folder))
    assert aug.fill == pytest.approx(list(-loaded.mean / loaded.std), rel=1e-6)
    digits = augmentation_for(data.load("digits", split="train"))
    assert (digits.image_shape, digits.max_shift, digits.flip) == ((1, 8, 8), 1, False)


def test_augmentation_for_colour_images_crops_and_flips():
    x = torch.rand(10, 3, 32, 32) + torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    x[0, :, 0, 0] = torch.tensor([-1.0, -2.0, -3.0])  # a black pixel in every channel
    colour = Dataset("cifar10", "train", x.reshape(10, -1), torch.zeros(10).long(), 10, (3, 32, 32))
    aug = augmentation_for(colour)
    assert (aug.max_shift, aug.flip, aug.fill) == (4, True, (-1.0, -2.0, -3.0))
    two = Dataset("odd", "train", torch.zeros(2, 2 * 16), torch.zeros(2).long(), 2, (2, 4, 4))
    with pytest.raises(ValueError, match="2-channel"):
        augmentation_for(two)


# Packed training with augmentation: 3-channel 6x6 images, three classes by colour blobs.
SMALL = Augmentation((3, 6, 6), max_shift=1, flip=True, fill=(-1.0, -1.0, -1.0))
N, C = 150, 3


def _train_data(seed=0):
    g = _gen(seed)
    y = torch.randint(0, C, (N,), generator=g)
    x = torch.randn(N, 3, 6, 6, generator=g) * 0.3
    x[torch.arange(N), y, 2:4, 1:3] += 2.0  # a blob in the label's channel
    return x.reshape(N, -1), y


def _shape(*, augmentation=SMALL, batch_size=16, max_steps=60, stop_at_fit=False):
    return PackShape(
        SMALL.dim,
        C,
        16,
        2,
        Nonlinearity.RELU,
        OptimizerName.ADAM,
        batch_size,
        max_steps,
        20,
        stop_at_fit,
        augmentation,
    )


MIXED = [Member(1, 0.01, 1.0, augment=True), Member(2, 0.02, 2.0), Member(3, 0.01, 1.5, True)]


@pytest.mark.parametrize("batch_size", [16, None], ids=["minibatch", "full"])
def test_mixed_pack_equals_each_model_alone(float64, batch_size):
    # In float64: torch's batched products need not round alike for every number of models
    # (M = 3 against 1: a few units in float32's last place per step, which 60 Adam steps
    # grow past any float32 tolerance on some CPUs), while a draw taken from another
    # member's generator would differ by O(1).
    x, y = _train_data()
    before = x.clone()
    shape = _shape(batch_size=batch_size)
    pack = train_pack(shape, MIXED, x, y.expand(3, -1))
    assert torch.equal(x, before)  # the shared training inputs are never augmented in place
    for i, member in enumerate(MIXED):
        alone = train_pack(shape, [member], x, y[None])
        assert alone.steps[0] == pack.steps[i]
        for name, value in pack.params.items():
            assert value.dtype == torch.float64
            torch.testing.assert_close(value[i], alone.params[name][0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [16, None], ids=["minibatch", "full"])
def test_augmenting_members_go_on_alike_when_a_pack_mate_leaves(batch_size):
    # The wild member diverges at once and leaves the pack at the first check (step 20):
    # the augmenting members after it move up a place and keep drawing as before.
    wild = Member(9, 1e30, 1.0)
    members = [MIXED[0], wild, MIXED[2], MIXED[1]]
    x, y = _train_data(2)
    shape = _shape(batch_size=batch_size)
    pack = train_pack(shape, members, x, y.expand(4, -1))
    assert pack.diverged.tolist() == [False, True, False, False]
    for i in (0, 2, 3):
        alone = train_pack(shape, [members[i]], x, y[None])
        for name, value in pack.params.items():
            torch.testing.assert_close(value[i], alone.params[name][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch_size", [16, None], ids=["minibatch", "full"])
def test_non_augmenting_member_is_untouched_by_augmenting_pack_mates(batch_size):
    x, y = _train_data(1)
    plain = [Member(m.seed, m.lr, m.init_scale) for m in MIXED]
    mixed = train_pack(_shape(batch_size=batch_size), MIXED, x, y.expand(3, -1))
    reference = train_pack(
        _shape(augmentation=None, batch_size=batch_size), plain, x, y.expand(3, -1)
    )
    for name, value in mixed.params.items():
        torch.testing.assert_close(value[1], reference.params[name][1], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(value[0], reference.params[name][0])  # member 0 augments


def test_augmentation_changes_training_and_fit_is_checked_on_clean_data():
    x, y = _train_data(2)
    shape = _shape(max_steps=400, stop_at_fit=True)
    member = Member(4, 0.01, 1.0)
    augmented = train_pack(shape, [Member(4, 0.01, 1.0, augment=True)], x, y[None])
    plain = train_pack(shape, [member], x, y[None])
    weights = "layers.0.weight"
    gap = (augmented.params[weights] - plain.params[weights]).abs().max().item()
    assert gap > 1e-3
    # It stopped early, at an accuracy check, and fits the UNaugmented training set.
    steps = int(augmented.steps[0])
    assert steps < 400 and steps % 20 == 0
    template, _ = init_pack(shape, [member])
    logits = predict_pack(template, augmented.params, x)  # [1, N, C]
    assert (logits[0].argmax(-1) == y).all()


def test_image_size_must_match_the_inputs():
    x, y = _train_data()
    shape = _shape(augmentation=MNIST)
    with pytest.raises(ValueError, match="augmentation is for images"):
        train_pack(shape, MIXED[:1], x, y[None])
    assert math.prod(SMALL.image_shape) == x.shape[1]


def test_execute_pack_augments_only_the_runs_that_ask():
    base = RunSpec(dataset="digits", width=16, depth=1, lr=0.01, max_steps=30, eval_every=10)
    specs = [base.model_copy(update={"augment": True}), base]
    pack = execute_pack(specs)
    alone = execute_pack([base])
    assert [r.status for r in pack.results] == [Status.DONE, Status.DONE]
    assert pack.results[0].metrics["train_loss"] != pack.results[1].metrics["train_loss"]
    for name in ("train_loss", "test_loss", "jacobian_norm"):
        assert pack.results[1].metrics[name] == pytest.approx(alone.results[0].metrics[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_gives_the_same_images():
    x = _images(CIFAR, 256)
    cpu = augment(x, CIFAR, generator=_gen(9))
    gpu = augment(x.cuda(), CIFAR, generator=_gen(9))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
