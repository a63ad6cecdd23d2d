"""What a pack is (paper §4; `sensgen.train` trains one): the shape its models share,
what each has of its own, the outcome of its training; its models drawn into stacked
tensors, and the predictions of a pack of trained models.

The models are stacked along a leading model axis, named as `stack_module_state` names
them (``layers.{l}.weight`` [M, n_l, n_{l−1}], ``layers.{l}.bias`` [M, n_l]).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from sensgen.backprop import logits
from sensgen.data import Augmentation
from sensgen.models import MLP, Nonlinearity, draw_initial_
from sensgen.optim import OptimizerName


@dataclass(frozen=True)
class PackShape:
    """What every model in a pack shares."""

    in_dim: int
    n_classes: int
    width: int
    depth: int
    nonlinearity: Nonlinearity
    optimizer: OptimizerName
    batch_size: int | None  # None: full batch
    max_steps: int
    eval_every: int
    stop_at_fit: bool
    augmentation: Augmentation | None = None  # how augmenting members augment; None: none do


@dataclass(frozen=True)
class Member:
    """What one model in a pack has of its own."""

    seed: int
    lr: float
    init_scale: float
    augment: bool = False  # augment each training batch with `PackShape.augmentation`


@dataclass(frozen=True)
class PackOutcome:
    """The end of a pack's training.

    Attributes:
        params: stacked parameters, each [M, ...], as `stack_module_state` names them.
        steps: [M] int64, updates applied to each model.
        diverged: [M] bool, whose loss or update became non-finite (their params are the
            last finite ones). With momentum that includes a learning rate beyond 7e37,
            where η·c (c ≤ μ⁻¹⁵, `optim.ScaledAccumulator`) overflows float32.
    """

    params: dict[str, torch.Tensor]
    steps: torch.Tensor
    diverged: torch.Tensor


def init_pack(shape: PackShape, members: Sequence[Member]) -> tuple[MLP, dict[str, torch.Tensor]]:
    """Each member's initial weights, drawn from its own seed as its `MLP` would draw them
    (`sensgen.models.draw_initial_`), into stacked tensors.

    Returns a template MLP (the first member's: its architecture, for `unstack` and
    `predict_pack`) and the stacked parameters [M, ...], named as `stack_module_state`
    names them. The members are drawn straight into their slices, not built as modules
    and stacked (a copy of the pack fewer), on as many threads as torch uses: each member
    has a generator of its own, so the draws do not depend on the threads (most of a pack's
    set-up: 45 → 17 ms for the reference pack on 2 cores; issue 8).
    """
    first = members[0]
    template = MLP(
        shape.in_dim,
        shape.n_classes,
        shape.width,
        shape.depth,
        shape.nonlinearity,
        first.init_scale,
        generator=torch.Generator().manual_seed(first.seed),
    )
    params = {
        name: p.new_empty((len(members), *p.shape)) for name, p in template.named_parameters()
    }
    layers = range(len(template.layers))
    inference = torch.is_inference_mode_enabled()  # per thread: the pool's must follow

    def draw(i: int) -> None:
        with torch.inference_mode(inference):
            draw_initial_(
                [params[f"layers.{layer}.weight"][i] for layer in layers],
                [params[f"layers.{layer}.bias"][i] for layer in layers],
                members[i].init_scale,
                torch.Generator().manual_seed(members[i].seed),
            )

    threads = min(torch.get_num_threads(), len(members))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(draw, range(len(members))))  # list(): raise what a draw raised
    else:
        for i in range(len(members)):
            draw(i)
    return template, params


@torch.no_grad()
def predict_pack(
    template: MLP, params: dict[str, torch.Tensor], x: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Logits of every model on shared inputs: [M, N, C]."""
    chunks = torch.split(x, chunk_size)
    return torch.cat([logits(template.nonlinearity, params, xc) for xc in chunks], dim=1)


@torch.no_grad()
def fits_training_set(
    template: MLP,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """[M] bool: whether each model classifies every training point correctly (own labels).

    Goes through x chunk by chunk and stops as soon as every model has misclassified a
    point (early in training, within the first chunk), so the check costs little until
    models come close to fitting.
    """
    fit = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    chunks = zip(torch.split(x, chunk_size), torch.split(y, chunk_size, dim=1), strict=True)
    for xc, yc in chunks:
        predictions = logits(template.nonlinearity, params, xc).argmax(dim=-1)  # [M, n]
        fit &= (predictions == yc).all(dim=1)
        if not fit.any():
            break
    return fit


def unstack(template: MLP, params: dict[str, torch.Tensor], index: int) -> MLP:
    """Model `index` of a pack as a standalone MLP (a copy; the pack is not touched)."""
    net = MLP(
        template.layers[0].in_features,
        template.layers[-1].out_features,
        template.layers[0].out_features,
        len(template.layers) - 1,
        template.nonlinearity,
        template.init_scale,
    )
    net.load_state_dict({k: v[index].clone() for k, v in params.items()})
    return net
