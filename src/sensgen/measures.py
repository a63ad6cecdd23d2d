"""Norm-, margin- and distance-based generalisation measures of a trained MLP (§6).

"Other measures" of `paper.md` §6 "Beyond the paper", after Jiang et al. 2020,
"Fantastic generalization measures and where to find them" (ICLR 2020; JNMKB below).
W_l is the weight matrix of the l-th `nn.Linear` of ``net`` in module order (l = 1..L,
readout last): a sensgen `MLP`, or any user MLP such as an ``nn.Sequential`` of linear
layers and elementwise activations. θ is all parameters (weights and biases), θ_0 the same
at initialisation. Every function is pure, computes in float64 on the CPU and returns one
Python float per model (`distance_from_init` returns a dict). Products of norms are formed
as exp(Σ log), so they overflow to ``inf`` without a warning; the geometric means never
overflow.

Example:
    >>> import torch
    >>> from sensgen.models import MLP
    >>> net = MLP(4, 3, width=8, depth=2, generator=torch.Generator().manual_seed(0))
    >>> out = all_measures(net, net, torch.randn(20, 4), torch.arange(20) % 3, seed=0)
    >>> out["distance_l2"]
    0.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

# Measures that JNMKB also report divided by γ² (the "margin-normalised" versions).
NORMALISED = (
    "frobenius_product",
    "frobenius_sum",
    "frobenius_geometric",
    "spectral_product",
    "spectral_geometric",
    "spectral_frobenius",
    "path_norm",
)


def _linear_names(net: nn.Module) -> list[str]:
    """Qualified names of the `nn.Linear` modules of ``net``, in module order (W_1..W_L)."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no nn.Linear layers to measure")
    return names


def _weights(net: nn.Module) -> list[torch.Tensor]:
    """[W_1, ..., W_L] as detached float64 CPU tensors (each [n_l, n_{l-1}])."""
    modules = dict(net.named_modules())
    return [modules[n].weight.detach().to("cpu", torch.float64) for n in _linear_names(net)]


