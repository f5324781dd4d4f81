"""Recall@K and clustering F1 against plain loops; the calculator through real faiss."""

import numpy as np
import torch

from pml_plugins.experiment.evaluate import Calculator, pairwise_f1


def naive_recall(emb, labels, k):
    hits = 0
    for i in range(len(emb)):
        d = ((emb - emb[i]) ** 2).sum(1)
        d[i] = np.inf
        nn = np.argsort(d, kind="stable")[:k]
        hits += any(labels[j] == labels[i] for j in nn)
    return hits / len(emb)


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
