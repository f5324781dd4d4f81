"""NRA: similarities from nonlinear rank approximations."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance, LpDistance
from pytorch_metric_learning.losses import GenericPairLoss

from .precision import InInputDtype, at_least_float32


def transfer(r: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""The NRA transfer function :math:`w(r; \alpha)` (paper eq. 10), for ranks in [0, 1].

    .. math::
        w(r;\alpha) = \tfrac12 (2r)^\alpha \text{ for } r < \tfrac12, \qquad
        w(r;\alpha) = 1 - \tfrac12 (2(1-r))^\alpha \text{ for } r \ge \tfrac12

    Continuous, :math:`w(\tfrac12) = \tfrac12`, slope :math:`\alpha` at :math:`\tfrac12`,
    :math:`w(r; 1) = r`. ``r`` is clamped to [0, 1], keeping the gradient at the bounds
    themselves (where the ranks of saturated anchors sit). For ``alpha < 1`` the base of
    the power is kept above the smallest normal number so that gradients stay finite at 0
    and 1.
    """
    alpha = checked_alpha(alpha)
    r = torch.where(r < 0, 0, torch.where(r > 1, 1, r))
    low, high = 2 * r, 2 * (1 - r)
    if alpha < 1:
        tiny = torch.finfo(r.dtype).tiny
        low, high = low.clamp_min(tiny), high.clamp_min(tiny)
    return torch.where(r < 0.5, 0.5 * low.pow(alpha), 1 - 0.5 * high.pow(alpha))


