"""Execute one pack: load its data, train its models together, measure each one.

`execute_pack` is what a worker runs. It touches no files: it returns the per-run
results, the per-test-point table and the trained weights, and the driver stores them.

Per model (paper §2.3, §2.1):
    train_acc, train_loss   on the full (subset of the) training set, with the labels the
                            model was trained on (random labels included), no augmentation
    test_acc, test_loss     on the full test set, true labels
    gap = train_acc − test_acc,  loss_gap = test_loss − train_loss
    jacobian_norm           Jbar = mean over test points of ‖∂softmax/∂x‖_F
Per test point: loss (CE), correct, p_y, margin z_y − max_{j≠y} z_j, ‖J‖_F (softmax and
logits). Per model, when `[measure]` asks: profiles along ellipses through training points
and region maps at init and after training (`sensgen.geometry`, paper Figs. 2 and 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from sensgen import data
from sensgen.geometry import measure_profiles, measure_regions
from sensgen.measure import MEASURE_SEED, measure_model, train_point_indices
from sensgen.measures import all_measures
from sensgen.metrics import jacobian_norms
from sensgen.models import count_parameters
from sensgen.store import RunResult, Status
from sensgen.study import Measurements, RunSpec
from sensgen.train import (
    Member,
    PackOutcome,
    PackShape,
    derive_seed,
    init_pack,
    predict_pack,
    train_pack,
    unstack,
)


@dataclass(frozen=True)
class PackResult:
    """What a finished pack hands back to the driver."""

    results: list[RunResult]
    points: pd.DataFrame | None  # None when the pack failed
    weights: dict[str, torch.Tensor] | None
    profiles: pd.DataFrame | None = None  # None when not measured or the pack failed
    regions: dict[str, torch.Tensor] | None = None
    measures: pd.DataFrame | None = None

    def files(self) -> dict[str, Any]:
        """The pack's files as `Store.finish_pack` keyword arguments."""
        return {
            "points": self.points,
            "weights": self.weights,
            "profiles": self.profiles,
            "regions": self.regions,
            "measures": self.measures,
        }


def training_subset(dataset: str, n_train: int, size: int | None) -> torch.Tensor | None:
    """Indices of a fixed training subset (the same for every run of a dataset), or None."""
    if size is None or size >= n_train:
        return None
    g = torch.Generator().manual_seed(derive_seed(0, f"subset:{dataset}"))
    return torch.randperm(n_train, generator=g)[:size].sort().values


