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
    train mode.

    A sensgen `MLP` has none, so this never fires for it.
    """
    for name, module in model.named_modules():
        hooks = module._forward_pre_hooks.values()  # the older torch.nn.utils.spectral_norm
        hooked = any(isinstance(h, SpectralNorm) for h in hooks)
        if module.training and (hooked or isinstance(module, _MODE_DEPENDENT)):
            kind = type(module).__name__.strip("_")
            kind = f"spectral_norm on a {kind}" if hooked else kind
            where = f" ({name!r})" if name else ""
            raise UserError(
                f"{metric} measures a fixed function, but {type(model).__name__} has a "
                f"{kind}{where} in train mode, which makes the output random, batch-"
                "dependent or change at every call; call model.eval() first."
            )
