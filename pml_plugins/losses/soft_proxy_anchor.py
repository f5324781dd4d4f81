"""Proxy-Anchor loss with soft (interpolated) class memberships."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .soft_labels import check_soft_labels, reduce_loss_dict, weighted_logsumexp


class SoftProxyAnchorLoss(ProxyAnchorLoss):
    r"""PML's ``ProxyAnchorLoss`` for soft class memberships :math:`y_{xc} \in [0, 1]`.

    Paper: S. Venkataramanan, B. Psomas, E. Kijak, L. Amsaleg, K. Karantzalos, Y. Avrithis,
    "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
    https://arxiv.org/abs/2106.04990; Proxy-Anchor itself is S. Kim et al., "Proxy Anchor
    Loss for Deep Metric Learning", CVPR 2020.

    The anchors are the class proxies :math:`p_c`. With :math:`s_{xc}` the similarity of
    sample :math:`x` to :math:`p_c` and :math:`y_{xc}` how much :math:`x` belongs to class c:

    .. math::
        \ell^+(p_c) = \log\Big(1 + \sum_x y_{xc}\, e^{-\alpha (s_{xc} - \delta)}\Big), \qquad
        \ell^-(p_c) = \log\Big(1 + \sum_x (1 - y_{xc})\, e^{\alpha (s_{xc} + \delta)}\Big)

    :math:`\ell^+` is summed over proxies and divided by the number of proxies with some
    :math:`y_{xc} > 0`; :math:`\ell^-` is divided by the number of classes. With one-hot
    :math:`y` (hard labels) this is PML's ``ProxyAnchorLoss`` exactly, ``indices_tuple``
    weighting included. A mixed point :math:`\lambda x + (1 - \lambda) x'` of classes c, c'
    has :math:`y = \lambda` for :math:`p_c`, :math:`1 - \lambda` for :math:`p_{c'}`, 0 for
    the other proxies (what ``MetrixLoss`` passes).

    Two ways in:

    - ``loss(embeddings, labels, indices_tuple)``: hard labels, PML's contract
      (``ref_emb`` is not supported, as in PML).
    - ``loss.soft_loss(embeddings, y)``: embeddings (N, d) and a membership matrix ``y``
      (N, num_classes) in [0, 1].

    The loss dict before reduction comes from the embeddings (:meth:`soft_loss_dict`) or
    from their similarities to the proxies (:meth:`mat_loss_dict`).

    The proxies are a ``torch.nn.Parameter`` of this loss: give the loss its own optimizer
    (PML trainers: ``optimizers["metric_loss_optimizer"]``), as with PML's
    ``ProxyAnchorLoss``. Metrix trains them with 100x the model's learning rate.

    Args:
        num_classes, embedding_size: shape of the proxies.
        margin: :math:`\delta` (default 0.1, PML's and Metrix's).
        alpha: :math:`\alpha` (default 32, PML's and Metrix's).
        **kwargs: PML's ``distance``, ``reducer``, ``weight_init_func``, regularizers, ...

    Default distance: ``CosineSimilarity()``. Default reducer: ``DivisorReducer``. Reducer
    input: ``pos_loss`` and ``neg_loss``, one value per proxy, reduction type ``element``,
    with the divisors above.

    Paper vs project: the proxy-anchor terms are the Proxy-Anchor paper's; the soft
    memberships (λ for :math:`p_c`, 1-λ for :math:`p_{c'}`, 0 elsewhere) follow Metrix's
    generic soft-label form but are a project derivation: the released Metrix code has no
    Proxy-Anchor + Metrix path.
    """

    supports_gram_path = True  #: MetrixLoss's Gram path (distances to proxies), this class only
    proxy_anchors = True  #: the soft-label loss's anchors are the proxies

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        dtype, device = embeddings.dtype, embeddings.device
        self.cast_types(dtype, device)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype).unsqueeze(1)
        y = torch.nn.functional.one_hot(labels, self.num_classes).to(dtype)
        return self.mat_loss_dict(self.get_logits(embeddings), y, miner_weights - 1)

    def soft_loss(self, embeddings: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reduced loss of ``embeddings`` with soft class memberships ``y``."""
        self.reset_stats()
        return reduce_loss_dict(self, self.soft_loss_dict(embeddings, y), embeddings)

    def soft_loss_dict(self, embeddings: torch.Tensor, y: torch.Tensor) -> dict:
        """PML's loss dict of :meth:`soft_loss`, before reduction."""
        check_soft_labels(y, (len(embeddings), self.num_classes), allow_nan=False)
        self.cast_types(embeddings.dtype, embeddings.device)
        return self.mat_loss_dict(self.get_logits(embeddings), y)

    def mat_loss_dict(
        self, mat: torch.Tensor, y: torch.Tensor, miner_weights: torch.Tensor | float = 0
    ) -> dict:
        """PML's loss dict from the similarities (or distances, ``self.distance``'s) ``mat``
        (N, num_classes) of N samples to the proxies and their memberships ``y``
        (N, num_classes) in [0, 1]: one value per proxy for each term, with the divisors
        above, plus the proxies' weight regularization. ``miner_weights`` (N, 1) are added
        to the exponents (PML's ``indices_tuple`` weighting, 0 = none)."""
        y = y.to(mat)
        pos_exp = self.distance.margin(mat, self.margin)
        neg_exp = self.distance.margin(-self.margin, mat)
        pos_term = weighted_logsumexp(self.alpha * pos_exp + miner_weights, y, dim=0)
        neg_term = weighted_logsumexp(self.alpha * neg_exp + miner_weights, 1 - y, dim=0)
        with_pos = int(torch.sum(torch.any(y > 0, dim=0)))
        indices = c_f.torch_arange_from_size(self.proxies)
        loss_dict = {
            "pos_loss": {
                "losses": pos_term.squeeze(0),
                "indices": indices,
                "reduction_type": "element",
                "divisor": with_pos,
            },
            "neg_loss": {
                "losses": neg_term.squeeze(0),
                "indices": indices,
                "reduction_type": "element",
                "divisor": self.num_classes,
            },
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict
