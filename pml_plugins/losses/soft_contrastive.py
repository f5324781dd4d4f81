"""Contrastive loss with soft (interpolated) pair labels."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .soft_labels import check_soft_labels


class SoftContrastiveLoss(ContrastiveLoss):
    r"""PML's ``ContrastiveLoss`` for pair labels :math:`y \in [0, 1]`.

    Paper: S. Venkataramanan, B. Psomas, E. Kijak, L. Amsaleg, K. Karantzalos, Y. Avrithis,
    "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
    https://arxiv.org/abs/2106.04990 (the label-interpolated form of the contrastive loss).

    For an anchor :math:`a` and a candidate :math:`x` with soft label :math:`y` and distance
    :math:`d = d(a, x)`, the two per-pair terms are

    .. math::
        \ell^+(a, x) = y\,[d - m^+]_+, \qquad \ell^-(a, x) = (1 - y)\,[m^- - d]_+

    A pair enters the positive term where :math:`y > 0` and the negative term where
    :math:`y < 1`; each term is reduced on its own (PML's ``AvgNonZeroReducer`` by default:
    the mean over the non-zero values) and the two are summed. With 0/1 labels this is PML's
    ``ContrastiveLoss`` exactly (same pairs, same sub-losses, same reducer).

    Two ways in:

    - ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``: hard labels, PML's
      contract (all pairs from ``labels``, or the pairs of ``indices_tuple``).
    - ``loss.soft_loss(anchors, others, y)``: anchors (A, d), candidates (N, d) and a soft
      label matrix ``y`` (A, N) in [0, 1], NaN where (anchor, candidate) is not a pair.

    Args:
        pos_margin: :math:`m^+` (PML's default 0; Metrix uses 0).
        neg_margin: :math:`m^-` (PML's default 1; Metrix uses 0.5, which ``MetrixLoss`` sets).
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``, ...

    Default distance: ``LpDistance(p=2, normalize_embeddings=True)`` (PML's). With a
    similarity the margins flip as in PML (``distance.margin``).

    Default reducer: ``AvgNonZeroReducer``, one per sub-loss. Reducer input: ``pos_loss`` and
    ``neg_loss``, per pair, reduction type ``pos_pair`` / ``neg_pair``, indices the
    (anchor, candidate) pairs.

    Paper vs project: the soft-label terms :math:`y\,\rho^+` and :math:`(1-y)\,\rho^-` are the
    paper's generic form. The split of a pair between the two
    sub-losses by ``y > 0`` / ``y < 1``, the NaN convention and keeping PML's margins as
    defaults (so that 0/1 labels give PML's loss) are project decisions.
    """

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        indices_tuple = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if all(len(x) <= 1 for x in indices_tuple):
            return self.zero_losses()  # as PML's GenericPairLoss
        a1, p, a2, n = indices_tuple
        mat = self.distance(embeddings, ref_emb)
        anchors = torch.cat([a1, a2])
        others = torch.cat([p, n])
        y = torch.cat([torch.ones(len(a1)), torch.zeros(len(a2))]).to(mat)
        return self._pair_loss_dict(mat[anchors, others], y, anchors, others)

    def soft_loss(
        self, anchors: torch.Tensor, others: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The reduced loss of every (anchor, candidate) pair whose label ``y`` is not NaN."""
        self.reset_stats()
        loss_dict = self.soft_loss_dict(anchors, others, y)
        self.add_embedding_regularization_to_loss_dict(loss_dict, anchors)
        return self.reducer(loss_dict, anchors, None)

    def soft_loss_dict(self, anchors: torch.Tensor, others: torch.Tensor, y: torch.Tensor) -> dict:
        """PML's loss dict of :meth:`soft_loss`, before reduction."""
        check_soft_labels(y, (len(anchors), len(others)), allow_nan=True)
        a, o = torch.where(~torch.isnan(y))
        if len(a) == 0:
            return self.zero_losses()
        mat = self.distance(anchors, others)
        return self._pair_loss_dict(mat[a, o], y[a, o].to(mat), a, o)

    def _pair_loss_dict(
        self, dists: torch.Tensor, y: torch.Tensor, a: torch.Tensor, o: torch.Tensor
    ) -> dict:
        pos, neg = y > 0, y < 1
        pos_loss, neg_loss = 0, 0
        if torch.any(pos):
            pos_loss = y[pos] * self.pos_calc(dists[pos], self.pos_margin)
        if torch.any(neg):
            neg_loss = (1 - y[neg]) * self.neg_calc(dists[neg], self.neg_margin)
        return {
            "pos_loss": {
                "losses": pos_loss,
                "indices": (a[pos], o[pos]),
                "reduction_type": "pos_pair",
            },
            "neg_loss": {
                "losses": neg_loss,
                "indices": (a[neg], o[neg]),
                "reduction_type": "neg_pair",
            },
        }
