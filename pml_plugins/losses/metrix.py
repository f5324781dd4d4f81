"""Metrix: mixup for deep metric learning, as a loss wrapper (embedding mixing)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseLossWrapper
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from .metrix_gram import (
    gram_distance_supported,
    matmul_fp32,
    mixed_squared_norms,
    proxy_distances,
    record_distance_stats,
    row_distances,
)
from .metrix_pairs import POSITIVES, MixedPairs, mixed_labels, mixed_pairs
from .precision import LOW_PRECISION, compute_dtype
from .soft_contrastive import SoftContrastiveLoss
from .soft_labels import reduce_loss_dict
from .soft_multi_similarity import SoftMultiSimilarityLoss
from .soft_proxy_anchor import SoftProxyAnchorLoss

#: inner losses by name, with the hyperparameters of the Metrix code
METRIX_LOSSES: dict[str, tuple[type, dict[str, Any]]] = {
    "contrastive": (SoftContrastiveLoss, {"pos_margin": 0.0, "neg_margin": 0.5}),
    "multi_similarity": (SoftMultiSimilarityLoss, {"alpha": 17.97, "beta": 75.66, "base": 0.77}),
    "proxy_anchor": (SoftProxyAnchorLoss, {"margin": 0.1, "alpha": 32.0}),
}
MODES = ("embed", "feature", "input")


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

    Mixed points (:func:`~pml_plugins.losses.metrix_pairs.mixed_pairs`): an anchor with a
    positive sees :math:`\lambda x_p + (1-\lambda) x_n` for its negatives n, with p its
    *first* positive (``positives="first"``, the authors' feature and embed code) or each of
    its positives (``positives="all"``, the authors' input-mode code); an anchor without a
    positive sees :math:`\lambda x_a + (1-\lambda) x_n`. All these pairs have the label
    :math:`y = \lambda`; each (anchor, p, n) triple is mixed once. The candidate positives
    and negatives are the clean loss's pairs (``mine_mixed=True``: the miner's output or the
    given ``indices_tuple``, as the authors' MS code) or every pair of the batch.
    ``anchor_pairs="all"`` lets every anchor see every mixed point, with
    :func:`~pml_plugins.losses.metrix_pairs.mixed_labels` (negative-negative mixes get
    :math:`y = 0`). For Proxy-Anchor the anchors are the proxies and a mix of classes c, c'
    has membership λ in c and 1-λ in c'.

    Modes: ``"embed"`` mixes the embeddings here, in ``forward``. ``"feature"`` and
    ``"input"`` mix trunk feature maps or images: use
    :class:`pml_plugins.trainers.MetrixTrainer`, which calls :meth:`compute_mixed_loss`; in
    these modes ``forward`` returns the clean loss only.

    Args:
        loss: ``"multi_similarity"`` (default), ``"contrastive"``, ``"proxy_anchor"``, or an
            instance of ``SoftMultiSimilarityLoss``/``SoftContrastiveLoss``/
            ``SoftProxyAnchorLoss``.
        mode: ``"embed"``, ``"feature"`` or ``"input"``.
        alpha: :math:`\alpha` of :math:`\mathrm{Beta}(\alpha, \alpha)` (default 2).
        weight: :math:`w`, the weight of the mixed loss (default 0.4).
        lam: a fixed :math:`\lambda` in [0, 1] instead of sampling (tests, ablations).
        miner: miner of the clean loss, used when no ``indices_tuple`` is given.
            ``"default"``: the inner loss's ``metrix_miner()``, none if it has none (Metrix's
            setting: ``MultiSimilarityMiner(epsilon=0.39)`` for multi-similarity).
        positives: ``"first"`` or ``"all"``, see above. ``None`` (default): the authors'
            choice for the mode, ``"all"`` in input mode and ``"first"`` otherwise.
        negatives: ``"all"`` mixes with every negative; ``"hardest"`` with each anchor's
            hardest negative only. ``None`` (default): ``"hardest"`` in input mode (the
            authors'), ``"all"`` otherwise.
        mine_mixed: whether the mixing pairs come from the clean loss's pairs (default
            True, the authors' MS code builds its mixes from the mined pairs) or from every
            pair of the batch. Without a miner and an ``indices_tuple`` both are the same.
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

    ``labels`` are required; ``indices_tuple`` goes to the clean loss (and, with
    ``mine_mixed``, chooses the mixing pairs); ``ref_emb`` is not supported (mixing is
    defined within the batch).

    Stats: ``mix_lambda``, ``clean_loss``, ``mixed_loss`` (unweighted), ``num_mixed``
    (distinct mixed points), ``num_mixed_pairs`` ((anchor, mixed point) pairs).

    Paper vs project: the soft-label losses, Beta(2, 2), one λ per iteration, w = 0.4, the
    pair types, their labels and their choice (first positive in feature/embed mode, every
    positive with the anchor's hardest negative in input mode, mixes from the mined pairs),
    and the MS/PA/contrastive constants are the paper's and its code's. Project decisions:
    the paper's soft-label MS loss instead of the released code's (which scales the clean
    positive term by λ and drops the mixed negatives); both pair branches every iteration
    instead of a coin flip between them (the authors' MS code has only the
    positive-negative branch); each triple mixed once (the code repeats a triple once per
    positive of the anchor); one weight 0.4 for every branch (the code uses 0.3 for
    contrastive anchor-negative mixes); the derived Proxy-Anchor labels.
    """

    def __init__(
        self,
        loss: str | torch.nn.Module = "multi_similarity",
        mode: str = "embed",
        alpha: float = 2.0,
        weight: float = 0.4,
        lam: float | None = None,
        miner: BaseMiner | str | None = "default",
        positives: str | None = None,
        negatives: str | None = None,
        mine_mixed: bool = True,
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
        if positives is None:
            positives = "all" if mode == "input" else "first"
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
        if negatives is None:
            negatives = "hardest" if mode == "input" else "all"
        if negatives not in ("all", "hardest"):
            raise ValueError(f"negatives must be 'all' or 'hardest', got {negatives!r}")
        if anchor_pairs not in ("own", "all"):
            raise ValueError(f"anchor_pairs must be 'own' or 'all', got {anchor_pairs!r}")
        if miner == "default":
            miner = inner.metrix_miner() if hasattr(inner, "metrix_miner") else None
        elif isinstance(miner, str):
            raise ValueError(f"miner must be a miner, None or 'default', got {miner!r}")
        self.loss = inner
        self.miner = miner
        self.mode = mode
        self.alpha = float(alpha)
        self.weight = float(weight)
        self.lam = None if lam is None else float(lam)
        self.positives = positives
        self.negatives = negatives
        self.mine_mixed = bool(mine_mixed)
        self.anchor_pairs = anchor_pairs
        self._beta: tuple[float, torch.distributions.Beta] | None = None
        self.add_to_recordable_attributes(list_of_names=["alpha", "weight"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=[
                "mix_lambda",
                "clean_loss",
                "mixed_loss",
                "num_mixed",
                "num_mixed_pairs",
            ],
            is_stat=True,
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
        indices_tuple = self.clean_indices(embeddings, labels, indices_tuple)
        clean = self.compute_clean_loss(embeddings, labels, indices_tuple)
        if self.mode != "embed":
            return clean
        lam = self.sample_lambda()
        pairs = self.mixing_pairs(labels, embeddings, indices_tuple)
        mixed = self.compute_embed_mixed_loss(embeddings, labels, pairs, lam)
        return clean + self.weight * mixed

    def clean_indices(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: tuple | None = None
    ) -> tuple | None:
        """The clean loss's ``indices_tuple``: the given one, else ``miner``'s (if any)."""
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels)
        return indices_tuple

    def compute_clean_loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple: tuple | None = None
    ) -> torch.Tensor:
        """The inner loss on the clean batch (see :meth:`clean_indices` for its pairs)."""
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
        self,
        labels: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        indices_tuple: tuple | None = None,
    ) -> MixedPairs:
        """The (anchor, mixed point) pairs of the batch (see
        :func:`~pml_plugins.losses.metrix_pairs.mixed_pairs`). ``indices_tuple``: the clean
        loss's pairs (:meth:`clean_indices`), used where ``mine_mixed``; ``embeddings``: for
        ``negatives="hardest"``."""
        hardest = None
        if self.negatives == "hardest":
            if embeddings is None:
                raise ValueError("hardest negatives need the embeddings")
            hardest = (embeddings, self.loss.distance)
        candidates = indices_tuple if self.mine_mixed else None
        return mixed_pairs(labels, candidates, self.positives, hardest)

    def mix_labels(
        self, labels: torch.Tensor, pairs: MixedPairs, lam: float, dtype: torch.dtype
    ) -> torch.Tensor:
        """Soft labels of the mixed points of ``pairs.points``: (B, M) anchors x mixed
        points, NaN where the anchor does not see the point; (M, num_classes) memberships for
        Proxy-Anchor."""
        first, second, point = pairs.points
        if self.loss.proxy_anchors:  # the anchors are the proxies, one per class
            classes = torch.arange(self.loss.num_classes, device=labels.device)
            y = mixed_labels(classes, labels[first], labels[second], lam)  # (C, M)
            return y.T.contiguous().to(dtype)
        if self.anchor_pairs == "all":
            return mixed_labels(labels, labels[first], labels[second], lam).to(dtype)
        y = torch.full((len(labels), len(first)), float("nan"), dtype=dtype, device=labels.device)
        y[pairs.pair_anchors(), point] = torch.tensor(lam, dtype=torch.float64).to(dtype)
        return y

    def compute_mixed_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        mixed_emb: torch.Tensor,
        pairs: MixedPairs,
        lam: float,
    ) -> torch.Tensor:
        r"""The unweighted soft-label loss :math:`\tilde\ell` of the mixed points.

        ``embeddings``/``labels``: the clean batch (the anchors); ``mixed_emb`` (M, d): the
        embeddings of the points ``pairs.points``, :math:`\lambda x_{first} +
        (1-\lambda) x_{second}` mixed at any stage.
        """
        labels = c_f.to_device(labels, embeddings)
        dtype = compute_dtype(embeddings.dtype)
        y = self.mix_labels(labels, pairs, lam, dtype)
        anchors = () if self.loss.proxy_anchors else (embeddings,)  # or the loss's proxies
        mixed = self.loss.soft_loss(*anchors, mixed_emb, y)
        self._record_mixed(mixed, pairs)
        return mixed

    def _record_mixed(self, mixed: torch.Tensor, pairs: MixedPairs) -> None:
        if self.collect_stats:
            with torch.no_grad():
                self.mixed_loss = float(mixed)
                self.num_mixed = pairs.num_points
                self.num_mixed_pairs = pairs.num_pairs

    def build_mixed_embeddings(
        self, embeddings: torch.Tensor, pairs: MixedPairs, lam: float
    ) -> torch.Tensor:
        r"""The M mixed points of ``pairs.points``, :math:`\lambda x_{first} + (1-\lambda)
        x_{second}`, from ``embeddings`` (B, ...) on any device: the embeddings here, the
        trunk outputs, feature maps or images in ``MetrixTrainer``'s other modes."""
        first, second, _ = pairs.points
        first, second = first.to(embeddings.device), second.to(embeddings.device)
        return lam * embeddings[first] + (1 - lam) * embeddings[second]

    def gram_path_applies(self) -> bool:
        """Whether :meth:`compute_embed_mixed_loss` skips building the mixed points: the inner
        loss's own class (not a base class) declares ``supports_gram_path``, its distance is
        PML's cosine, dot-product or Euclidean one, ``anchor_pairs="own"``, and for
        Proxy-Anchor there is no embedding regularizer (it would need the mixed embeddings)."""
        loss = self.loss
        declared = vars(type(loss)).get("supports_gram_path", False)  # not inherited
        own = (
            loss.embedding_regularizer is None if loss.proxy_anchors else self.anchor_pairs == "own"
        )
        return declared and own and gram_distance_supported(loss.distance)

    def compute_embed_mixed_loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: MixedPairs, lam: float
    ) -> torch.Tensor:
        r"""Embed mode's :meth:`compute_mixed_loss`, without building the mixed points where
        :meth:`gram_path_applies`.

        Contrastive and MS: the distances of each row's anchor to its mixed points, (R, B)
        from the Gram matrix (:func:`~pml_plugins.losses.metrix_gram.row_distances`):
        O(B^2 d + R B), R = B rows with ``positives="first"``, instead of O(B M d) for the
        M mixed points, to the inner loss's ``mixed_loss_dict``. Proxy-Anchor: the (M, C)
        distances to the proxies from :math:`E P^\top`
        (:func:`~pml_plugins.losses.metrix_gram.proxy_distances`), to its ``mat_loss_dict``.
        Same loss, reducer input and stats as the generic path up to rounding, except that the
        Euclidean distance of a mixed point that is its own anchor (λ = 1) is exactly 0, and
        that Proxy-Anchor's reducer gets the clean embeddings instead of the mixed ones
        (PML's reducers use them for dtype, device and zero losses only).
        """
        labels = c_f.to_device(labels, embeddings)
        if pairs.num_pairs == 0 or not self.gram_path_applies():
            mixed_emb = self.build_mixed_embeddings(embeddings, pairs, lam)
            return self.compute_mixed_loss(embeddings, labels, mixed_emb, pairs, lam)
        dtype = compute_dtype(embeddings.dtype)
        loss = self.loss
        loss.reset_stats()
        gram = matmul_fp32(embeddings, embeddings.T)
        if loss.proxy_anchors:
            loss.cast_types(embeddings.dtype, embeddings.device)
            first, second, _ = pairs.points
            mat = proxy_distances(loss.distance, embeddings, loss.proxies, gram, first, second, lam)
            loss_dict = loss.mat_loss_dict(mat, self.mix_labels(labels, pairs, lam, dtype))
        else:
            mat = row_distances(loss.distance, gram, pairs, lam)
            y = torch.tensor(lam, dtype=torch.float64).to(dtype)  # every pair's label
            loss_dict = loss.mixed_loss_dict(mat, pairs, y)
            record_distance_stats(
                loss.distance,
                gram.diagonal,
                lambda: mixed_squared_norms(gram, *pairs.points[:2], lam),
            )
        mixed = reduce_loss_dict(loss, loss_dict, embeddings)
        if embeddings.dtype in LOW_PRECISION:
            mixed = mixed.to(embeddings.dtype)  # the generic path's dtype
        self._record_mixed(mixed, pairs)
        return mixed
