"""Recall@K and clustering F1 against plain loops; the calculator through real faiss; the
arguments of PML's ``AccuracyCalculator`` that ``Calculator`` must honour."""

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_plugins.experiment import evaluate
from pml_plugins.experiment.evaluate import Calculator, pairwise_f1


def naive_recall(emb, labels, k, only=None):
    """Recall@K by a loop over the queries (``only``: that query's hit, 0 or 1)."""
    hits = 0
    for i in range(len(emb)) if only is None else [only]:
        d = ((emb - emb[i]) ** 2).sum(1)
        d[i] = np.inf
        nn = np.argsort(d, kind="stable")[:k]
        hits += any(labels[j] == labels[i] for j in nn)
    return hits / (len(emb) if only is None else 1)


def naive_pairwise_f1(labels, clusters):
    tp = fp = fn = 0
    n = len(labels)
    for i in range(n):
        for j in range(i + 1, n):
            same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
            tp += same_class and same_cluster
            fp += same_cluster and not same_class
            fn += same_class and not same_cluster
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def test_pairwise_f1_matches_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 60)
    clusters = rng.integers(0, 6, 60)
    assert np.isclose(pairwise_f1(labels, clusters), naive_pairwise_f1(labels, clusters))
    assert pairwise_f1(labels, labels) == 1.0


def test_calculator_recall_at_k_matches_loop_and_pml_p_at_1():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 300)
    emb = rng.normal(size=(300, 16)).astype(np.float32) + labels[:, None] * 0.3
    calc = Calculator(k_values=[1, 2, 4, 8, 16], clustering=True)
    acc = calc.get_accuracy(torch.tensor(emb), torch.tensor(labels))
    for k in (1, 2, 4, 8, 16):
        assert np.isclose(acc[f"recall_at_{k}"], naive_recall(emb, labels, k), atol=1e-6), k
    assert np.isclose(acc["recall_at_1"], acc["precision_at_1"])
    assert {"NMI", "AMI", "F1", "mean_average_precision_at_r", "r_precision"} <= set(acc)
    assert 0 <= acc["F1"] <= 1


def test_recall_at_k_beyond_largest_class_is_defined():
    labels = np.repeat(np.arange(20), 3)  # max bin count 3 < K = 10
    emb = np.random.default_rng(2).normal(size=(60, 4)).astype(np.float32)
    acc = Calculator(k_values=[1, 10], clustering=False).get_accuracy(
        torch.tensor(emb), torch.tensor(labels)
    )
    assert np.isclose(acc["recall_at_10"], naive_recall(emb, labels, 10))
    assert "NMI" not in acc and "F1" not in acc


# ---------------------------------------------------------------- PML's arguments honoured

CPU = torch.device("cpu")
AT_R = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def classes_of_50(seed=3):
    """300 items, 6 classes of about 50: the largest class is far above k = 5 or 8."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, 300)
    emb = rng.normal(size=(300, 16)).astype(np.float32) + labels[:, None] * 0.3
    return torch.tensor(emb), torch.tensor(labels)


@pytest.mark.parametrize("metric", ["mean_average_precision", "mean_reciprocal_rank"])
def test_requested_stock_metric_is_computed_as_pml(metric):
    emb, labels = classes_of_50()
    # PML 2.9 retrieves no neighbours for mean_reciprocal_rank alone: P@1 makes it
    pml = AccuracyCalculator(include=(metric, "precision_at_1"), k="max_bin_count", device=CPU)
    want = pml.get_accuracy(emb, labels)[metric]
    got = Calculator(include=(metric,), device=CPU).get_accuracy(emb, labels)
    assert set(got) == {metric}
    assert np.isclose(got[metric], want, rtol=0, atol=1e-12)
    # named in get_accuracy only; the default set leaves it out
    calc = Calculator(clustering=False, device=CPU)
    assert metric not in calc.get_accuracy(emb, labels)
    got = calc.get_accuracy(emb, labels, include=(metric, "recall_at_1"))
    assert set(got) == {metric, "recall_at_1"}
    assert np.isclose(got[metric], want, rtol=0, atol=1e-12)


def test_metric_hooks_accept_label_counts_as_lists():
    """PML's hooks take ``label_counts`` as lists too (its own unit tests do), in any order."""
    emb, labels = classes_of_50()
    labels = labels.float()
    counts = evaluate.label_match_counts(labels, labels)
    _, knn = evaluate.ChunkedKNN()(emb, 60, emb, True)
    kwargs = {
        "knn_labels": labels[knn],
        "query_labels": labels,
        "not_lone_query_mask": torch.ones(len(labels), dtype=torch.bool),
        "ref_includes_query": True,
    }
    as_lists = (counts[0].tolist()[::-1], counts[1].tolist()[::-1])
    keys = (*AT_R, "mean_average_precision")
    pml = AccuracyCalculator(include=keys, device=CPU)
    ours = Calculator(k_values=[1], include=(*keys, "recall_at_1"), device=CPU)
    want = pml._get_accuracy(pml.get_function_dict(), label_counts=counts, **kwargs)
    got = ours._get_accuracy(ours.get_function_dict(), label_counts=as_lists, **kwargs)
    for key in keys:
        assert np.isclose(got[key], want[key], rtol=0, atol=1e-12), key
    assert np.isclose(got["recall_at_1"], want["precision_at_1"], rtol=0, atol=1e-7)


