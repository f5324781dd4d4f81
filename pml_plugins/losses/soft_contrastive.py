"""Contrastive loss with soft (interpolated) pair labels."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import ContrastiveLoss

from .metrix_pairs import MixedPairs
from .soft_labels import check_soft_labels, reduce_loss_dict


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

    The loss dict before reduction comes from the embeddings (:meth:`soft_loss_dict`), from
    their distance matrix (:meth:`mat_loss_dict`) or from the pairs' distances
    (:meth:`pair_loss_dict`, with the indices the reducer gets; :meth:`mixed_loss_dict`).

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

    supports_gram_path = True  #: MetrixLoss's Gram path (:meth:`mixed_loss_dict`), this class only
    proxy_anchors = False  #: the soft-label loss's anchors are embeddings, not proxies

    def soft_loss(
        self, anchors: torch.Tensor, others: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The reduced loss of every (anchor, candidate) pair whose label ``y`` is not NaN."""
        self.reset_stats()
        return reduce_loss_dict(self, self.soft_loss_dict(anchors, others, y), anchors)

    def soft_loss_dict(self, anchors: torch.Tensor, others: torch.Tensor, y: torch.Tensor) -> dict:
        """PML's loss dict of :meth:`soft_loss`, before reduction."""
        check_soft_labels(y, (len(anchors), len(others)), allow_nan=True)
        if torch.isnan(y).all():
            return self.zero_losses()
        return self.mat_loss_dict(self.distance(anchors, others), y)

    def mat_loss_dict(self, mat: torch.Tensor, y: torch.Tensor) -> dict:
        """PML's loss dict from the distances ``mat`` (A, N) of A anchors to N candidates
        (``self.distance``'s) and their soft labels ``y`` (A, N), NaN where not a pair:
        :meth:`pair_loss_dict` of the entries (row, column) whose label is not NaN."""
        a, o = torch.where(~torch.isnan(y))
        return self.pair_loss_dict(mat[a, o], y[a, o], a, o)

    def mixed_loss_dict(self, mat: torch.Tensor, pairs: MixedPairs, y: torch.Tensor) -> dict:
        """PML's loss dict of Metrix's mixed ``pairs`` of label ``y`` (0-d) from their (R, B)
        row distances ``mat``: :meth:`pair_loss_dict` of ``pairs.entries``, (anchor, point)."""
        rows, seconds = pairs.entries
        y = y.expand(len(rows))
        return self.pair_loss_dict(mat[rows, seconds], y, pairs.pair_anchors(), pairs.points[2])

    def pair_loss_dict(
        self, dists: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, others: torch.Tensor
    ) -> dict:
        r"""PML's loss dict of P pairs: their distances ``dists`` (P,), soft labels ``y`` (P,)
        in [0, 1], and the anchor and candidate indices the reducer gets for them.

        ``pos_loss``: :math:`y\,[d - m^+]_+` for the pairs with ``y > 0``; ``neg_loss``:
        :math:`(1 - y)\,[m^- - d]_+` for those with ``y < 1`` (``distance.margin`` flips
        both for a similarity).
        """
        y = y.to(dists)
        pos, neg = y > 0, y < 1
        pos_loss, neg_loss = 0, 0
        if torch.any(pos):
            pos_loss = y[pos] * self.pos_calc(dists[pos], self.pos_margin)
        if torch.any(neg):
            neg_loss = (1 - y[neg]) * self.neg_calc(dists[neg], self.neg_margin)
        return {
            "pos_loss": {
                "losses": pos_loss,
                "indices": (anchors[pos], others[pos]),
                "reduction_type": "pos_pair",
            },
            "neg_loss": {
                "losses": neg_loss,
                "indices": (anchors[neg], others[neg]),
                "reduction_type": "neg_pair",
            },
        }
