"""PML's ``AccuracyCalculator`` plus Recall@K and clustering F1.

Metrics (all through PML's ``calculate_<name>`` mechanism, so PML's testers and hooks
log them like their own):

- PML's ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``, and, when
  clustering is on, ``NMI`` and ``AMI`` (k-means with k = number of query classes);
- ``recall_at_<K>`` for each configured K: the fraction of queries with at least one
  same-class item among their K nearest neighbours, the query itself excluded;
- ``F1``: the pairwise clustering F1 of Song et al. (CVPR 2016) for the same k-means.

``k`` defaults to ``"max_bin_count"``, so MAP@R stays exact without PML's all-neighbour
search; every other ``k`` is PML's. The search retrieves the K nearest neighbours where
Recall@K needs more than ``k``; PML's metrics see the first ``k`` of them.
PML's ``mean_average_precision`` and ``mean_reciprocal_rank`` are computed when ``include``
names them.

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

Label bookkeeping: for 1-D labels compared by equality, ``get_accuracy`` and the R-precision,
MAP@R and MAP metrics use :func:`label_match_counts`, :func:`lone_query_labels` and
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

CLUSTERING_METRICS = ("NMI", "AMI", "F1")
#: PML's metrics that :class:`Calculator` computes only when ``include`` names them
OPT_IN_METRICS = ("mean_average_precision", "mean_reciprocal_rank")


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
    return unique, _counts_of(unique, *torch.unique(reference_labels, return_counts=True))


def _counts_of(labels: torch.Tensor, unique: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per label, ``counts[j]`` where ``unique[j]`` (sorted) is that label, else 0."""
    if len(unique) == 0:
        return torch.zeros(len(labels), dtype=torch.long, device=labels.device)
    pos = torch.searchsorted(unique, labels).clamp(max=len(unique) - 1)
    return torch.where(unique[pos] == labels, counts[pos], 0)


def sorted_label_counts(
    label_counts: Sequence, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique labels, counts)`` as tensors on ``device``, sorted by label.

    PML's metric hooks take ``label_counts`` as tensors (``get_label_match_counts``) or as
    plain sequences (its own unit tests pass lists), in any label order.
    """
    unique, counts = (torch.as_tensor(x, device=device) for x in label_counts)
    order = torch.argsort(unique)
    return unique[order], counts[order].long()


def lone_query_labels(
    query_labels: torch.Tensor, label_counts: Sequence, ref_includes_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_lone_query_labels`` for 1-D labels and equality, without an
    (N x lone labels) table: (labels without a match in the reference, not-lone mask)."""
    unique, counts = sorted_label_counts(label_counts, query_labels.device)
    lone = unique[counts - int(ref_includes_query) <= 0]
    return lone, ~torch.isin(query_labels, lone.to(query_labels.dtype))