def training_labels(spec: RunSpec, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The labels a run trains on: the true ones, with a `random_labels` fraction redrawn."""
    if spec.random_labels == 0:
        return y.clone()
    g = torch.Generator().manual_seed(derive_seed(spec.seed, "labels"))
    return data.randomize_labels(y, spec.random_labels, n_classes, generator=g)


def execute_pack(
    specs: Sequence[RunSpec],
    *,
    device: str = "cpu",
    on_step: Callable[[int], None] | None = None,
    measure: Measurements | None = None,
) -> PackResult:
    """Train and evaluate a pack of same-shape runs (see module docstring).

    `measure` (the study's `[measure]` table) adds per-model measurements (`measure_model`)
    and decides whether the per-point table is kept.
    """
    measure = measure or Measurements()
    start = time.perf_counter()
    first = specs[0]
    train = data.load(first.dataset, split="train")
    test = data.load(first.dataset, split="test")
    subset = training_subset(first.dataset, len(train), first.train_subset)
    x_train, y_true = (train.x, train.y) if subset is None else (train.x[subset], train.y[subset])
    labels = torch.stack([training_labels(s, y_true, train.n_classes) for s in specs])
    shape = PackShape(
        in_dim=x_train.shape[1],
        n_classes=train.n_classes,
        width=first.width,
        depth=first.depth,
        nonlinearity=first.nonlinearity,
        optimizer=first.optimizer,
        batch_size=first.batch_size,
        max_steps=first.max_steps,
        eval_every=first.eval_every,
        stop_at_fit=first.stop_at_fit,
        augmentation=data.augmentation_for(train) if any(s.augment for s in specs) else None,
    )
    members = [
        Member(seed=s.seed, lr=s.lr, init_scale=s.init_scale, augment=s.augment) for s in specs
    ]
    x_train, labels = x_train.to(device), labels.to(device)
    outcome = train_pack(shape, members, x_train, labels, on_step=on_step)
    # The initial weights (the same draw train_pack started from) are needed only to compare
    # against them: once per pack, for region maps at init and distance from init.
    needs_init = measure.region_planes > 0 or bool(measure.measure_groups())
    template, initial = init_pack(shape, members if needs_init else members[:1])
    template, initial = template.to(device), initial if needs_init else None
    results, points = _evaluate(
        specs, shape, template, outcome, x_train, labels, test, device, measure
    )
    done = [r.status is Status.DONE for r in results]
    profiles, regions = _geometry(specs, done, template, initial, outcome, x_train, y_true, measure)
    measures = _measures(specs, done, template, initial, outcome, x_train, labels, measure)
    wall = (time.perf_counter() - start) / len(specs)  # training and every measurement
    results = [_with_wall_time(r, wall) for r in results]
    weights = {
        f"{spec.run_id}.{name}": value[i].detach().cpu().contiguous()
        for i, spec in enumerate(specs)
        for name, value in outcome.params.items()
    }
    table = pd.concat(points, ignore_index=True) if measure.points else None
    return PackResult(results, table, weights, profiles, regions, measures)


def _measures(specs, done, template, initial, outcome, x_train, labels, measure):
    """Generalization measures (`sensgen.measures.all_measures`) of the done models, long.

    Margin and flatness use the same fixed subset of `measure_points` training points (with
    the labels each model trained on); norms and distances use the weights only.
    """
    groups = measure.measure_groups()
    if not groups:
        return None
    k = min(measure.measure_points, len(x_train))
    idx = train_point_indices(len(x_train), k, seed=MEASURE_SEED).to(x_train.device)
    rows = []
    for i, spec in enumerate(specs):
        if not done[i]:
            continue
        net = unstack(template, outcome.params, i)
        init = unstack(template, initial, i)
        x, y = x_train[idx].cpu(), labels[i][idx].cpu()
        values = all_measures(net, init, x, y, seed=spec.seed, groups=groups, n_train=len(x_train))
        rows += [(spec.run_id, name, float(value)) for name, value in values.items()]
    return pd.DataFrame(rows, columns=["run_id", "measure", "value"]) if rows else None


def _geometry(specs, done, template, initial, outcome, x_train, y_true, measure):
    """Profiles (Fig. 2) and region maps (Fig. 3) of the pack's done models, if asked."""
    if not (measure.profile_ellipses or measure.region_planes):
        return None, None
    frames, regions = [], {}
    for i, spec in enumerate(specs):
        if not done[i]:  # diverged nets are not measured
            continue
        net = unstack(template, outcome.params, i).to(x_train.device)
        if measure.profile_ellipses:
            frame = measure_profiles(net, x_train, y_true, config=measure, seed=MEASURE_SEED)
            frames.append(frame.assign(run_id=spec.run_id))
        if measure.region_planes:
            before = unstack(template, initial, i).to(x_train.device)
            maps = measure_regions(before, net, x_train, y_true, config=measure, seed=MEASURE_SEED)
            regions |= {f"{spec.run_id}.{key}": value for key, value in maps.items()}
    profiles = pd.concat(frames, ignore_index=True) if frames else None
    return profiles, (regions or None) if measure.region_planes else None


def _evaluate(specs, shape, template, outcome: PackOutcome, x_train, labels, test, device, measure):
    x_test, y_test = test.x.to(device), test.y.to(device)
    train_logits = predict_pack(template, outcome.params, x_train)  # [M, N, C]
    test_logits = predict_pack(template, outcome.params, x_test)  # [M, Nt, C]
    n_params = count_parameters(shape.in_dim, shape.n_classes, shape.width, shape.depth)
    results, points = [], []
    for i, spec in enumerate(specs):
        net = unstack(template, outcome.params, i).to(device)
        norms = jacobian_norms(net, x_test)
        frame = _point_frame(spec.run_id, test_logits[i], y_test, norms)
        train_loss = F.cross_entropy(train_logits[i].double(), labels[i]).item()
        train_acc = (train_logits[i].argmax(-1) == labels[i]).double().mean().item()
        test_loss, test_acc = frame["loss"].mean(), frame["correct"].mean()
        metrics = {
            "steps": int(outcome.steps[i]),
            "n_params": n_params,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": float(test_loss),
            "test_acc": float(test_acc),
            "gap": train_acc - float(test_acc),
            "loss_gap": float(test_loss) - train_loss,
            "jacobian_norm": float(frame["jacobian_norm"].mean()),
            "jacobian_norm_logits": float(frame["jacobian_norm_logits"].mean()),
        }
        broken = [k for k, v in metrics.items() if pd.isna(v) or abs(v) == float("inf")]
        diverged = bool(outcome.diverged[i]) or bool(broken)
        status = Status.DIVERGED if diverged else Status.DONE
        error = _divergence(bool(outcome.diverged[i]), broken, net) if diverged else None
        if not diverged:  # diverged nets are not measured (their columns stay NULL)
            metrics |= measure_model(
                net, x_train=x_train, test=test, config=measure, seed=MEASURE_SEED
            )
        results.append(RunResult(spec.run_id, status, metrics, error))
        points.append(frame)
    return results, points


def _divergence(in_training: bool, broken: list[str], net: torch.nn.Module) -> str:
    """Why a run is stored as diverged: non-finite during training, or trained to finite
    weights whose function is not finite in float32 (its logits overflow, say)."""
    if in_training:
        return "loss or parameters became non-finite during training"
    largest = max(float(p.detach().abs().max()) for p in net.parameters())
    return (
        f"trained with finite losses and parameters (the largest |θ| {largest:.1e}), but its "
        f"{', '.join(broken)} came out non-finite: the trained function overflows float32"
    )


def _point_frame(run_id: str, logits: torch.Tensor, y: torch.Tensor, norms) -> pd.DataFrame:
    """Per-test-point table for one model (float64 maths on the model's logits)."""
    z = logits.double()
    log_p = torch.log_softmax(z, dim=-1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return pd.DataFrame(
        {
            "run_id": run_id,
            "split": "test",
            "index": torch.arange(len(y)).numpy(),
            "label": y.cpu().numpy(),
            "loss": (-log_p.gather(1, y[:, None]).squeeze(1)).cpu().numpy(),
            "correct": (z.argmax(-1) == y).cpu().numpy(),
            "p_y": log_p.gather(1, y[:, None]).squeeze(1).exp().cpu().numpy(),
            "margin": (z_y - others.amax(-1)).cpu().numpy(),
            "jacobian_norm": norms["softmax"].cpu().numpy(),
            "jacobian_norm_logits": norms["logits"].cpu().numpy(),
        }
    )


def _with_wall_time(result: RunResult, wall_s: float) -> RunResult:
    return RunResult(
        result.run_id, result.status, {**result.metrics, "wall_s": wall_s}, result.error
    )


def execute_or_fail(specs: Sequence[RunSpec], **options) -> PackResult:
    """`execute_pack`, with any exception turned into a `failed` pack: one bad pack never
    stops a sweep. Interrupts (Ctrl-C, exit) still propagate."""
    try:
        return execute_pack(specs, **options)
    except Exception as error:
        return failed_pack(specs, error)


def failed_pack(specs: Sequence[RunSpec], error: BaseException) -> PackResult:
    """A pack result with every run `failed`, no points and no weights."""
    return PackResult(failed_results(specs, error), None, None)


def failed_results(specs: Sequence[RunSpec], error: BaseException) -> list[RunResult]:
    """Every run of a pack marked failed with the exception's one-line summary."""
    message = f"{type(error).__name__}: {error}"
    return [RunResult(s.run_id, Status.FAILED, {}, message) for s in specs]
