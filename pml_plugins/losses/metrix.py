"""Metrix: mixup for deep metric learning, as a loss wrapper (embedding mixing)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance
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

    Modes: ``"embed"`` mixes the embeddings here, in ``forward``. ``"feature"`` and
    ``"input"`` mix trunk outputs or images: use
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
        **loss_kwargs: Any,
    ) -> None:
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
        mixed_emb = lam * embeddings[first] + (1 - lam) * embeddings[second]
        mixed = self.compute_mixed_loss(embeddings, labels, mixed_emb, first, second, lam)
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
