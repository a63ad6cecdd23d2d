"""Per-point Frobenius norm of the input–output Jacobian (paper §2.1).

For a network with logits z(x) ∈ R^C and p = softmax(z), the paper's sensitivity metric
at a point x is ‖J(x)‖_F with J(x) = ∂p/∂x ∈ R^{C×d}: the Jacobian of the *softmax
output*, not of the logits. By the chain rule J = S(p) J_z with

    S(p) = diag(p) − p pᵀ   (symmetric, C×C),     J_z = ∂z/∂x   (C×d),

so with the logit Gram matrix K = J_z J_zᵀ (C×C):

    ‖J‖_F² = tr(S K S) = Σ_ij (S K)_ij S_ij,      ‖J_z‖_F² = tr K.

Both paths below produce K, then contract with S in float64:

* closed form for sensgen `MLP`s: J_z = W_L D_{L−1} W_{L−1} ··· D_1 W_1 with
  D_l = diag(φ'(h_l(x))). We build M = W_L D_{L−1} ··· W_2 D_1 (C×n_1) from the left,
  batched over points, and use the Gram trick K = M G Mᵀ with G = W_1 W_1ᵀ computed once
  (cheaper than forming M W_1 when n_1 < d).
* autodiff for any `nn.Module` returning logits: `vmap(jacrev)` of the logits, K = J_z J_zᵀ.

Why float64 for S: at a confident point p_y rounds to 1 in float32 and S_yy = p_y(1 − p_y)
cancels to 0, so every float32 method loses the small norms that the paper plots on log
axes. We compute p in float64 with a max-shifted softmax and 1 − p_i as Σ_{j≠i} p_j.

The input x is whatever the model consumes; for sensgen datasets that is the flattened,
standardised input, so norms are per unit of standardised input (they scale as 1/scale).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from sensgen.errors import UserError, parse_choice
from sensgen.metrics._inputs import (
    as_batch,
    check_chunk_size,
    is_plain_mlp,
    unwrap_parallel,
)
from sensgen.metrics._mode import require_eval_mode
from sensgen.models import DERIVATIVES, MLP

# Elements in the largest per-chunk intermediate: about 4 MiB in float32, which keeps it in
# cache-friendly sizes (measured fastest on 2 cores) and bounds memory for any model.
_CHUNK_ELEMENTS = 2**20
_MIN_CHUNK = 16


class Output(StrEnum):
    """Which output the Jacobian is taken of."""

    SOFTMAX = "softmax"
    LOGITS = "logits"


class Method(StrEnum):
    """How the logit Gram matrix is computed."""

    AUTO = "auto"  # closed form for sensgen MLPs, autodiff otherwise
    CLOSED_FORM = "closed_form"
    AUTODIFF = "autodiff"


def jacobian_norm(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str = "softmax",
    chunk_size: int | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Exact per-point Frobenius norm of the input–output Jacobian (paper §2.1).

    ‖J(x)‖_F with J = ∂softmax(f(x))/∂x (``output="softmax"``, the paper's metric) or
    J = ∂f(x)/∂x (``output="logits"``), one value per point. The model Jbar of the paper
    is the mean of these values over the test set; averaging is the caller's job.

    Args:
        model: any module mapping a batch [B, ...] to logits [B, C] (a log-softmax is
            fine; probabilities are refused for output="softmax"), in eval mode if it has
            dropout, batch norm or spectral norm (else `UserError`; so is a batch norm
            without running statistics, batch-dependent in any mode, and on the autodiff
            path a forward whose points' logits change with their batch); `nn.DataParallel` is
            measured as the module inside. Its parameters, buffers and ``.grad`` are not
            touched.
        x: inputs [B, ...] (for sensgen MLPs [B, d]) on the model's device.
        output: "softmax" or "logits".
        chunk_size: points per chunk; None picks one that bounds memory (~64 MiB per
            intermediate). Results do not depend on it.
        method: "auto" (closed form for a sensgen `MLP` with MLP's own forward, autodiff
            otherwise), "closed_form" or "autodiff".

    Returns:
        float64 tensor [B] on x's device.

    Example:
        >>> net = MLP(784, 10, width=64, depth=2)
        >>> jacobian_norm(net, torch.randn(8, 784)).shape
        torch.Size([8])
    """
    output = parse_choice(Output, output, "output")
    return jacobian_norms(model, x, outputs=(output,), chunk_size=chunk_size, method=method)[output]


