"""Forward and backward passes of a pack of MLPs, written out (paper §4; issue 8).

A pack holds M same-shape MLPs (`sensgen.models.MLP`) stacked along a leading model axis:
W_l [M, n_l, n_{l−1}] and b_l [M, n_l] for l = 0..L−1, named ``layers.{l}.weight`` and
``layers.{l}.bias`` as `torch.func.stack_module_state` names them. For a batch
x [M, B, d] (each model its own examples) or x [B, d] (one batch shared by every model):

    h_l = a_{l−1} W_lᵀ + b_l,   a_l = φ(h_l),   a_{−1} = x,   z = h_{L−1}   (logits, B × C)
    loss_m = s · Σ_b (logsumexp(z_mb) − z_mb[y_mb])

with s = 1/B for the mean loss of a batch (s = 1/N for a chunk of a full batch of N); the
shapes are the math's, "Layouts" below says how each is stored. The backward pass is the
chain rule, one batched matrix product per term, with a per-model gain γ on the gradient
(1 but for momentum's scaled accumulator, `sensgen.optim`):

    δ_{L−1} = s · γ · (softmax(z) − onehot(y))                    (B × C per model)
    γ ∂loss/∂W_l = δ_lᵀ a_{l−1},   γ ∂loss/∂b_l = Σ_b δ_l,   δ_{l−1} = φ'(h_{l−1}) ⊙ (δ_l W_l)

This is what `vmap(grad(loss))` over `functional_call` computes (tests check it, for every
nonlinearity, to float64 rounding), without its per-step tracing and dispatch, which is
half the step of a small model (width 64, batch 32). The products write into buffers kept
from step to step; the gradients are written into (or, to accumulate chunks or momentum,
added to) the caller's buffers. φ' is applied by the same kernels autograd uses for each
nonlinearity, so at a breakpoint (ReLU at 0, ...) the value is autograd's.

A shared batch x [B, d] (full-batch training) makes the first layer two plain matrix
products for the whole pack, x [B, d] by the stacked W_0 viewed as [M·n_0, d] and its
transpose, instead of M small ones.

Layouts. The first layer's h_0, a_0 and δ_0 are stored [M, B, n_0]; every later layer's
h_l, a_l and δ_l feature-major, [M, n_l, B], the logits and δ_{L−1} too ([M, C, B]). The
products above the first layer are then, per model, the forward h_lᵀ = W_l a_{l−1}ᵀ into
[n_l, B], the weight gradient δ_lᵀ a_{l−1} as the stored [n_l, B] by [B, n_{l−1}], and
the upstream gradient W_lᵀ δ_lᵀ into [n_{l−1}, B] (for layer 1, (δ_lᵀ)ᵀ W_l into
[B, n_0], the first layer's layout). For a 256 × 256 layer MKL's batched product runs the
forward 10% and the weight gradient 4% faster this way, the upstream gradient 5% slower:
2% of a reference step all told (issue 8). The log-softmax wants the logits class-major
too, so they need no transposed copy. An MLP has at least one hidden layer
(`sensgen.models.MLP`): the readout is never the first layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from sensgen.divergence import underflow_slack
from sensgen.models import ACTIVATIONS, Nonlinearity
from sensgen.optim import per_model

Params = dict[str, torch.Tensor]

_aten = torch.ops.aten

Unary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Backward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# a = φ(h) written into `out`: the kernels of `sensgen.models.ACTIVATIONS`, in their out=
# form, so that a step allocates nothing (a fresh [M, B, n] tensor per call costs page
# faults, more than the kernel itself for the reference pack; issue 8).
ACTIVATIONS_INTO: dict[Nonlinearity, Unary] = {
    # relu's own out= form computes into a new tensor and copies; relu is clamp_min(h, 0).
    Nonlinearity.RELU: lambda h, out: _aten.clamp_min.out(h, 0.0, out=out),
    Nonlinearity.RELU6: lambda h, out: _aten.hardtanh.out(h, 0.0, 6.0, out=out),
    Nonlinearity.HARD_TANH: lambda h, out: _aten.hardtanh.out(h, -1.0, 1.0, out=out),
    Nonlinearity.HARD_SIGMOID: lambda h, out: _aten.hardsigmoid.out(h, out=out),
    Nonlinearity.TANH: lambda h, out: _aten.tanh.out(h, out=out),
    Nonlinearity.SIGMOID: lambda h, out: _aten.sigmoid.out(h, out=out),
    Nonlinearity.ELU: lambda h, out: _aten.elu.out(h, 1.0, 1, 1, out=out),
}

# g ← φ'(h) ⊙ g in place, from the pre-activation h and the activation a = φ(h): autograd's
# own kernels (elementwise, so writing over their input g is safe).
ACTIVATION_BACKWARDS: dict[Nonlinearity, Backward] = {
    Nonlinearity.RELU: lambda g, h, a: _aten.threshold_backward.grad_input(g, a, 0, grad_input=g),
    # hardtanh's mask lo < h < hi is lo < a < hi on a = clamp(h, lo, hi), exactly.
    Nonlinearity.RELU6: lambda g, h, a: _aten.hardtanh_backward.grad_input(
        g, a, 0.0, 6.0, grad_input=g
    ),
    Nonlinearity.HARD_TANH: lambda g, h, a: _aten.hardtanh_backward.grad_input(
        g, a, -1.0, 1.0, grad_input=g
    ),
    Nonlinearity.HARD_SIGMOID: lambda g, h, a: _aten.hardsigmoid_backward.grad_input(
        g, h, grad_input=g
    ),
    Nonlinearity.TANH: lambda g, h, a: _aten.tanh_backward.grad_input(g, a, grad_input=g),
    Nonlinearity.SIGMOID: lambda g, h, a: _aten.sigmoid_backward.grad_input(g, a, grad_input=g),
    Nonlinearity.ELU: lambda g, h, a: _aten.elu_backward.grad_input(
        g, 1.0, 1, 1, False, h, grad_input=g
    ),
}


# The nonlinearities whose φ' is computed from a = φ(h) alone: their activation may be
# written over h (in place: no second [M, B, n] buffer to fetch, 0.1 ms per layer on the
# reference pack; issue 8). The others need h in the backward pass.
BACKWARD_FROM_ACTIVATION = frozenset(
    {
        Nonlinearity.RELU,
        Nonlinearity.RELU6,
        Nonlinearity.HARD_TANH,
        Nonlinearity.TANH,
        Nonlinearity.SIGMOID,
    }
)


# The nonlinearities whose elementwise kernels (φ and φ') round differently in their scalar
# loop, which takes the values after a call's last whole pair of vectors (a kernel call
# runs 2 vectors at a time, at most 32 values on AVX-512), than in their vectorised one.
# For them a model's slice goes through its own call unless it is a multiple of
# `VECTOR_MULTIPLE` values: otherwise which of its values the scalar loop takes would
# depend on where the slice sits in the pack's buffer, so on its pack-mates (a cache
# block, a compacted pack). As the fused update does (`sensgen.optim`).
TAIL_SENSITIVE = frozenset({Nonlinearity.SIGMOID, Nonlinearity.ELU})
VECTOR_MULTIPLE = 64


def n_layers(params: Params) -> int:
    """L, the number of weight layers of a stacked MLP."""
    return sum(1 for name in params if name.endswith(".weight"))


def layer(params: Params, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_l [M, n_l, n_{l−1}], b_l [M, n_l]) of layer `index`."""
    return params[f"layers.{index}.weight"], params[f"layers.{index}.bias"]


