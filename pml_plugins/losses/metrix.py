"""Metrix: mixup for deep metric learning, as a loss wrapper (embedding mixing)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from pytorch_metric_learning.losses import BaseLossWrapper
from pytorch_metric_learning.miners import BaseMiner, MultiSimilarityMiner
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from .soft_contrastive import SoftContrastiveLoss
from .soft_multi_similarity import SoftMultiSimilarityLoss
from .soft_proxy_anchor import SoftProxyAnchorLoss

#: inner losses by name, with the hyperparameters of the Metrix code
METRIX_LOSSES: dict[str, tuple[type, dict[str, Any]]] = {
    "contrastive": (SoftContrastiveLoss, {"pos_margin": 0.0, "neg_margin": 0.5}),
    "multi_similarity": (SoftMultiSimilarityLoss, {"alpha": 17.97, "beta": 75.66, "base": 0.77}),
    "proxy_anchor": (SoftProxyAnchorLoss, {"margin": 0.1, "alpha": 32.0}),
}
#: Metrix's miner for the clean multi-similarity loss
MS_MINER_EPSILON = 0.39
MODES = ("embed", "feature", "input")
#: distances computed from Gram matrices in embed mode (exact types, p = 2, any power)
GRAM_DISTANCES = (CosineSimilarity, DotProductSimilarity, LpDistance)
#: ``torch.nn.functional.normalize``'s eps, which PML's distances use
NORM_EPS = 1e-12


def mixing_pairs(
    labels: torch.Tensor,
    embeddings: torch.Tensor | None = None,
    distance: BaseDistance | None = None,
    hardest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Index pairs ``(first, second)`` of the mixed points :math:`\lambda x_f + (1-\lambda) x_s`.

    ``hardest=False``: every ordered pair of batch samples with different labels (each
    (anchor, positive, negative) triple of the batch then finds its mixed point exactly
    once). ``hardest=True``: each sample with a negative, paired with its hardest negative
    (the most similar sample of another class under ``distance``, on detached
    ``embeddings``).
    """
    diff = labels.unsqueeze(1) != labels.unsqueeze(0)
    if not hardest:
        return torch.where(diff)
    if embeddings is None or distance is None:
        raise ValueError("hardest negatives need the embeddings and a distance")
    first = torch.where(diff.any(dim=1))[0]
    with torch.no_grad():
        mat = distance(embeddings.detach())
        if distance.is_inverted:
            second = mat.masked_fill(~diff, float("-inf")).argmax(dim=1)
        else:
            second = mat.masked_fill(~diff, float("inf")).argmin(dim=1)
    return first, second[first]


