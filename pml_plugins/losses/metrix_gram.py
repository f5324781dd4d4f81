r"""Distances to Metrix's mixed embeddings from the batch's Gram matrix, without building them.

For :math:`v = \lambda x_f + (1-\lambda) x_s` and :math:`G = E E^\top`:
:math:`a \cdot v = \lambda G_{af} + (1-\lambda) G_{as}` and
:math:`\|v\|^2 = \lambda^2 G_{ff} + (1-\lambda)^2 G_{ss} + 2\lambda(1-\lambda) G_{fs}`. PML's
cosine, dot-product and Euclidean distances (any power, normalised or not) follow from these.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from pytorch_metric_learning.utils import common_functions as c_f

from .metrix_pairs import MixedPairs

#: distances computed from Gram matrices (exact types, p = 2, any power)
GRAM_DISTANCES = (CosineSimilarity, DotProductSimilarity, LpDistance)
#: ``torch.nn.functional.normalize``'s eps, which PML's distances use
NORM_EPS = 1e-12


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 or wider, outside autocast: products of raw (unnormalised)
    embeddings overflow float16 from norms of 256 on."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
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
    query_sq: torch.Tensor | None,
    ref_sq: torch.Tensor | None,
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
    euclid = isinstance(distance, LpDistance)
    return distance_from_dot(
        distance,
        dot,
        hat_sq.index_select(0, anchors).unsqueeze(1) if euclid else None,
        mix_hat_sq if euclid else None,
        coincide,
    )


def grouped_log1p_exp_sum(rows: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    r""":math:`\log(1 + \sum_{i:\, g_i = k} e^{r_i})` for each group k < n (0 for a group
    without rows), shifted by :math:`\max(0, \max_i r_i)` per group: with ``rows`` the
    log-sum-exps of the rows of a matrix, PML's ``logsumexp(..., add_one=True)`` over all
    entries of the rows of each group."""
    with torch.no_grad():
        shift = torch.zeros(n, dtype=rows.dtype, device=rows.device).scatter_reduce(
            0, groups, rows, "amax", include_self=True
        )
    total = torch.zeros_like(shift).index_add(0, groups, torch.exp(rows - shift[groups]))
    return shift + torch.log(torch.exp(-shift) + total)


def label_weights(lam: float, dtype: torch.dtype) -> tuple[float, float]:
    """The positive and negative weights y = λ and 1 - y, rounded as a soft-label tensor of
    ``dtype`` would round them."""
    y = torch.tensor(lam, dtype=torch.float64).to(dtype)
    return y.item(), (1 - y).item()


def ms_rows_loss_dict(
    loss: torch.nn.Module,
    mat: torch.Tensor,
    pairs: MixedPairs,
    lam: float,
    dtype: torch.dtype,
) -> dict:
    r"""``SoftMultiSimilarityLoss``'s loss dict (one value per batch anchor) of the pairs
    ``pairs``, all labelled λ, from their row distances ``mat`` (:func:`row_distances`):

    .. math::
        \ell(a) = \tfrac{1}{\alpha}\log\big(1 + \textstyle\sum \lambda e^{-\alpha(s - m)}\big)
        + \tfrac{1}{\beta}\log\big(1 + \textstyle\sum (1-\lambda) e^{\beta(s - m)}\big)
    """
    n = pairs.batch_size
    sign = -1.0 if loss.distance.is_inverted else 1.0  # margin(mat, base) = sign (mat - base)
    mask = torch.zeros_like(mat).masked_fill_(~pairs.seen, c_f.neg_inf(mat.dtype))
    terms = []
    coefs = (sign * loss.alpha, -sign * loss.beta)
    for weight, coef in zip(label_weights(lam, dtype), coefs, strict=True):
        if weight <= 0:  # no term: 0, as weighted_logsumexp
            terms.append(mat.new_zeros(n))
            continue
        rows = torch.logsumexp(torch.add(mask, mat, alpha=coef), dim=1)
        rows = rows + (math.log(weight) - coef * loss.base)
        terms.append(grouped_log1p_exp_sum(rows, pairs.anchors, n))
    losses = (1.0 / loss.alpha) * terms[0] + (1.0 / loss.beta) * terms[1]
    return {
        "loss": {
            "losses": losses.unsqueeze(1),
            "indices": torch.arange(n, device=mat.device),
            "reduction_type": "element",
        }
    }


def contrastive_rows_loss_dict(
    loss: torch.nn.Module,
    mat: torch.Tensor,
    pairs: MixedPairs,
    lam: float,
    dtype: torch.dtype,
) -> dict:
    """``SoftContrastiveLoss``'s loss dict of the pairs ``pairs``, all labelled λ, from
    their row distances ``mat``: indices (anchor, mixed point), every pair in the positive
    term if λ > 0, in the negative term if λ < 1."""
    rows, seconds = pairs.entries
    dists = mat[rows, seconds]
    pos_w, neg_w = label_weights(lam, dtype)
    indices = (pairs.pair_anchors(), pairs.points[2])
    none = (rows[:0], rows[:0])
    return {
        "pos_loss": {
            "losses": pos_w * loss.pos_calc(dists, loss.pos_margin) if pos_w > 0 else 0,
            "indices": indices if pos_w > 0 else none,
            "reduction_type": "pos_pair",
        },
        "neg_loss": {
            "losses": neg_w * loss.neg_calc(dists, loss.neg_margin) if neg_w > 0 else 0,
            "indices": indices if neg_w > 0 else none,
            "reduction_type": "neg_pair",
        },
    }


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