def jacobian_norms(
    model: nn.Module,
    x: torch.Tensor,
    *,
    outputs: tuple[str, ...] = ("softmax", "logits"),
    chunk_size: int | None = None,
    method: str = "auto",
) -> dict[Output, torch.Tensor]:
    """Several Jacobian norms from one pass: {Output: float64 [B]}.

    Same contract as `jacobian_norm`; both norms share the logit Gram matrix K, so asking
    for "softmax" and "logits" together costs the same as asking for one.
    """
    wanted = [parse_choice(Output, o, "output") for o in outputs]
    method = parse_choice(Method, method, "method")
    model = unwrap_parallel(model)
    if method is Method.AUTO:
        method = Method.CLOSED_FORM if is_plain_mlp(model) else Method.AUTODIFF
    if method is Method.CLOSED_FORM and not is_plain_mlp(model):
        raise UserError(
            f"method='closed_form' needs a sensgen MLP (with MLP's own forward), got "
            f"{type(model).__name__}; use method='autodiff' (or 'auto') for other modules."
        )
    chunk_size = check_chunk_size(chunk_size)
    x = as_batch(model, x)
    require_eval_mode(model, "jacobian_norm")
    empty = torch.zeros(0, dtype=torch.float64, device=x.device)
    if x.shape[0] == 0:
        return dict.fromkeys(wanted, empty)
    size = chunk_size or _default_chunk_size(model, x, method)
    parts: dict[Output, list[torch.Tensor]] = {o: [] for o in wanted}
    with torch.no_grad():
        if method is Method.CLOSED_FORM:
            gram_fn = _mlp_gram_fn(model)
        else:
            gram_fn = partial(_autodiff_logit_gram, model)
    for chunk in torch.split(x, size):
        with torch.no_grad():
            logits, gram = gram_fn(chunk)
        if Output.SOFTMAX in wanted:
            check_logits(model, logits)
        for o in wanted:
            parts[o].append(_contract(logits, gram, o))
    return {o: torch.cat(p) for o, p in parts.items()}


def check_logits(model: nn.Module, logits: torch.Tensor) -> None:
    """UserError if the softmax of `logits` [B, C] cannot be what the caller meant."""
    name = type(model).__name__
    if logits.shape[-1] == 1:
        raise UserError(
            f"{name} returns one logit per point: the softmax of one "
            "logit is constant, so its Jacobian is 0. Measure output='logits', or wrap "
            "a binary classifier to return [0, z] (softmax([0, z]) = [1 − σ(z), σ(z)])."
        )
    # Probabilities (a softmax already applied) would be softmaxed twice, silently. No
    # logits are all >= 0 with every row summing to 1 by chance.
    tolerance = max(1e-6, 8 * torch.finfo(logits.dtype).eps)
    total = logits.to(torch.float64).sum(dim=-1)
    if bool((logits >= 0).all()) and bool(((total - 1).abs() <= tolerance).all()):
        raise UserError(
            f"{name} returns probabilities (every output >= 0, each row summing to 1), "
            "not logits, so output='softmax' would apply a second softmax. Pass "
            "output='logits' to take the Jacobian of what it returns (for a softmax head "
            "that is the paper's ‖∂p/∂x‖_F), or return the logits (a log-softmax is fine)."
        )


def softmax_jacobian_factor(logits: torch.Tensor) -> torch.Tensor:
    """S(p) = diag(p) − p pᵀ in float64, accurate at confident points.

    Args:
        logits: [B, C], any float dtype.

    Returns:
        float64 [B, C, C]. The diagonal uses 1 − p_i = Σ_{j≠i} p_j, so S_yy stays
        accurate when p_y is within float32 rounding of 1.
    """
    p = probabilities(logits)  # [B, C]
    eye = torch.eye(p.shape[-1], dtype=torch.bool, device=p.device)
    others = p.unsqueeze(-2).masked_fill(eye, 0.0).sum(dim=-1)  # [B, C]: Σ_{j≠i} p_j
    s = -p.unsqueeze(-1) * p.unsqueeze(-2)  # [B, C, C]
    s.diagonal(dim1=-2, dim2=-1).copy_(p * others)
    return s


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """p = softmax(z) in float64, max-shifted: [B, C]."""
    z = logits.to(torch.float64)
    return torch.softmax(z - z.amax(dim=-1, keepdim=True), dim=-1)


def _contract(logits: torch.Tensor, gram: torch.Tensor, output: Output) -> torch.Tensor:
    """‖J‖_F from the logit Gram K [B, C, C]: sqrt(tr K) or sqrt(tr(S K S))."""
    gram = gram.to(torch.float64)
    if output is Output.LOGITS:
        squared = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        s = softmax_jacobian_factor(logits)
        squared = ((s @ gram) * s).sum(dim=(-2, -1))  # tr(S K S) with S symmetric
    return squared.clamp_min(0.0).sqrt()