def test_explicit_k_is_pmls_and_recall_at_larger_k_is_exact():
    emb, labels = classes_of_50()
    calc = Calculator(k=5, k_values=[1, 8], clustering=False, device=CPU)
    bins = torch.bincount(labels)
    assert calc.determine_k(bins, len(emb), True) == 5  # PML's k, not raised to 8
    assert calc.neighbours_to_fetch(5, len(emb), True) == 8
    got = calc.get_accuracy(emb, labels)
    want = AccuracyCalculator(k=5, include=AT_R, device=CPU).get_accuracy(emb, labels)
    for key in AT_R:
        assert np.isclose(got[key], want[key], rtol=0, atol=1e-12), key
    # MAP@R over 8 neighbours (what k=8 gives) is another number: the test can tell
    at_8 = AccuracyCalculator(k=8, include=AT_R, device=CPU).get_accuracy(emb, labels)
    assert abs(at_8["mean_average_precision_at_r"] - got["mean_average_precision_at_r"]) > 1e-3
    for k in (1, 8):
        assert np.isclose(got[f"recall_at_{k}"], naive_recall(emb.numpy(), labels.numpy(), k))


def test_default_metrics_and_clustering_f1_follow_nmi_and_ami():
    calc = Calculator(device=CPU)
    assert set(calc.get_curr_metrics()) == {
        *AT_R,
        *(f"recall_at_{k}" for k in (1, 2, 4, 8)),
        "NMI",
        "AMI",
        "F1",
    }
    no_kmeans = Calculator(exclude=("NMI", "AMI"), device=CPU).get_curr_metrics()
    assert "F1" not in no_kmeans and "recall_at_8" in no_kmeans
    assert Calculator(include=("F1",), device=CPU).get_curr_metrics() == ["F1"]

    def near(x, y):
        return (x - y).abs() < 1

    # as PML: a custom comparison works without clustering, and refuses it when asked for
    Calculator(exclude=("NMI", "AMI"), label_comparison_fn=near, device=CPU)
    with pytest.raises(NotImplementedError):
        Calculator(include=("F1",), label_comparison_fn=near, device=CPU)


def naive_recall_per_class(emb, labels, k):
    """Recall@K per class (sorted labels): the mean of its queries' hits."""
    hits = np.array([naive_recall(emb, labels, k, only=i) for i in range(len(emb))])
    return [float(hits[labels == c].mean()) for c in np.unique(labels)]


@pytest.mark.parametrize("averaging", ["avg_of_avgs", "return_per_class"])
def test_recall_at_k_follows_pml_averaging(averaging):
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(4), [5, 10, 20, 45])  # unequal classes: the means differ
    emb = rng.normal(size=(80, 8)).astype(np.float32) + labels[:, None] * 0.4
    calc = Calculator(k_values=[2], clustering=False, device=CPU, **{averaging: True})
    got = calc.get_accuracy(torch.tensor(emb), torch.tensor(labels))["recall_at_2"]
    per_class = naive_recall_per_class(emb, labels, 2)
    want = per_class if averaging == "return_per_class" else np.mean(per_class)
    assert np.allclose(got, want, rtol=0, atol=1e-12)
    assert not np.isclose(np.mean(per_class), naive_recall(emb, labels, 2))


def test_recall_at_k_needs_k_neighbours_or_the_whole_reference():
    labels = torch.tensor([0.0, 0, 1, 1, 1])
    emb = torch.tensor([[0.0], [4], [1], [2], [3]])
    calc = Calculator(k_values=[8], clustering=False, device=CPU)
    # five items, K = 8: the four other items are every neighbour there is
    assert calc.get_accuracy(emb, labels)["recall_at_8"] == 1.0
    # a hook given 2 of the 4 neighbours cannot know Recall@8
    kwargs = {
        "knn_labels": torch.tensor([[1.0, 1], [1, 1], [1, 1], [1, 1], [1, 1]]),
        "query_labels": labels,
        "not_lone_query_mask": torch.ones(5, dtype=torch.bool),
        "label_counts": ([0, 1], [2, 3]),
        "ref_includes_query": True,
    }
    assert np.isnan(calc._get_accuracy(calc.get_function_dict(), **kwargs)["recall_at_8"])
