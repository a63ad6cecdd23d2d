"""What each model of a pack trains on at each step: its minibatch and its augmentation.

Every model draws from generators of its own, seeded from its run's seed by `derive_seed`:
its data order from ``derive_seed(seed, "order")``, its translations and flips from
``derive_seed(seed, "augment")``. What a model sees therefore does not depend on its
pack-mates, nor on which of them are still training (`select` drops models).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sensgen.data import Augmentation, apply_augmentation, draw_augmentation


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose ("order", "labels", ...) derived from a run's seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generators(seeds: Sequence[int], purpose: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(s, purpose)) for s in seeds]


class Minibatches:
    """Each model's next minibatch, gathered into one buffer [M, B, d] kept across steps.

    Model m walks its own permutation of the N examples, drawn from its own generator and
    redrawn every epoch; an epoch is ⌊N / B⌋ batches (the remainder of each is dropped).

    Args:
        seeds: the models' run seeds (M of them).
        batch_size: B.
        x: the training inputs [N, d] (for their size, dtype and device).
    """

    def __init__(self, seeds: Sequence[int], batch_size: int, x: torch.Tensor) -> None:
        self.generators = _generators(seeds, "order")
        self.b, self.n = batch_size, x.shape[0]
        self.orders = torch.empty(0, 0, dtype=torch.int64)  # [M, N], one permutation per row
        self.cursor = self.n  # forces a fresh permutation at the first step
        self.x = torch.empty(len(seeds), batch_size, x.shape[1], dtype=x.dtype, device=x.device)
        self.idx = torch.empty(0, 0, dtype=torch.int64)  # [M, B], the last batch's rows
        self.row_sq: torch.Tensor | None = None  # ‖x_i‖² [N], float64, made on first use

    def next(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [M, B, d], labels [M, B]) of the next step, from x [N, d], y [M, N]."""
        if self.cursor + self.b > self.n:
            perms = [torch.randperm(self.n, generator=g) for g in self.generators]
            self.orders, self.cursor = torch.stack(perms).to(x.device), 0
        idx = self.idx = self.orders[:, self.cursor : self.cursor + self.b]
        self.cursor += self.b
        torch.index_select(x, 0, idx.flatten(), out=self.x.view(-1, x.shape[1]))
        return self.x, torch.gather(y, 1, idx)

    def input_norms(self, x: torch.Tensor) -> torch.Tensor:
        """‖x_batch_m‖_F [M] (float64) of the last batch from x [N, d], unaugmented: from
        the rows' squared norms, computed once, not from a pass over the batch."""
        if self.row_sq is None:  # in float64, 1,024 rows at a time (not a copy of all x)
            rows = [torch.linalg.vector_norm(c, dim=1, dtype=torch.float64) for c in x.split(1024)]
            self.row_sq = torch.cat(rows) ** 2
        return self.row_sq[self.idx].sum(dim=1).sqrt()

    def select(self, keep: list[int]) -> None:
        """Keep only models `keep` (positions), each going on with its own permutation."""
        self.generators = [self.generators[i] for i in keep]
        if len(self.orders):
            self.orders = self.orders[keep]
        self.x = self.x[keep].contiguous()


class Augmenter:
    """Augments the batches of a pack's augmenting members, each with its own generator.

    Args:
        aug: how to augment.
        which: positions (in the pack) of the augmenting members.
        seeds: their run seeds, in the same order.
    """

    def __init__(self, aug: Augmentation, which: list[int], seeds: Sequence[int]) -> None:
        self.aug = aug
        self.which = which
        self.generators = _generators(seeds, "augment")
        self._index: torch.Tensor | None = None  # `which` as a tensor, made on first use

    @classmethod
    def for_pack(
        cls,
        aug: Augmentation | None,
        augments: Sequence[bool],
        seeds: Sequence[int],
        x: torch.Tensor,
    ) -> Augmenter | None:
        """None when no member augments (the pack then trains exactly as without this)."""
        which = [i for i, flag in enumerate(augments) if flag]
        if not which:
            return None
        if aug is None:
            raise ValueError("members augment, but the PackShape has no augmentation")
        if aug.dim != x.shape[1]:
            raise ValueError(
                f"augmentation is for images of {aug.image_shape}, x is [N, {x.shape[1]}]"
            )
        return cls(aug, which, [seeds[i] for i in which])

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        """Augment members `which` of the batches xb [M, B, D] in place; returns xb.

        Every augmenting member draws B translations (and flips) from its own generator,
        so its draws do not depend on its pack-mates; all are applied in one batched call.
        """
        b, d = xb.shape[1:]
        draws = [draw_augmentation(self.aug, b, generator=g) for g in self.generators]
        shifts = torch.cat([s for s, _ in draws])  # [K*B, 2], member-major
        flips = torch.cat([f for _, f in draws])  # [K*B]
        if self._index is None:
            self._index = torch.tensor(self.which, dtype=torch.int64, device=xb.device)
        moved = apply_augmentation(xb[self._index].reshape(-1, d), self.aug, shifts, flips)
        xb[self._index] = moved.view(-1, b, d)
        return xb

    def select(self, keep: list[int]) -> Augmenter | None:
        """This augmenter for the pack of models `keep` (positions); None if none augments."""
        position = {old: new for new, old in enumerate(keep)}
        pairs = zip(self.which, self.generators, strict=True)
        kept = [(position[i], g) for i, g in pairs if i in position]
        if not kept:
            return None
        self.which = [i for i, _ in kept]
        self.generators = [g for _, g in kept]
        self._index = None
        return self
