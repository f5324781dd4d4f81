r"""Distances to Metrix's mixed embeddings from the batch's Gram matrix, without building them.

For :math:`v = \lambda x_f + (1-\lambda) x_s` and :math:`G = E E^\top`:
:math:`a \cdot v = \lambda G_{af} + (1-\lambda) G_{as}` and
:math:`\|v\|^2 = \lambda^2 G_{ff} + (1-\lambda)^2 G_{ss} + 2\lambda(1-\lambda) G_{fs}`. PML's
cosine, dot-product and Euclidean distances (any power, normalised or not) follow from these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)

from .metrix_pairs import MixedPairs
from .precision import compute_dtype

#: distances computed from Gram matrices (exact types, p = 2, any power)
GRAM_DISTANCES = (CosineSimilarity, DotProductSimilarity, LpDistance)
#: ``torch.nn.functional.normalize``'s eps, which PML's distances use
NORM_EPS = 1e-12


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 or wider, outside autocast: products of raw (unnormalised)
    embeddings overflow float16 from norms of 256 on."""
    dtype = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


def gram_distance_supported(distance: BaseDistance) -> bool:
    """Whether this module reproduces ``distance``: PML's ``CosineSimilarity``,
    ``DotProductSimilarity`` or ``LpDistance`` (exactly these classes) with ``p = 2``, any
    ``power``, normalised or not."""
    return type(distance) in GRAM_DISTANCES and distance.p == 2


def normalised_points(
    distance: BaseDistance, sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""From points' squared norms :math:`\|x\|^2`: the factor the distance scales them by
    (:math:`1 / \max(\|x\|, 10^{-12})` as ``F.normalize``, with zero gradient below the
    eps; 1 without normalisation) and their squared norm after it."""
    if not distance.normalize_embeddings:
        return torch.ones_like(sq), sq
    norm = torch.sqrt(sq.clamp_min(NORM_EPS**2))
    return 1 / norm, sq / norm**2


def distance_from_dot(
    distance: BaseDistance,
    dot: torch.Tensor,
    query_sq: torch.Tensor,
    ref_sq: torch.Tensor,
    coincide: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``distance(q, r)`` from the dot products and squared norms of the points after the
    distance's normalisation (:func:`normalised_points`), broadcast together.

    Similarities: the dot product. Euclidean: :math:`\sqrt{\|q\|^2 + \|r\|^2 - 2 q \cdot r}`,
    with zero gradient at 0 (as ``torch.cdist``) and exactly 0 where ``coincide`` (r is q
    itself). Then the distance's ``power``.
    """
    mat = dot
    if isinstance(distance, LpDistance):
        sq = query_sq + ref_sq - 2 * dot
        if coincide is not None:
            sq = sq.masked_fill(coincide, 0)
        positive = sq > 0
        mat = torch.where(positive, torch.sqrt(torch.where(positive, sq, 1)), 0)
    if distance.power != 1:
        mat = mat**distance.power
    return mat


def record_distance_stats(
    distance: BaseDistance,
    query_sq: Callable[[], torch.Tensor],
    ref_sq: Callable[[], torch.Tensor],
) -> None:
    """The norm stats that ``distance(query, ref)`` records, from the squared norms
    (functions, called only where ``distance.collect_stats``)."""
    distance.reset_stats()
    if not distance.collect_stats:
        return
    with torch.no_grad():
        for name, sq in (("query", query_sq()), ("ref", ref_sq())):
            norm = torch.sqrt(sq.clamp_min(0))
            final = norm / norm.clamp_min(NORM_EPS) if distance.normalize_embeddings else norm
            setattr(distance, f"initial_avg_{name}_norm", torch.mean(norm).item())
            setattr(distance, f"final_avg_{name}_norm", torch.mean(final).item())


def mixed_squared_norms(
    gram: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: float
) -> torch.Tensor:
    r""":math:`\|\lambda x_f + (1-\lambda) x_s\|^2` from the Gram matrix, broadcast over
    ``first`` and ``second`` (index tensors)."""
    sq = gram.diagonal()
    return (
        lam**2 * sq[first] + (1 - lam) ** 2 * sq[second] + 2 * lam * (1 - lam) * gram[first, second]
    )


def row_distances(
    distance: BaseDistance, gram: torch.Tensor, pairs: MixedPairs, lam: float
) -> torch.Tensor:
    r"""(R, B): ``distance`` of anchor ``anchors[r]`` to the mixed point
    :math:`\lambda x_{firsts[r]} + (1-\lambda) x_s` for every column s (seen or not), from the
    Gram matrix ``gram`` of the raw embeddings. O(R B)."""
    anchors, firsts = pairs.anchors, pairs.firsts
    sq = gram.diagonal()
    scale, hat_sq = normalised_points(distance, sq)
    by_first = gram.index_select(0, firsts)  # x_f . x_s
    mix_sq = (
        lam**2 * sq.index_select(0, firsts).unsqueeze(1)
        + (1 - lam) ** 2 * sq
        + 2 * lam * (1 - lam) * by_first
    )
    mix_scale, mix_hat_sq = normalised_points(distance, mix_sq)
    by_anchor = gram.index_select(0, anchors)  # a . x_s
    dot = lam * by_anchor.gather(1, firsts.unsqueeze(1)) + (1 - lam) * by_anchor
    dot = dot * (scale.index_select(0, anchors).unsqueeze(1) * mix_scale)
    coincide = (anchors == firsts).unsqueeze(1) if lam == 1 else None  # v = a itself
    anchor_hat_sq = hat_sq.index_select(0, anchors).unsqueeze(1)
    return distance_from_dot(distance, dot, anchor_hat_sq, mix_hat_sq, coincide)


def proxy_distances(
    distance: BaseDistance,
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    gram: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    r"""(M, C): ``distance`` of the mixed points :math:`\lambda x_f + (1-\lambda) x_s` to
    the proxies, from :math:`E P^\top`: O(B C d + M C) instead of O(M C d)."""
    proxy_sq = torch.sum(proxies.to(gram.dtype) ** 2, dim=1)
    proxy_scale, proxy_hat_sq = normalised_points(distance, proxy_sq)
    mix_sq = mixed_squared_norms(gram, first, second, lam)
    mix_scale, mix_hat_sq = normalised_points(distance, mix_sq)
    by_proxy = matmul_fp32(embeddings, proxies.T) * proxy_scale
    dot = (lam * by_proxy[first] + (1 - lam) * by_proxy[second]) * mix_scale.unsqueeze(1)
    record_distance_stats(distance, lambda: mix_sq, lambda: proxy_sq)
    return distance_from_dot(distance, dot, mix_hat_sq.unsqueeze(1), proxy_hat_sq)
