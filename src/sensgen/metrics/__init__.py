"""Sensitivity metrics: pure functions of (model, inputs), one value per example or path.

* `jacobian_norm` (paper §2.1): the Frobenius norm of the softmax-output input–output
  Jacobian at each point; closed form for sensgen MLPs, `vmap(jacrev)` for any module.
* `transitions` (paper §2.2): linear-region boundaries crossed along a path, counted the
  paper's way ("sampled") or exactly ("exact", sensgen's extension).
* Trajectories (`ellipse`, `random_ellipse`, `segment`, `polygon`, `plane_grid`), activation
  codes, profiles along an ellipse in angle bins, and region maps on a 2-D slice.
"""

from sensgen.metrics.codes import (
    BREAKPOINTS,
    activation_codes,
    hidden_preactivations,
    is_piecewise_linear,
    layer_activation_codes,
)
from sensgen.metrics.jacobian import (
    Method,
    Output,
    jacobian_norm,
    jacobian_norms,
    softmax_jacobian_factor,
)
from sensgen.metrics.jacobian_estimate import jacobian_norm_estimate
from sensgen.metrics.profiles import (
    Density,
    Profile,
    Reduce,
    angle_bins,
    bin_arc_length,
    bin_by_angle,
    jacobian_profile,
    transition_profile,
)
from sensgen.metrics.regions import boundary_density, disc_mask, region_map
from sensgen.metrics.trajectories import (
    PlaneGrid,
    ellipse,
    ellipse_angles,
    ellipse_axes,
    ellipse_speed,
    plane_grid,
    polygon,
    random_anchors,
    random_ellipse,
    segment,
)
from sensgen.metrics.transitions import (
    CodeDistance,
    PolygonCount,
    TransitionMethod,
    TransitionResult,
    crossing_angles,
    ellipse_transitions_exact,
    ellipse_transitions_sampled,
    transition_details,
    transitions,
)

__all__ = [
    "BREAKPOINTS",
    "CodeDistance",
    "Density",
    "Method",
    "Output",
    "PlaneGrid",
    "PolygonCount",
    "Profile",
    "Reduce",
    "TransitionMethod",
    "TransitionResult",
    "activation_codes",
    "angle_bins",
    "bin_arc_length",
    "bin_by_angle",
    "boundary_density",
    "crossing_angles",
    "disc_mask",
    "ellipse",
    "ellipse_angles",
    "ellipse_axes",
    "ellipse_speed",
    "ellipse_transitions_exact",
    "ellipse_transitions_sampled",
    "hidden_preactivations",
    "is_piecewise_linear",
    "jacobian_norm",
    "jacobian_norm_estimate",
    "jacobian_norms",
    "jacobian_profile",
    "layer_activation_codes",
    "plane_grid",
    "polygon",
    "random_anchors",
    "random_ellipse",
    "region_map",
    "segment",
    "softmax_jacobian_factor",
    "transition_details",
    "transition_profile",
    "transitions",
]
