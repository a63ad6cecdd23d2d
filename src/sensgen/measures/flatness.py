"""Perturbation-based measures: PAC-Bayes flatness and sharpness, magnitude-aware or plain
(JNMKB: Jiang et al. 2020), and pacbayes.init. Each search is seeded and deterministic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from sensgen.measures.margins import checked_labels, logits64
from sensgen.measures.mlp64 import BufferedMLP
from sensgen.measures.norms import _params
from sensgen.models import MLP


def perturbed_accuracy(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    noise: list[dict[str, torch.Tensor]],
    *,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
    settle: float | None = None,
) -> float:
    """Mean over the draws in ``noise`` of the accuracy of θ + u on (x, y), float64.

    Each draw is a dict of standard normals g shaped like the parameters; u = s ∘ g with
    s_i = sqrt(σ²θ_i² + ε²) (magnitude-aware) or s_i = σ (plain).

    With ``settle`` = t, only whether the mean is ≥ t is wanted: the draws stop as soon as
    the rest cannot change that (accuracies lie in [0, 1]), and the value returned is on
    the same side of t as the full mean (a bound on it).
    """
    net64 = copy.deepcopy(net).to("cpu", torch.float64).eval()  # no dropout noise
    # A copy: `_params` of a float64 CPU net returns its parameters themselves, which each
    # draw overwrites below (θ must stay θ, or the draws would add up).
    theta = {name: t.clone() for name, t in _params(net64).items()}
    x, y = x.to("cpu", torch.float64), y.to("cpu", torch.long)
    n, total = len(noise), 0.0
    logits = _logits_into_buffers(net64)
    with torch.no_grad():
        # s depends on σ only: computed once for all the draws.
        scale = {
            name: (sigma**2 * t**2 + eps**2).sqrt() if magnitude_aware else sigma
            for name, t in theta.items()
        }
        params = dict(net64.named_parameters())
        su = {name: torch.empty_like(t) for name, t in theta.items()}  # s ∘ g, kept
        for k, g in enumerate(noise, start=1):
            for name, p in params.items():  # θ + (s ∘ g): the same two roundings as ever
                torch.add(theta[name], torch.mul(g[name], scale[name], out=su[name]), out=p)
            total += float((logits(x).argmax(1) == y).double().mean())
            if settle is not None and k < n:
                if total / n >= settle:  # the mean can only grow from here
                    return total / n
                if (total + (n - k)) / n < settle - _SLACK:  # even all-correct rest falls short
                    return (total + (n - k)) / n
    return total / n


# Early stops decide only with this margin, so float rounding of the bound never flips one.
_SLACK = 1e-12


def _logits_into_buffers(net64: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [n, d] ↦ net64(x) at its current parameters, for evaluations without gradients,
    many times over: for a sensgen `MLP` into buffers kept from call to call
    (`BufferedMLP`: the same values, bit for bit, without a fresh [n, width] tensor per
    layer and call, whose page faults took a quarter of each forward pass of a flatness
    search, 784-512-512-512 on 1,000 points: 13.4 against 10.1 ms; issue 8). Any other
    module: itself. The returned logits live in a buffer until the next call.
    """
    buffered = BufferedMLP.of(net64)
    if buffered is None:
        return net64
    params = dict(net64.named_parameters())  # (the draws overwrite these tensors in place)
    return lambda x: buffered.logits(params, x)


