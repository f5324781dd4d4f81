"""Closest points between arcs / segments against a dense brute-force search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pml_plugins.geometry import (
    closest_points_from_gram,
    closest_points_on_arcs,
    closest_points_on_segments,
)
from tests.loss_contract import kink_free

DIMS = (3, 8, 64)
CASES_PER_DIM = 110
TOL = 1e-4


# ----------------------------------------------------------------- test data
def _unit(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _tangent(g: torch.Generator, m: torch.Tensor) -> torch.Tensor:
    w = torch.randn(m.shape, generator=g, dtype=torch.float64)
    w = w - (w * m).sum(-1, keepdim=True) * m
    return F.normalize(w, dim=-1)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=torch.float64)


def arc_cases(d: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random arcs of several kinds, with a tag per case (0 random, 1 nearly crossing,
    2 shared endpoint, 3 degenerate, 4 near-antipodal)."""
    g = torch.Generator().manual_seed(seed + d)
    n = CASES_PER_DIM
    x1, x2, y1, y2 = (_unit(g, n, d) for _ in range(4))
    kind = torch.zeros(n, dtype=torch.long)
    # nearly crossing: the second arc passes within ~1e-3 of a point of the first
    s = slice(30, 55)
    k = s.stop - s.start
    x1[s], x2[s] = _unit(g, k, d), _unit(g, k, d)
    tau = _uniform(g, k, 0.2, 0.8)
    ang = torch.acos((x1[s] * x2[s]).sum(-1, keepdim=True).clamp(-1, 1))
    mid = (torch.sin((1 - tau) * ang) * x1[s] + torch.sin(tau * ang) * x2[s]) / torch.sin(ang)
    mid = F.normalize(mid + 1e-3 * torch.randn(mid.shape, generator=g, dtype=torch.float64), dim=-1)
    w = _tangent(g, mid)
    half = _uniform(g, k, 0.2, 1.0)
    y1[s] = torch.cos(half) * mid - torch.sin(half) * w
    y2[s] = torch.cos(half) * mid + torch.sin(half) * w
    kind[s] = 1
    # shared endpoints
    y1[55:62] = x1[55:62]
    y2[62:68] = x2[62:68]
    y1[68:72] = x2[68:72]
    kind[55:72] = 2
    # degenerate arcs (x1 == x2, or both arcs points)
    x2[72:82] = x1[72:82]
    y2[78:86] = y1[78:86]
    kind[72:86] = 3
    # near-antipodal endpoints
    noise = 10 ** torch.empty(24, 1, dtype=torch.float64).uniform_(-4, -1.5, generator=g)
    x2[86:110] = F.normalize(-x1[86:110] + noise * _unit(g, 24, d), dim=-1)
    y2[98:110] = F.normalize(-y1[98:110] + noise[12:] * _unit(g, 12, d), dim=-1)
    kind[86:110] = 4
    return {"x1": x1, "x2": x2, "y1": y1, "y2": y2}, kind


