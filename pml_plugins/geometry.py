"""Closest points between two great-circle arcs, or two line segments (LoOp's geometry).

Given two pairs of points ``(x1, x2)`` and ``(y1, y2)``, find the points ``p`` between
``x1`` and ``x2`` and ``q`` between ``y1`` and ``y2`` that are closest to each other:

    d* = min over p in X, q in Y of ||p - q||_2

- **arcs** (``closest_points_on_arcs``): X is the shorter great-circle arc from ``x1`` to
  ``x2`` on the unit hypersphere (inputs are L2-normalised first);
- **segments** (``closest_points_on_segments``): X is the line segment ``[x1, x2]``.

This is the inner problem of LoOp, "Looking for Optimal Hard Negative Embeddings"
(Vasudeva et al., ICCV 2021, https://arxiv.org/abs/2108.09335). The minimum is exact:
both solvers enumerate a superset of the KKT points of the problem on the box of the
two normalised parameters (corners, the 1-D optimum on each edge, the interior
stationary points) and keep the best; the global minimiser is always a KKT point.

**Arcs.** With ``e1 = x1``, ``e2`` the Gram-Schmidt direction of ``x2`` and
``a0 = angle(x1, x2)``, the arc is ``x(a) = cos(a) e1 + sin(a) e2`` for ``a in [0, a0]``
(likewise ``y(b)``, ``b in [0, b0]``), and ``||x(a) - y(b)||^2 = 2 - 2 u(a)^T G v(b)`` with
``u(a) = (cos a, sin a)``, ``v(b) = (cos b, sin b)`` and the 2x2 frame matrix
``G = [[e1.f1, e1.f2], [e2.f1, e2.f2]]``. Candidates: the 4 corners; on each edge
``a in {0, a0}`` the maximiser ``b = atan2(G^T u(a))`` when it lies in ``[0, b0]`` (same
with the roles swapped); the interior stationary points, which are the singular-vector
pairs of ``G`` (``a`` = an eigen-direction of ``G G^T``, ``b = atan2(G^T u(a))``).

**Segments.** ``P(s) = x1 + s (x2 - x1)``, ``Q(t) = y1 + t (y2 - y1)``, ``s, t in [0, 1]``:
a convex quadratic; candidates are the interior stationary point, the clipped 1-D
optimum on each of the 4 edges, and the 4 corners.

**Gradients** (envelope theorem). The optimal normalised parameters ``tau = a*/a0`` and
``upsilon = b*/b0`` (``s*``, ``t*`` for segments) are found under ``torch.no_grad`` in
float64; the distance is then recomputed differentiably from the endpoints at those
fixed parameters. Because the parameter box ``[0, 1]^2`` does not depend on the inputs,
this gives the exact gradient of ``d*`` wherever the minimiser is unique. ``p`` and
``q`` are returned as functions of the endpoints at the fixed parameters: their
gradients do not include the motion of the minimiser, only ``dist``'s gradient is the
derivative of the minimum.

**Memory.** ``closest_points_from_gram`` solves from 2x2 Gram blocks only
(``x_k . x_l``, ``y_k . y_l``, ``x_k . y_l``), so that all pairs of pairs of a batch cost
O(B^2) memory after one B x B Gram matrix: ``p = c1 x1 + c2 x2`` and
``||p - q||^2 = a^T Gxx a + b^T Gyy b - 2 a^T Gxy b`` with the endpoint coefficients ``a``,
``b``, which are differentiable functions of the arc angles at fixed ``tau``, ``upsilon``.

**Edge cases.** An arc whose angle is at most ``min_angle`` (default ``1e-3``, the project's
decision, docs/methods/loop.md) is treated as its start point ``x1``; pass
``min_angle=0`` for the exact arc down to ``x1 == x2``. The arc angle
``2 asin(||x1 - x2|| / 2)`` has its argument clamped below 1, so that antipodal endpoints
(where the shorter arc is not unique) stay finite. A distance whose square is below the
rounding level of its dtype is returned as 0 with a zero gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEGENERATE_ANGLE",
    "GramSolution",
    "closest_points_from_gram",
    "closest_points_on_arcs",
    "closest_points_on_segments",
    "safe_sqrt",
    "solve_arc_parameters",
    "solve_segment_parameters",
]

#: arcs whose angle (radians) is at most this are treated as their start point
DEGENERATE_ANGLE = 1e-3

_TWO_PI = 2.0 * math.pi
#: distances between two computed points below this many eps (relative) are rounding noise
_ROUNDING_ULPS = 8.0
_GEOMETRIES = ("arc", "segment")


class GramSolution(NamedTuple):
    """Closest points in endpoint coordinates: ``p = x_coef[..., 0] x1 + x_coef[..., 1] x2``."""

    x_coef: Tensor  # (..., 2), differentiable
    y_coef: Tensor  # (..., 2), differentiable
    dist: Tensor  # (...), ||p - q||, differentiable (envelope theorem)
    x_param: Tensor  # (...), float64, detached: position of p in [0, 1] (0 = x1, 1 = x2)
    y_param: Tensor  # (...), float64, detached: position of q in [0, 1] (0 = y1, 1 = y2)


def _entries(g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return g[..., 0, 0], g[..., 0, 1], g[..., 1, 0], g[..., 1, 1]


def _chord_sq(g: Tensor) -> Tensor:
    """||v1 - v2||^2 from the 2x2 Gram block of (v1, v2)."""
    return g[..., 0, 0] + g[..., 1, 1] - 2.0 * g[..., 0, 1]


def _arc_angle(chord_sq: Tensor) -> Tensor:
    """Angle between two unit vectors from their squared chord, clamped below pi."""
    one_minus = 1.0 - torch.finfo(chord_sq.dtype).eps
    half = torch.sqrt(chord_sq.clamp_min(0.0)) / 2.0
    return 2.0 * torch.asin(half.clamp(max=one_minus))


@torch.no_grad()
def solve_arc_parameters(
    gxx: Tensor,
    gyy: Tensor,
    gxy: Tensor,
    min_angle: float = DEGENERATE_ANGLE,
    x_chord_sq: Tensor | None = None,
    y_chord_sq: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised parameters of the closest points of two arcs of unit vectors.

    Args:
        gxx, gyy, gxy: (..., 2, 2) Gram blocks ``x_k . x_l``, ``y_k . y_l``, ``x_k . y_l``
            of unit vectors (broadcastable against each other).
        min_angle: arcs of at most this angle are the point ``x1`` (resp. ``y1``).
        x_chord_sq, y_chord_sq: optional ``||x1 - x2||^2``, ``||y1 - y2||^2`` computed from
            the vectors (more accurate for short arcs than the Gram entries).

    Returns:
        ``(tau, upsilon, x_degenerate, y_degenerate)``, float64 / bool, no gradient:
        ``p = x(tau * a0)``, ``q = y(upsilon * b0)``.
    """
    gxx, gyy, gxy = gxx.double(), gyy.double(), gxy.double()
    xc = (_chord_sq(gxx) if x_chord_sq is None else x_chord_sq).double()
    yc = (_chord_sq(gyy) if y_chord_sq is None else y_chord_sq).double()
    a0, b0 = _arc_angle(xc), _arc_angle(yc)
    x_deg, y_deg = a0 <= min_angle, b0 <= min_angle
    m11, m12, m21, m22 = _entries(gxy)
    m11, m12, m21, m22, a0, b0, x_deg, y_deg = torch.broadcast_tensors(
        m11, m12, m21, m22, a0, b0, x_deg, y_deg
    )
    one = torch.ones_like(a0)
    cx, sx = torch.cos(a0), torch.where(x_deg, one, torch.sin(a0))
    cy, sy = torch.cos(b0), torch.where(y_deg, one, torch.sin(b0))
    zero = torch.zeros_like(a0)
    # frame matrix G = [[e1.f1, e1.f2], [e2.f1, e2.f2]], e2 / f2 by Gram-Schmidt
    g11 = m11
    g12 = torch.where(y_deg, zero, (m12 - cy * m11) / sy)
    g21 = torch.where(x_deg, zero, (m21 - cx * m11) / sx)
    g22 = torch.where(x_deg | y_deg, zero, (m22 - cy * m21 - cx * m12 + cx * cy * m11) / (sx * sy))
    A = torch.where(x_deg, zero, a0)
    B = torch.where(y_deg, zero, b0)

    def best_beta(a: Tensor) -> Tensor:  # argmax over the full circle of u(a)^T G v(b)
        ca, sa = torch.cos(a), torch.sin(a)
        return torch.remainder(torch.atan2(g12 * ca + g22 * sa, g11 * ca + g21 * sa), _TWO_PI)

    def best_alpha(b: Tensor) -> Tensor:
        cb, sb = torch.cos(b), torch.sin(b)
        return torch.remainder(torch.atan2(g21 * cb + g22 * sb, g11 * cb + g12 * sb), _TWO_PI)

    # interior stationary points: a along an eigen-direction of G G^T
    theta = 0.5 * torch.atan2(2.0 * (g11 * g21 + g12 * g22), g11**2 + g12**2 - g21**2 - g22**2)
    interior = [torch.remainder(theta + k * (math.pi / 2.0), _TWO_PI) for k in range(4)]
    alphas = [zero, zero, A, A, zero, A, best_alpha(zero), best_alpha(B), *interior]
    betas = [zero, B, zero, B, best_beta(zero), best_beta(A), zero, B]
    betas += [best_beta(a) for a in interior]
    alpha, beta = torch.stack(alphas, -1), torch.stack(betas, -1)
    valid = (alpha <= A.unsqueeze(-1)) & (beta <= B.unsqueeze(-1))
    ca, sa, cb, sb = torch.cos(alpha), torch.sin(alpha), torch.cos(beta), torch.sin(beta)
    h = ca * (g11.unsqueeze(-1) * cb + g12.unsqueeze(-1) * sb)
    h = h + sa * (g21.unsqueeze(-1) * cb + g22.unsqueeze(-1) * sb)
    best = h.masked_fill(~valid, -math.inf).argmax(-1, keepdim=True)
    a_star = alpha.gather(-1, best).squeeze(-1)
    b_star = beta.gather(-1, best).squeeze(-1)
    tau = torch.where(A > 0, a_star / torch.where(A > 0, A, one), zero).clamp(0.0, 1.0)
    ups = torch.where(B > 0, b_star / torch.where(B > 0, B, one), zero).clamp(0.0, 1.0)
    return tau, ups, x_deg, y_deg


