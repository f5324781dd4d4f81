"""LoOp: the closest points between positive pairs of different classes as hard negatives."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from ..geometry import DEGENERATE_ANGLE, GramSolution, closest_points_from_gram, safe_sqrt
from .precision import at_least_float32, in_dtype

__all__ = ["LoOpLoss", "form_positive_pairs"]

BASES = ("hphn_triplet", "triplet", "lifted", "multi_similarity", "npair")
GEOMETRIES = ("arc", "segment")

#: per-base hyperparameters and their defaults (the authors' code; docs/methods/loop.md)
_BASE_DEFAULTS: dict[str, dict[str, float]] = {
    "hphn_triplet": {"margin": 1e-5},
    "triplet": {"margin": 1e-5},
    "lifted": {"margin": 1e-5},
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "ms_base": 0.4, "mining_threshold": -0.02},
    "npair": {},
}


def form_positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Positive pairs from labels: within each class, samples paired in index order.

    The 1st and 2nd samples of a class form a pair, the 3rd and 4th the next, ...; an odd
    leftover sample is not paired. Pairs are returned ordered by their first member.
    """
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - torch.repeat_interleave(starts, counts)
    class_size = torch.repeat_interleave(counts, counts)
    is_first = (rank % 2 == 0) & (rank + 1 < class_size)
    where = torch.nonzero(is_first).squeeze(1)
    first, second = order[where], order[where + 1]
    by_first = torch.argsort(first)
    return first[by_first], second[by_first]


