"""The metrics measure a fixed function: a model whose output depends on train mode is refused."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.spectral_norm import SpectralNorm

from sensgen.errors import UserError

# Modules that behave differently in train mode: dropout draws masks, RReLU its negative
# slopes, batch norm uses (and updates) batch statistics, so points would interact and
# results vary between calls; spectral norm runs a power iteration at every call, which
# moves its weight and writes its buffers.
_MODE_DEPENDENT = (
    nn.modules.dropout._DropoutNd,
    nn.RReLU,
    nn.modules.batchnorm._BatchNorm,
    parametrizations._SpectralNorm,
)


def require_eval_mode(model: nn.Module, metric: str) -> None:
    """Raise `UserError` if ``model`` has a dropout, batch-norm or spectral-norm module in
    train mode, or a batch norm without running statistics.

    A batch norm made with ``track_running_stats=False`` normalises by the statistics of
    the batch in eval mode too (torch uses batch statistics whenever it has no running
    ones), so a point's output depends on the points beside it: the per-point metrics would
    return values that change with the batch and the chunking, or fail deep in torch on the
    one-point batches of the Jacobian. A sensgen `MLP` has none of these, so this never
    fires for it.
    """
    for name, module in model.named_modules():
        where = f" ({name!r})" if name else ""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise UserError(
                f"{metric} measures one function of each point, but {type(model).__name__} "
                f"has a {type(module).__name__}{where} without running statistics "
                "(track_running_stats=False), which normalises by the statistics of the "
                "batch even in eval mode, so each point's output depends on the others. "
                "Give it running statistics estimated on the training data (or remove it) "
                "before measuring."
            )
        hooks = module._forward_pre_hooks.values()  # the older torch.nn.utils.spectral_norm
        hooked = any(isinstance(h, SpectralNorm) for h in hooks)
        if module.training and (hooked or isinstance(module, _MODE_DEPENDENT)):
            kind = type(module).__name__.strip("_")
            kind = f"spectral_norm on a {kind}" if hooked else kind
            raise UserError(
                f"{metric} measures a fixed function, but {type(model).__name__} has a "
                f"{kind}{where} in train mode, which makes the output random, batch-"
                "dependent or change at every call; call model.eval() first."
            )
