"""PML's ``AccuracyCalculator`` plus Recall@K and clustering F1.

Metrics (all through PML's ``calculate_<name>`` mechanism, so PML's testers and hooks
log them like their own):

- PML's ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``, and, when
  clustering is on, ``NMI`` and ``AMI`` (k-means with k = number of query classes);
- ``recall_at_<K>`` for each configured K: the fraction of queries with at least one
  same-class item among their K nearest neighbours, the query itself excluded;
- ``F1``: the pairwise clustering F1 of Song et al. (CVPR 2016) for the same k-means.

``k`` (neighbours retrieved) is ``max(max_bin_count, max K)`` so MAP@R stays exact and
every Recall@K is defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator,
    nan_accuracy,
    try_getting_not_lone_labels,
)

KNN_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
CLUSTERING_METRICS = ("NMI", "AMI", "F1")


def recall_at_k(knn_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of ``knn_labels[:, :k]`` that contain the query's label."""
    hits = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def pairwise_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Pairwise F1 of a clustering: pairs in the same cluster vs pairs of the same class."""
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((li.max() + 1, ci.max() + 1), dtype=np.float64)
    np.add.at(table, (li, ci), 1.0)

    def pairs(n: np.ndarray) -> float:
        return float((n * (n - 1) / 2).sum())

    tp = pairs(table)
    predicted = pairs(table.sum(axis=0))
    actual = pairs(table.sum(axis=1))
    if tp == 0:
        return 0.0
    precision, recall = tp / predicted, tp / actual
    return 2 * precision * recall / (precision + recall)


class Calculator(AccuracyCalculator):
    """``AccuracyCalculator`` with ``recall_at_<K>`` for ``k_values`` and clustering ``F1``.

    Args:
        k_values: the K of Recall@K.
        clustering: compute NMI, AMI and F1 (k-means); off for very many classes.
        **kwargs: passed to PML's ``AccuracyCalculator`` (``knn_func``, ``device``, ...).
            ``k`` defaults to ``"max_bin_count"`` (never PML's full-neighbour default).
    """

    def __init__(self, k_values: Sequence[int] = (1, 2, 4, 8), clustering: bool = True, **kwargs):
        self.k_values = tuple(sorted({int(k) for k in k_values}))
        for k in self.k_values:
            setattr(self, f"calculate_recall_at_{k}", self._recall_metric(k))
        kwargs.setdefault("k", "max_bin_count")
        if not clustering:
            kwargs["exclude"] = tuple(set(kwargs.get("exclude", ())) | {"NMI", "AMI", "F1"})
        kwargs.setdefault("exclude", ())
        kwargs["exclude"] = tuple(
            set(kwargs["exclude"]) | {"mean_average_precision", "mean_reciprocal_rank"}
        )
        super().__init__(**kwargs)

    def _recall_metric(self, k: int):
        def calculate(knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
            knn_labels, query_labels = try_getting_not_lone_labels(
                knn_labels, query_labels, not_lone_query_mask
            )
            if knn_labels is None:
                return nan_accuracy(label_counts[0], self.return_per_class)
            return recall_at_k(knn_labels, query_labels.flatten(), k)

        return calculate

    def calculate_F1(self, query_labels, cluster_labels, **kwargs):
        return pairwise_f1(c_f.to_numpy(query_labels).ravel(), c_f.to_numpy(cluster_labels).ravel())

    def requires_clustering(self) -> list[str]:
        return [*super().requires_clustering(), "F1"]

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), *(f"recall_at_{k}" for k in self.k_values)]

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        most = num_reference_embeddings - int(ref_includes_query)
        return min(max(k, max(self.k_values, default=1)), most)