def _mlp_gram_fn(model: MLP) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Closed form for a sensgen MLP: chunk [B, d] → (logits [B, C], K = J_z J_zᵀ [B, C, C]).

    G = W_1 W_1ᵀ is formed once per call, not once per chunk. Products with a shared weight
    matrix are done as one [B·C, n] @ [n, m] GEMM rather than B small batched ones.
    """
    derivative = DERIVATIVES[model.nonlinearity]
    weights = [layer.weight.detach() for layer in model.layers]  # W_1 [n1, d] ... W_L [C, n]
    w1 = weights[0]
    use_gram = w1.shape[0] < w1.shape[1]  # n1 < d: the Gram trick is cheaper
    second = w1 @ w1.T if use_gram else w1  # G [n1, n1], or W_1 [n1, d]
    if use_gram and not bool(torch.isfinite(second).all()) and bool(torch.isfinite(w1).all()):
        # G squares W_1 before M meets it: finite weights beyond ~1e19 (a blown-up net) would
        # overflow it, and 0·inf make NaN of a Jacobian that is 0 (every unit dead) or finite.
        use_gram, second = False, w1

    def gram_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, logits = model.preactivations(x)
        b, c = x.shape[0], weights[-1].shape[0]
        m = weights[-1] * derivative(hidden[-1]).unsqueeze(1)  # [B, C, n_{L-1}]
        for h, w in zip(reversed(hidden[:-1]), reversed(weights[1:-1]), strict=True):
            m = (m.reshape(b * c, -1) @ w).reshape(b, c, -1) * derivative(h).unsqueeze(1)
        # m = W_L D_{L-1} ... W_2 D_1  [B, C, n1];  K = m G mᵀ  or  (m W_1)(m W_1)ᵀ
        right = (m.reshape(b * c, -1) @ second).reshape(b, c, -1)
        other = m if use_gram else right
        return logits, right @ other.transpose(1, 2)

    return gram_of


def _autodiff_logit_gram(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic path: logits [B, C] and K [B, C, C] from `vmap(jacrev)` of the logits."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def logits_of_one(xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (params, buffers), (xi.unsqueeze(0),)).squeeze(0)
        return out, out

    logits = check_output(model, functional_call(model, (params, buffers), (x,)))
    try:
        jz, alone = vmap(jacrev(logits_of_one, has_aux=True))(x)
        jz = jz.flatten(start_dim=2)  # [B, C, d]
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
        raise UserError(
            f"jacobian_norm takes each point's Jacobian with torch.func.vmap, which "
            f"{type(model).__name__}'s forward does not allow: a random operation (dropout "
            "called as F.dropout in train mode?: call model.eval()) or Python control flow "
            f"on a tensor's value. torch says: {error}"
        ) from None
    _check_points_alone(model, logits, alone)
    return logits, jz @ jz.transpose(1, 2)


def _check_points_alone(model: nn.Module, logits: torch.Tensor, alone: torch.Tensor) -> None:
    """UserError unless each point's logits [B, C] are the same computed alone, in a batch
    of one, as jacrev differentiates it: a forward that mixes points (statistics over the
    batch, as in ``x - x.mean(0)``) would pair the batch's softmax with the Jacobian of
    another function (0 for that example). Tolerance √eps of the dtype, relative to the
    point's largest logit, absorbs the rounding of batched versus one-point kernels."""
    tolerance = torch.finfo(logits.dtype).eps ** 0.5
    gap = (alone - logits).abs().amax(dim=-1)
    scale = 1.0 + logits.abs().amax(dim=-1)
    if bool((gap > tolerance * scale).any()):
        raise UserError(
            f"{type(model).__name__} gives a point other logits alone (a batch of one, as "
            "each point's Jacobian is taken) than in its batch: its forward mixes the points "
            "(statistics over the batch dimension?), so it has no per-point Jacobian. Make "
            "each output depend on its own input only."
        )


def check_output(model: nn.Module, logits: object) -> torch.Tensor:
    """The model's output if it is logits [B, C], else a UserError saying what it was."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(
            f"jacobian_norm expects the model to return logits of shape [B, C]; "
            f"{type(model).__name__} returned {got}."
        )
    return logits


def _default_chunk_size(model: nn.Module, x: torch.Tensor, method: Method) -> int:
    """Points per chunk so the largest [chunk, C, n] intermediate holds ~2^20 elements.

    The closed form builds [chunk, C, n_l] for the hidden widths n_l (and [chunk, C, d] only
    when n_1 ≥ d); autodiff builds the full [chunk, C, d] Jacobian.
    """
    input_size = max(1, x[0].numel()) if len(x) else 1
    widths = [p.shape[0] for p in model.parameters() if p.ndim == 2]
    n_out = widths[-1] if widths else 1
    if method is Method.CLOSED_FORM:
        hidden = widths[:-1]
        widest = max([*hidden, input_size]) if hidden[0] >= input_size else max(hidden)
    else:  # jacrev's backward makes [chunk, C, ·] of every layer's output, however wide
        widest = max(input_size, _largest_output(model, x[:1]) if len(x) else 1)
    return max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(1, n_out * widest))


def _largest_output(model: nn.Module, x: torch.Tensor) -> int:
    """The most values any submodule outputs for one point x [1, ...] (one probe pass)."""
    sizes = [1]

    def record(module: nn.Module, args: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out[0].numel() if out.ndim else 1)

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return max(sizes)
