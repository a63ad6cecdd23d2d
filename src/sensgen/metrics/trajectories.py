"""Paths through input space for the transition and along-trajectory metrics (paper §2.2).

The paper measures sensitivity along closed paths through the data. The main one is the
ellipse through three points x1, x2, x3 at equally spaced angles,

    z(φ) = c + a cos φ + b sin φ,   c = (x1 + x2 + x3)/3,   a = c − x2,   b = (x1 − x3)/√3,

so z(π/3) = x1, z(π) = x2 and z(5π/3) = x3: the unique ellipse centred at the anchors'
centroid that passes through them 2π/3 apart (Study 2, Fig. 2). Also here: random ellipses
through Gaussian anchors matched to the data, straight segments, closed polygons (the exact
transition count walks a k-gon inscribed in an ellipse), and the grid on the plane through
three points for the region maps (Study 3, Fig. 3).

Anchors are flattened input vectors [D]. Paths are [n, D] in the anchors' floating dtype
and on their device; the arithmetic is float64 inside, so float64 anchors give paths exact
to rounding.

Example:
    >>> x1, x2, x3 = torch.eye(3, dtype=torch.float64)
    >>> path = ellipse(x1, x2, x3, n_points=600)  # 600 = 6·100: the anchors are samples
    >>> torch.allclose(path[100], x1) and torch.allclose(path[300], x2)
    True
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch

from sensgen.errors import UserError

_F64 = torch.float64
# Anchors whose second Gram–Schmidt direction is this small relative to their spread are
# treated as collinear: the plane through them is not determined.
_COLLINEAR_RTOL = 1e-10


def check_count(value: int, name: str, minimum: int) -> int:
    """`value` as an int if it is an integer >= `minimum` (NumPy's too), else a UserError
    naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def as_vectors(names: str, *xs: torch.Tensor) -> tuple[list[torch.Tensor], torch.dtype]:
    """Check that xs are 1-D tensors of one length; return float64 copies and the out dtype."""
    for name, x in zip(names.split(), xs, strict=True):
        if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.numel() == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(
                f"{name} must be a flattened input vector of shape [D], got {shape}; "
                "pass x.flatten() for an image-shaped input."
            )
    if len({x.shape[0] for x in xs}) > 1:
        lengths = ", ".join(f"{n}: {x.shape[0]}" for n, x in zip(names.split(), xs, strict=True))
        raise UserError(f"{names.replace(' ', ', ')} must have the same length D ({lengths}).")
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    return [x.to(_F64) for x in xs], dtype


def ellipse_axes(
    x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre and semi-axis vectors of the ellipse through three points (paper §2.2).

    c = (x1 + x2 + x3)/3, a = c − x2, b = (x1 − x3)/√3, so that z(φ) = c + a cos φ + b sin φ
    has z(π/3) = x1, z(π) = x2, z(5π/3) = x3. a and b are conjugate semi-diameters (not
    orthogonal in general).

    Args:
        x1, x2, x3: anchors [D].

    Returns:
        (c, a, b), each [D] in the anchors' dtype.

    Example:
        >>> c, a, b = ellipse_axes(*torch.eye(3))
        >>> c
        tensor([0.3333, 0.3333, 0.3333])
    """
    (p, q, r), dtype = as_vectors("x1 x2 x3", x1, x2, x3)
    c = (p + q + r) / 3
    return c.to(dtype), (c - q).to(dtype), ((p - r) / math.sqrt(3.0)).to(dtype)


def ellipse_angles(n_points: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The sample angles φ_i = 2πi/n, i = 0..n−1, of a closed path (float64 [n])."""
    n = check_count(n_points, "n_points", 1)
    return torch.arange(n, dtype=_F64, device=device) * (2 * math.pi) / n


def ellipse(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, *, n_points: int) -> torch.Tensor:
    """n points z(φ_i), φ_i = 2πi/n, on the ellipse through x1, x2, x3 (paper §2.2).

    z(φ) = c + a cos φ + b sin φ with (c, a, b) from `ellipse_axes`. The path is closed: the
    first point is not repeated at the end (the last step goes from z(φ_{n−1}) to z(0)). Use
    n divisible by 6 so the anchors are samples: x1 = path[n/6], x2 = path[n/2],
    x3 = path[5n/6]; other n are allowed.

    Args:
        x1, x2, x3: anchors [D].
        n_points: number of samples n >= 3.

    Returns:
        [n, D] in the anchors' dtype.

    Example:
        >>> ellipse(*torch.eye(3), n_points=12).shape
        torch.Size([12, 3])
    """
    (p, q, r), dtype = as_vectors("x1 x2 x3", x1, x2, x3)
    phi = ellipse_angles(check_count(n_points, "n_points", 3), device=p.device)  # [n]
    c = (p + q + r) / 3
    a, b = c - q, (p - r) / math.sqrt(3.0)
    return (c + torch.outer(phi.cos(), a) + torch.outer(phi.sin(), b)).to(dtype)  # [n, D]


def ellipse_speed(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, phi: torch.Tensor | float
) -> torch.Tensor:
    """Speed ‖z'(φ)‖ = ‖−a sin φ + b cos φ‖ of the ellipse z(φ) = c + a cos φ + b sin φ.

    Arc length is ∫‖z'(φ)‖ dφ; dividing by it removes the ellipse's varying speed from
    per-angle densities. c does not enter; it is accepted so ``ellipse_speed(*axes, phi)``
    works with ``axes = ellipse_axes(x1, x2, x3)``. Computed through the 2×2 R factor of
    [a b] (QR), so it costs O(D) once and stays accurate where the speed is small.

    Args:
        c, a, b: [D] each.
        phi: angles, a tensor of any shape [...] or a float.

    Returns:
        float64 [...] (same shape as phi).

    Example:
        >>> ellipse_speed(torch.zeros(2), torch.tensor([2.0, 0]), torch.tensor([0, 1.0]), 0.0)
        tensor(1., dtype=torch.float64)
    """
    (_, a64, b64), _ = as_vectors("c a b", c, a, b)
    r = torch.linalg.qr(torch.stack([a64, b64], dim=1), mode="r").R  # [2, 2]: ‖[a b]y‖ = ‖Ry‖
    phi = torch.as_tensor(phi, dtype=_F64, device=a64.device)
    y = torch.stack([-phi.sin(), phi.cos()])  # [2, ...]
    v = torch.tensordot(r, y, dims=1)  # [2, ...]
    return torch.hypot(v[0], v[1])


def random_anchors(
    mean: torch.Tensor, var: torch.Tensor | float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Three i.i.d. Gaussian anchors x_k ~ N(mean, diag(var)) (paper §2.2, Study 2).

    The paper's random ellipse goes through three points drawn from a Gaussian matched to
    the data: mean = the per-feature training mean and var = the mean per-feature variance
    s² (isotropic N(μ, s²I)); a per-feature var [D] gives the diagonal-covariance variant.

    Args:
        mean: [D].
        var: a scalar (float or 0-d tensor) or [D]; every entry >= 0.
        generator: keyword-only source of randomness (the global one when None).

    Returns:
        [3, D] in mean's dtype; unpack as ``x1, x2, x3 = random_anchors(...)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_anchors(torch.zeros(784), 1.0, generator=g).shape
        torch.Size([3, 784])
    """
    (mu,), dtype = as_vectors("mean", mean)
    var64 = torch.as_tensor(var, dtype=_F64, device=mu.device)
    if var64.ndim > 1 or (var64.ndim == 1 and var64.shape != mu.shape):
        raise UserError(
            f"var must be a scalar or a per-feature vector of shape {tuple(mu.shape)}, "
            f"got shape {tuple(var64.shape)}."
        )
    if not bool(torch.isfinite(var64).all()) or bool((var64 < 0).any()):
        raise UserError("var must be finite and >= 0 (a variance, not a standard deviation).")
    device = generator.device if generator is not None else mu.device
    noise = torch.randn(3, mu.shape[0], generator=generator, dtype=_F64, device=device)
    return (mu + noise.to(mu.device) * var64.sqrt()).to(dtype)


def random_ellipse(
    mean: torch.Tensor,
    var: torch.Tensor | float,
    *,
    n_points: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`ellipse` through three `random_anchors` (the paper's random ellipse, Study 2).

    Returns:
        [n_points, D] in mean's dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_ellipse(torch.zeros(5), 0.5, n_points=60, generator=g).shape
        torch.Size([60, 5])
    """
    check_count(n_points, "n_points", 3)
    x1, x2, x3 = random_anchors(mean, var, generator=generator)
    return ellipse(x1, x2, x3, n_points=n_points)


def segment(x1: torch.Tensor, x2: torch.Tensor, *, n_points: int) -> torch.Tensor:
    """n equally spaced points on the straight segment from x1 to x2, both included.

    z_i = (1 − t_i) x1 + t_i x2 with t_i = i/(n − 1), so z_0 = x1 and z_{n−1} = x2 exactly.
    An open path: count transitions along it with ``transitions(model, path,
    closed=False)``; the default, ``closed=True``, adds the way back from x2 to x1 (for a
    segment, twice the count).

    Args:
        x1, x2: endpoints [D].
        n_points: n >= 2.

    Returns:
        [n, D] in the endpoints' dtype.

    Example:
        >>> segment(torch.zeros(2), torch.ones(2), n_points=3)[1]
        tensor([0.5000, 0.5000])
    """
    (p, q), dtype = as_vectors("x1 x2", x1, x2)
    t = torch.linspace(0, 1, check_count(n_points, "n_points", 2), dtype=_F64, device=p.device)
    return (torch.outer(1 - t, p) + torch.outer(t, q)).to(dtype)


def polygon(vertices: torch.Tensor, *, points_per_edge: int, closed: bool = True) -> torch.Tensor:
    """Points along the edges of a polygon through K vertices.

    Each edge from v_j to v_{j+1} contributes m = points_per_edge points
    (1 − t) v_j + t v_{j+1}, t = 0, 1/m, ..., (m − 1)/m, so every vertex appears once, at
    index j·m. Closed (default): K edges, the last back to v_0, K·m points, v_0 not repeated
    (a closed path like `ellipse`). Open: K − 1 edges plus the last vertex, (K − 1)·m + 1
    points. With m = 1 and closed=True the result is the vertices themselves.

    Args:
        vertices: [K, D], K >= 2.
        points_per_edge: m >= 1.
        closed: whether the last vertex joins back to the first.

    Returns:
        [K·m, D] (closed) or [(K − 1)·m + 1, D] (open), in the vertices' dtype.

    Example:
        >>> square = torch.tensor([[0.0, 0], [1, 0], [1, 1], [0, 1]])
        >>> polygon(square, points_per_edge=2).shape
        torch.Size([8, 2])
    """
    if not isinstance(vertices, torch.Tensor) or vertices.ndim != 2 or vertices.shape[0] < 2:
        shape = tuple(vertices.shape) if isinstance(vertices, torch.Tensor) else vertices
        raise UserError(f"vertices must be a [K, D] tensor with K >= 2, got {shape}.")
    m = check_count(points_per_edge, "points_per_edge", 1)
    dtype = vertices.dtype if vertices.dtype.is_floating_point else torch.get_default_dtype()
    v = vertices.to(_F64)
    starts, ends = (v, v.roll(-1, dims=0)) if closed else (v[:-1], v[1:])  # [E, D] each
    t = (torch.arange(m, dtype=_F64, device=v.device) / m)[None, :, None]  # [1, m, 1]
    path = (1 - t) * starts[:, None] + t * ends[:, None]  # [E, m, D]
    path = path.reshape(-1, v.shape[1])
    if not closed:
        path = torch.cat([path, v[-1:]])
    return path.to(dtype)


@dataclass(frozen=True, eq=False)
class PlaneGrid:
    """A square grid on the plane through three anchors (Study 3, Fig. 3).

    A grid point with plane coordinates (s, t) is origin + s·u + t·v, where basis = [u; v]
    is orthonormal. Row r, column k of the grid has coordinates (u_coords[k], v_coords[r]).

    Attributes:
        u_coords: [R] coordinates along u (the columns), increasing.
        v_coords: [R] coordinates along v (the rows), increasing.
        anchor_coords: [3, 2] the anchors' (u, v) coordinates.
        basis: [2, D] rows u and v.
        origin: [D] the anchors' centroid.
    """

    u_coords: torch.Tensor
    v_coords: torch.Tensor
    anchor_coords: torch.Tensor
    basis: torch.Tensor
    origin: torch.Tensor

    @property
    def resolution(self) -> int:
        return self.u_coords.shape[0]

    def embed(self, coords: torch.Tensor) -> torch.Tensor:
        """Input-space points origin + coords @ basis for plane coordinates [..., 2] → [..., D]."""
        return self.origin + coords.to(self.basis.dtype) @ self.basis

    @property
    def points(self) -> torch.Tensor:
        """All R² grid points [R·R, D], row-major: index r·R + k is (u_coords[k], v_coords[r]).

        Built on each access (512² MNIST points are 0.8 GB in float32); to bound memory,
        evaluate a model row block by row block with `embed` instead.
        """
        vv, uu = torch.meshgrid(self.v_coords, self.u_coords, indexing="ij")  # [R, R] each
        return self.embed(torch.stack([uu, vv], dim=-1).reshape(-1, 2))


def plane_grid(
    x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, *, resolution: int, extent: float = 1.5
) -> PlaneGrid:
    """A resolution² grid on the plane through x1, x2, x3 (paper Study 3, Fig. 3).

    The basis is Gram–Schmidt of (x2 − x1, x3 − x1): u = (x2 − x1)/‖x2 − x1‖, v = the unit
    part of x3 − x1 orthogonal to u. The origin is the centroid c, and each anchor is
    c + (s, t) @ [u; v]. The grid is the square [−h, h]² with h = extent · max_i ‖(s_i, t_i)‖_∞:
    the smallest centroid-centred square holding the anchors, scaled by extent (1.5 by
    default, so the anchors sit well inside).

    Args:
        x1, x2, x3: anchors [D], not collinear.
        resolution: R >= 2 points per side.
        extent: scale of the square relative to the anchors' extent, > 0.

    Returns:
        A `PlaneGrid` in the anchors' dtype.

    Raises:
        UserError: if the anchors are (numerically) collinear, so no plane is determined.

    Example:
        >>> grid = plane_grid(*torch.eye(3, dtype=torch.float64), resolution=64)
        >>> grid.points.shape, grid.anchor_coords.shape
        (torch.Size([4096, 3]), torch.Size([3, 2]))
    """
    (p, q, r), dtype = as_vectors("x1 x2 x3", x1, x2, x3)
    n = check_count(resolution, "resolution", 2)
    if not (isinstance(extent, int | float) and math.isfinite(extent) and extent > 0):
        raise UserError(f"extent must be a finite number > 0, got {extent!r}.")
    d2, d3 = q - p, r - p
    n2, n3 = d2.norm().item(), d3.norm().item()
    u = d2 / max(n2, torch.finfo(_F64).tiny)
    w = d3 - (u @ d3) * u
    w = w - (u @ w) * u  # second pass: orthogonal to u to rounding
    # (anchors given in float32 carry its rounding: a + d, a + 2d are "off the line" by it)
    tolerance = max(_COLLINEAR_RTOL, 64 * torch.finfo(dtype).eps)
    if n2 == 0 or w.norm().item() <= tolerance * max(n2, n3):
        raise UserError(
            "plane_grid needs three anchors that span a plane, but these are collinear "
            f"(x3 is {w.norm().item():.3g} from the line through x1 and x2, which are "
            f"{n2:.3g} apart); pick three points not on one line."
        )
    basis = torch.stack([u, w / w.norm()])  # [2, D]
    origin = (p + q + r) / 3
    anchor_coords = (torch.stack([p, q, r]) - origin) @ basis.T  # [3, 2]
    half = extent * anchor_coords.abs().max().item()
    coords = torch.linspace(-half, half, n, dtype=_F64, device=p.device)  # [R]
    return PlaneGrid(
        u_coords=coords.to(dtype),
        v_coords=coords.clone().to(dtype),
        anchor_coords=anchor_coords.to(dtype),
        basis=basis.to(dtype),
        origin=origin.to(dtype),
    )
