"""Tuples anchored at the class representatives of a batch (Alternating Projections)."""

from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

IndicesTuple = tuple[torch.Tensor, ...]


class RepresentativeMiner(BaseMiner):
    """Returns only the tuples whose anchor is a class representative of the batch.

    From "Deep Metric Learning with Alternating Projections onto Feasible Sets", O. Can,
    Y. Z. Gürbüz, A. A. Alatan, ICIP 2021, https://arxiv.org/abs/1907.07585.

    In the paper's abstract, each relaxed feasible set enforces the proximity constraints
    "only for particular samples (a sample from each class)". The project reconstructs this
    as the pairs ``(r_c, x)`` whose anchor is the representative ``r_c`` of a class and
    whose other end is any sample ``x`` of the batch (or of ``ref_emb``). Whether the paper's
    loss uses only these tuples or the whole batch is unknown: this miner gives the former,
    and leaving it out gives the latter.

    Which batch positions hold representatives is not in the embeddings or labels: the
    caller gives a boolean mask over the batch with :meth:`set_representative_mask` before
    each call. :class:`pml_plugins.trainers.AlternatingProjections` does so for every
    batch, with the mask from :meth:`RepresentativeSampler.batch_info`. The mask stays
    until it is replaced.

    Output:

    - without ``inner_miner``: all representative-anchored positive and negative pairs
      ``(a1, p, a2, n)`` (``tuple_type="pairs"``, default) or all triplets ``(a, p, n)``
      with a representative anchor (``tuple_type="triplets"``);
    - with ``inner_miner``: the inner miner's tuples (in its format) whose anchor is a
      representative: for pairs, positive pairs with ``mask[a1]`` and negative pairs with
      ``mask[a2]``.

    With ``ref_emb``, anchors are batch positions and the other ends are ``ref_emb``
    positions; without, a sample is never paired with itself.

    Args:
        tuple_type: ``"pairs"`` or ``"triplets"`` (used without ``inner_miner``).
        inner_miner: a PML miner whose output is filtered, or ``None`` for all tuples.
        **kwargs: passed to PML's ``BaseMiner`` (e.g. ``collect_stats``).
    """

    def __init__(
        self, tuple_type: str = "pairs", inner_miner: BaseMiner | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if tuple_type not in ("pairs", "triplets"):
            raise ValueError(f"tuple_type must be 'pairs' or 'triplets', got {tuple_type!r}")
        self.tuple_type = tuple_type
        self.inner_miner = inner_miner
        self.representative_mask: torch.Tensor | None = None
        self.add_to_recordable_attributes(name="num_representatives", is_stat=True)

    def set_representative_mask(self, mask: torch.Tensor | None) -> None:
        """Marks the batch positions that hold a representative (``True``)."""
        self.representative_mask = None if mask is None else torch.as_tensor(mask).bool()

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> IndicesTuple:
        mask = self._mask_for(embeddings)
        if self.collect_stats:
            self.num_representatives = int(mask.sum())
        if self.inner_miner is not None:
            if ref_emb is embeddings:
                tuples = self.inner_miner(embeddings, labels)
            else:
                tuples = self.inner_miner(embeddings, labels, ref_emb, ref_labels)
        elif self.tuple_type == "pairs":
            tuples = lmu.get_all_pairs_indices(labels, ref_labels)
        else:  # triplets: only the representatives' rows, not PML's (B, B, B) get_all_triplets
            matches, diffs = lmu.get_matches_and_diffs(labels, ref_labels)
            anchors = torch.where(mask)[0]
            row, p, n = torch.where(matches[anchors].unsqueeze(2) & diffs[anchors].unsqueeze(1))
            return anchors[row], p, n
        return self.keep_representative_anchors(tuples, mask)

    @staticmethod
    def keep_representative_anchors(tuples: IndicesTuple, mask: torch.Tensor) -> IndicesTuple:
        """The tuples of ``tuples`` (pairs or triplets) whose anchor has ``mask`` True."""
        if len(tuples) == 4:
            a1, p, a2, n = tuples
            keep_pos, keep_neg = mask[a1], mask[a2]
            return a1[keep_pos], p[keep_pos], a2[keep_neg], n[keep_neg]
        a, p, n = tuples
        keep = mask[a]
        return a[keep], p[keep], n[keep]

    def _mask_for(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.representative_mask is None:
            raise ValueError(
                "RepresentativeMiner needs to know which batch positions are representatives: "
                "call set_representative_mask(mask) before mining (the AlternatingProjections "
                "trainer does this for every batch)"
            )
        mask = self.representative_mask.to(embeddings.device)
        if mask.shape != (len(embeddings),):
            raise ValueError(
                f"representative mask has shape {tuple(mask.shape)}, but the batch has "
                f"{len(embeddings)} embeddings"
            )
        return mask
