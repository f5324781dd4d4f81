"""Metrix's mixing pairs: which points are mixed and which anchor sees which mixed point."""

from __future__ import annotations

from functools import cached_property

import torch
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

#: which positives of an anchor are mixed with its negatives
POSITIVES = ("first", "all")


class MixedPairs:
    r"""The (anchor, mixed point) pairs of Metrix's mixed term, stored as rows.

    Row r pairs the anchor ``anchors[r]`` with the mixed points
    :math:`v = \lambda x_{f} + (1-\lambda) x_s`, :math:`f` = ``firsts[r]``, for every column
    s with ``seen[r, s]``. :math:`f` is a positive of the anchor, or the anchor itself
    when it has no positive; s is a negative of the anchor. Every pair therefore has the
    soft label :math:`y = \lambda` (a positive-negative or anchor-negative mix, Metrix §4.2).

    Args:
        anchors, firsts: (R,) batch indices.
        seen: (R, B) boolean, B the batch size.
    """

    def __init__(self, anchors: torch.Tensor, firsts: torch.Tensor, seen: torch.Tensor):
        self.anchors = anchors
        self.firsts = firsts
        self.seen = seen

    @property
    def batch_size(self) -> int:
        return self.seen.shape[1]

    @cached_property
    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, second)`` of every pair, row-major."""
        return torch.where(self.seen)

    @cached_property
    def points(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(first, second, point)``: the distinct mixed points (sorted by first, then
        second) and, for every pair of :attr:`entries`, the index of its point."""
        rows, seconds = self.entries
        n = self.batch_size
        keys, point = torch.unique(self.firsts[rows] * n + seconds, return_inverse=True)
        return keys // n, keys % n, point

    @property
    def num_pairs(self) -> int:
        return len(self.entries[0])

    @property
    def num_points(self) -> int:
        return len(self.points[0])

    def pair_anchors(self) -> torch.Tensor:
        """The anchor of every pair of :attr:`entries`."""
        return self.anchors[self.entries[0]]


def candidate_masks(
    labels: torch.Tensor, indices_tuple: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) positive and negative masks: every pair of the labels, or only the pairs of
    ``indices_tuple`` (pairs or triplets, e.g. a miner's output)."""
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    if indices_tuple is None:
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        return same & ~eye, ~same
    a1, p, a2, neg = lmu.convert_to_pairs(indices_tuple, labels)
    pos = torch.zeros(n, n, dtype=torch.bool, device=labels.device)
    negative = torch.zeros_like(pos)
    pos[a1, p] = True
    negative[a2, neg] = True
    return pos & ~eye, negative


def hardest_negatives(
    negatives: torch.Tensor, embeddings: torch.Tensor, distance: BaseDistance
) -> torch.Tensor:
    """The mask keeping each anchor's hardest negative only: the most similar (closest)
    candidate of ``negatives`` under ``distance`` of the detached ``embeddings``."""
    with torch.no_grad():
        mat = distance(embeddings.detach())
        if distance.is_inverted:
            hardest = mat.masked_fill(~negatives, float("-inf")).argmax(dim=1)
        else:
            hardest = mat.masked_fill(~negatives, float("inf")).argmin(dim=1)
    one = torch.zeros_like(negatives)
    one[torch.arange(len(one), device=one.device), hardest] = True
    return one & negatives.any(dim=1, keepdim=True)


def mixed_pairs(
    labels: torch.Tensor,
    indices_tuple: tuple | None = None,
    positives: str = "first",
    hardest: tuple[torch.Tensor, BaseDistance] | None = None,
) -> MixedPairs:
    r"""Metrix's mixing pairs of a batch, from the candidate pairs of each anchor.

    The candidates are every pair of the batch, or those of ``indices_tuple`` (the mined
    pairs, as the authors' MS code). An anchor a with a positive candidate is mixed
    positive-negative: :math:`\lambda x_p + (1-\lambda) x_n` for each negative n of a, with

    - ``positives="first"``: p = a's first positive (the lowest batch index), as the
      authors' feature and embed code;
    - ``positives="all"``: every positive p of a (the authors' input-mode code).

    An anchor without a positive is mixed anchor-negative, :math:`\lambda x_a +
    (1-\lambda) x_n`. ``hardest=(embeddings, distance)`` keeps only each anchor's hardest
    negative (:func:`hardest_negatives`, the authors' input mode). Each (anchor, p, n)
    triple appears once.
    """
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    pos, neg = candidate_masks(labels, indices_tuple)
    if hardest is not None and len(labels) > 0:
        neg = hardest_negatives(neg, *hardest)
    idx = torch.arange(len(labels), device=labels.device)
    has_pos = pos.any(dim=1)
    if positives == "first":
        anchors = idx
        first_pos = pos.to(torch.uint8).argmax(dim=1) if len(labels) > 0 else idx
        firsts = torch.where(has_pos, first_pos, idx)
    else:
        anchors, firsts = torch.where(pos | (torch.diag(~has_pos)))
    seen = neg.index_select(0, anchors)
    keep = seen.any(dim=1)
    return MixedPairs(anchors[keep], firsts[keep], seen[keep])


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
