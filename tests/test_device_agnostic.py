"""The training step on a device other than the default one, checked on the CPU.

No GPU is needed: `_FakeDevice` is a TorchFunctionMode under which tensors moved to
``cpu:0`` stand for tensors on an accelerator (``x.device`` of such a tensor says
``cpu:0``, so ``device=x.device`` puts new tensors there too), while everything else stays
on the default device, the host. It records what would cost or break on a GPU:

* ``mix``: an op given a device tensor and a host tensor of one or more dims (CUDA raises
  "Expected all tensors to be on the same device");
* ``sync``: a read of a device tensor by the host (``item``, ``tolist``, ``bool``,
  ``nonzero``, ``.cpu()``, ...), where the host waits for the GPU;
* ``h2d``: a host tensor copied to the device (a blocking copy, also a wait);
* ``host``: a tensor factory called with neither ``device=`` nor a generator.

The trainer's contract (README, "Running on a cluster or GPU"; issue 6): one [M] read per
step for divergence (`sensgen.divergence`), the data order uploaded once per epoch, nothing
created on the host and mixed with the pack, and the same result as on the default device.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from sensgen import optim, train
from sensgen.models import Nonlinearity
from sensgen.optim import OptimizerName
from sensgen.train import Member, PackShape, train_pack

DEVICE = torch.device("cpu", 0)  # stands for "cuda:0"

_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.linspace, torch.eye, torch.scalar_tensor,
    torch.rand, torch.randn, torch.randint, torch.randperm,
}  # fmt: skip
_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.nonzero, torch.nonzero, torch.unique, torch.Tensor.unique,
    torch.masked_select, torch.Tensor.masked_select,
}  # fmt: skip


def _on_device(device) -> bool:
    return device is not None and torch.device(device).index == 0


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/sensgen/" in frame.filename:
            return f"{frame.filename.split('/sensgen/')[-1]}:{frame.lineno}"
    return "?"


class _FakeDevice(TorchFunctionMode):
    """See the module docstring. ``events`` lists (kind, what, where)."""

    def __init__(self) -> None:
        super().__init__()
        self.tagged = WeakIdKeyDictionary()  # tensors on the fake device
        self.events: list[tuple[str, str, str]] = []

    def on(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.tagged

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # x.device
            return DEVICE if self.on(args[0]) else torch.device("cpu")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [t for t in tensors if self.on(t)]
        name = getattr(func, "__name__", str(func))
        target = None
        if func is torch.Tensor.to:
            for a in [*args[1:], kwargs.get("device")]:
                if isinstance(a, str | torch.device):
                    target = torch.device(a)
        if func in _READS and on:
            self.events.append(("sync", name, _caller()))
        elif target is not None and _on_device(target) != self.on(args[0]):
            self.events.append(("h2d" if _on_device(target) else "sync", name, _caller()))
        elif on and any(not self.on(t) and t.dim() > 0 for t in tensors):
            self.events.append(("mix", name, _caller()))
        if func in _FACTORIES and kwargs.get("device") is None and "generator" not in kwargs:
            self.events.append(("host", name, _caller()))
        plain = {k: ("cpu" if k == "device" and _on_device(v) else v) for k, v in kwargs.items()}
        if target is not None:
            args = [a if not isinstance(a, str | torch.device) else "cpu" for a in args]
            plain.pop("device", None)
        with torch._C.DisableTorchFunction():
            out = func(*args, **plain)
            if target is not None and _on_device(target) and out is args[0]:
                out = out.clone()  # a move makes a new tensor
        if func in _READS or (target is not None and not _on_device(target)):
            return out
        if on or _on_device(kwargs.get("device")) or (target is not None):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.tagged[t] = True
        return out


N, D, C = 64, 16, 3


def _pack(optimizer: str, batch_size: int | None) -> tuple[PackShape, list[Member]]:
    shape = PackShape(
        D, C, 8, 2, Nonlinearity.RELU, OptimizerName(optimizer), batch_size,
        max_steps=12, eval_every=6, stop_at_fit=False,
    )  # fmt: skip
    return shape, [Member(seed=i, lr=0.05 * (i + 1), init_scale=2.0) for i in range(3)]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    return x, torch.randint(0, C, (N,), generator=g).repeat(3, 1)


def _train_on_fake_device(shape, members, monkeypatch):
    """train_pack on the fake device: its outcome, and the events of each step."""
    x, y = _data()
    optim._scale_table.cache_clear()  # (cached tensors would be untagged ones)
    mode, per_step = _FakeDevice(), []
    step = train._PackRun.step

    def recorded_step(self, xs):
        start = len(mode.events)
        step(self, xs)
        per_step.append(mode.events[start:])

    monkeypatch.setattr(train._PackRun, "step", recorded_step)
    with mode:
        x, y = x.to(DEVICE), y.to(DEVICE)
        mode.events.clear()
        outcome = train_pack(shape, members, x, y, blocks=[len(members)])
    optim._scale_table.cache_clear()
    return outcome, mode.events, per_step


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "rmsprop"])
@pytest.mark.parametrize("batch_size", [16, None])
def test_a_training_step_reads_the_device_once_and_mixes_no_host_tensor(
    optimizer, batch_size, monkeypatch
):
    shape, members = _pack(optimizer, batch_size)
    x, y = _data()
    expected = train_pack(shape, members, x, y, blocks=[len(members)])
    outcome, events, per_step = _train_on_fake_device(shape, members, monkeypatch)

    assert [e for e in events if e[0] == "mix"] == []
    assert len(per_step) == shape.max_steps
    for events_of_step in per_step[1:]:  # (the first step fills caches: `optim._scale_table`)
        kinds = collections.Counter(kind for kind, _, _ in events_of_step)
        assert kinds["sync"] == 1, events_of_step  # the divergence guard's one [M] read
        assert kinds["host"] == 0, events_of_step
        uploads = [e for e in events_of_step if e[0] == "h2d"]
        assert all(where.startswith("batches.py") for _, _, where in uploads), uploads
    if batch_size is not None:  # the data order, uploaded once per epoch of N / B steps
        uploads = sum(e[0] == "h2d" and e[2].startswith("batches.py") for s in per_step for e in s)
        assert uploads == shape.max_steps // (N // batch_size)
    for name, value in expected.params.items():
        assert torch.equal(outcome.params[name], value), name
    assert torch.equal(outcome.steps, expected.steps)
    assert torch.equal(outcome.diverged, expected.diverged)


def test_the_fake_device_sees_a_host_tensor_mixed_in():
    """The check itself: a host tensor added to a device one is reported."""
    mode = _FakeDevice()
    with mode:
        x = torch.ones(3).to(DEVICE)
        _ = x + torch.ones(3)
        _ = x + torch.ones(3, device=x.device)
        _ = x.sum().item()
    kinds = [kind for kind, _, _ in mode.events]
    assert kinds.count("mix") == 1 and kinds.count("sync") == 1 and kinds.count("h2d") == 1