def not_lone(
    knn_labels: torch.Tensor, query_labels: torch.Tensor, not_lone_query_mask: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PML's ``try_getting_not_lone_labels`` without a Python loop over the mask."""
    if not bool(not_lone_query_mask.any()):
        return None, None
    return knn_labels[not_lone_query_mask], query_labels[not_lone_query_mask]


def relevance_mask(
    gt_labels: torch.Tensor, label_counts: Sequence, num_k: int, ref_includes_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PML's ``get_relevance_mask`` for 1-D labels, without its loop over the classes.

    Row i is True in its first R_i columns, R_i = the number of reference items with
    query i's label (less the query itself when the reference includes the queries); a
    label missing from ``label_counts`` gets R_i = 0, as in PML.
    """
    unique, counts = sorted_label_counts(label_counts, gt_labels.device)
    count_per_query = _counts_of(
        gt_labels, unique.to(gt_labels.dtype), counts - int(ref_includes_query)
    )
    columns = torch.arange(num_k, device=gt_labels.device)
    return columns.unsqueeze(0) < count_per_query.unsqueeze(1), count_per_query


class Calculator(AccuracyCalculator):
    """``AccuracyCalculator`` with ``recall_at_<K>`` for ``k_values`` and clustering ``F1``.

    It accepts every argument of PML's ``AccuracyCalculator`` with PML's meaning; two
    defaults differ, for large test sets:

    - ``k`` defaults to ``"max_bin_count"`` (PML: ``None``, every reference item a
      neighbour). ``k`` is exactly PML's: an integer, ``"max_bin_count"`` or ``None``; PML's
      metrics see exactly the neighbours PML's ``determine_k`` gives (an integer ``k``
      below the largest class gets PML's warning and PML's truncated R-precision and
      MAP@R).
    - With an empty ``include`` (at construction and in ``get_accuracy``), the metrics are
      ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``, the
      ``recall_at_<K>``, and ``NMI``, ``AMI`` and ``F1``, less ``exclude``. PML's
      ``mean_average_precision`` and ``mean_reciprocal_rank`` (``OPT_IN_METRICS``) are
      computed when named in ``include``, at construction or in ``get_accuracy``. ``F1``
      uses the k-means of NMI and AMI and is computed with them: excluding both NMI and
      AMI turns it off too (no k-means runs, as in PML), unless ``include`` names it.

    Recall@K needs the K nearest neighbours. The search retrieves ``max(k', min(K, M))``
    neighbours, ``k'`` the ``determine_k`` count, K the largest Recall@K computed and M
    the reference items other than the query; PML's metrics get the first ``k'`` of them
    (``knn_labels``, ``knn_distances``) and Recall@K the whole list (``recall_knn_labels``).
    So with an integer ``k`` below K, PML's metrics are PML's for that ``k`` and every
    Recall@K is still exact. A Recall@K hook given fewer than K neighbours and not the
    whole reference (``_get_accuracy`` called directly) returns NaN, with a warning.

    Recall@K follows ``avg_of_avgs``, ``return_per_class`` and ``label_comparison_fn`` as
    PML's precision_at_1 does. The metric hooks take ``label_counts`` as PML's functions
    return them or as plain sequences (PML's own tests), in any label order.
    ``mean_reciprocal_rank`` alone retrieves neighbours (PML 2.9's does not).

    Args:
        k_values: the K of Recall@K.
        clustering: compute NMI, AMI and F1 (k-means); ``False`` adds them to ``exclude``
            (off for very many classes).
        include, exclude, avg_of_avgs, return_per_class, k, label_comparison_fn, device:
            PML's (``k``'s default differs, see above).
        knn_func, kmeans_func: PML's; ``None`` gives :func:`default_knn_func` /
            :func:`default_kmeans_func` for ``device``, so the calculator also works
            without faiss.
    """

    #: the metrics an empty ``include`` computes (set once the parent's init has run)
    _default_metrics: tuple[str, ...] | None = None

    def __init__(
        self,
        k_values: Sequence[int] = (1, 2, 4, 8),
        clustering: bool = True,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = "max_bin_count",
        label_comparison_fn=None,
        device: torch.device | str | None = None,
        knn_func=None,
        kmeans_func=None,
    ) -> None:
        self.k_values = tuple(sorted({int(x) for x in k_values}))
        for x in self.k_values:
            setattr(self, f"calculate_recall_at_{x}", self._recall_metric(x))
        if not clustering and isinstance(exclude, (tuple, list)):
            exclude = (*exclude, *(m for m in CLUSTERING_METRICS if m not in exclude))
        super().__init__(
            include=include,
            exclude=exclude,
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            k=k,
            label_comparison_fn=None,  # set below, once the default metrics are known
            device=device,
            knn_func=default_knn_func(device) if knn_func is None else knn_func,
            kmeans_func=default_kmeans_func(device) if kmeans_func is None else kmeans_func,
        )
        self._default_metrics = self.default_metrics(include)
        self.curr_function_dict = self.get_function_dict()
        if label_comparison_fn:
            self.label_comparison_fn = label_comparison_fn
            if any(x in self.requires_clustering() for x in self.get_curr_metrics()):
                raise NotImplementedError("Unsupported: clustering + custom label comparison")

    # ------------------------------------------------------------ metric selection

    def default_metrics(self, include: Sequence[str] = ()) -> tuple[str, ...]:
        """The metrics of an empty ``include`` in ``get_accuracy`` (see the class doc)."""
        names = list(self.original_function_dict)
        if len(include) > 0:  # the constructor named them: all of them
            return tuple(names)
        names = [m for m in names if m not in OPT_IN_METRICS]
        if not {"NMI", "AMI"} & set(names):
            names = [m for m in names if m != "F1"]
        return tuple(names)

    def get_function_dict(self, include: Sequence[str] = (), exclude: Sequence[str] = ()):
        """PML's, but an empty ``include`` means :meth:`default_metrics`."""
        if len(include) == 0 and self._default_metrics is not None:
            return {
                name: fn
                for name, fn in self.original_function_dict.items()
                if name in self._default_metrics and name not in exclude
            }
        return super().get_function_dict(include, exclude)

    def requires_clustering(self) -> list[str]:
        return [*super().requires_clustering(), "F1"]

    def requires_knn(self) -> list[str]:
        """PML's, the ``recall_at_<K>``, and ``mean_reciprocal_rank``, which PML 2.9 leaves
        out (its ``include=("mean_reciprocal_rank",)`` alone fails for want of neighbours)."""
        stock = [m for m in super().requires_knn() if m != "mean_reciprocal_rank"]
        return [*stock, "mean_reciprocal_rank", *(f"recall_at_{x}" for x in self.k_values)]

    def neighbours_to_fetch(self, k: int, num_reference: int, ref_includes_query: bool) -> int:
        """How many neighbours ``get_accuracy`` retrieves: ``k`` (from ``determine_k``), or
        the largest K of the Recall@K being computed where that is more (at most every
        reference item but the query)."""
        metrics = self.get_curr_metrics()
        largest = max((x for x in self.k_values if f"recall_at_{x}" in metrics), default=0)
        return max(k, min(largest, num_reference - int(ref_includes_query)))

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
        :func:`lone_query_labels` for 1-D labels, and the neighbours Recall@K needs."""
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
            fetch = self.neighbours_to_fetch(num_k, len(reference), ref_includes_query)
            knn_distances, knn_indices = self.knn_func(query, fetch, reference, ref_includes_query)
            knn_labels = reference_labels[knn_indices]
            if not bool(not_lone_query_mask.any()):
                c_f.LOGGER.warning("None of the query labels are in the reference set.")
            kwargs.update(
                label_counts=label_counts,
                knn_labels=knn_labels[:, :num_k],
                knn_distances=knn_distances[:, :num_k],
                recall_knn_labels=knn_labels,
                lone_query_labels=lone,
                not_lone_query_mask=not_lone_query_mask,
            )
        if any(x in self.requires_clustering() for x in metrics):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
        return self._get_accuracy(self.curr_function_dict, **kwargs)

    # ------------------------------------------------------------ metrics

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
        args = (knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts)
        if not self._fast_labels(query_labels):
            return super().calculate_r_precision(*args)
        parts = self._at_r(*args)
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
        args = (knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts)
        if not self._fast_labels(query_labels):
            return super().calculate_mean_average_precision_at_r(*args)
        return self._average_precision(*args, at_r=True)

    def calculate_mean_average_precision(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kw
    ):
        """PML's MAP over the retrieved neighbours; R from :func:`relevance_mask` (1-D labels)."""
        args = (knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts)
        if not self._fast_labels(query_labels):
            return super().calculate_mean_average_precision(*args)
        return self._average_precision(*args, at_r=False)

    def _average_precision(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, at_r
    ):
        """PML's ``mean_average_precision`` (``at_r``: MAP@R) for 1-D labels."""
        parts = self._at_r(
            knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts
        )
        if parts is None:
            return nan_accuracy(label_counts[0], self.return_per_class)
        same_label, mask, count, gt = parts
        if not at_r:
            mask = torch.ones_like(mask)
        num_samples, num_k = same_label.shape
        equality = same_label * mask
        cumulative_correct = torch.cumsum(equality, dim=1)
        k_idx = torch.arange(1, num_k + 1, device=gt.device).repeat(num_samples, 1)
        precision_at_ks = (cumulative_correct * equality).type(torch.float64) / k_idx
        accuracy = torch.sum(precision_at_ks * mask, dim=1) / count
        return maybe_get_avg_of_avgs(accuracy, gt, self.avg_of_avgs, self.return_per_class)

    def _recall_metric(self, k: int):
        def calculate(knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
            neighbours = kwargs.get("recall_knn_labels", knn_labels)
            neighbours, query_labels = not_lone(neighbours, query_labels, not_lone_query_mask)
            if neighbours is None:
                return nan_accuracy(label_counts[0], self.return_per_class)
            reference = kwargs.get("reference")
            whole = reference is not None and neighbours.shape[1] >= len(reference) - int(
                kwargs.get("ref_includes_query", False)
            )
            if neighbours.shape[1] < k and not whole:
                c_f.LOGGER.warning(
                    f"recall_at_{k} is NaN: {neighbours.shape[1]} neighbours given, {k} needed"
                )
                return nan_accuracy(label_counts[0], self.return_per_class)
            gt = query_labels[:, None]
            # a hit: one of the first k neighbours matches (the comparison gives N x k, or
            # N x k x label dims for equality on multi-dimensional labels: all must match)
            same = self.label_comparison_fn(gt, neighbours[:, :k])
            hits = c_f.torch_all_from_dim_to_end(same, 2).any(dim=1)
            if not (self.avg_of_avgs or self.return_per_class):
                return hits.float().mean().item()
            return maybe_get_avg_of_avgs(hits.double(), gt, self.avg_of_avgs, self.return_per_class)

        return calculate

    def calculate_F1(self, query_labels, cluster_labels, **kwargs):
        return pairwise_f1(c_f.to_numpy(query_labels).ravel(), c_f.to_numpy(cluster_labels).ravel())