@torch.no_grad()
def solve_segment_parameters(gxx: Tensor, gyy: Tensor, gxy: Tensor) -> tuple[Tensor, Tensor]:
    """Parameters ``(s, t)`` in [0, 1] of the closest points of two segments (float64).

    Args as in ``solve_arc_parameters`` (any vectors, not only unit ones).
    """
    gxx, gyy, gxy = gxx.double(), gyy.double(), gxy.double()
    m11, m12, m21, m22 = _entries(gxy)
    a = _chord_sq(gxx).clamp_min(0.0)  # u.u, u = x2 - x1
    c = _chord_sq(gyy).clamp_min(0.0)  # v.v, v = y2 - y1
    b = m22 - m21 - m12 + m11  # u.v
    d = gxx[..., 0, 1] - gxx[..., 0, 0] - m21 + m11  # u.w0, w0 = x1 - y1
    e = m12 - gyy[..., 0, 1] - m11 + gyy[..., 0, 0]  # v.w0
    x_scale = gxx[..., 0, 0] + gxx[..., 1, 1]
    y_scale = gyy[..., 0, 0] + gyy[..., 1, 1]
    a, b, c, d, e, x_scale, y_scale = torch.broadcast_tensors(a, b, c, d, e, x_scale, y_scale)
    x_deg, y_deg = a <= 1e-14 * x_scale, c <= 1e-14 * y_scale
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    a_safe, c_safe = torch.where(x_deg, one, a), torch.where(y_deg, one, c)

    def t_for(s: Tensor) -> Tensor:
        return torch.where(y_deg, zero, ((e + b * s) / c_safe).clamp(0.0, 1.0))

    def s_for(t: Tensor) -> Tensor:
        return torch.where(x_deg, zero, ((b * t - d) / a_safe).clamp(0.0, 1.0))

    det = a * c - b * b
    ok = (det > 0) & ~x_deg & ~y_deg
    det_safe = torch.where(ok, det, one)
    s_in, t_in = (b * e - c * d) / det_safe, (a * e - b * d) / det_safe
    ok = ok & (s_in >= 0) & (s_in <= 1) & (t_in >= 0) & (t_in <= 1)
    s = torch.stack([zero, zero, one, one, zero, one, s_for(zero), s_for(one), s_in], -1)
    t = torch.stack([zero, one, zero, one, t_for(zero), t_for(one), zero, one, t_in], -1)
    valid = torch.cat([torch.ones_like(s[..., :8], dtype=torch.bool), ok.unsqueeze(-1)], -1)
    a, b, c, d, e = (v.unsqueeze(-1) for v in (a, b, c, d, e))
    f = a * s * s + c * t * t - 2.0 * b * s * t + 2.0 * d * s - 2.0 * e * t
    best = f.masked_fill(~valid, math.inf).argmin(-1, keepdim=True)
    return s.gather(-1, best).squeeze(-1), t.gather(-1, best).squeeze(-1)


