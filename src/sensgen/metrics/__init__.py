"""Sensitivity metrics: pure functions of (model, inputs), one value per example.

`jacobian_norm` is the paper's §2.1 metric (Novak et al. 2018): the Frobenius norm of the
softmax-output input–output Jacobian at each point.
"""

from sensgen.metrics.jacobian import (
    Method,
    Output,
    jacobian_norm,
    jacobian_norms,
    softmax_jacobian_factor,
)

__all__ = ["Method", "Output", "jacobian_norm", "jacobian_norms", "softmax_jacobian_factor"]
