"""Evaluation without faiss: the chunked torch kNN and the scikit-learn k-means fallback."""

import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.inference import FaissKNN

from pml_plugins.experiment import evaluate
from pml_plugins.experiment.evaluate import Calculator, ChunkedKNN, SklearnKMeans

KNN_KEYS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
)
CPU = torch.device("cpu")


def naive_knn(query, reference, k, metric, skip_self):
    """Nearest first, by explicit loops in float64."""
    q, r = query.double().numpy(), reference.double().numpy()
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
    dists, idx = [], []
    for i in range(len(q)):
        row = []
        for j in range(len(r)):
            if skip_self and i == j:
                continue
            if metric == "l2":
                row.append((float(((q[i] - r[j]) ** 2).sum()), j))
            else:
                row.append((-float((q[i] * r[j]).sum()), j))
        row.sort()
        dists.append([d if metric == "l2" else -d for d, _ in row[:k]])
        idx.append([j for _, j in row[:k]])
    return np.array(dists), np.array(idx)


def assert_no_near_ties(query, reference, k, skip_self, gap=1e-4):
    """The k + 1 nearest distances of every query (float64) are at least ``gap`` apart, so
    that the order of the k nearest cannot depend on float32 summation order (rounding
    moves a distance by about 1e-6 here: squared norms up to 50 times float32's 1.2e-7)."""
    d = torch.cdist(query.double(), reference.double())
    if skip_self:
        d.fill_diagonal_(float("inf"))
    nearest = d.topk(k + 1, dim=1, largest=False).values
    assert nearest.diff(dim=1).min() > gap, "near-tied neighbours in the test data"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_chunked_knn_matches_loop(metric, ref_includes_query):
    g = torch.Generator().manual_seed(1)  # seed 0 has two distances 1.4e-5 apart
    reference = torch.randn(53, 7, generator=g)
    query = reference[:20] if ref_includes_query else torch.randn(20, 7, generator=g)
    normalise = torch.nn.functional.normalize if metric == "cosine" else (lambda v: v)
    assert_no_near_ties(normalise(query), normalise(reference), 5, ref_includes_query)
    # chunk of 6 queries: blocks 6, 6, 6, 2 (the last one partial)
    d, i = ChunkedKNN(metric=metric, chunk_size=6)(query, 5, reference, ref_includes_query)
    nd, ni = naive_knn(query, reference, 5, metric, skip_self=ref_includes_query)
    assert d.shape == (20, 5) and i.dtype == torch.long
    assert np.array_equal(i.numpy(), ni)
    assert np.allclose(d.numpy(), nd, atol=1e-4)


def test_chunked_knn_chunk_size_does_not_change_the_result_and_bounds_memory():
    # seed 15: no two of the 11 nearest distances closer than 1.5e-4 (seed 1: 8e-6, where
    # the block shape's summation order could swap two neighbours)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(15))
    assert_no_near_ties(x, x, 10, skip_self=True)
    full = ChunkedKNN(chunk_size=300)(x, 10, x, True)
    for chunk in (1, 7, 64):
        part = ChunkedKNN(chunk_size=chunk)(x, 10, x, True)
        assert torch.equal(part[1], full[1]) and torch.allclose(part[0], full[0])
    auto = ChunkedKNN()
    assert auto.chunk_for(60_000) * 60_000 * 4 <= evaluate.CHUNK_BYTES
    with pytest.raises(ValueError, match="reference"):
        auto(x, 3)
    with pytest.raises(ValueError, match="neighbours"):
        auto(x[:4], 4, x[:4], True)


def test_chunked_knn_equals_faiss_neighbours_up_to_float32_near_ties():
    """Same neighbour lists as faiss's exact L2 index; where they differ, the two swapped
    distances are equal to float32 rounding (checked in float64)."""
    rng = np.random.default_rng(3)
    x = torch.nn.functional.normalize(
        torch.tensor(rng.normal(size=(2000, 64)), dtype=torch.float32)
    )
    fd, fi = FaissKNN()(x, 30, x, True)
    td, ti = ChunkedKNN()(x, 30, x, True)
    assert torch.allclose(fd, td, atol=1e-5)
    x64 = x.double()
    rows = torch.where((fi != ti).any(dim=1))[0]
    assert len(rows) <= 0.01 * len(x), len(rows)
    for r in rows.tolist():
        a = ((x64[fi[r]] - x64[r]) ** 2).sum(1)
        b = ((x64[ti[r]] - x64[r]) ** 2).sum(1)
        assert torch.allclose(a, b, atol=1e-5), r