def _arc_coefficients(chord_sq: Tensor, tau: Tensor, degenerate: Tensor) -> Tensor:
    """Endpoint coefficients of the point at fraction ``tau`` of the arc (slerp)."""
    tiny = torch.finfo(chord_sq.dtype).eps ** 2
    safe = torch.where(degenerate, torch.ones_like(chord_sq), chord_sq).clamp_min(tiny)
    angle = _arc_angle(safe)
    tau = tau.to(chord_sq.dtype)
    sin_angle = torch.sin(angle)
    c1 = torch.sin((1.0 - tau) * angle) / sin_angle
    c2 = torch.sin(tau * angle) / sin_angle
    c1 = torch.where(degenerate, torch.ones_like(c1), c1)
    c2 = torch.where(degenerate, torch.zeros_like(c2), c2)
    return torch.stack([c1, c2], -1)


def _segment_coefficients(s: Tensor, dtype: torch.dtype) -> Tensor:
    s = s.to(dtype)
    return torch.stack([1.0 - s, s], -1)


def _quadratic(g: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a^T g b over the last two dimensions."""
    return (a.unsqueeze(-1) * g * b.unsqueeze(-2)).sum((-2, -1))


def safe_sqrt(x: Tensor, floor: Tensor | float) -> Tensor:
    """sqrt(x) where x > floor, else 0 (with a zero, never NaN, gradient)."""
    keep = x > floor
    return torch.where(
        keep, torch.sqrt(torch.where(keep, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def closest_points_from_gram(
    gxx: Tensor,
    gyy: Tensor,
    gxy: Tensor,
    geometry: str = "arc",
    min_angle: float = DEGENERATE_ANGLE,
    x_chord_sq: Tensor | None = None,
    y_chord_sq: Tensor | None = None,
) -> GramSolution:
    """Closest points of two arcs / segments, from 2x2 Gram blocks only.

    Args:
        gxx: (..., 2, 2) Gram block of ``(x1, x2)``: ``gxx[..., k, l] = x_k . x_l``.
        gyy: (..., 2, 2) Gram block of ``(y1, y2)``.
        gxy: (..., 2, 2) cross block ``gxy[..., k, l] = x_k . y_l``. The three blocks
            broadcast against each other, e.g. ``(n, 1, 2, 2)``, ``(1, n, 2, 2)`` and
            ``(n, n, 2, 2)`` for all pairs of ``n`` pairs.
        geometry: ``"arc"`` (the vectors must be unit vectors) or ``"segment"``.
        min_angle: arcs of at most this angle are their start point (arcs only).
        x_chord_sq, y_chord_sq: optional ``||x1 - x2||^2`` and ``||y1 - y2||^2`` computed
            from the vectors; more accurate for short arcs in low precision than the
            Gram entries (arcs only).

    Returns:
        ``GramSolution(x_coef, y_coef, dist, x_param, y_param)``. ``dist`` is
        differentiable with respect to the Gram entries (and the chords) and its gradient
        is the envelope-theorem gradient of the minimum distance.
    """
    if geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be one of {_GEOMETRIES}, got {geometry!r}")
    dtype = torch.promote_types(torch.promote_types(gxx.dtype, gyy.dtype), gxy.dtype)
    if geometry == "arc":
        xc = _chord_sq(gxx) if x_chord_sq is None else x_chord_sq
        yc = _chord_sq(gyy) if y_chord_sq is None else y_chord_sq
        tau, ups, x_deg, y_deg = solve_arc_parameters(gxx, gyy, gxy, min_angle, xc, yc)
        x_coef = _arc_coefficients(xc.to(dtype).expand(tau.shape), tau, x_deg)
        y_coef = _arc_coefficients(yc.to(dtype).expand(ups.shape), ups, y_deg)
    else:
        tau, ups = solve_segment_parameters(gxx, gyy, gxy)
        x_coef, y_coef = _segment_coefficients(tau, dtype), _segment_coefficients(ups, dtype)
    p_sq = _quadratic(gxx, x_coef, x_coef)
    q_sq = _quadratic(gyy, y_coef, y_coef)
    dist_sq = p_sq + q_sq - 2.0 * _quadratic(gxy, x_coef, y_coef)
    floor = torch.finfo(dtype).eps * (p_sq + q_sq).detach() + torch.finfo(dtype).tiny
    return GramSolution(x_coef, y_coef, safe_sqrt(dist_sq, floor), tau, ups)


def _gram_block(u1: Tensor, u2: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
    """The 2x2 block ``[[u1.v1, u1.v2], [u2.v1, u2.v2]]``."""
    return torch.stack([torch.stack([(u * v).sum(-1) for v in (v1, v2)], -1) for u in (u1, u2)], -2)


def _closest_points(
    x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor, geometry: str, min_angle: float
) -> tuple[Tensor, Tensor, Tensor]:
    x1, x2, y1, y2 = torch.broadcast_tensors(x1, x2, y1, y2)
    if geometry == "arc":
        x1, x2, y1, y2 = (torch.nn.functional.normalize(v, dim=-1) for v in (x1, x2, y1, y2))
    gxx, gyy = _gram_block(x1, x2, x1, x2), _gram_block(y1, y2, y1, y2)
    gxy = _gram_block(x1, x2, y1, y2)
    sol = closest_points_from_gram(
        gxx,
        gyy,
        gxy,
        geometry,
        min_angle,
        x_chord_sq=(x1 - x2).pow(2).sum(-1),
        y_chord_sq=(y1 - y2).pow(2).sum(-1),
    )
    p = sol.x_coef[..., :1] * x1 + sol.x_coef[..., 1:] * x2
    q = sol.y_coef[..., :1] * y1 + sol.y_coef[..., 1:] * y2
    if geometry == "arc":
        # on the sphere already, up to rounding that near-antipodal endpoints amplify;
        # |p| = 1 identically, so normalising leaves the gradient unchanged
        p, q = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(q, dim=-1)
    # p and q each carry rounding errors of a few eps: a smaller |p - q| is no distance
    # (arcs that overlap or cross), so it is 0 with a zero gradient, as in the Gram path
    noise = (_ROUNDING_ULPS * torch.finfo(p.dtype).eps) ** 2
    floor = noise * (p.pow(2).sum(-1) + q.pow(2).sum(-1)).detach() + torch.finfo(p.dtype).tiny
    dist = safe_sqrt((p - q).pow(2).sum(-1), floor)
    return p, q, dist


def closest_points_on_arcs(
    x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor, min_angle: float = DEGENERATE_ANGLE
) -> tuple[Tensor, Tensor, Tensor]:
    """Closest points of the shorter great-circle arcs ``x1 -> x2`` and ``y1 -> y2``.

    Args:
        x1, x2, y1, y2: (..., d) tensors (broadcastable), L2-normalised here.
        min_angle: an arc of at most this angle (radians) is treated as its start point
            (default ``DEGENERATE_ANGLE`` = 1e-3; 0 keeps every arc down to ``x1 == x2``).

    Returns:
        ``(p, q, dist)``: (..., d), (..., d), (...). ``p`` lies on the first arc, ``q`` on
        the second, ``dist = ||p - q||`` is their (global) minimum distance, differentiable
        with respect to the four inputs.
    """
    return _closest_points(x1, x2, y1, y2, "arc", min_angle)


def closest_points_on_segments(
    x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Closest points of the segments ``[x1, x2]`` and ``[y1, y2]`` (raw, unnormalised).

    Args:
        x1, x2, y1, y2: (..., d) tensors (broadcastable). ``x1 == x2`` is a point.

    Returns:
        ``(p, q, dist)`` as in ``closest_points_on_arcs``.
    """
    return _closest_points(x1, x2, y1, y2, "segment", 0.0)