class NRALoss(InInputDtype, GenericPairLoss):
    r"""Nonlinear Rank Approximation (NRA) loss.

    Paper: K. Schall, K. U. Barthel, N. Hezel, K. Jung, "Deep Metric Learning using
    Similarities from Nonlinear Rank Approximations", IEEE MMSP 2019 (arXiv:1909.09427).

    Every sample ``i`` of ``embeddings`` is an anchor; its candidates are the reference set
    (the batch itself, without ``i``, when ``ref_emb`` is None). With :math:`\mathcal{P}_i`
    its positives, :math:`\mathcal{N}_i` its negatives, :math:`\mathcal{S}_i` their union
    and :math:`D` the distances:

    .. math::
        D_{i,\min} = \min_{\mathcal{S}_i} D_{ij},\ D_{i,\max} = \max_{\mathcal{S}_i} D_{ij},\
        r^+_i = \frac{\max_{\mathcal{P}_i} D_{ij} - D_{i,\min}}{D_{i,\max} - D_{i,\min}},\
        r^-_i = \frac{\min_{\mathcal{N}_i} D_{ij} - D_{i,\min}}{D_{i,\max} - D_{i,\min}}

    .. math::
        \ell_i = -\log\bigl(1 - w(r^+_i;\alpha) + \epsilon\bigr)
                 - \log\bigl(w(r^-_i;\alpha) + \epsilon\bigr)

    i.e. the paper's eq. (13) term :math:`-\log(s^+_i+\epsilon) - \log(1-s^-_i+\epsilon)` with
    :math:`s = 1 - w(r)`; ``w`` is :func:`transfer`. The loss is the mean of
    :math:`\ell_i` over anchors.

    Args:
        alpha: slope of the transfer function at r = 1/2 (paper: 4).
        eps: the paper's epsilon inside both logs (paper: 1e-4, which caps a term at
            -log(eps) ~ 9.21). The ranks have none (paper eqs. 11-12): they are
            invariant to the scale of the distances. Where all of an anchor's candidates
            are equally far (:math:`D_{i,\max} = D_{i,\min}`, e.g. a single candidate) the
            ranks are 0/0; they are taken as 0 there, with a zero gradient.
        detach_normalizers: treat :math:`D_{i,\min}` and :math:`D_{i,\max}` as constants.
            Under the literal formula an anchor whose nearest candidate is its closest
            negative (r- = 0) or whose farthest candidate is its farthest positive
            (r+ ~ 1) sits at the maximum -log(eps) with exactly zero gradient; detached
            normalisers give it a gradient.

    Default distance: ``LpDistance(normalize_embeddings=False)``, Euclidean distance of
    the unnormalised embeddings (as in the paper). For an inverted distance (a similarity)
    the ranks are taken on the negated similarity, i.e. most similar = rank 0.

    Default reducer: PML's ``MeanReducer``. Reducer input: one loss per anchor (reduction type
    ``element``), for the anchors that have a positive or a negative; the mean over them is
    the paper's :math:`\frac1m\sum_i`.

    ``indices_tuple``: if given (pairs, or triplets turned into pairs), the positive and
    negative sets are restricted to the mined pairs, and so is :math:`\mathcal{S}_i`
    (their union, as in the paper). ``ref_emb``/``ref_labels``: anchors come from
    ``embeddings``, candidates from the reference set.

    Built on PML's ``GenericPairLoss(mat_based_loss=True)``, which supplies the pairs (from
    ``labels`` or ``indices_tuple``), their masks and the distance matrix; from it come two
    rules of PML's pair losses: a batch with at most one positive and at most one negative
    pair gives zero (as no pair at all), and a pair listed as both positive and negative
    fails PML's assertion.

    Paper vs project: the ranks, the transfer function, eq. (13), alpha = 4, eps = 1e-4,
    all samples as anchors and unnormalised distances are the paper's. Project decisions:
    ranks of 0 where all candidates are equally far; an anchor without a positive skips the
    positive term, one without a negative skips the negative term; PML's zero below two
    pairs; ``detach_normalizers`` (off by default, literal formula); restriction to mined
    pairs; :math:`1 - s^- = w(r^-)` computed directly; the arithmetic is done in float32 at
    least, and the per-anchor losses are returned in the input's dtype.

    Stats: ``mean_pos_rank`` (mean r+), ``mean_neg_rank`` (mean r-) and ``frac_saturated``,
    the fraction of anchors with r- = 0 or with their farthest candidate a positive (r+ at
    its maximum).
    """

    def __init__(
        self, alpha: float = 4.0, eps: float = 1e-4, detach_normalizers: bool = False, **kwargs
    ) -> None:
        super().__init__(mat_based_loss=True, **kwargs)
        self.alpha = checked_alpha(alpha)
        self.eps = float(eps)
        self.detach_normalizers = detach_normalizers
        self.add_to_recordable_attributes(list_of_names=["alpha", "eps"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["mean_pos_rank", "mean_neg_rank", "frac_saturated"], is_stat=True
        )

    def _compute_loss(
        self, mat: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor
    ) -> dict:
        pos_mask, neg_mask = pos_mask.bool(), neg_mask.bool()
        has_pos, has_neg = pos_mask.any(dim=1), neg_mask.any(dim=1)
        anchors = torch.where(has_pos | has_neg)[0]
        dist = at_least_float32(-mat if self.distance.is_inverted else mat)
        pos_mask, neg_mask, dist = pos_mask[anchors], neg_mask[anchors], dist[anchors]
        has_pos, has_neg = has_pos[anchors], has_neg[anchors]
        cand_mask = pos_mask | neg_mask

        d_min = masked_min(dist, cand_mask)
        d_max = masked_max(dist, cand_mask)
        pos_max = masked_max(dist, pos_mask)
        neg_min = masked_min(dist, neg_mask)
        if self.detach_normalizers:
            d_min, d_max = d_min.detach(), d_max.detach()
        pos_rank = rank(pos_max, d_min, d_max)
        neg_rank = rank(neg_min, d_min, d_max)

        pos_term = -torch.log(1 - transfer(pos_rank, self.alpha) + self.eps)
        neg_term = -torch.log(transfer(neg_rank, self.alpha) + self.eps)
        losses = torch.where(has_pos, pos_term, 0) + torch.where(has_neg, neg_term, 0)

        if self.collect_stats:
            with torch.no_grad():
                self.mean_pos_rank = pos_rank[has_pos].mean().item() if has_pos.any() else 0.0
                self.mean_neg_rank = neg_rank[has_neg].mean().item() if has_neg.any() else 0.0
                saturated = (has_neg & (neg_min == d_min)) | (has_pos & (pos_max == d_max))
                self.frac_saturated = saturated.float().mean().item()

        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}

    def get_default_distance(self) -> BaseDistance:
        return LpDistance(normalize_embeddings=False, p=2, power=1)


def checked_alpha(alpha: float) -> float:
    """``alpha`` as a float, if it is > 0 (the transfer function's slope at 1/2)."""
    if alpha <= 0:
        raise ValueError(f"NRA needs alpha > 0, got alpha={alpha}")
    return float(alpha)


def rank(d: torch.Tensor, d_min: torch.Tensor, d_max: torch.Tensor) -> torch.Tensor:
    r"""Normalised rank :math:`(d - D_{\min}) / (D_{\max} - D_{\min})` (paper eqs. 11-12).

    Where :math:`D_{\max} = D_{\min}` the candidates are all equally far and ``d`` is
    among them, so the rank is 0/0: it is 0 there, with a zero gradient.
    """
    span = d_max - d_min
    flat = span == 0
    return torch.where(flat, 0.0, (d - d_min) / torch.where(flat, 1.0, span))


def masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise minimum over ``mask``; rows with an empty mask get a finite constant.

    ``amin`` splits the gradient evenly among tied minima (``min(dim)`` would pick one).
    """
    fill = x.detach().max() + 1 if x.numel() > 0 else 0.0
    return x.masked_fill(~mask, fill).amin(dim=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise maximum over ``mask``; rows with an empty mask get a finite constant."""
    fill = x.detach().min() - 1 if x.numel() > 0 else 0.0
    return x.masked_fill(~mask, fill).amax(dim=1)
