"""The metrics measure a fixed function: a model whose output depends on train mode is refused."""

from __future__ import annotations

from torch import nn

from sensgen.errors import UserError

# Modules that behave differently in train mode: dropout draws masks, RReLU its negative
# slopes, batch norm uses (and updates) batch statistics, so points would interact and
# results vary between calls.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.RReLU, nn.modules.batchnorm._BatchNorm)


def require_eval_mode(model: nn.Module, metric: str) -> None:
    """Raise `UserError` if ``model`` has a dropout or batch-norm module in train mode.

    A sensgen `MLP` has none, so this never fires for it.
    """
    for name, module in model.named_modules():
        if module.training and isinstance(module, _MODE_DEPENDENT):
            kind = type(module).__name__
            where = f" ({name!r})" if name else ""
            raise UserError(
                f"{metric} measures a fixed function, but {type(model).__name__} has a "
                f"{kind}{where} in train mode, which makes the output random or batch-"
                "dependent; call model.eval() first."
            )