def _params(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All parameters of a module, or a state dict, as float64 CPU tensors by name."""
    items = obj.named_parameters() if isinstance(obj, nn.Module) else obj.items()
    return {name: p.detach().to("cpu", torch.float64) for name, p in items}


def _fro_sq(w: torch.Tensor) -> float:
    return float((w * w).sum())


def _spec_sq(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w, ord=2)) ** 2


def _exp(log_value: float) -> float:
    """exp that returns inf instead of raising OverflowError."""
    return math.exp(log_value) if log_value < 709.78 else math.inf


def _log_product(values: list[float]) -> float:
    return sum(math.log(v) if v > 0 else -math.inf for v in values)


def n_params(net: nn.Module) -> int:
    """The number of trainable parameters: Σ_l n_l (n_{l−1} + 1) for an MLP with biases
    (weights plus biases, JNMKB, "params")."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def frobenius_product(net: nn.Module) -> float:
    """Π_l ‖W_l‖_F² (JNMKB, "prod.fro"), formed as exp(Σ_l log ‖W_l‖_F²)."""
    return _exp(_log_product([_fro_sq(w) for w in _weights(net)]))


def frobenius_sum(net: nn.Module) -> float:
    """Σ_l ‖W_l‖_F²; Jiang et al.'s "sum.fro" is `frobenius_geometric`."""
    return sum(_fro_sq(w) for w in _weights(net))


def frobenius_geometric(net: nn.Module) -> float:
    """L · (Π_l ‖W_l‖_F²)^{1/L} = L · exp((1/L) Σ_l log ‖W_l‖_F²) (JNMKB, "sum.fro").

    The mean is taken in log space, so it stays finite however deep or large the net.
    """
    fro = [_fro_sq(w) for w in _weights(net)]
    return len(fro) * _exp(_log_product(fro) / len(fro))


def spectral_product(net: nn.Module) -> float:
    """Π_l ‖W_l‖_2² with ‖·‖_2 the largest singular value (JNMKB, "prod.spec")."""
    return _exp(_log_product([_spec_sq(w) for w in _weights(net)]))


def spectral_geometric(net: nn.Module) -> float:
    """L · (Π_l ‖W_l‖_2²)^{1/L}, in log space (JNMKB, "sum.spec")."""
    spec = [_spec_sq(w) for w in _weights(net)]
    return len(spec) * _exp(_log_product(spec) / len(spec))


def spectral_frobenius(net: nn.Module) -> float:
    """Π_l ‖W_l‖_2² · Σ_l ‖W_l‖_F² / ‖W_l‖_2² (JNMKB, "fro/spec").

    The sum is the total stable rank; the product is as in `spectral_product`.
    """
    ws = _weights(net)
    spec = [_spec_sq(w) for w in ws]
    if min(spec) == 0:
        return 0.0
    stable_rank = sum(_fro_sq(w) / s for w, s in zip(ws, spec, strict=True))
    return _exp(_log_product(spec) + math.log(stable_rank))


def path_norm(net: nn.Module) -> float:
    """Σ_i f_{W∘W}(𝟙)_i (JNMKB, "path.norm").

    The all-ones input is passed through the element-wise squared weights W_l ∘ W_l with
    the identity activation and no biases: v_0 = 𝟙, v_l = (W_l ∘ W_l) v_{l−1}; the measure
    is Σ_i (v_L)_i, i.e. the sum over input-output paths of the product of squared weights.
    """
    ws = _weights(net)
    v = torch.ones(ws[0].shape[1], dtype=torch.float64)
    for w in ws:
        v = (w * w) @ v
    return float(v.sum())


def distance_from_init(
    net: nn.Module, init: nn.Module | Mapping[str, torch.Tensor]
) -> dict[str, float | list[float]]:
    """Distances between θ and θ_0 (JNMKB, "dist.l2", "dist.fro", "dist.spec").

    Args:
        net: the trained network.
        init: the same architecture at initialisation, as a module or its state dict.

    Returns:
        ``l2``: ‖θ − θ_0‖_2 over all parameters (weights and biases);
        ``frobenius``: [‖W_l − W_l⁰‖_F for l = 1..L];
        ``spectral``: [‖W_l − W_l⁰‖_2 for l = 1..L].
    """
    theta, theta0 = _params(net), _params(init)
    if theta.keys() != theta0.keys():
        raise ValueError("net and init have different parameters")
    l2 = math.sqrt(sum(float(((theta[k] - theta0[k]) ** 2).sum()) for k in theta))
    diffs = [theta[f"{n}.weight"] - theta0[f"{n}.weight"] for n in _linear_names(net)]
    return {
        "l2": l2,
        "frobenius": [float(torch.linalg.matrix_norm(d)) for d in diffs],
        "spectral": [float(torch.linalg.matrix_norm(d, ord=2)) for d in diffs],
    }


def logits64(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a float64 CPU copy of ``net`` on x (the network itself is untouched)."""
    net64 = copy.deepcopy(net).to("cpu", torch.float64)
    with torch.no_grad():
        return net64(x.to("cpu", torch.float64))


def margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point output margins z_y − max_{j≠y} z_j, float64 [B] (negative if misclassified)."""
    z = logits64(net, x)
    y = y.to("cpu", torch.long)
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return true - others.max(dim=1).values


def margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """γ = 10th percentile over the given training points of z_y − max_{j≠y} z_j.

    The percentile is ``torch.quantile(·, 0.1)`` with linear interpolation between order
    statistics (numpy's default), as in JNMKB.
    """
    return float(torch.quantile(margins(net, x, y), 0.1))


def inverse_margin(gamma: float) -> float:
    """1/γ² (JNMKB, "1/margin"); γ from `margin`."""
    return 1.0 / gamma**2 if gamma != 0 else math.inf


def normalised(measure_value: float, gamma: float) -> float:
    """measure / γ², the margin-normalised version of a norm measure (JNMKB)."""
    return measure_value * inverse_margin(gamma)


def perturbed_accuracy(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    noise: list[dict[str, torch.Tensor]],
    *,
    magnitude_aware: bool = True,
    eps: float = 1e-3,
) -> float:
    """Mean over the draws in ``noise`` of the accuracy of θ + u on (x, y), float64.

    Each draw is a dict of standard normals g shaped like the parameters; u = s ∘ g with
    s_i = sqrt(σ²θ_i² + ε²) (magnitude-aware) or s_i = σ (plain).
    """
    net64 = copy.deepcopy(net).to("cpu", torch.float64)
    theta = _params(net64)
    x, y = x.to("cpu", torch.float64), y.to("cpu", torch.long)
    accs = []
    with torch.no_grad():
        for g in noise:
            for name, p in net64.named_parameters():
                scale = (sigma**2 * theta[name] ** 2 + eps**2).sqrt() if magnitude_aware else sigma
                p.copy_(theta[name] + scale * g[name])
            accs.append(float((net64(x).argmax(1) == y).double().mean()))
    return sum(accs) / len(accs)


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
    u_i ~ N(0, σ²θ_i² + ε²) (magnitude-aware, the default) or u ~ N(0, σ²I) (plain).

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
    target = _accuracy(net, x, y) - deviation

    def ok(sigma: float) -> bool:
        kw = {"magnitude_aware": magnitude_aware, "eps": eps}
        return perturbed_accuracy(net, x, y, sigma, noise, **kw) >= target

    sigma = _largest_feasible(ok, sigma_max, steps)
    return {"sigma": sigma, "flatness": 1.0 / sigma**2 if sigma > 0 else math.inf}


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits64(net, x).argmax(1) == y.to("cpu", torch.long)).double().mean())


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
) -> float:
    """Lowest accuracy on (x, y) of θ + u over a projected sign-gradient ascent, float64.

    The box is |u_i| ≤ b_i with b_i = α|θ_i| + ε (magnitude-aware) or b_i = α (plain);
    u = b ∘ v with v ∈ [−1, 1]. v starts at ``start`` (a dict of values in [−1, 1] shaped
    like the parameters) and takes ``ascent_steps`` steps v ← clip(v + η sign(∇_v ℓ), −1, 1)
    (η = ``step_size``), i.e. per-coordinate steps η b_i in u. The ascended loss is
    ℓ = −(1/m) Σ_i 1[margin_i > 0] · margin_i with margin_i = z_y − max_{j≠y} z_j: it pushes
    the still-correct points towards the boundary and is positively homogeneous in the
    logits, so scaling the readout leaves every step unchanged. Returns the minimum
    accuracy over the start and the ``ascent_steps`` iterates.
    """
    net64 = copy.deepcopy(net).to("cpu", torch.float64)
    theta = _params(net64)
    bound = {
        k: alpha * t.abs() + eps if magnitude_aware else torch.full_like(t, alpha)
        for k, t in theta.items()
    }
    v = {k: s.to("cpu", torch.float64).clone().requires_grad_(True) for k, s in start.items()}
    x, y = x.to("cpu", torch.float64), y.to("cpu", torch.long)
    worst = math.inf
    for step in range(ascent_steps + 1):
        params = {k: theta[k] + bound[k] * v[k] for k in theta}
        z = torch.func.functional_call(net64, params, (x,))
        true = z.gather(1, y[:, None]).squeeze(1)
        m = true - z.scatter(1, y[:, None], -math.inf).max(dim=1).values
        worst = min(worst, float((z.argmax(1) == y).double().mean()))
        if step == ascent_steps:
            break
        loss = -(m * (m > 0)).mean()
        grads = torch.autograd.grad(loss, list(v.values()))
        with torch.no_grad():
            for t, g in zip(v.values(), grads, strict=True):
                t.add_(step_size * g.sign()).clamp_(-1.0, 1.0)
    return worst


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
    modified. Returns ``{"alpha": α', "sharpness": 1/α'²}`` (∞ when α' = 0).
    """
    gen = torch.Generator().manual_seed(seed)
    start = {
        n: 2 * torch.rand(p.shape, generator=gen, dtype=torch.float64) - 1
        for n, p in net.named_parameters()
    }
    target = _accuracy(net, x, y) - deviation
    kw = {"magnitude_aware": magnitude_aware, "eps": eps, "ascent_steps": ascent_steps}

    def ok(alpha: float) -> bool:
        acc = adversarial_accuracy(net, x, y, alpha, start, step_size=step_size, **kw)
        return acc >= target

    alpha = _largest_feasible(ok, alpha_max, steps)
    return {"alpha": alpha, "sharpness": 1.0 / alpha**2 if alpha > 0 else math.inf}


def pacbayes_init(distance_l2: float, sigma: float, m: int) -> float:
    """‖θ − θ_0‖²/(4σ²) + log(m/σ) + 10 (JNMKB, "pacbayes.init"); ∞ when σ = 0.

    ``distance_l2`` = ‖θ − θ_0‖_2, σ from the plain `pacbayes_flatness`, m = train size.
    """
    if sigma <= 0:
        return math.inf
    return distance_l2**2 / (4 * sigma**2) + math.log(m / sigma) + 10


def all_measures(
    net: nn.Module,
    init: nn.Module | Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
) -> dict[str, float]:
    """Every measure of this module for one model, as {name: float}.

    Keys: ``n_params``, the six Frobenius/spectral measures, ``path_norm``,
    ``distance_l2`` (‖θ − θ_0‖_2), ``distance_frobenius`` (Σ_l ‖W_l − W_l⁰‖_F²),
    ``distance_spectral`` (Σ_l ‖W_l − W_l⁰‖_2²), ``margin`` (γ), ``inverse_margin``, and
    ``<name>_normalised`` = value/γ² for each name in `NORMALISED`.

    ``pacbayes_mag_flatness`` = 1/σ'² from `pacbayes_flatness` (magnitude-aware, its
    defaults, seeded by ``seed``); ``pacbayes_init`` from the plain (u ~ N(0, σ²I)) σ and
    m = len(x); ``sharpness_mag`` = 1/α'² from `sharpness` (magnitude-aware, defaults).
    """
    out: dict[str, float] = {"n_params": float(n_params(net))}
    for fn in (
        frobenius_product,
        frobenius_sum,
        frobenius_geometric,
        spectral_product,
        spectral_geometric,
        spectral_frobenius,
        path_norm,
    ):
        out[fn.__name__] = fn(net)
    dist = distance_from_init(net, init)
    out["distance_l2"] = dist["l2"]
    out["distance_frobenius"] = sum(d**2 for d in dist["frobenius"])
    out["distance_spectral"] = sum(d**2 for d in dist["spectral"])
    gamma = margin(net, x, y)
    out["margin"] = gamma
    out["inverse_margin"] = inverse_margin(gamma)
    for name in NORMALISED:
        out[f"{name}_normalised"] = normalised(out[name], gamma)
    out["pacbayes_mag_flatness"] = pacbayes_flatness(net, x, y, seed=seed)["flatness"]
    sigma = pacbayes_flatness(net, x, y, seed=seed, magnitude_aware=False)["sigma"]
    out["pacbayes_init"] = pacbayes_init(dist["l2"], sigma, len(x))
    out["sharpness_mag"] = sharpness(net, x, y, seed=seed)["sharpness"]
    return out