def clustered_set(n=5000, dim=64, classes=100, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, dim))
    emb = (centers[labels] * 0.5 + rng.normal(size=(n, dim))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return torch.tensor(emb), torch.tensor(labels)


def test_calculator_without_faiss_uses_torch_and_sklearn_and_agrees_with_faiss(monkeypatch):
    emb, labels = clustered_set()
    with_faiss = Calculator(device=CPU)
    # the neighbours get_accuracy retrieves
    k = with_faiss.neighbours_to_fetch(
        with_faiss.determine_k(torch.bincount(labels), len(emb), True), len(emb), True
    )
    assert isinstance(with_faiss.knn_func, FaissKNN)
    expected = with_faiss.get_accuracy(emb, labels)
    _, faiss_neighbours = with_faiss.knn_func(emb, k, emb, True)

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
    assert evaluate.faiss_module() is None
    fallback = Calculator(device=CPU)
    assert isinstance(fallback.knn_func, ChunkedKNN)
    assert isinstance(fallback.kmeans_func, SklearnKMeans)
    got = fallback.get_accuracy(emb, labels)
    _, torch_neighbours = fallback.knn_func(emb, k, emb, True)

    # Both search in float32, in different summation orders: two neighbours whose
    # distances agree to float32 rounding may come out in either order. Every place where
    # the neighbour lists differ must be such a tie (equal distance in float64) ...
    differ = faiss_neighbours != torch_neighbours
    x = emb.double()
    d_faiss = (x[:, None] - x[faiss_neighbours]).norm(dim=-1)
    d_torch = (x[:, None] - x[torch_neighbours]).norm(dim=-1)
    assert torch.all((d_faiss - d_torch)[differ].abs() < 1e-5)
    # ... and each metric is a mean over queries of a value in [0, 1], so it can differ
    # by at most the fraction of queries whose lists differ.
    bound = differ.any(dim=1).double().mean().item() + 1e-6
    assert bound < 0.05, f"{bound:.3f} of the queries have tied neighbours"
    assert set(got) == set(expected)
    for key in KNN_KEYS:
        assert abs(got[key] - expected[key]) <= bound, (key, got[key], expected[key], bound)
    # k-means differs by algorithm (k-means++ vs faiss's random init): close, not equal
    for key in ("NMI", "AMI", "F1"):
        assert 0.0 <= got[key] <= 1.0
        assert abs(got[key] - expected[key]) < 0.1, (key, got[key], expected[key])
    # and the structure is found at all (random clusters give NMI ~ 0.1 here)
    assert got["NMI"] > 0.4


def test_cuda_device_without_faiss_gpus_falls_back_to_torch_knn():
    if evaluate.faiss_gpus() > 0:  # faiss-gpu: the GPU index is used instead
        assert isinstance(evaluate.default_knn_func("cuda:0"), FaissKNN)
    else:
        assert isinstance(evaluate.default_knn_func("cuda:0"), ChunkedKNN)
    assert isinstance(evaluate.default_knn_func("cpu"), FaissKNN)


# ---------------------------------------------------------------- label bookkeeping


def labelled_set(seed, n_query, n_ref, classes, ref_includes_query):
    """Continuous embeddings; some query classes have a single item (lone queries), some
    query classes are missing from a separate reference set."""
    g = torch.Generator().manual_seed(seed)
    query_labels = torch.randint(0, classes, (n_query,), generator=g)
    query_labels[:3] = torch.tensor([classes, classes + 1, classes + 2])  # lone classes
    query = torch.randn(n_query, 8, generator=g) + query_labels[:, None] * 0.05
    if ref_includes_query:
        extra_labels = torch.randint(0, classes, (n_ref,), generator=g)
        extra = torch.randn(n_ref, 8, generator=g) + extra_labels[:, None] * 0.05
        return (
            query,
            query_labels,
            torch.cat([query, extra]),
            torch.cat([query_labels, extra_labels]),
        )
    ref_labels = torch.randint(1, classes, (n_ref,), generator=g)  # class 0 has no reference
    ref = torch.randn(n_ref, 8, generator=g) + ref_labels[:, None] * 0.05
    return query, query_labels, ref, ref_labels


def test_label_helpers_equal_pml_functions():
    from pytorch_metric_learning.utils import accuracy_calculator as pml_acc

    for ref_includes_query in (True, False):
        q, ql, r, rl = labelled_set(0, 200, 150, 12, ref_includes_query)
        ql, rl = ql.float(), rl.float()
        ours = evaluate.label_match_counts(ql, rl)
        theirs = pml_acc.get_label_match_counts(ql, rl, pml_acc.EQUALITY)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        lone, mask = evaluate.lone_query_labels(ql, ours, ref_includes_query)
        p_lone, p_mask = pml_acc.get_lone_query_labels(
            ql, theirs, ref_includes_query, pml_acc.EQUALITY
        )
        assert torch.equal(lone, p_lone) and torch.equal(mask, p_mask)
        assert len(lone) >= 3
        gt = ql[mask]
        rel, count = evaluate.relevance_mask(gt, ours, 23, ref_includes_query)
        p_rel, p_count = pml_acc.get_relevance_mask(
            (len(gt), 23), gt[:, None], ref_includes_query, theirs
        )
        assert torch.equal(rel, p_rel) and torch.equal(count, p_count)


@pytest.mark.parametrize("ref_includes_query", [True, False])
@pytest.mark.parametrize("averaging", ["plain", "avg_of_avgs", "return_per_class"])
def test_calculator_at_r_metrics_equal_pml(ref_includes_query, averaging):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    q, ql, r, rl = labelled_set(1, 300, 200, 15, ref_includes_query)
    options = {"avg_of_avgs": averaging == "avg_of_avgs"}
    options["return_per_class"] = averaging == "return_per_class"
    keys = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    ours = Calculator(
        k_values=[1], clustering=False, device=CPU, include=keys, **options
    ).get_accuracy(q, ql, r, rl, ref_includes_query)
    pml = AccuracyCalculator(include=keys, k="max_bin_count", device=CPU, **options).get_accuracy(
        q, ql, r, rl, ref_includes_query
    )
    for key in keys:
        assert np.allclose(ours[key], pml[key], rtol=0, atol=1e-12, equal_nan=True), key
