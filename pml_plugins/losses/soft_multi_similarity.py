"""Multi-Similarity loss with soft (interpolated) pair labels."""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import BaseMiner, MultiSimilarityMiner
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .metrix_pairs import MixedPairs
from .soft_labels import check_soft_labels, pair_label_matrix, reduce_loss_dict, weighted_logsumexp


class SoftMultiSimilarityLoss(MultiSimilarityLoss):
    r"""PML's ``MultiSimilarityLoss`` for pair labels :math:`y \in [0, 1]`.

    Paper: S. Venkataramanan, B. Psomas, E. Kijak, L. Amsaleg, K. Karantzalos, Y. Avrithis,
    "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
    https://arxiv.org/abs/2106.04990 (label-interpolated MS loss); the MS loss itself is
    X. Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019.

    For an anchor :math:`a` with candidates :math:`x` of soft label :math:`y_{ax}` and
    similarity :math:`s_{ax}`:

    .. math::
        \ell(a) = \frac{1}{\alpha} \log\Big(1 + \sum_x y_{ax}\, e^{-\alpha (s_{ax} - m)}\Big)
                + \frac{1}{\beta} \log\Big(1 + \sum_x (1 - y_{ax})\, e^{\beta (s_{ax} - m)}\Big)

    (:math:`\alpha` = ``alpha`` for positives, :math:`\beta` = ``beta`` for negatives,
    :math:`m` = ``base``, PML's names). A sum with no term is 0. With 0/1 labels this is PML's
    ``MultiSimilarityLoss`` exactly.

    Two ways in:

    - ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``: hard labels, PML's
      contract (all pairs from ``labels``, or the pairs of ``indices_tuple``; pairs count
      once, as in PML's mask-based MS).
    - ``loss.soft_loss(anchors, others, y)``: anchors (A, d), candidates (N, d) and a soft
      label matrix ``y`` (A, N) in [0, 1], NaN where (anchor, candidate) is not a pair.

    The loss dict before reduction comes from the embeddings (:meth:`soft_loss_dict`), from
    their similarity matrix (:meth:`mat_loss_dict`), or from rows of similarities whose
    pairs share one label, several rows per anchor (:meth:`rows_loss_dict`; Metrix's mixed
    pairs: :meth:`mixed_loss_dict`).

    Args:
        alpha, beta, base: as PML (defaults 2, 50, 0.5). Metrix uses 17.97, 75.66, 0.77,
            which ``MetrixLoss`` sets.
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``, ...

    Default distance: ``CosineSimilarity()``. Default reducer: ``MeanReducer``. Reducer
    input: ``loss``, one value per anchor (all A anchors, 0 for an anchor without pairs),
    reduction type ``element``.

    Paper vs project: the weighted sums inside the logs are the paper's generic soft-label
    form, not the released code's MS + Metrix loss, whose bugs are not
    reproduced. The NaN convention and PML's defaults are project decisions.
    """

    supports_gram_path = True  #: MetrixLoss's Gram path (:meth:`mixed_loss_dict`), this class only
    proxy_anchors = False  #: the soft-label loss's anchors are embeddings, not proxies

    @staticmethod
    def metrix_miner() -> BaseMiner:
        """Metrix's miner of the clean MS loss (``MetrixLoss``'s default)."""
        return MultiSimilarityMiner(epsilon=0.39)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        indices_tuple = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if all(len(x) <= 1 for x in indices_tuple):
            return self.zero_losses()  # as PML's GenericPairLoss
        mat = self.distance(embeddings, ref_emb)
        y = pair_label_matrix(indices_tuple, *mat.shape, dtype=mat.dtype, device=mat.device)
        return self.mat_loss_dict(mat, y)

    def soft_loss(
        self, anchors: torch.Tensor, others: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The reduced loss over all anchors; pairs whose label ``y`` is NaN are left out."""
        self.reset_stats()
        return reduce_loss_dict(self, self.soft_loss_dict(anchors, others, y), anchors)

    def soft_loss_dict(self, anchors: torch.Tensor, others: torch.Tensor, y: torch.Tensor) -> dict:
        """PML's loss dict of :meth:`soft_loss`, before reduction."""
        check_soft_labels(y, (len(anchors), len(others)), allow_nan=True)
        if len(anchors) == 0:
            return self.zero_losses()
        return self.mat_loss_dict(self.distance(anchors, others), y)

    def mat_loss_dict(self, mat: torch.Tensor, y: torch.Tensor) -> dict:
        """PML's loss dict from the similarities (or distances, ``self.distance``'s) ``mat``
        (A, N) of A anchors to N candidates and their soft labels ``y`` (A, N), NaN where not
        a pair: the formula above for every row, one value per anchor (0 for a row without
        pairs), reduction type ``element``."""
        known = ~torch.isnan(y)
        pos_w = torch.where(known, y, 0)
        neg_w = torch.where(known, 1 - y, 0)
        pos_exp = self.distance.margin(mat, self.base)
        neg_exp = self.distance.margin(self.base, mat)
        return self._terms_loss_dict(
            weighted_logsumexp(self.alpha * pos_exp, pos_w),
            weighted_logsumexp(self.beta * neg_exp, neg_w),
        )

    def rows_loss_dict(
        self,
        mat: torch.Tensor,
        seen: torch.Tensor,
        y: float | torch.Tensor,
        anchors: torch.Tensor,
        num_anchors: int,
    ) -> dict:
        r"""PML's loss dict (as :meth:`mat_loss_dict`'s: one value per anchor, reduction type
        ``element``) of ``num_anchors`` anchors whose pairs lie in rows sharing one label.

        Row r of ``mat`` (R, N) holds the similarities (or distances, ``self.distance``'s)
        of the anchor ``anchors[r]`` to N candidates; its pairs are the columns where
        ``seen[r]`` ((R, N) boolean), and every pair has the soft label ``y`` (a number in
        [0, 1], rounded to ``mat``'s dtype as a label tensor would be). An anchor may own
        several rows (its sums run over all of them) or none (loss 0).

        The same loss as :meth:`mat_loss_dict` of each anchor's rows side by side, up to
        rounding: each term is summed first per row, :math:`\log \sum_x e^{c s_{rx}}` over
        the row's pairs with :math:`\log w - c m` added after it (:math:`c = \mp\alpha`,
        :math:`w = y` for the positive term, :math:`c = \pm\beta`, :math:`w = 1 - y` for the
        negative one; upper signs for a similarity, lower for a distance), then per anchor
        over its rows (:func:`grouped_log1p_exp_sum`). This order is fixed: float32 results
        (and the project's reference runs) depend on it. O(R N), with no (A, K N) matrix.
        """
        label = torch.as_tensor(y, dtype=torch.float64).to(mat.dtype)
        if not 0 <= label.item() <= 1:
            raise ValueError(f"the soft label y must lie in [0, 1], got {label.item()}")
        sign = -1.0 if self.distance.is_inverted else 1.0  # margin(mat, base) = sign (mat - base)
        mask = torch.zeros_like(mat).masked_fill_(~seen, c_f.neg_inf(mat.dtype))
        terms = []
        weights = (label.item(), (1 - label).item())
        for weight, coef in zip(weights, (sign * self.alpha, -sign * self.beta), strict=True):
            if weight <= 0:  # no term: 0, as weighted_logsumexp
                terms.append(mat.new_zeros(num_anchors, 1))
                continue
            rows = torch.logsumexp(torch.add(mask, mat, alpha=coef), dim=1)
            rows = rows + (math.log(weight) - coef * self.base)
            terms.append(grouped_log1p_exp_sum(rows, anchors, num_anchors).unsqueeze(1))
        return self._terms_loss_dict(*terms)

    def mixed_loss_dict(self, mat: torch.Tensor, pairs: MixedPairs, y: torch.Tensor) -> dict:
        """PML's loss dict of Metrix's mixed ``pairs`` of label ``y`` (0-d) from their (R, B)
        row distances ``mat``: :meth:`rows_loss_dict`, one value per batch sample."""
        return self.rows_loss_dict(mat, pairs.seen, y, pairs.anchors, pairs.batch_size)

    def _terms_loss_dict(self, pos: torch.Tensor, neg: torch.Tensor) -> dict:
        """The loss dict of the positive and negative terms' log sums (A, 1)."""
        return {
            "loss": {
                "losses": (1.0 / self.alpha) * pos + (1.0 / self.beta) * neg,
                "indices": c_f.torch_arange_from_size(pos),
                "reduction_type": "element",
            }
        }


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