class LoOpLoss(BaseMetricLossFunction):
    r"""LoOp: Looking for Optimal Hard Negative Embeddings.

    Vasudeva, Deora, Bhattacharya, Pal, Chanda. *LoOp: Looking for Optimal Hard Negative
    Embeddings for Deep Metric Learning*, ICCV 2021, https://arxiv.org/abs/2108.09335
    (official MXNet code: github.com/puneesh00/LoOp).

    The batch is split into positive pairs :math:`(x_1^i, x_2^i)`. For every two pairs
    :math:`i, j` of different classes, the optimal hard negative distance is the
    smallest distance between the points "between" each pair:

    .. math::
        d^*(i, j) = \min_{p \in X_i,\ q \in X_j} \|p - q\|_2

    where :math:`X_i` is the shorter great-circle arc from :math:`x_1^i` to :math:`x_2^i`
    (``geometry="arc"``, on L2-normalised embeddings) or the segment
    :math:`[x_1^i, x_2^i]` (``geometry="segment"``), solved exactly by
    ``pml_plugins.geometry``. :math:`d^*` then replaces the negative distance of a base
    loss (:math:`\mathcal{N}_i` = the pairs of other classes, :math:`d^{ap}_i` = the
    larger of the two members' hardest same-class distances, :math:`[\cdot]_+ = \max(\cdot, 0)`):

    - ``hphn_triplet`` (default): :math:`\ell_i = [d^{ap}_i - \min_{j \in \mathcal{N}_i} d^*(i,j) + m]_+`
    - ``triplet``: the list of pairs is split in halves, pair :math:`i` of the first half
      is matched with pair :math:`i' = i + \lfloor n_p/2 \rfloor` of the second:
      :math:`\ell_i = [\|x_1^i - x_2^i\| - d^*(i, i') + m]_+` (skipped if same class)
    - ``lifted``: :math:`\ell_i = [\log \sum_{j \in \mathcal{N}_i} e^{-d^*(i,j)} + d^{ap}_i + m]_+`
    - ``npair``: :math:`\ell_i = \log(1 + \sum_{j \in \mathcal{N}_i} e^{s^*(i,j) - x_1^i \cdot x_2^i})`
    - ``multi_similarity``: similarities :math:`s = 1 - d^2/2` (cosines; :math:`s^*` from
      :math:`d^*`); negatives :math:`s^*(i,j) > s^+_{min,i} - th`, positives (both
      members' similarities to their other same-class samples, each unordered pair
      once) :math:`s < \max_j s^*(i,j) + th`;
      :math:`\ell_i = \frac{1}{\alpha}\log(1 + \sum_{pos} e^{-\alpha(s - \lambda)}) +
      \frac{1}{\beta}\log(1 + \sum_{neg} e^{\beta(s^* - \lambda)})`, pairs with nothing
      mined are skipped.

    With ``geometry="segment"``, ``npair`` and ``multi_similarity`` use dot products;
    the largest dot product between two segments is at a corner (it is bilinear), so
    :math:`s^*(i,j) = \max_{k,l} x_k^i \cdot x_l^j` (the official code's N-pair).

    Args:
        base: ``"hphn_triplet"`` (default), ``"triplet"``, ``"lifted"``,
            ``"multi_similarity"`` or ``"npair"``.
        geometry: ``"arc"`` or ``"segment"``; ``None`` (default) means ``"segment"`` for
            ``npair`` (official code: unnormalised embeddings) and ``"arc"`` otherwise.
        margin: :math:`m` of ``hphn_triplet``, ``triplet`` and ``lifted``; default 1e-5,
            the official ``main.py``'s ``--margin``, which it passes to every margin-based
            base (the 0.1 in the official triplet class's signature is never used by it).
        alpha, beta, ms_base, mining_threshold: ``multi_similarity`` only; defaults
            2, 50, 0.4 (:math:`\lambda`) and -0.02 (:math:`th`).
        min_angle: arcs of at most this angle (radians, default 1e-3) are treated as a
            point, their first member.
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``, ...

    Default distance: ``LpDistance(p=2, power=1, normalize_embeddings=True)`` for ``arc``,
    ``normalize_embeddings=False`` for ``segment``. The closed forms are for the Euclidean
    (chord) distance, so only an ``LpDistance`` with ``p=2, power=1`` is accepted; its
    ``normalize_embeddings`` must be True for ``arc`` (with ``segment`` it chooses
    whether the segments join normalised or raw embeddings).
    Default reducer: ``MeanReducer``. Reducer input: ``"loss"``, one element per
    positive pair (``reduction_type="element"``, indices = the pair's first member).

    Paper / official code: the optimal-point distance, its use in the five base losses,
    the margins, the MS constants. Project decisions (docs/methods/loop.md): pairs
    are formed from labels (within each class in index order, an odd leftover unpaired
    but still used as a positive by ``hphn_triplet``, ``lifted`` and
    ``multi_similarity``); two pairs of the same class are never compared; degenerate
    arcs are a point (not dropped); mean over pairs by default where the official code
    sums (pass ``reducer=SumReducer()`` for the sum); the positive pairs of a
    user-supplied ``indices_tuple`` replace the label pairing; pairs are ordered by their
    first member (this fixes the ``triplet`` half split); exact candidate-enumeration
    solvers with envelope-theorem gradients instead of autograd through the official
    KKT formulas; MS positives exclude the sample itself by index and count each
    unordered pair once; float16/bfloat16 inputs are computed in float32 and the losses
    returned in the input's dtype.

    ``indices_tuple``: if given (pairs or triplets, as from a PML miner), its positive
    pairs ``(anchor, positive)`` are the arcs instead of the label pairing (unordered,
    de-duplicated, self-pairs dropped; both members must share a label); its negatives
    are not used, since LoOp's negatives are the pairs of other classes. ``labels`` are
    always required. ``ref_emb`` is not supported (the pairs and their negatives all come
    from the batch): passing one raises ``ValueError``.

    Stats (``collect_stats``): ``num_pairs``, ``mean_optimal_neg_dist`` (mean :math:`d^*`
    over the compared pairs of pairs), ``mean_endpoint_neg_dist`` (mean of the smallest
    of the four endpoint distances), ``frac_interior_solutions`` (both closest points
    strictly inside their arcs) and ``frac_corner_solutions`` (both at endpoints).
    """

    def __init__(
        self,
        base: str = "hphn_triplet",
        geometry: str | None = None,
        margin: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        ms_base: float | None = None,
        mining_threshold: float | None = None,
        min_angle: float = DEGENERATE_ANGLE,
        **kwargs,
    ):
        if base not in BASES:
            raise ValueError(f"LoOpLoss: base must be one of {BASES}, got {base!r}")
        if geometry is None:
            geometry = "segment" if base == "npair" else "arc"
        if geometry not in GEOMETRIES:
            raise ValueError(f"LoOpLoss: geometry must be one of {GEOMETRIES}, got {geometry!r}")
        given = {
            "margin": margin,
            "alpha": alpha,
            "beta": beta,
            "ms_base": ms_base,
            "mining_threshold": mining_threshold,
        }
        defaults = _BASE_DEFAULTS[base]
        unused = [k for k, v in given.items() if v is not None and k not in defaults]
        if unused:
            raise ValueError(
                f"LoOpLoss(base={base!r}) does not use {', '.join(unused)}; "
                f"its hyperparameters are: {', '.join(defaults) or '(none)'}"
            )
        # set before super().__init__, which calls get_default_distance()
        self.base = base
        self.geometry = geometry
        super().__init__(**kwargs)
        self.min_angle = float(min_angle)
        for name, default in defaults.items():
            setattr(self, name, float(default if given[name] is None else given[name]))
        self._check_distance()
        self.add_to_recordable_attributes(list_of_names=list(defaults), is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=[
                "num_pairs",
                "mean_optimal_neg_dist",
                "mean_endpoint_neg_dist",
                "frac_interior_solutions",
                "frac_corner_solutions",
            ],
            is_stat=True,
        )

    def get_default_distance(self) -> LpDistance:
        return LpDistance(p=2, power=1, normalize_embeddings=self.geometry == "arc")

    def _check_distance(self) -> None:
        d = self.distance
        if not (isinstance(d, LpDistance) and d.p == 2 and d.power == 1 and not d.is_inverted):
            raise ValueError(
                "LoOpLoss solves for Euclidean closest points: distance must be "
                f"LpDistance(p=2, power=1), got {d!r}"
            )
        if self.geometry == "arc" and not d.normalize_embeddings:
            raise ValueError(
                "LoOpLoss(geometry='arc') works on the unit hypersphere: the distance must "
                "have normalize_embeddings=True (use geometry='segment' for raw embeddings)"
            )

    # ------------------------------------------------------------------ pairs
    def _positive_pairs(
        self, labels: Tensor, indices_tuple: tuple | None, n: int
    ) -> tuple[Tensor, Tensor]:
        if indices_tuple is None:
            return form_positive_pairs(labels)
        a1, p, _, _ = lmu.convert_to_pairs(indices_tuple, labels)
        a1, p = a1.to(labels.device).long(), p.to(labels.device).long()
        keep = a1 != p
        a1, p = a1[keep], p[keep]
        if bool((labels[a1] != labels[p]).any()):
            raise ValueError(
                "LoOpLoss: the positive pairs of indices_tuple must join samples of the same class"
            )
        keys = torch.unique(torch.minimum(a1, p) * n + torch.maximum(a1, p))
        return keys // n, keys % n

    # --------------------------------------------------------------- the loss
    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if ref_emb is not embeddings:
            raise ValueError(
                "LoOpLoss does not support ref_emb: its positive pairs and their "
                "other-class negatives all come from the batch"
            )
        c_f.labels_required(labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = self.distance.maybe_normalize(at_least_float32(embeddings))
            out = self._loss(emb, labels, indices_tuple)
        return in_dtype(out, embeddings.dtype)

    def _loss(self, emb: Tensor, labels: Tensor, indices_tuple: tuple | None) -> dict:
        n = emb.shape[0]
        first, second = self._positive_pairs(labels, indices_tuple, n)
        if self.collect_stats:
            self.num_pairs = int(first.numel())
        if first.numel() < 2:
            return self.zero_losses()
        pair_labels = labels[first]
        if self.base == "triplet":
            half = first.numel() // 2
            pi = torch.arange(half, device=emb.device)
            pj = pi + half
        else:
            pi, pj = torch.triu_indices(first.numel(), first.numel(), 1, device=emb.device)
        cross = pair_labels[pi] != pair_labels[pj]
        pi, pj = pi[cross], pj[cross]
        if pi.numel() == 0:
            return self.zero_losses()

        gram = emb @ emb.t()
        members = torch.stack([first, second], 1)  # (n_p, 2)
        gpp = gram[members.unsqueeze(-1), members.unsqueeze(-2)]  # (n_p, 2, 2)
        gxy = gram[members[pi].unsqueeze(-1), members[pj].unsqueeze(-2)]  # (K, 2, 2)
        chord_sq = (emb[first] - emb[second]).pow(2).sum(-1)  # (n_p,)

        corner_sim = self.geometry == "segment" and self.base in ("npair", "multi_similarity")
        sol = None
        if not corner_sim or self.collect_stats:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not corner_sim):
                sol = closest_points_from_gram(
                    gpp[pi], gpp[pj], gxy, self.geometry, self.min_angle, chord_sq[pi], chord_sq[pj]
                )
        if self.collect_stats:
            self._set_stats(sol, gpp[pi], gpp[pj], gxy)

        if corner_sim:
            neg = gxy.amax(dim=(-2, -1))  # largest dot product: at a corner
        elif self.base in ("npair", "multi_similarity"):
            neg = 1.0 - sol.dist.pow(2) / 2.0  # cosine of the closest points
        else:
            neg = sol.dist

        if self.base == "triplet":
            pos = safe_sqrt(chord_sq[pi], torch.finfo(emb.dtype).tiny)
            losses = torch.relu(pos - neg + self.margin)
            return self._element_losses(losses, first[pi])

        n_p = first.numel()
        neg_mat = emb.new_zeros(n_p, n_p).index_put((pi, pj), neg).index_put((pj, pi), neg)
        neg_mask = torch.zeros(n_p, n_p, dtype=torch.bool, device=emb.device)
        neg_mask[pi, pj] = True
        neg_mask[pj, pi] = True
        has_neg = neg_mask.any(1)
        same = pair_labels.unsqueeze(1) == labels.unsqueeze(0)  # (n_p, B)
        idx = torch.arange(n, device=emb.device)

        if self.base == "npair":
            s_ap = gram[first, second]
            losses = lmu.logsumexp(neg_mat - s_ap.unsqueeze(1), keep_mask=neg_mask, add_one=True)
            return self._element_losses(losses.squeeze(1)[has_neg], first[has_neg])

        if self.base == "multi_similarity":
            return self._multi_similarity(gram, first, second, same, idx, neg_mat, neg_mask)

        # distance bases: hardest positive of each member, the larger of the two
        sq = gram.diagonal()
        dist_sq = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * gram
        floor = torch.finfo(emb.dtype).eps * (sq.unsqueeze(1) + sq.unsqueeze(0)).detach()
        dist = safe_sqrt(dist_sq, floor + torch.finfo(emb.dtype).tiny)
        d1 = dist[first].masked_fill(~(same & (idx != first.unsqueeze(1))), 0.0).amax(1)
        d2 = dist[second].masked_fill(~(same & (idx != second.unsqueeze(1))), 0.0).amax(1)
        d_ap = torch.maximum(d1, d2)
        if self.base == "hphn_triplet":
            d_an = neg_mat.masked_fill(~neg_mask, float("inf")).amin(1)
            losses = torch.relu(d_ap - d_an + self.margin)
        else:  # lifted
            lse = lmu.logsumexp(-neg_mat, keep_mask=neg_mask, add_one=False).squeeze(1)
            losses = torch.relu(lse + d_ap + self.margin)
        return self._element_losses(losses[has_neg], first[has_neg])

    def _multi_similarity(
        self,
        gram: Tensor,
        first: Tensor,
        second: Tensor,
        same: Tensor,
        idx: Tensor,
        neg_sim: Tensor,
        neg_mask: Tensor,
    ) -> dict:
        # positives: both members' similarities to their other same-class samples,
        # each unordered pair once (the pair's own similarity through the first member)
        m1 = same & (idx != first.unsqueeze(1))
        m2 = same & (idx != second.unsqueeze(1)) & (idx != first.unsqueeze(1))
        pos_sim = torch.cat([gram[first], gram[second]], 1)
        pos_mask = torch.cat([m1, m2], 1)
        with torch.no_grad():
            hardest_pos = pos_sim.masked_fill(~pos_mask, float("inf")).amin(1, keepdim=True)
            hardest_neg = neg_sim.masked_fill(~neg_mask, -float("inf")).amax(1, keepdim=True)
            neg_keep = neg_mask & (neg_sim > hardest_pos - self.mining_threshold)
            pos_keep = pos_mask & (pos_sim < hardest_neg + self.mining_threshold)
        pos_loss = (
            lmu.logsumexp(-self.alpha * (pos_sim - self.ms_base), keep_mask=pos_keep, add_one=True)
            / self.alpha
        )
        neg_loss = (
            lmu.logsumexp(self.beta * (neg_sim - self.ms_base), keep_mask=neg_keep, add_one=True)
            / self.beta
        )
        losses = (pos_loss + neg_loss).squeeze(1)
        keep = neg_mask.any(1) & (pos_keep.any(1) | neg_keep.any(1))
        return self._element_losses(losses[keep], first[keep])

    def _element_losses(self, losses: Tensor, indices: Tensor) -> dict:
        if losses.numel() == 0:
            return self.zero_losses()
        return {"loss": {"losses": losses, "indices": indices, "reduction_type": "element"}}

    @torch.no_grad()
    def _set_stats(self, sol: GramSolution, gxx: Tensor, gyy: Tensor, gxy: Tensor) -> None:
        sq_x = gxx.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (K, 2, 1)
        sq_y = gyy.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)  # (K, 1, 2)
        corner = (sq_x + sq_y - 2.0 * gxy).clamp_min(0.0).amin(dim=(-2, -1)).sqrt()
        tau, ups = sol.x_param, sol.y_param
        inside = (tau > 0) & (tau < 1) & (ups > 0) & (ups < 1)
        at_corner = ((tau == 0) | (tau == 1)) & ((ups == 0) | (ups == 1))
        self.mean_optimal_neg_dist = sol.dist.float().mean().item()
        self.mean_endpoint_neg_dist = corner.float().mean().item()
        self.frac_interior_solutions = inside.float().mean().item()
        self.frac_corner_solutions = at_corner.float().mean().item()