def mixed_labels(
    anchor_labels: torch.Tensor,
    first_labels: torch.Tensor,
    second_labels: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    r"""Soft labels (A, M) of mixed points w.r.t. anchors: ``mix_λ`` of the binary labels.

    :math:`y(a, v) = \lambda\,[c(x_f) = c(a)] + (1 - \lambda)\,[c(x_s) = c(a)]`, so a
    positive-negative mix has :math:`y = \lambda`, an anchor-negative mix (the anchor is its
    own positive) :math:`\lambda`, a negative-negative mix 0, a positive-positive mix 1.
    """
    a = anchor_labels.unsqueeze(1)
    first_same = (first_labels.unsqueeze(0) == a).double()
    second_same = (second_labels.unsqueeze(0) == a).double()
    return lam * first_same + (1 - lam) * second_same


def own_mix_mask(labels: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Which mixed points each anchor sees (B, M), as in Metrix.

    An anchor with a positive in the batch sees the mixes of its positives with its
    negatives; an anchor without one sees the mixes of itself with its negatives. The
    mixed points must come from :func:`mixing_pairs` (``first``/``second`` of different
    labels).
    """
    same = labels.unsqueeze(1) == labels[first].unsqueeze(0)
    is_self = torch.arange(len(labels), device=labels.device).unsqueeze(1) == first.unsqueeze(0)
    positives = labels.unsqueeze(1) == labels.unsqueeze(0)
    has_pos = (positives.sum(dim=1) > 1).unsqueeze(1)
    return same & torch.where(has_pos, ~is_self, is_self)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 or wider, outside autocast: products of raw (unnormalised)
    embeddings overflow float16 from norms of 256 on."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


class SymmetricGram(torch.autograd.Function):
    r""":math:`G = X X^\top` with the backward :math:`(\partial G + \partial G^\top) X`: one
    matrix product instead of autograd's two (one per factor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return matmul_fp32(x, x.T)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return matmul_fp32(grad + grad.T, x).to(x.dtype)


def gram_distance_supported(distance: BaseDistance) -> bool:
    """Whether :func:`normalised_points` and :func:`distance_from_dot` reproduce
    ``distance``: PML's ``CosineSimilarity``, ``DotProductSimilarity`` or ``LpDistance``
    (exactly these classes) with ``p = 2``, any ``power``, normalised or not."""
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


class MetrixLoss(BaseLossWrapper, ModuleWithRecords):
    r"""Metrix: a soft-label loss on clean and on mixed examples.

    Paper: S. Venkataramanan, B. Psomas, E. Kijak, L. Amsaleg, K. Karantzalos, Y. Avrithis,
    "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
    https://arxiv.org/abs/2106.04990.

    .. math::
        E = \ell(\text{clean batch}) + w\, \tilde\ell(\text{anchors}, V), \qquad
        V = \{(\lambda x + (1-\lambda) x',\ \lambda y + (1-\lambda) y')\},
        \quad \lambda \sim \mathrm{Beta}(\alpha, \alpha)

    :math:`\ell` is the inner loss with hard labels; :math:`\tilde\ell` is the same loss
    with soft labels (``soft_loss``) between the clean anchors and the mixed points. One
    :math:`\lambda` per call, shared by the batch.

    Mixed points and labels (``anchor_pairs="own"``, the paper's pair choice): for an anchor
    with positives, each of its positives mixed with each of its negatives
    (:math:`y = \lambda`); for an anchor without a positive, the anchor mixed with each of
    its negatives (:math:`y = \lambda`). Every (anchor, positive, negative) triple is mixed
    once. ``anchor_pairs="all"`` lets every anchor see every mixed point, with
    :func:`mixed_labels` (negative-negative mixes get :math:`y = 0`). For Proxy-Anchor the
    anchors are the proxies and a mix of classes c, c' has membership λ in c and 1-λ in c'.

    Modes: ``"embed"`` mixes the embeddings here, in ``forward``, without building the
    mixed points for PML's cosine, dot-product and Euclidean distances: distances to them
    come from the Gram matrix of the batch (:meth:`compute_embed_mixed_loss`).
    ``"feature"`` and ``"input"`` mix trunk outputs or images: use
    :class:`pml_plugins.trainers.MetrixTrainer`, which calls :meth:`compute_mixed_loss`; in these
    modes ``forward`` returns the clean loss only.

    Args:
        loss: ``"multi_similarity"`` (default), ``"contrastive"``, ``"proxy_anchor"``, or an
            instance of ``SoftMultiSimilarityLoss``/``SoftContrastiveLoss``/
            ``SoftProxyAnchorLoss``.
        mode: ``"embed"``, ``"feature"`` or ``"input"``.
        alpha: :math:`\alpha` of :math:`\mathrm{Beta}(\alpha, \alpha)` (default 2).
        weight: :math:`w`, the weight of the mixed loss (default 0.4).
        lam: a fixed :math:`\lambda` in [0, 1] instead of sampling (tests, ablations).
        miner: miner of the clean loss, used when no ``indices_tuple`` is given.
            ``"default"``: ``MultiSimilarityMiner(epsilon=0.39)`` for multi-similarity, none
            otherwise (Metrix's setting). The mixed loss is never mined.
        negatives: ``"all"`` (default) mixes with every negative; ``"hardest"`` with the
            hardest negative of each sample only. Input mode always uses ``"hardest"``.
        anchor_pairs: ``"own"`` (default) or ``"all"``, see above.
        num_classes, embedding_size: the proxies' shape for ``loss="proxy_anchor"``
            (ignored for the other losses, so a runner may always pass them).
        **loss_kwargs: constructor arguments of the inner loss when ``loss`` is a name
            (over Metrix's values: contrastive ``pos_margin=0, neg_margin=0.5``; MS
            ``alpha=17.97, beta=75.66, base=0.77``; PA ``margin=0.1, alpha=32``, plus the
            required ``num_classes``, ``embedding_size``). The inner loss's own ``alpha``
            cannot be given here (it names the Beta parameter): pass an instance instead.

    Default distance and reducer: the inner loss's (contrastive: ``LpDistance``,
    ``AvgNonZeroReducer``; MS: ``CosineSimilarity``, ``MeanReducer``; PA:
    ``CosineSimilarity``, ``DivisorReducer``). Each of the clean and the mixed loss is
    reduced by the inner loss's reducer; the two scalars are then combined.

    ``labels`` are required; ``indices_tuple`` goes to the clean loss only; ``ref_emb`` is
    not supported (mixing is defined within the batch).

    Stats: ``mix_lambda``, ``clean_loss``, ``mixed_loss`` (unweighted), ``num_mixed``.

    Paper vs project: the soft-label losses, Beta(2, 2), one λ per iteration, w = 0.4, the
    pair types and their labels, and the MS/PA/contrastive constants are the paper's and its
    code's. Project decisions: the paper's soft-label MS loss instead of the released
    code's (which scales the clean positive term by λ and drops the mixed negatives); both
    pair branches every iteration instead of a coin flip between them; each triple mixed
    once; one weight 0.4 for every branch (the code uses 0.3 for contrastive
    anchor-negative mixes); the derived Proxy-Anchor labels; the hardest negative of the
    mixed sample itself (not of the anchor) in input mode.
    """

    def __init__(
        self,
        loss: str | torch.nn.Module = "multi_similarity",
        mode: str = "embed",
        alpha: float = 2.0,
        weight: float = 0.4,
        lam: float | None = None,
        miner: BaseMiner | str | None = "default",
        negatives: str = "all",
        anchor_pairs: str = "own",
        collect_stats: bool | None = None,
        num_classes: int | None = None,
        embedding_size: int | None = None,
        **loss_kwargs: Any,
    ) -> None:
        if loss == "proxy_anchor":
            # the proxies' shape; the experiment runner fills both in from the data and model
            for key, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
                if value is not None:
                    loss_kwargs.setdefault(key, value)
        inner = self._build_loss(loss, loss_kwargs)
        super().__init__(loss=inner, collect_stats=collect_stats)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if lam is not None and not 0 <= lam <= 1:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        if negatives not in ("all", "hardest"):
            raise ValueError(f"negatives must be 'all' or 'hardest', got {negatives!r}")
        if anchor_pairs not in ("own", "all"):
            raise ValueError(f"anchor_pairs must be 'own' or 'all', got {anchor_pairs!r}")
        if miner == "default":
            miner = (
                MultiSimilarityMiner(epsilon=MS_MINER_EPSILON)
                if isinstance(inner, SoftMultiSimilarityLoss)
                else None
            )
        elif isinstance(miner, str):
            raise ValueError(f"miner must be a miner, None or 'default', got {miner!r}")
        self.loss = inner
        self.miner = miner
        self.mode = mode
        self.alpha = float(alpha)
        self.weight = float(weight)
        self.lam = None if lam is None else float(lam)
        self.negatives = negatives
        self.anchor_pairs = anchor_pairs
        self._beta: tuple[float, torch.distributions.Beta] | None = None
        self.add_to_recordable_attributes(list_of_names=["alpha", "weight"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["mix_lambda", "clean_loss", "mixed_loss", "num_mixed"], is_stat=True
        )

    @staticmethod
    def supported_losses() -> list[str]:
        return [cls.__name__ for cls, _ in METRIX_LOSSES.values()]

    @classmethod
    def check_loss_support(cls, loss_name: str) -> None:
        if loss_name not in cls.supported_losses():
            raise ValueError(
                f"MetrixLoss needs a soft-label loss ({', '.join(cls.supported_losses())}), "
                f"got {loss_name}"
            )

    @staticmethod
    def _build_loss(loss: str | torch.nn.Module, loss_kwargs: dict[str, Any]) -> torch.nn.Module:
        if isinstance(loss, torch.nn.Module):
            if loss_kwargs:
                raise ValueError(
                    f"loss is an instance; the keyword arguments {sorted(loss_kwargs)} "
                    "would be ignored: set them on the instance"
                )
            return loss
        if loss not in METRIX_LOSSES:
            raise ValueError(
                f"loss must be one of {sorted(METRIX_LOSSES)} or an instance, got {loss!r}"
            )
        cls, defaults = METRIX_LOSSES[loss]
        return cls(**{**defaults, **loss_kwargs})

    @property
    def uses_proxies(self) -> bool:
        return isinstance(self.loss, SoftProxyAnchorLoss)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clean loss + ``weight`` x mixed loss (embed mode); the clean loss otherwise."""
        self.reset_stats()
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb is not supported by MetrixLoss: mixing is within the batch")
        c_f.labels_required(labels)
        c_f.check_shapes(embeddings, labels)
        labels = c_f.to_device(labels, embeddings)
        clean = self.compute_clean_loss(embeddings, labels, indices_tuple)
        if self.mode != "embed":
            return clean
        lam = self.sample_lambda()
        first, second = self.mixing_pairs(labels, embeddings)
        mixed = self.compute_embed_mixed_loss(embeddings, labels, first, second, lam)
        return clean + self.weight * mixed

    def compute_clean_loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: tuple | None = None
    ) -> torch.Tensor:
        """The inner loss on the clean batch (mined by ``miner`` if no ``indices_tuple``)."""
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels)
        clean = self.loss(embeddings, labels, indices_tuple)
        if self.collect_stats:
            with torch.no_grad():
                self.clean_loss = float(clean)
        return clean

    def sample_lambda(self) -> float:
        """λ ~ Beta(alpha, alpha) from torch's RNG, or the fixed ``lam``."""
        if self.lam is not None:
            lam = self.lam
        else:
            if self._beta is None or self._beta[0] != self.alpha:
                conc = torch.tensor(self.alpha, dtype=torch.float64)
                self._beta = (self.alpha, torch.distributions.Beta(conc, conc, validate_args=False))
            lam = float(self._beta[1].sample())
        if self.collect_stats:
            self.mix_lambda = lam
        return lam

    def mixing_pairs(
        self, labels: torch.Tensor, embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` batch indices of the points to mix (see :func:`mixing_pairs`)."""
        hardest = self.negatives == "hardest" or self.mode == "input"
        return mixing_pairs(labels, embeddings, self.loss.distance, hardest=hardest)

    def mix_labels(
        self,
        labels: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Soft labels of the mixed points: (B, M) anchors x mixed points, NaN where the
        anchor does not see the point; (M, num_classes) memberships for Proxy-Anchor."""
        if self.uses_proxies:
            n = self.loss.num_classes
            one_hot = torch.nn.functional.one_hot
            y = (
                lam * one_hot(labels[first], n).double()
                + (1 - lam) * one_hot(labels[second], n).double()
            )
            return y.to(dtype)
        y = mixed_labels(labels, labels[first], labels[second], lam).to(dtype)
        if self.anchor_pairs == "own":
            y = y.masked_fill(~own_mix_mask(labels, first), float("nan"))
        return y

    def compute_mixed_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        mixed_emb: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
    ) -> torch.Tensor:
        r"""The unweighted soft-label loss :math:`\tilde\ell` of the mixed points.

        ``embeddings``/``labels``: the clean batch (the anchors); ``mixed_emb`` (M, d): the
        embeddings of :math:`\lambda x_{first} + (1-\lambda) x_{second}`, mixed at any stage.
        """
        labels = c_f.to_device(labels, embeddings)
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        y = self.mix_labels(labels, first, second, lam, dtype)
        if self.uses_proxies:
            mixed = self.loss.soft_loss(mixed_emb, y)
        else:
            mixed = self.loss.soft_loss(embeddings, mixed_emb, y)
        if self.collect_stats:
            with torch.no_grad():
                self.mixed_loss = float(mixed)
                self.num_mixed = len(first)
        return mixed

    def gram_path_applies(self) -> bool:
        """Whether :meth:`compute_embed_mixed_loss` can skip building the mixed points: the
        inner loss is one of the three soft-label losses (exactly), its distance passes
        :func:`gram_distance_supported`, and for Proxy-Anchor there is no embedding
        regularizer (it would need the mixed embeddings)."""
        loss = self.loss
        if type(loss) not in (SoftContrastiveLoss, SoftMultiSimilarityLoss, SoftProxyAnchorLoss):
            return False
        if self.uses_proxies and loss.embedding_regularizer is not None:
            return False
        return gram_distance_supported(loss.distance)

    def compute_embed_mixed_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
    ) -> torch.Tensor:
        r"""Embed mode's :meth:`compute_mixed_loss` of the points
        :math:`v = \lambda x_{first} + (1-\lambda) x_{second}`, without building them.

        With :math:`G = E E^\top` of the raw embeddings, :math:`a \cdot v = \lambda
        G_{af} + (1-\lambda) G_{as}` and :math:`\|v\|^2 = \lambda^2 G_{ff} +
        (1-\lambda)^2 G_{ss} + 2\lambda(1-\lambda) G_{fs}` give the distance of an anchor to
        a mixed point, after the distance's own normalisation of both
        (:func:`normalised_points`, :func:`distance_from_dot`). ``anchor_pairs="own"`` forms
        only the pairs each anchor sees, as rows (anchor, first point) over the B candidate
        second points: O(B^2 d) for G plus O(R B) for the R = sum_a |P(a)| rows (O(B^2 m)
        with m samples per class), instead of the (B, M) distance matrix of M = O(B^2)
        materialised points (O(B^3 d)). ``"all"`` builds the (B, M) matrix from gathers of G
        (O(B M)); Proxy-Anchor the (M, C) logits from :math:`E P^\top` (O(B C d + M C)).
        Same loss, reducer input and stats as the generic path up to rounding, except that
        the Euclidean distance of a mixed point that is its own anchor (λ ∈ {0, 1}) is
        exactly 0, and that Proxy-Anchor's reducer gets the clean embeddings instead of the
        mixed ones (PML's reducers use them for dtype, device and zero losses only). Falls
        back to the generic path where :meth:`gram_path_applies` is false or, with
        ``"own"``, where a mixing pair has one label.
        """
        labels = c_f.to_device(labels, embeddings)
        first, second = c_f.to_device(first, embeddings), c_f.to_device(second, embeddings)
        if len(first) == 0 or not self.gram_path_applies():
            return self._generic_embed_mixed_loss(embeddings, labels, first, second, lam)
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        loss = self.loss
        loss.reset_stats()
        gram = SymmetricGram.apply(embeddings)
        sq = gram.diagonal()
        # ||lam x_f + (1 - lam) x_s||^2 for every (f, s), mixing pair or not
        mix_sq = lam**2 * sq.unsqueeze(1) + (1 - lam) ** 2 * sq + 2 * lam * (1 - lam) * gram
        if self.uses_proxies:
            loss_dict = self._gram_proxy_loss_dict(
                embeddings, labels, first, second, lam, mix_sq[first, second], dtype
            )
        else:
            args = (gram, labels, first, second, lam, mix_sq, dtype)
            if self.anchor_pairs == "all":
                loss_dict = self._gram_all_pairs_loss_dict(*args)
            else:
                loss_dict = self._gram_own_pairs_loss_dict(*args)
                if loss_dict is None:  # a mixing pair of one class: labels other than λ
                    return self._generic_embed_mixed_loss(embeddings, labels, first, second, lam)
            record_distance_stats(loss.distance, lambda: sq, lambda: mix_sq[first, second])
        loss.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        mixed = loss.reducer(loss_dict, embeddings, None)
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            mixed = mixed.to(embeddings.dtype)  # the generic path's dtype
        if self.collect_stats:
            with torch.no_grad():
                self.mixed_loss = float(mixed)
                self.num_mixed = len(first)
        return mixed

    def _generic_embed_mixed_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
    ) -> torch.Tensor:
        """:meth:`compute_mixed_loss` of the mixed embeddings, built."""
        mixed_emb = lam * embeddings[first] + (1 - lam) * embeddings[second]
        return self.compute_mixed_loss(embeddings, labels, mixed_emb, first, second, lam)

    def _gram_own_pairs_loss_dict(
        self,
        gram: torch.Tensor,
        labels: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
        mix_sq: torch.Tensor,
        dtype: torch.dtype,
    ) -> dict | None:
        """Loss dict of ``anchor_pairs="own"``, pairs in the generic path's order.

        Anchor a sees mixed point m = (f, s) exactly when it sees every mix whose first point
        is f (:func:`own_mix_mask`): one row per (a, f), the mixes of f being the columns s
        where ``(f, s)`` is a mixing pair. Where first and second points have different
        labels (:func:`mixing_pairs`), every pair seen has the label λ (:func:`mixed_labels`);
        otherwise this returns None.
        """
        n = len(labels)
        device = labels.device
        dist = self.loss.distance
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        idx = torch.arange(n, device=device)
        is_self = idx.unsqueeze(1) == idx.unsqueeze(0)
        has_pos = (same.sum(dim=1) > 1).unsqueeze(1)
        anchors, firsts = torch.where(same & torch.where(has_pos, ~is_self, is_self))
        is_pair = torch.zeros(n * n, dtype=torch.bool, device=device)
        is_pair[first * n + second] = True
        is_pair = is_pair.view(n, n)
        if bool(torch.any(is_pair & same)):
            return None
        seen = is_pair.index_select(0, firsts)  # (R, B): (a, f) sees s where (f, s) is mixed
        # normalisation factors folded into (B, B) matrices before gathering rows
        scale, hat_sq = normalised_points(dist, gram.diagonal())
        mix_scale, mix_hat_sq = normalised_points(dist, mix_sq)
        scaled = gram * scale.unsqueeze(1)  # a . x / |a|
        left = lam * scaled[anchors, firsts]
        right = ((1 - lam) * scaled).index_select(0, anchors)
        dot = (left.unsqueeze(1) + right) * mix_scale.index_select(0, firsts)
        if lam == 1:
            coincide = (anchors == firsts).unsqueeze(1)
        elif lam == 0:
            coincide = idx == anchors.unsqueeze(1)
        else:
            coincide = None
        euclid = isinstance(dist, LpDistance)
        mat = distance_from_dot(
            dist,
            dot,
            hat_sq[anchors].unsqueeze(1) if euclid else None,
            mix_hat_sq.index_select(0, firsts) if euclid else None,
            coincide,
        )
        if isinstance(self.loss, SoftContrastiveLoss):
            pair_id = torch.full((n, n), -1, dtype=torch.long, device=device)
            pair_id[first, second] = torch.arange(len(first), device=device)
            flat = torch.nonzero(seen.view(-1)).squeeze(1)  # row-major: the generic order
            dists = mat.reshape(-1).index_select(0, flat)
            mixes = pair_id.index_select(0, firsts).view(-1).index_select(0, flat)
            per_row = seen.sum(dim=1)
            pair_anchors = torch.repeat_interleave(anchors, per_row, output_size=len(flat))
            return self._contrastive_pairs_loss_dict(dists, lam, pair_anchors, mixes, dtype)
        return self._ms_rows_loss_dict(mat, lam, ~seen, anchors, n, dtype)

    def _gram_all_pairs_loss_dict(
        self,
        gram: torch.Tensor,
        labels: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
        mix_sq: torch.Tensor,
        dtype: torch.dtype,
    ) -> dict:
        """Loss dict of ``anchor_pairs="all"``: the (B, M) matrix, from gathers of G."""
        dist = self.loss.distance
        scale, hat_sq = normalised_points(dist, gram.diagonal())
        mix_scale, mix_hat_sq = normalised_points(dist, mix_sq[first, second])
        scaled = gram * scale.unsqueeze(1)
        dot = (lam * scaled[:, first] + (1 - lam) * scaled[:, second]) * mix_scale
        rows = torch.arange(len(labels), device=labels.device).unsqueeze(1)
        coincide = (first == rows) if lam == 1 else (second == rows) if lam == 0 else None
        mat = distance_from_dot(dist, dot, hat_sq.unsqueeze(1), mix_hat_sq, coincide)
        y = self.mix_labels(labels, first, second, lam, dtype)
        if isinstance(self.loss, SoftContrastiveLoss):
            a, o = torch.where(~torch.isnan(y))
            if len(a) == 0:
                return self.loss.zero_losses()
            return self.loss._pair_loss_dict(mat[a, o], y[a, o].to(mat), a, o)
        return self.loss._loss_dict(mat, y)

    def _gram_proxy_loss_dict(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
        mix_sq: torch.Tensor,
        dtype: torch.dtype,
    ) -> dict:
        """Proxy-Anchor loss dict of the mixed points: (M, C) logits from E P^T."""
        loss = self.loss
        dist = loss.distance
        loss.cast_types(embeddings.dtype, embeddings.device)
        proxies = loss.proxies
        proxy_sq = torch.sum(
            proxies.to(torch.promote_types(embeddings.dtype, torch.float32)) ** 2, dim=1
        )
        proxy_scale, proxy_hat_sq = normalised_points(dist, proxy_sq)
        mix_scale, mix_hat_sq = normalised_points(dist, mix_sq)
        by_proxy = matmul_fp32(embeddings, proxies.T) * proxy_scale
        dot = (lam * by_proxy[first] + (1 - lam) * by_proxy[second]) * mix_scale.unsqueeze(1)
        cos = distance_from_dot(dist, dot, mix_hat_sq.unsqueeze(1), proxy_hat_sq)
        record_distance_stats(dist, lambda: mix_sq, lambda: proxy_sq)
        y = self.mix_labels(labels, first, second, lam, dtype)
        return loss.logits_loss_dict(cos, y, 0)

    def _contrastive_pairs_loss_dict(
        self,
        dists: torch.Tensor,
        lam: float,
        anchors: torch.Tensor,
        mixes: torch.Tensor,
        dtype: torch.dtype,
    ) -> dict:
        """``SoftContrastiveLoss._pair_loss_dict`` for pairs that all have the label ``lam``:
        every pair in the positive term if λ > 0, in the negative term if λ < 1."""
        c = self.loss
        y = torch.tensor(lam, dtype=torch.float64).to(dtype).to(dists.dtype)
        pos, neg = bool(y > 0), bool(y < 1)
        none = anchors[:0]
        return {
            "pos_loss": {
                "losses": y * c.pos_calc(dists, c.pos_margin) if pos else 0,
                "indices": (anchors, mixes) if pos else (none, none),
                "reduction_type": "pos_pair",
            },
            "neg_loss": {
                "losses": (1 - y) * c.neg_calc(dists, c.neg_margin) if neg else 0,
                "indices": (anchors, mixes) if neg else (none, none),
                "reduction_type": "neg_pair",
            },
        }

    def _ms_rows_loss_dict(
        self,
        mat: torch.Tensor,
        lam: float,
        unseen: torch.Tensor,
        anchors: torch.Tensor,
        n: int,
        dtype: torch.dtype,
    ) -> dict:
        """``SoftMultiSimilarityLoss``'s loss dict when the pairs of anchor a, all labelled
        ``lam``, are the entries not ``unseen`` of the rows i with ``anchors[i] = a``
        (``mat``: (R, N))."""
        ms = self.loss
        pos_w = torch.tensor(lam, dtype=torch.float64).to(dtype).item()  # the label's rounding
        neg_w = (1 - torch.tensor(pos_w, dtype=dtype)).item()
        sign = -1.0 if ms.distance.is_inverted else 1.0  # margin(mat, base) = sign (mat - base)
        # PML's masking value on the entries not seen; the constants go after the row sums
        mask = torch.zeros_like(mat).masked_fill_(unseen, c_f.neg_inf(mat.dtype))
        terms = []
        for weight, coef in ((pos_w, sign * ms.alpha), (neg_w, -sign * ms.beta)):
            if weight <= 0:  # no term: 0, as weighted_logsumexp
                terms.append(mat.new_zeros(n))
                continue
            # log sum_j w e^{coef (mat_ij - base)} of each row i
            rows = torch.logsumexp(torch.add(mask, mat, alpha=coef), dim=1)
            rows = rows + (math.log(weight) - coef * ms.base)
            terms.append(grouped_log1p_exp_sum(rows, anchors, n))
        losses = (1.0 / ms.alpha) * terms[0] + (1.0 / ms.beta) * terms[1]
        return {
            "loss": {
                "losses": losses.unsqueeze(1),
                "indices": torch.arange(n, device=mat.device),
                "reduction_type": "element",
            }
        }