class Backprop:
    """Loss and gradient of every model of a pack, with buffers reused across steps.

    Args:
        nonlinearity: φ of the hidden layers.

    One instance serves one pack: its buffers are sized on first use for each batch shape
    met (a full batch's last chunk may be shorter) and kept.
    """

    def __init__(self, nonlinearity: Nonlinearity) -> None:
        self.activation = ACTIVATIONS_INTO[nonlinearity]
        self.backward = ACTIVATION_BACKWARDS[nonlinearity]
        self.in_place = nonlinearity in BACKWARD_FROM_ACTIVATION
        self.tail_sensitive = nonlinearity in TAIL_SENSITIVE
        self.first_grad_bound: torch.Tensor | None = None  # see `loss_and_grad`
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _buffer(self, slot: str, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """The kept buffer of `slot` for this shape (like's dtype and device)."""
        key = (slot, shape, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def forward(self, params: Params, x: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Pre-activations and activations [(h_l, a_l)] of the hidden layers, and logits.

        x is [M, B, d] or, shared by every model, [B, d]. The first layer's h_0, a_0 are
        [M, B, n_0]; every later layer's are stored feature-major, [M, n_l, B], and so are
        the logits, [M, C, B] (module docstring: why). They live in this instance's buffers
        until its next call. Where φ' needs only a (`BACKWARD_FROM_ACTIVATION`), a is
        written over h, and both name it.
        """
        if n_layers(params) < 2:  # ("Layouts": the readout would be the first layer)
            raise ValueError("a pack's MLPs need at least one hidden layer")
        hidden = []
        a = x
        for index in range(n_layers(params) - 1):
            h = self._affine(params, index, a)
            out = h if self.in_place else self._buffer(f"a{index}", h, *h.shape)
            a = self._per_model(self.activation, (h, out), into=out)
            hidden.append((h, a))
        return hidden, self._affine(params, n_layers(params) - 1, a)

    def _affine(self, params: Params, index: int, a: torch.Tensor) -> torch.Tensor:
        """`affine` for the first layer, into its buffer [M, B, n_0]; for a later layer,
        h_lᵀ = W_l a_{l−1}ᵀ + b_l into its buffer [M, n_l, B] (a_{l−1} in its layout)."""
        weight, bias = layer(params, index)
        m, n_out, _ = weight.shape
        if index > 0:  # a is [M, B, n_0] (after the first layer) or [M, n_{l−1}, B]
            b = a.shape[1] if index == 1 else a.shape[2]
            a_t = a.transpose(1, 2) if index == 1 else a
            h = self._buffer(f"h{index}", weight, m, n_out, b)
            return torch.baddbmm(bias.unsqueeze(2), weight, a_t, out=h)
        b = a.shape[-2]
        h = self._buffer(f"h{index}", weight, m, b, n_out)
        scratch = self._buffer("shared", weight, b, m * n_out) if a.dim() == 2 else None
        return affine(weight, bias, a, out=h, scratch=scratch)

    def loss_and_grad(
        self,
        params: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        grads: Params,
        *,
        scale: float,
        beta: float = 0.0,
        gain: torch.Tensor | None = None,
        input_norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each model's loss s·Σ_b CE (module docstring) [M], its gradient into `grads`.

        Args:
            params: the stacked parameters.
            x: inputs [M, B, d], or [B, d] shared by every model.
            y: labels [M, B] (int64).
            grads: buffers shaped like `params`; each becomes β·(what it holds) + gradient.
            scale: s, 1/B for the mean over the batch.
            beta: β; 0 overwrites (what the buffers hold is ignored, NaN included), 1 adds
                (accumulating chunks, or a momentum step, `Optimizer.accumulator`).
            gain: per model [M] (float64), a factor on the gradient (not the loss): the
                buffers become β·(what they hold) + gain·gradient (momentum's scaled
                accumulator, `sensgen.optim.ScaledAccumulator`). It multiplies δ_{L−1},
                so every product downstream carries it at no extra pass.
            input_norms: ‖x_m‖_F per model [M] (float64), if given: then
                ``first_grad_bound`` [M] becomes ‖δ_0‖_F·‖x_m‖_F ≥ max |∂loss/∂W_0| (each
                entry Σ_b δ_bi x_bj is at most ‖δ_·i‖‖x_·j‖, Cauchy–Schwarz), for
                `sensgen.divergence` (one pass over δ_0 [M, B, n_0] instead of one over
                the first layer's weights; inf or NaN if δ_0 is not finite), gain included.
        """
        hidden, z_t = self.forward(params, x)  # logits [M, C, B]
        # The log-softmax over classes runs on z [M, C, B]: along a middle dim the kernel is
        # vectorised over the batch, along the last (C = 10) it is scalar and ~10x slower.
        m, c, b = z_t.shape
        log_p = _aten._log_softmax.out(z_t, 1, False, out=self._buffer("log_p", z_t, m, c, b))
        labels = y.unsqueeze(1)  # [M, 1, B]
        picked = log_p.gather(1, labels).squeeze(1)  # [M, B]
        losses = picked.sum(dim=1).mul_(-scale)
        delta = probabilities_(log_p)  # softmax(z) [M, C, B], in log_p's memory
        delta.scatter_add_(1, labels, torch.full_like(picked.unsqueeze(1), -1.0))
        factor = scale if gain is None else per_model(gain * scale, delta)
        delta.mul_(factor)  # δ_{L−1}, [M, C, B] as every layer's above the first
        for index in reversed(range(n_layers(params))):
            a_in = x if index == 0 else hidden[index - 1][1]
            self._weight_grad(index, delta, a_in, grads, beta)
            if index == 0 and input_norms is not None:
                delta_norm = torch.linalg.vector_norm(delta, dim=(1, 2)).to(torch.float64)
                self.first_grad_bound = underflow_slack(delta_norm, delta) * input_norms
            if index > 0:
                upstream = self._upstream(params, index, delta)
                delta = self._per_model(self.backward, (upstream, *hidden[index - 1]), upstream)
        return losses

    def _per_model(
        self, kernel: Callable, args: tuple[torch.Tensor, ...], into: torch.Tensor
    ) -> torch.Tensor:
        """``kernel(*args)``, an elementwise kernel over [M, ...] tensors writing ``into``
        (one of them), one call per model where the slices would otherwise share a scalar
        loop (`TAIL_SENSITIVE`); returns ``into``."""
        if not self.tail_sensitive or into[0].numel() % VECTOR_MULTIPLE == 0:
            return kernel(*args)
        for slices in zip(*(t.unbind(0) for t in args), strict=True):
            kernel(*slices)
        return into

    def _upstream(self, params: Params, index: int, delta: torch.Tensor) -> torch.Tensor:
        """δ_l W_l, the gradient at layer (index − 1)'s activation, in that layer's layout:
        for layer 1, (δ_lᵀ)ᵀ W_l into the first layer's [M, B, n_0]; above it, W_lᵀ δ_l
        into [M, n_{l−1}, B] (δ_l as stored, [M, n_l, B])."""
        weight, _ = layer(params, index)
        m, _, n_in = weight.shape
        b = delta.shape[2]
        if index == 1:
            out = self._buffer(f"d{index}", weight, m, b, n_in)
            return torch.bmm(delta.transpose(1, 2), weight, out=out)
        out = self._buffer(f"d{index}", weight, m, n_in, b)
        return torch.bmm(weight.transpose(1, 2), delta, out=out)

    def _weight_grad(
        self, index: int, delta: torch.Tensor, a_in: torch.Tensor, grads: Params, beta: float
    ) -> None:
        """grads ← β·grads + (∂/∂W_l = δᵀ a_in, ∂/∂b_l = Σ_b δ) for layer `index`.

        δ is [M, B, n_0] for the first layer and [M, n_l, B] above it, a_in in its layer's
        layout (x, [M, B, d] or shared [B, d]; a_0 [M, B, n_0]; later [M, n, B])."""
        g_weight, g_bias = grads[f"layers.{index}.weight"], grads[f"layers.{index}.bias"]
        batch_dim = 1 if index == 0 else 2
        if index > 0:  # δ_l [M, n_l, B] by a_in as [M, B, n_in]
            a_rows = a_in if index == 1 else a_in.transpose(1, 2)
            torch.baddbmm(g_weight, delta, a_rows, beta=beta, out=g_weight)
        elif a_in.dim() == 3 and _stored_transposed(g_weight):  # as [M, n_in, n_out]: a_inᵀ δ
            g_t = g_weight.transpose(1, 2)
            torch.baddbmm(g_t, a_in.transpose(1, 2), delta, beta=beta, out=g_t)
        elif a_in.dim() == 3:
            torch.baddbmm(g_weight, delta.transpose(1, 2), a_in, beta=beta, out=g_weight)
        else:  # shared input: one [M·n_l, B] × [B, d] product for the whole pack
            m, n_out, n_in = g_weight.shape
            flat = self._buffer("shared_t", delta, m * n_out, a_in.shape[0])
            flat.view(m, n_out, -1).copy_(delta.transpose(1, 2))
            flat_grad = g_weight.view(m * n_out, n_in)
            torch.addmm(flat_grad, flat, a_in, beta=beta, out=flat_grad)
        if beta == 0.0:
            torch.sum(delta, dim=batch_dim, out=g_bias)
        else:
            bias_grad = self._buffer("db", delta, *g_bias.shape)
            torch.sum(delta, dim=batch_dim, out=bias_grad)
            if beta != 1.0:  # (β = 1, momentum's and the chunks': ·1 is no op, and exact)
                g_bias.mul_(beta)
            g_bias.add_(bias_grad)


def probabilities_(log_p: torch.Tensor) -> torch.Tensor:
    """p = exp(log p) in place, with the probabilities up to about e·tiny flushed to 0.

    tiny is the dtype's smallest normal number (1.2e-38 in float32): such a p is 3.2e-38
    or less, and p − onehot(y) is the same with or without it but for a difference of that
    size. Why: torch's vectorised exp leaves its fast path for every argument whose result
    is not a normal number, log p < ln tiny = −87.3 in float32, and is then ~200× slower per
    entry. A confident model's wrong classes sit there (a fitted model's, most of them):
    the exp alone took 0.15 ms of a reference step over steps 30–90, more as models fit
    (issue 8). So log p is
    clamped to ln tiny + 1, where exp is fast, and what came out at that floor (or below it)
    becomes 0. NaN stays NaN (a diverging model's loss must stay visible).
    """
    floor, at_floor = _exp_floor(log_p.dtype)
    log_p.clamp_min_(floor).exp_()
    return torch.threshold_(log_p, at_floor, 0.0)  # p ≤ (1 + 2⁻¹⁰)·exp(floor) → 0


@functools.cache
def _exp_floor(dtype: torch.dtype) -> tuple[float, float]:
    """(ln tiny + 1, a threshold just above its exp) for `probabilities_`: exp(floor) as
    the CPU computes it, raised by 2⁻¹⁰ so that another device's exp, a few units of the
    last place apart, still puts every floored entry at or below it."""
    floor = math.log(torch.finfo(dtype).tiny) + 1.0
    return floor, float(torch.tensor(floor, dtype=dtype).exp()) * (1 + 2**-10)


def _stored_transposed(weight: torch.Tensor) -> bool:
    """Whether a stacked weight [M, n_out, n_in] is laid out as [M, n_in, n_out]."""
    return not weight.is_contiguous() and weight.transpose(1, 2).is_contiguous()


def minibatch_layout(params: Params) -> Params:
    """The stacked parameters with the first layer's weights stored as [M, n_in, n_out].

    They keep their shape [M, n_out, n_in] (a transposed view of that storage), so every
    caller sees the same tensors; only the products' speed changes. For per-model inputs
    x [M, B, d], the forward product x W₀ᵀ then reads W₀ᵀ contiguous, which MKL's batched
    product runs ~15% faster than W₀ stored as is (3–4% of the reference pack's step; issue
    8); its weight gradient xᵀδ₀ is as fast either way, and the first layer has no
    input-gradient product δ₀W₀, the one the transposed layout would slow down (hence the
    deeper layers keep theirs). Full-batch steps share x [B, d] and want W₀ as is (one
    [B, d] × [d, M·n₀] product): they do not use this layout. Results differ from the other
    layout in float rounding only (the forward product sums in another order).
    """
    name = "layers.0.weight"
    weight = params[name]
    stored = weight.transpose(1, 2).contiguous().transpose(1, 2)
    return {k: (stored if k == name else v) for k, v in params.items()}


def affine(
    weight: torch.Tensor,
    bias: torch.Tensor,
    a: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """h = a Wᵀ + b for every model: [M, B, n_out] from a [M, B, n_in] or shared a [B, n_in].

    A shared input is one [B, n_in] × [n_in, M·n_out] product for the whole pack (into
    ``scratch`` [B, M·n_out] if given). The result goes into ``out`` if given.
    """
    if a.dim() == 3 or _stored_transposed(weight):
        # A shared input meets a first layer stored transposed (`minibatch_layout`) in the
        # fit check during training: M products over the one x [B, d] read W₀ as it is
        # stored, where the flat product would copy it at every chunk.
        a = a if a.dim() == 3 else a.expand(weight.shape[0], -1, -1)
        return torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2), out=out)
    m, n_out, n_in = weight.shape
    flat = torch.mm(a, weight.reshape(m * n_out, n_in).t(), out=scratch)
    return torch.add(flat.view(-1, m, n_out).transpose(0, 1), bias.unsqueeze(1), out=out)


def logits(nonlinearity: Nonlinearity, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits [M, B, C] of every model of a pack on x [M, B, d] or shared x [B, d]."""
    activation = ACTIVATIONS[nonlinearity]
    a = x
    for index in range(n_layers(params)):
        h = affine(*layer(params, index), a)
        a = h if index == n_layers(params) - 1 else activation(h)
    return a
