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

Back ends (chosen by :func:`default_knn_func` / :func:`default_kmeans_func` unless
``knn_func``/``kmeans_func`` are given):

- CUDA device and faiss built with GPU support: PML's ``FaissKNN`` on the calculator's GPU
  only (``gpus=[index]``, not every visible GPU) and faiss k-means on the GPU;
- faiss importable otherwise: PML's ``FaissKNN`` (exact ``IndexFlatL2``) and faiss
  k-means on the CPU (PML's defaults);
- no faiss: :class:`ChunkedKNN`, an exact torch search on the calculator's device, one
  block of queries at a time (memory O(chunk x N), never N x N), and scikit-learn's
  ``KMeans`` (:class:`SklearnKMeans`);
- CUDA device, faiss without GPU support: :class:`ChunkedKNN` on the GPU, faiss k-means on
  the CPU.

Label bookkeeping: for 1-D labels compared by equality, ``get_accuracy`` and the R-precision
and MAP@R metrics use :func:`label_match_counts`, :func:`lone_query_labels` and
:func:`relevance_mask` (O(N), same results) instead of PML's (classes x N) tables and loop
over the classes; other labels go through PML's code.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.accuracy_calculator import (
    EQUALITY,
    AccuracyCalculator,
    get_label_match_counts,
    get_lone_query_labels,
    maybe_get_avg_of_avgs,
    nan_accuracy,
)
from pytorch_metric_learning.utils.inference import return_results

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


#: bytes of one (chunk x N) distance block that :class:`ChunkedKNN` aims for by default
CHUNK_BYTES = 256 * 2**20


