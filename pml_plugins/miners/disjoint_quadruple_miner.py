"""Pairs inside disjoint quadruples (two classes x two samples), GradML's batch layout."""

from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import common_functions as c_f


class DisjointQuadrupleMiner(BaseMiner):
    """Splits a batch into disjoint quadruples and returns the pairs inside each.

    Quadruple ``q`` is ``(x1, x2 | y1, y2)``: the first two samples (in batch order) of the
    batch's class ``2q`` and of its class ``2q + 1``, where classes are numbered in the order
    of their first appearance in the batch. Classes with fewer than two samples are left
    out, and so is the last class when an odd number of classes remains. Samples beyond the
    first two of a class are not used.

    Output: ``(a1, p, a2, n)``, with the two positive pairs ``(x1, x2)``, ``(y1, y2)`` and the
    four negative pairs ``(x1, y1), (x1, y2), (x2, y1), (x2, y2)`` of every quadruple, each
    pair once. With :class:`pml_plugins.losses.GradMLLoss` this gives the mean over quadruples
    of GradML's eq. (11), the O(batch size) setting of the paper. A batch from PML's
    ``MPerClassSampler(m=2)`` with an even number of classes is used completely.

    The layout (classes paired in order, the first two samples each) is a project decision:
    the paper states the O(B) cost and the quadruple, not how a batch is split.

    The embeddings are not looked at. ``ref_emb``/``ref_labels`` are not supported.
    """

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        x1, x2, y1, y2 = self.quadruples(labels)
        a1 = torch.cat([x1, y1])
        p = torch.cat([x2, y2])
        a2 = torch.cat([x1, x1, x2, x2])
        n = torch.cat([y1, y2, y1, y2])
        return a1, p, a2, n

    @staticmethod
    def quadruples(
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices ``x1, x2, y1, y2``, one entry per quadruple."""
        order = torch.sort(labels, stable=True).indices
        _, counts = torch.unique_consecutive(labels[order], return_counts=True)
        starts = (torch.cumsum(counts, 0) - counts)[counts >= 2]
        first, second = order[starts], order[starts + 1]
        by_appearance = torch.argsort(first)
        first, second = first[by_appearance], second[by_appearance]
        num_quads = len(first) // 2
        first = first[: 2 * num_quads].view(num_quads, 2)
        second = second[: 2 * num_quads].view(num_quads, 2)
        return first[:, 0], second[:, 0], first[:, 1], second[:, 1]