def segment_cases(d: int, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random segments (0), nearly crossing (1), shared endpoints (2), degenerate (3),
    (nearly) parallel or collinear (4)."""
    g = torch.Generator().manual_seed(seed + d)
    n = CASES_PER_DIM

    def rnd(k: int = n) -> torch.Tensor:
        return torch.randn(k, d, generator=g, dtype=torch.float64)

    x1, x2, y1, y2 = rnd(), rnd(), rnd(), rnd()
    kind = torch.zeros(n, dtype=torch.long)
    s = slice(30, 55)
    k = s.stop - s.start
    mid = x1[s] + _uniform(g, k, 0.2, 0.8) * (x2[s] - x1[s]) + 1e-3 * rnd(k)
    v = rnd(k)
    y1[s], y2[s] = mid - _uniform(g, k, 0.2, 1.0) * v, mid + _uniform(g, k, 0.2, 1.0) * v
    kind[s] = 1
    y1[55:62] = x1[55:62]
    y2[62:68] = x2[62:68]
    y1[68:72] = x2[68:72]
    kind[55:72] = 2
    x2[72:82] = x1[72:82]
    y2[78:86] = y1[78:86]
    kind[72:86] = 3
    u = x2[86:110] - x1[86:110]
    off = 0.3 * rnd(24)
    off[12:] = 0.0  # collinear
    y1[86:110] = x1[86:110] + off + _uniform(g, 24, -0.5, 1.5) * u
    y2[86:110] = y1[86:110] + (_uniform(g, 24, -1.0, 1.0) * u + 1e-7 * rnd(24))
    kind[86:110] = 4
    return {"x1": x1, "x2": x2, "y1": y1, "y2": y2}, kind


# --------------------------------------------------------------- brute force
def arc_points(x1: torch.Tensor, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points of the shorter great-circle arc x1 -> x2 at fractions t: (N, m) -> (N, m, d)."""
    ang = torch.acos((x1 * x2).sum(-1).clamp(-1, 1)).unsqueeze(-1)
    sin = torch.sin(ang)
    point = sin < 1e-12
    sin = torch.where(point, torch.ones_like(sin), sin)
    w1 = torch.where(point, 1 - t, torch.sin((1 - t) * ang) / sin)
    w2 = torch.where(point, t, torch.sin(t * ang) / sin)
    pts = w1.unsqueeze(-1) * x1.unsqueeze(-2) + w2.unsqueeze(-1) * x2.unsqueeze(-2)
    return F.normalize(pts, dim=-1)  # exact in theory; removes rounding near antipodes


def segment_points(x1: torch.Tensor, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x1.unsqueeze(-2) + t.unsqueeze(-1) * (x2 - x1).unsqueeze(-2)


def brute_force(points, x1, x2, y1, y2, n: int = 192, top: int = 3, rounds: int = 15):
    """Minimum distance over a dense grid of both parameters, refined around the
    ``top`` best local minima of the grid (windows halved each round, so that the
    refinement can still travel along the narrow valley of two nearly parallel
    crossing arcs), vectorised over cases."""
    N = x1.shape[0]
    grid = torch.linspace(0, 1, n, dtype=torch.float64).expand(N, n)
    D = torch.cdist(points(x1, x2, grid), points(y1, y2, grid))  # (N, n, n)
    best = D.flatten(1).amin(1)
    padded = F.pad(D, (1, 1, 1, 1), value=math.inf)
    is_min = torch.ones_like(D, dtype=torch.bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                is_min &= D <= padded[:, 1 + di : n + 1 + di, 1 + dj : n + 1 + dj]
    _, flat = D.masked_fill(~is_min, math.inf).flatten(1).topk(top, largest=False)
    ti, tj = (flat // n).double() / (n - 1), (flat % n).double() / (n - 1)  # (N, top)
    m, half = 25, 8.0 / (n - 1)
    lin = torch.linspace(0, 1, m, dtype=torch.float64)
    rep = [v.repeat_interleave(top, 0) for v in (x1, x2, y1, y2)]
    for _ in range(rounds):
        lo_i, hi_i = (ti - half).clamp(0, 1), (ti + half).clamp(0, 1)
        lo_j, hi_j = (tj - half).clamp(0, 1), (tj + half).clamp(0, 1)
        gi = (lo_i.unsqueeze(-1) + (hi_i - lo_i).unsqueeze(-1) * lin).reshape(N * top, m)
        gj = (lo_j.unsqueeze(-1) + (hi_j - lo_j).unsqueeze(-1) * lin).reshape(N * top, m)
        Dr = torch.cdist(points(rep[0], rep[1], gi), points(rep[2], rep[3], gj))
        val, arg = Dr.flatten(1).min(1)
        best = torch.minimum(best, val.reshape(N, top).amin(1))
        ti = gi.gather(1, (arg // m).unsqueeze(1)).reshape(N, top)
        tj = gj.gather(1, (arg % m).unsqueeze(1)).reshape(N, top)
        half /= 2.0
    return best


def _corner_min(c: dict[str, torch.Tensor], normalize: bool) -> torch.Tensor:
    v = {k: F.normalize(t, dim=-1) if normalize else t for k, t in c.items()}
    ds = [torch.linalg.norm(v[a] - v[b], dim=-1) for a in ("x1", "x2") for b in ("y1", "y2")]
    return torch.stack(ds, -1).amin(-1)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("d", DIMS)
def test_arcs_match_brute_force(d):
    c, kind = arc_cases(d)
    p, q, dist = closest_points_on_arcs(c["x1"], c["x2"], c["y1"], c["y2"])
    bf = brute_force(arc_points, c["x1"], c["x2"], c["y1"], c["y2"])
    # the solver is never worse than any grid point (it is exact, up to the float64
    # resolution of distances from Gram entries near 0), and the grid comes within TOL
    assert (dist <= bf + 1e-7).all(), (dist - bf).max()
    err = (dist - bf).abs()
    assert err.max() < TOL, [(int(kind[i]), float(err[i])) for i in err.argsort()[-5:]]
    # each kind of case is present
    assert set(kind.tolist()) == {0, 1, 2, 3, 4}
    # p and q lie on their arcs and realise dist
    torch.testing.assert_close(torch.linalg.norm(p - q, dim=-1), dist)
    for pt, a, b in ((p, c["x1"], c["x2"]), (q, c["y1"], c["y2"])):
        torch.testing.assert_close(
            torch.linalg.norm(pt, dim=-1), torch.ones(len(pt), dtype=pt.dtype)
        )

        def ang(u, v):
            return torch.acos((u * v).sum(-1).clamp(-1, 1))

        gap = ang(a, pt) + ang(pt, b) - ang(a, b)
        assert gap.abs().max() < 1e-6
    # shared endpoints -> the arcs touch
    assert dist[kind == 2].max() < 1e-7


@pytest.mark.parametrize("d", DIMS)
def test_segments_match_brute_force(d):
    c, kind = segment_cases(d)
    p, q, dist = closest_points_on_segments(c["x1"], c["x2"], c["y1"], c["y2"])
    bf = brute_force(segment_points, c["x1"], c["x2"], c["y1"], c["y2"])
    assert (dist <= bf + 1e-7).all(), (dist - bf).max()
    err = (dist - bf).abs()
    assert err.max() < TOL, [(int(kind[i]), float(err[i])) for i in err.argsort()[-5:]]
    torch.testing.assert_close(torch.linalg.norm(p - q, dim=-1), dist)
    for pt, a, b in ((p, c["x1"], c["x2"]), (q, c["y1"], c["y2"])):
        gap = torch.linalg.norm(a - pt, dim=-1) + torch.linalg.norm(pt - b, dim=-1)
        assert (gap - torch.linalg.norm(a - b, dim=-1)).abs().max() < 1e-6
    assert dist[kind == 2].max() < 1e-7
    assert set(kind.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("d", DIMS)
def test_optimum_never_above_endpoint_distances(d):
    for cases, solver, normalize in (
        (arc_cases(d, seed=7), closest_points_on_arcs, True),
        (segment_cases(d, seed=8), closest_points_on_segments, False),
    ):
        c, _ = cases
        dist = solver(c["x1"], c["x2"], c["y1"], c["y2"])[2]
        corner = _corner_min(c, normalize)
        assert (dist <= corner + 1e-12).all()
        # and strictly below it for a good share of random cases
        assert (dist < corner - 1e-6).float().mean() > 0.3


def test_gram_solver_matches_vector_solver_for_all_pairs_of_pairs():
    g = torch.Generator().manual_seed(3)
    n, d = 7, 5
    for geometry in ("arc", "segment"):
        x = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
        if geometry == "arc":
            x = F.normalize(x, dim=-1)
        gram = x @ x.t()
        idx = torch.arange(2 * n).reshape(n, 2)
        gpp = gram[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (n, 2, 2)
        gxy = gram[idx[:, None, :, None], idx[None, :, None, :]]  # (n, n, 2, 2)
        sol = closest_points_from_gram(gpp[:, None], gpp[None, :], gxy, geometry)
        solver = closest_points_on_arcs if geometry == "arc" else closest_points_on_segments
        for i in range(n):
            for j in range(n):
                ref = solver(x[2 * i], x[2 * i + 1], x[2 * j], x[2 * j + 1])[2]
                torch.testing.assert_close(sol.dist[i, j], ref, atol=1e-7, rtol=0)
        torch.testing.assert_close(sol.dist, sol.dist.t(), atol=1e-7, rtol=0)
        assert sol.dist.diagonal().abs().max() < 1e-7  # a pair against itself


def test_gradcheck_distance_float64():
    g = torch.Generator().manual_seed(5)
    for solver, d in ((closest_points_on_arcs, 4), (closest_points_on_segments, 3)):
        ins = [torch.randn(8, d, generator=g, dtype=torch.float64) for _ in range(4)]
        # where the optima are: interior and boundary solutions must both be exercised
        with torch.no_grad():
            p, q, _ = solver(*ins)
            inside = []
            for pt, a, b in ((p, ins[0], ins[1]), (q, ins[2], ins[3])):
                if solver is closest_points_on_arcs:
                    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
                gap_a = torch.linalg.norm(pt - a, dim=-1)
                gap_b = torch.linalg.norm(pt - b, dim=-1)
                inside.append(torch.minimum(gap_a, gap_b) > 1e-9)
        assert (inside[0] & inside[1]).any() and (~inside[0] | ~inside[1]).any()
        # no switch between candidate optima within 1e-5 (rounding would pick the branch)
        assert kink_free(lambda *v, s=solver: s(*v)[2], ins)
        inputs = tuple(t.clone().requires_grad_(True) for t in ins)
        assert torch.autograd.gradcheck(
            lambda *v, s=solver: s(*v)[2], inputs, eps=1e-6, atol=1e-6, rtol=1e-4
        )


def test_gradient_finite_float32_edge_cases():
    g = torch.Generator().manual_seed(11)
    d = 6
    a, b, c = (F.normalize(torch.randn(d, generator=g), dim=0) for _ in range(3))
    cases = [
        (a, a, b, c),  # degenerate first arc
        (a, a, b, b),  # two points
        (a, a, a, a),  # identical points: distance 0
        (a, b, a, c),  # shared endpoint: distance 0
        (a, b, a, b),  # identical arcs
        (a, -a, b, c),  # exactly antipodal
        (a, F.normalize(-a + 1e-4 * b, dim=0), b, -b),  # near-antipodal
        (a, F.normalize(a + 1e-5 * b, dim=0), c, b),  # tiny arc
        (torch.zeros(d), a, b, c),  # zero vector
    ]
    for solver in (closest_points_on_arcs, closest_points_on_segments):
        for case in cases:
            ins = [t.clone().requires_grad_(True) for t in case]
            p, q, dist = solver(*ins)
            assert torch.isfinite(p).all() and torch.isfinite(q).all() and torch.isfinite(dist)
            dist.backward()
            assert all(torch.isfinite(t.grad).all() for t in ins)


def test_min_angle_treats_short_arcs_as_points():
    g = torch.Generator().manual_seed(13)
    x1, y1, y2 = (
        F.normalize(torch.randn(1, 5, generator=g, dtype=torch.float64), dim=-1) for _ in range(3)
    )
    w = _tangent(g, x1)
    x2 = math.cos(5e-4) * x1 + math.sin(5e-4) * w  # an arc of 5e-4 rad
    p, _, _ = closest_points_on_arcs(x1, x2, y1, y2)  # default min_angle = 1e-3
    torch.testing.assert_close(p, x1)
    # with min_angle=0 the short arc is solved exactly
    _, _, dist = closest_points_on_arcs(x1, x2, y1, y2, min_angle=0.0)
    bf = brute_force(arc_points, x1, x2, y1, y2)
    assert (dist - bf).abs().max() < 1e-6 and (dist <= bf + 1e-12).all()


def test_batched_leading_shapes_and_broadcasting():
    g = torch.Generator().manual_seed(17)
    x1, x2 = torch.randn(2, 3, 1, 4, generator=g, dtype=torch.float64).unbind(0)
    y1, y2 = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64).unbind(0)
    for solver in (closest_points_on_arcs, closest_points_on_segments):
        p, q, dist = solver(x1, x2, y1, y2)
        assert p.shape == q.shape == (3, 5, 4) and dist.shape == (3, 5)
        for i in range(3):
            for j in range(5):
                ref = solver(x1[i, 0], x2[i, 0], y1[0, j], y2[0, j])[2]
                torch.testing.assert_close(dist[i, j], ref)


def _on_circle(*angles: float) -> list[torch.Tensor]:
    return [
        torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64).requires_grad_()
        for a in angles
    ]


@pytest.mark.parametrize(
    "angles",
    [
        (0.0, 1.0, 0.5, 1.5),  # overlapping arcs in 2-D
        (0.1, 1.3, 0.2, 0.9),  # one arc inside the other
        (0.3, 0.9, 0.3, 0.9),  # the same arc
        (0.9, 0.3, 0.3, 0.9),  # the same arc, reversed
    ],
)
def test_overlapping_arcs_are_at_distance_zero_with_zero_gradient(angles):
    """Where the arcs share points, d* = 0 and nothing moves them apart: the distance and
    its gradient are exactly 0, not rounding noise divided by rounding noise."""
    xs = _on_circle(*angles)
    _, _, dist = closest_points_on_arcs(*xs)
    dist.backward()
    assert dist.item() == 0.0
    for x in xs:
        assert torch.count_nonzero(x.grad) == 0


def test_crossing_arcs_in_3d_are_at_distance_zero_with_zero_gradient():
    e = torch.eye(3, dtype=torch.float64)
    x1, x2 = F.normalize(e[0] - e[1], dim=0), F.normalize(e[0] + e[1], dim=0)  # through e0
    y1, y2 = F.normalize(e[0] - e[2], dim=0), F.normalize(e[0] + e[2], dim=0)  # through e0
    xs = [v.clone().requires_grad_() for v in (x1, x2, y1, y2)]
    _, _, dist = closest_points_on_arcs(*xs)
    dist.backward()
    assert dist.item() == 0.0
    assert all(torch.count_nonzero(x.grad) == 0 for x in xs)


@pytest.mark.parametrize("gap", [1e-9, 1e-6, 1e-3])
def test_arcs_a_small_gap_apart_keep_their_distance(gap):
    """The zero floor is rounding noise only: a real gap of 1e-9 survives in float64."""
    xs = _on_circle(0.0, 1.0, 1.0 + gap, 2.0)
    _, _, dist = closest_points_on_arcs(*xs)
    assert dist.item() == pytest.approx(2 * math.sin(gap / 2), rel=1e-6)