def faiss_module() -> Any | None:
    """The ``faiss`` module, or ``None`` where it cannot be imported."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def faiss_gpus() -> int:
    """How many GPUs faiss can use (0 for faiss-cpu or without faiss)."""
    faiss = faiss_module()
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


class ChunkedKNN:
    """Exact k nearest neighbours in torch, one chunk of queries at a time.

    Callable like PML's ``FaissKNN``: ``(query, k, reference, ref_includes_query) ->
    (distances, indices)``, both ``(len(query), k)`` on ``query``'s device, nearest first.
    With ``ref_includes_query`` the query itself is dropped from its own neighbours (PML's
    ``return_results``), so ``k`` neighbours remain.

    Args:
        metric: ``"l2"`` (default): squared Euclidean distances, ascending, as faiss's
            ``IndexFlatL2`` (PML's default index) returns them; ``"cosine"``: cosine
            similarity (embeddings normalised here), descending, as ``IndexFlatIP`` on
            normalised embeddings. On L2-normalised embeddings both give the same order.
        chunk_size: queries per block; the block's distance matrix is ``chunk_size x N``.
            Default: as many as fit in ``CHUNK_BYTES`` (256 MiB) of float32.
    """

    def __init__(self, metric: str = "l2", chunk_size: int | None = None) -> None:
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.metric = metric
        self.chunk_size = chunk_size

    def chunk_for(self, num_reference: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, CHUNK_BYTES // (4 * max(1, num_reference)))

    @torch.no_grad()
    def __call__(
        self,
        query: torch.Tensor,
        k: int,
        reference: torch.Tensor | None = None,
        ref_includes_query: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            raise ValueError("ChunkedKNN needs the reference embeddings (it keeps no index)")
        if ref_includes_query:
            k = k + 1
        if k > len(reference):
            raise ValueError(f"k={k} neighbours asked for, but the reference has {len(reference)}")
        query = query.float()
        reference = reference.to(query.device).float()
        largest = self.metric == "cosine"
        if largest:
            query = torch.nn.functional.normalize(query, dim=1)
            reference = torch.nn.functional.normalize(reference, dim=1)
        else:
            ref_sq = (reference * reference).sum(dim=1)
        distances = torch.empty(len(query), k, device=query.device)
        indices = torch.empty(len(query), k, device=query.device, dtype=torch.long)
        step = self.chunk_for(len(reference))
        for start in range(0, len(query), step):
            q = query[start : start + step]
            if largest:
                block = q @ reference.T
            else:  # |q|^2 + |r|^2 - 2 q.r in one (chunk x N) buffer, as faiss computes it
                block = (q * q).sum(dim=1, keepdim=True) + ref_sq
                block.addmm_(q, reference.T, alpha=-2).clamp_(min=0)
            d, i = torch.topk(block, k, dim=1, largest=largest, sorted=True)
            distances[start : start + len(q)] = d
            indices[start : start + len(q)] = i
            del block
        return return_results(distances, indices, ref_includes_query)


class SklearnKMeans:
    """k-means for the clustering metrics without faiss: scikit-learn's ``KMeans``.

    Callable like PML's ``FaissKMeans``: ``(x, nmb_clusters) -> cluster labels``. Defaults
    mirror PML's faiss call (20 iterations, one initialisation); the initialisation is
    k-means++ (faiss: random points), so the clusters differ from faiss's.
    """

    def __init__(self, max_iter: int = 20, n_init: int = 1, seed: int = 0) -> None:
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed

    def __call__(self, x: torch.Tensor, nmb_clusters: int) -> torch.Tensor:
        from sklearn.cluster import KMeans

        data = c_f.to_numpy(x).astype(np.float32)
        km = KMeans(
            n_clusters=nmb_clusters,
            n_init=self.n_init,
            max_iter=self.max_iter,
            random_state=self.seed,
        )
        return torch.as_tensor(km.fit_predict(data), dtype=torch.long, device=x.device)


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return c_f.use_cuda_if_available()
    return torch.device(device)


def default_knn_func(device: torch.device | str | None = None):
    """faiss-gpu on a CUDA ``device`` when faiss has GPUs, faiss-cpu, else :class:`ChunkedKNN`."""
    device = _as_device(device)
    if faiss_module() is None:
        return ChunkedKNN()
    from pytorch_metric_learning.utils.inference import FaissKNN

    if device.type == "cuda":
        if faiss_gpus() == 0:
            return ChunkedKNN()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return FaissKNN(gpus=[index])
    return FaissKNN()


def default_kmeans_func(device: torch.device | str | None = None):
    """faiss k-means (on the GPU where faiss has GPUs and ``device`` is CUDA), else sklearn."""
    device = _as_device(device)
    if faiss_module() is None:
        return SklearnKMeans()
    from pytorch_metric_learning.utils.inference import FaissKMeans

    return FaissKMeans(niter=20, gpu=device.type == "cuda" and faiss_gpus() > 0)


def label_match_counts(
    query_labels: torch.Tensor, reference_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_label_match_counts`` for 1-D labels and equality, in O(N) memory.

    ``(unique query labels (sorted), how many reference items carry each)``. PML compares
    every unique query label with every reference label: a (classes x N) table, about
    8 bytes per entry at its peak (0.49 GB at 2,857 classes x 20,000 items).
    """
    unique = torch.unique(query_labels)
    ref_unique, ref_counts = torch.unique(reference_labels, return_counts=True)
    if len(ref_unique) == 0:
        return unique, torch.zeros(len(unique), dtype=torch.long, device=unique.device)
    pos = torch.searchsorted(ref_unique, unique).clamp(max=len(ref_unique) - 1)
    found = ref_unique[pos] == unique
    return unique, torch.where(found, ref_counts[pos], torch.zeros_like(ref_counts[pos]))


def lone_query_labels(
    query_labels: torch.Tensor, label_counts: tuple, ref_includes_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_lone_query_labels`` for 1-D labels and equality, without an
    (N x lone labels) table: (labels without a match in the reference, not-lone mask)."""
    unique, counts = label_counts
    lone = unique[counts - int(ref_includes_query) <= 0]
    return lone, ~torch.isin(query_labels, lone)


def not_lone(
    knn_labels: torch.Tensor, query_labels: torch.Tensor, not_lone_query_mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PML's ``try_getting_not_lone_labels`` without a Python loop over the mask."""
    if not bool(not_lone_query_mask.any()):
        return None, None
    return knn_labels[not_lone_query_mask], query_labels[not_lone_query_mask]


def relevance_mask(
    gt_labels: torch.Tensor, label_counts: tuple, num_k: int, ref_includes_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_relevance_mask`` for 1-D labels, without its loop over the classes.

    Row i is True in its first R_i columns, R_i = the number of reference items with
    query i's label (less the query itself when the reference includes the queries).
    """
    unique, counts = label_counts
    count_per_query = counts[torch.searchsorted(unique, gt_labels)] - int(ref_includes_query)
    columns = torch.arange(num_k, device=gt_labels.device)
    return columns.unsqueeze(0) < count_per_query.unsqueeze(1), count_per_query


class Calculator(AccuracyCalculator):
    """``AccuracyCalculator`` with ``recall_at_<K>`` for ``k_values`` and clustering ``F1``.

    Args:
        k_values: the K of Recall@K.
        clustering: compute NMI, AMI and F1 (k-means); off for very many classes.
        **kwargs: passed to PML's ``AccuracyCalculator`` (``knn_func``, ``device``, ...).
            ``k`` defaults to ``"max_bin_count"`` (never PML's full-neighbour default);
            ``knn_func``/``kmeans_func`` default to :func:`default_knn_func` /
            :func:`default_kmeans_func` for ``device``, so the calculator also works
            without faiss.
    """

    def __init__(self, k_values: Sequence[int] = (1, 2, 4, 8), clustering: bool = True, **kwargs):
        self.k_values = tuple(sorted({int(k) for k in k_values}))
        for k in self.k_values:
            setattr(self, f"calculate_recall_at_{k}", self._recall_metric(k))
        kwargs.setdefault("k", "max_bin_count")
        if kwargs.get("knn_func") is None:
            kwargs["knn_func"] = default_knn_func(kwargs.get("device"))
        if kwargs.get("kmeans_func") is None:
            kwargs["kmeans_func"] = default_kmeans_func(kwargs.get("device"))
        if not clustering:
            kwargs["exclude"] = tuple(set(kwargs.get("exclude", ())) | {"NMI", "AMI", "F1"})
        kwargs.setdefault("exclude", ())
        kwargs["exclude"] = tuple(
            set(kwargs["exclude"]) | {"mean_average_precision", "mean_reciprocal_rank"}
        )
        super().__init__(**kwargs)

    # ------------------------------------------------------------ labels at scale
    # PML's label bookkeeping builds (classes x N) tables and loops over the classes; for
    # 1-D labels compared by equality (the usual case) the functions above give the same
    # numbers in O(N). Otherwise PML's own code runs.

    def _fast_labels(self, labels: torch.Tensor) -> bool:
        return self.label_comparison_fn is EQUALITY and labels.dim() == 1

    def get_accuracy(
        self,
        query,
        query_labels,
        reference=None,
        reference_labels=None,
        ref_includes_query=False,
        include=(),
        exclude=(),
    ):
        """PML's ``get_accuracy`` (2.9), with :func:`label_match_counts` and
        :func:`lone_query_labels` for 1-D labels."""
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        same = reference is query and reference_labels is query_labels
        query, reference, query_labels, reference_labels = [
            c_f.numpy_to_torch(x).to(self.device).type(torch.float)
            for x in [query, reference, query_labels, reference_labels]
        ]
        if len(query) != len(query_labels) or len(reference) != len(reference_labels):
            raise ValueError("embeddings and labels must have the same length")
        if (
            ref_includes_query
            and not same
            and not (
                torch.allclose(query, reference[: len(query)])
                and torch.allclose(query_labels, reference_labels[: len(query)])
            )
        ):
            raise ValueError(
                "When ref_includes_query is True, the first len(query) elements of reference "
                "must be equal to query, and likewise for the labels"
            )
        self.curr_function_dict = self.get_function_dict(include, exclude)
        kwargs = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
            "label_comparison_fn": self.label_comparison_fn,
        }
        metrics = self.get_curr_metrics()
        if any(x in self.requires_knn() for x in metrics):
            fast = self._fast_labels(query_labels) and reference_labels.dim() == 1
            if fast:
                label_counts = label_match_counts(query_labels, reference_labels)
                lone, not_lone_query_mask = lone_query_labels(
                    query_labels, label_counts, ref_includes_query
                )
            else:
                label_counts = get_label_match_counts(
                    query_labels, reference_labels, self.label_comparison_fn
                )
                lone, not_lone_query_mask = get_lone_query_labels(
                    query_labels, label_counts, ref_includes_query, self.label_comparison_fn
                )
            num_k = self.determine_k(label_counts[1], len(reference), ref_includes_query)
            knn_distances, knn_indices = self.knn_func(query, num_k, reference, ref_includes_query)
            if not bool(not_lone_query_mask.any()):
                c_f.LOGGER.warning("None of the query labels are in the reference set.")
            kwargs.update(
                label_counts=label_counts,
                knn_labels=reference_labels[knn_indices],
                knn_distances=knn_distances,
                lone_query_labels=lone,
                not_lone_query_mask=not_lone_query_mask,
            )
        if any(x in self.requires_clustering() for x in metrics):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
        return self._get_accuracy(self.curr_function_dict, **kwargs)

    def _at_r(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts
    ):
        """(same-label, relevance mask, R per query, labels) of the non-lone queries."""
        knn_labels, query_labels = not_lone(knn_labels, query_labels, not_lone_query_mask)
        if knn_labels is None:
            return None
        mask, count = relevance_mask(
            query_labels, label_counts, knn_labels.shape[1], ref_includes_query
        )
        gt = query_labels[:, None]
        return self.label_comparison_fn(gt, knn_labels), mask, count, gt

    def calculate_r_precision(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kw
    ):
        """PML's R-precision; the relevance mask from :func:`relevance_mask` (1-D labels)."""
        if not self._fast_labels(query_labels):
            return super().calculate_r_precision(
                knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts
            )
        parts = self._at_r(
            knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts
        )
        if parts is None:
            return nan_accuracy(label_counts[0], self.return_per_class)
        same_label, mask, _, gt = parts
        matches_per_row = torch.sum(same_label * mask, dim=1)
        accuracy = matches_per_row.type(torch.float64) / torch.sum(mask, dim=1)
        return maybe_get_avg_of_avgs(accuracy, gt, self.avg_of_avgs, self.return_per_class)

    def calculate_mean_average_precision_at_r(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kw
    ):
        """PML's MAP@R; the relevance mask from :func:`relevance_mask` (1-D labels)."""
        if not self._fast_labels(query_labels):
            return super().calculate_mean_average_precision_at_r(
                knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts
            )
        parts = self._at_r(
            knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts
        )
        if parts is None:
            return nan_accuracy(label_counts[0], self.return_per_class)
        same_label, mask, count, gt = parts
        num_samples, num_k = same_label.shape
        equality = same_label * mask
        cumulative_correct = torch.cumsum(equality, dim=1)
        k_idx = torch.arange(1, num_k + 1, device=gt.device).repeat(num_samples, 1)
        precision_at_ks = (cumulative_correct * equality).type(torch.float64) / k_idx
        accuracy = torch.sum(precision_at_ks * mask, dim=1) / count
        return maybe_get_avg_of_avgs(accuracy, gt, self.avg_of_avgs, self.return_per_class)

    def _recall_metric(self, k: int):
        def calculate(knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
            knn_labels, query_labels = not_lone(knn_labels, query_labels, not_lone_query_mask)
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