def pacbayes_flatness(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
    deviation: float = 0.1,
    n_draws: int = 10,
    sigma_max: float = 1024.0,
    steps: int = 20,
) -> dict[str, float]:
    """PAC-Bayes flatness 1/σ² (JNMKB, "pacbayes.flatness"/"pacbayes.mag.flatness").

    σ is the largest value with E_u[acc(θ + u)] ≥ acc(θ) − ``deviation`` on (x, y), where
    u_i ~ N(0, σ²θ_i² + ε²) (magnitude-aware, the default) or u ~ N(0, σ²I) (plain). An
    exact tie counts as ≥ (`_TIES`). A net with a NaN or ∞ parameter (a diverged one) gives
    NaN, not the cap that its constant argmax would reach.

    Search: ``n_draws`` standard-normal draws g are taken once from a generator seeded with
    ``seed`` and reused at every σ (common random numbers: the criterion is a deterministic
    function of σ); σ by `_largest_feasible` (cap ``sigma_max``). σ = 0 gives ∞.

    Returns ``{"sigma": σ, "flatness": 1/σ²}``.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n, p.shape) for n, p in net.named_parameters()]
    noise = [
        {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes}
        for _ in range(n_draws)
    ]
    target = _accuracy(net, x, y) - deviation - _TIES
    if not _finite(net):
        return {"sigma": math.nan, "flatness": math.nan}

    def ok(sigma: float) -> bool:
        kw = {"magnitude_aware": magnitude_aware, "eps": eps, "settle": target}
        return perturbed_accuracy(net, x, y, sigma, noise, **kw) >= target

    sigma = _largest_feasible(ok, sigma_max, steps)
    return {"sigma": sigma, "flatness": 1.0 / sigma**2 if sigma > 0 else math.inf}


# The searches' criteria hold when an accuracy is ≥ acc(θ) − deviation, up to this much: the
# accuracies are multiples of 1/m, their means over n draws of 1/(mn), so an exact tie
# (10 draws each losing one point of 10: mean 0.9 = 1 − 0.1) can be summed to 1e-16 below
# the threshold, and was refused; any real shortfall is ≥ 1/(10mn), far above this.
_TIES = 1e-12


def _finite(net: nn.Module) -> bool:
    """Whether every parameter of ``net`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """acc(θ) on (x, y), float64; y checked against the logits (`checked_labels`): a
    label out of range would make the accuracy 0 and the search return its cap."""
    z = logits64(net, x)
    return float((z.argmax(1) == checked_labels(y, z)).double().mean())


def _largest_feasible(ok: Callable[[float], bool], upper: float, steps: int) -> float:
    """The bisection shared by `pacbayes_flatness` and `sharpness`.

    hi = 1, doubled while ``ok(hi)`` (returning the last feasible value once hi would
    exceed ``upper``); then ``steps`` bisection steps on [lo, hi] keep lo feasible and hi
    infeasible, and lo is returned (0 if even the smallest tried value is infeasible).
    """
    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, 2 * hi
        if hi > upper:
            return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def adversarial_accuracy(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    start: dict[str, torch.Tensor],
    *,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
    ascent_steps: int = 10,
    step_size: float = 0.25,
    stop_below: float | None = None,
) -> float:
    """Lowest accuracy on (x, y) of θ + u over a projected sign-gradient ascent, float64.

    The box is |u_i| ≤ b_i with b_i = α|θ_i| + ε (magnitude-aware) or b_i = α (plain);
    u = b ∘ v with v ∈ [−1, 1]. v starts at ``start`` (a dict of values in [−1, 1] shaped
    like the parameters) and takes ``ascent_steps`` steps v ← clip(v + η sign(∇_v ℓ), −1, 1)
    (η = ``step_size``), i.e. per-coordinate steps η b_i in u. The ascended loss is
    ℓ = −(1/m) Σ_i 1[margin_i > 0] · margin_i with margin_i = z_y − max_{j≠y} z_j: it pushes
    the still-correct points towards the boundary and is positively homogeneous in the
    logits, so scaling the readout leaves every step unchanged. Returns the minimum
    accuracy over the start and the ``ascent_steps`` iterates; with ``stop_below``, the
    ascent stops at the first iterate whose accuracy is below it (the minimum is then below
    it too) and returns that accuracy.
    """
    net64 = copy.deepcopy(net).to("cpu", torch.float64).eval()  # no dropout noise
    theta = _params(net64)
    bound = {
        k: alpha * t.abs() + eps if magnitude_aware else torch.full_like(t, alpha)
        for k, t in theta.items()
    }
    v = {k: s.to("cpu", torch.float64).clone() for k, s in start.items()}
    x, y = x.to("cpu", torch.float64), y.to("cpu", torch.long)
    ascent = _buffered_ascent if BufferedMLP.applies_to(net64) else _autograd_ascent
    worst = math.inf
    for accuracy in ascent(net64, theta, bound, v, x, y, ascent_steps, step_size):
        worst = min(worst, accuracy)
        if stop_below is not None and worst < stop_below:
            break
    return worst


def _autograd_ascent(
    net64: nn.Module,
    theta: dict[str, torch.Tensor],
    bound: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    step_size: float,
) -> Iterator[float]:
    """The accuracy of each iterate θ + b ∘ v of `adversarial_accuracy`'s ascent (the
    start first, ``steps`` + 1 in all), v updated in place between them: the loss ℓ
    differentiated by autograd, for any module. Stop iterating to stop the ascent."""
    for t in v.values():
        t.requires_grad_(True)
    for step in range(steps + 1):
        params = {k: theta[k] + bound[k] * v[k] for k in theta}
        z = torch.func.functional_call(net64, params, (x,))
        yield _accuracy_of(z, y)
        if step == steps:
            return
        true = z.gather(1, y[:, None]).squeeze(1)
        m = true - z.scatter(1, y[:, None], -math.inf).max(dim=1).values
        loss = -(m * (m > 0)).mean()
        grads = torch.autograd.grad(loss, list(v.values()))
        with torch.no_grad():
            for t, g in zip(v.values(), grads, strict=True):
                t.add_(step_size * g.sign()).clamp_(-1.0, 1.0)


@torch.no_grad()
def _buffered_ascent(
    net64: MLP,
    theta: dict[str, torch.Tensor],
    bound: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    step_size: float,
) -> Iterator[float]:
    """`_autograd_ascent` for a sensgen `MLP`, bit for bit, into kept buffers
    (`BufferedMLP`; issue 8).

    ∂ℓ/∂z is written out as autograd's backward pass of ℓ = −mean(m · 1[m > 0]) makes it:
    −1/n at (i, y_i) and +1/n at (i, the rival class that attains max_{j≠y} z_ij) for
    the points with m_i > 0 (n points in all), +0 everywhere else (autograd's sums of its
    branches turn every −0 into +0; where the rival is y, y's −1/n alone). Then
    ∂ℓ/∂v = ∂ℓ/∂θ' ∘ b at θ' = θ + b ∘ v, as autograd's product rule computes it.
    """
    mlp = BufferedMLP(net64)
    params = {k: torch.empty_like(t) for k, t in theta.items()}
    grads = {k: torch.empty_like(t) for k, t in theta.items()}
    rows, n = y[:, None], max(x.shape[0], 1)  # (no points: nothing to scatter into)
    for step in range(steps + 1):
        for k, p in params.items():  # θ + b ∘ v, the same two roundings as autograd's
            torch.add(theta[k], torch.mul(bound[k], v[k], out=grads[k]), out=p)
        z = mlp.logits(params, x)
        yield _accuracy_of(z, y)
        if step == steps:
            return
        true = z.gather(1, rows).squeeze(1)
        rival = z.scatter(1, rows, -math.inf).max(dim=1)
        positive = (true - rival.values > 0)[:, None]
        grad_z = torch.zeros_like(z)
        grad_z.scatter_(1, rival.indices[:, None], torch.where(positive, z.new_tensor(1 / n), 0))
        # y's entry last: where the rival is y itself (one class, or every other logit
        # −inf), autograd's backward of the −inf scatter zeroes the rival's +1/n there.
        grad_z.scatter_(1, rows, torch.where(positive, z.new_tensor(-1 / n), 0))
        mlp.gradients(params, grad_z, grads)
        for k, t in v.items():
            t.add_(grads[k].mul_(bound[k]).sign_().mul_(step_size)).clamp_(-1.0, 1.0)


def _accuracy_of(z: torch.Tensor, y: torch.Tensor) -> float:
    return float((z.argmax(1) == y).double().mean())


def sharpness(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
    deviation: float = 0.1,
    ascent_steps: int = 10,
    step_size: float = 0.25,
    alpha_max: float = 1024.0,
    steps: int = 20,
) -> dict[str, float]:
    """Worst-case sharpness 1/α'² (JNMKB, "sharpness"/"sharpness.mag"; ε = 1e-3).

    α' is the largest α such that the accuracy after the worst perturbation u found in the
    box |u_i| ≤ α|θ_i| + ε (magnitude-aware, the default) or |u_i| ≤ α (plain) stays
    ≥ acc(θ) − ``deviation`` on (x, y). The worst perturbation is searched by
    `adversarial_accuracy` from one start v ~ U[−1, 1] (u = bound ∘ v), drawn once from a
    generator seeded with ``seed`` and reused at every α, so the criterion is a
    deterministic function of α. α' comes from the same bracketing and bisection as
    `pacbayes_flatness` (cap ``alpha_max``, ``steps`` bisection steps). The net is not
    modified. Returns ``{"alpha": α', "sharpness": 1/α'²}`` (∞ when α' = 0; NaN for a net
    with a NaN or ∞ parameter). An exact tie counts as ≥ (`_TIES`).
    """
    gen = torch.Generator().manual_seed(seed)
    start = {
        n: 2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1
        for n, p in net.named_parameters()
    }
    target = _accuracy(net, x, y) - deviation - _TIES
    if not _finite(net):
        return {"alpha": math.nan, "sharpness": math.nan}
    kw = {"magnitude_aware": magnitude_aware, "eps": eps, "ascent_steps": ascent_steps}

    def ok(alpha: float) -> bool:
        acc = adversarial_accuracy(
            net, x, y, alpha, start, step_size=step_size, stop_below=target, **kw
        )
        return acc >= target

    alpha = _largest_feasible(ok, alpha_max, steps)
    return {"alpha": alpha, "sharpness": 1.0 / alpha**2 if alpha > 0 else math.inf}


def pacbayes_init(distance_l2: float, sigma: float, m: int) -> float:
    """‖θ − θ_0‖²/(4σ²) + log(m/σ) + 10 (JNMKB, "pacbayes.init"); ∞ when σ = 0.

    ``distance_l2`` = ‖θ − θ_0‖_2, σ from the plain `pacbayes_flatness`, m = train size.
    """
    if sigma <= 0:
        return math.inf
    # (float products round to ∞ where distance_l2**2 would raise OverflowError)
    return distance_l2 * distance_l2 / (4 * sigma * sigma) + math.log(m / sigma) + 10
