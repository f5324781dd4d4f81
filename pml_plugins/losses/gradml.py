"""GradML: a loss derived from the gradients it should produce."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import GenericPairLoss
from pytorch_metric_learning.reducers import BaseReducer, MultipleReducers, ThresholdReducer

from .precision import InInputDtype, at_least_float32


class GradMLLoss(InInputDtype, GenericPairLoss):
    r"""GradML loss, generalised from one quadruple to a batch of pairs.

    Paper: B. Vasudeva, P. Deora, S. Bhattacharya, U. Pal, S. Chanda, "GradML: A
    Gradient-based Loss for Deep Metric Learning", I (Still) Can't Believe It's Not Better
    workshop at NeurIPS 2021.

    For a quadruple ``x1, x2`` (class A) and ``y1, y2`` (class B) the paper's loss is eq. (11):

    .. math::
        L = d(x_1,x_2)^k + d(y_1,y_2)^k
            - w\,[d(x_1,y_1)^k + d(x_1,y_2)^k + d(x_2,y_1)^k + d(x_2,y_2)^k]

    On a batch with positive pairs :math:`\mathcal{P}` and negative pairs :math:`\mathcal{N}`
    this loss computes

    .. math::
        L = 2\,\mathrm{mean}_{(i,j)\in\mathcal{P}}\, d_{ij}^k
            - 4w\,\mathrm{mean}_{(i,j)\in\mathcal{N}}\, d_{ij}^k

    which is eq. (11) to the letter when the batch is one quadruple, and the mean over
    quadruples of eq. (11) when the pairs are those of disjoint quadruples (use
    :class:`pml_plugins.miners.DisjointQuadrupleMiner`, the paper's O(B) setting). Without a
    miner, all positive and all negative pairs of the batch are used.

    Args:
        k: exponent of the distance (paper: k = 2 in the main results, k in [1, 4] swept).
        w: weight of the negative pairs (paper: w = 1 in the main results).
        eps: added to :math:`d^2` before the power when ``k != 2``, so that
            :math:`d^k = (d^2 + \epsilon)^{k/2}` has finite gradients at coincident points.
            For ``k == 2`` the squared distance is used as is.

    Default distance: PML's, ``LpDistance(normalize_embeddings=True, p=2, power=1)``. Any
    non-inverted distance may be given; :math:`d^2` is obtained as ``mat ** (2 / power)``.

    Default reducer: PML's ``MeanReducer``. The loss has two sub-losses, ``pos_loss`` (per positive
    pair :math:`2 d^k`, reduction type ``pos_pair``) and ``neg_loss`` (per negative pair
    :math:`-4 w d^k`, reduction type ``neg_pair``); the mean of each, summed, is exactly the
    formula above. Every negative-pair term is at most 0, so a reducer that keeps only
    values above a threshold of 0 or more (``AvgNonZeroReducer``, ``ThresholdReducer`` with
    ``low >= 0``) would drop the whole repulsion term: such a reducer for ``neg_loss``
    (directly or through ``MultipleReducers``) raises ``ValueError``. A ``ThresholdReducer``
    with ``low < 0`` keeps the negative pairs whose term is above ``low``.

    ``indices_tuple``: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` (turned into pairs
    by ``lmu.convert_to_pairs``; a pair repeated in several triplets counts as often as it
    appears). ``ref_emb``/``ref_labels`` are supported: pairs run from ``embeddings`` to the
    reference set.

    Built on PML's ``GenericPairLoss(mat_based_loss=False)``, as PML's ``ContrastiveLoss``:
    the template supplies the pairs (from ``labels`` or ``indices_tuple``; a quadruple of
    ``DisjointQuadrupleMiner`` is its six pairs) and their distances, and, as in PML's pair
    losses, a batch with at most one positive and at most one negative pair gives zero.

    Paper vs project: eq. (11), k and w, and the defaults k = 2, w = 1 are the paper's. The
    batch generalisation, the mean over pairs, the L2-normalisation of the embeddings (the
    paper does not say; without it the loss is unbounded below for w > 0) and the epsilon in
    the power are project decisions. float16/bfloat16 distances are raised to float32 before
    the power, and the terms are returned in the input's dtype. The gradient row for GradML
    in the paper's Table 1 does not follow from eq. (11) and is not reproduced; autograd
    differentiates eq. (11).

    Stats: ``mean_pos_dist_k`` and ``mean_neg_dist_k``, the mean :math:`d^k` over positive
    and negative pairs.
    """

    def __init__(self, k: float = 2.0, w: float = 1.0, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(mat_based_loss=False, **kwargs)
        if k <= 0:
            raise ValueError(f"GradMLLoss needs k > 0, got k={k}")
        if self.distance.is_inverted:
            raise ValueError(
                "GradMLLoss needs a distance (smaller = more similar), "
                f"got the similarity {type(self.distance).__name__}"
            )
        self.k = float(k)
        self.w = float(w)
        self.eps = float(eps)
        check_keeps_negative_terms(self.reducer)
        self.add_to_recordable_attributes(list_of_names=["k", "w", "eps"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["mean_pos_dist_k", "mean_neg_dist_k"], is_stat=True
        )

    def compute_loss(self, *args, **kwargs) -> dict:
        """PML's ``GenericPairLoss.compute_loss``, once the reducer (which may have been
        replaced since construction) is known to keep the negative terms."""
        check_keeps_negative_terms(self.reducer)
        return super().compute_loss(*args, **kwargs)

    def _compute_loss(
        self,
        pos_pair_dist: torch.Tensor | list,
        neg_pair_dist: torch.Tensor | list,
        indices_tuple: tuple[torch.Tensor, ...],
    ) -> dict:
        pos_dk = self.dist_pow_k(pos_pair_dist) if len(pos_pair_dist) > 0 else None
        neg_dk = self.dist_pow_k(neg_pair_dist) if len(neg_pair_dist) > 0 else None
        if self.collect_stats:
            with torch.no_grad():
                self.mean_pos_dist_k = 0.0 if pos_dk is None else pos_dk.mean().item()
                self.mean_neg_dist_k = 0.0 if neg_dk is None else neg_dk.mean().item()
        a1, p, a2, n = indices_tuple
        return {
            "pos_loss": {
                "losses": 0 if pos_dk is None else 2 * pos_dk,
                "indices": (a1, p),
                "reduction_type": "pos_pair",
            },
            "neg_loss": {
                "losses": 0 if neg_dk is None else -4 * self.w * neg_dk,
                "indices": (a2, n),
                "reduction_type": "neg_pair",
            },
        }

    def dist_pow_k(self, dist: torch.Tensor) -> torch.Tensor:
        """d**k from distances d as given by ``self.distance`` (in float32 at least)."""
        dist = at_least_float32(dist)
        power = self.distance.power
        sq = dist if power == 2 else dist.pow(2.0 / power)
        if self.k == 2:
            return sq
        return (sq + self.eps).pow(self.k / 2)

    def _sub_loss_names(self) -> list[str]:
        return ["pos_loss", "neg_loss"]


def check_keeps_negative_terms(reducer: BaseReducer) -> None:
    """Refuse a reducer that would drop every (non-positive) ``neg_loss`` term of GradML."""
    if isinstance(reducer, MultipleReducers):
        reducers = reducer.reducers
        reducer = reducers["neg_loss"] if "neg_loss" in reducers else reducer.default_reducer
    if isinstance(reducer, ThresholdReducer) and reducer.low is not None and reducer.low >= 0:
        raise ValueError(
            f"GradMLLoss: {type(reducer).__name__}(low={reducer.low}) keeps only terms above "
            f"{reducer.low}, but every negative-pair term is -4 w d^k <= 0, so the repulsion "
            "would be dropped; use MeanReducer (the default), SumReducer, or "
            "MultipleReducers with another reducer for 'neg_loss'"
        )
