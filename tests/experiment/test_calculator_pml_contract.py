"""PML's own accuracy-calculator tests, run against ``AccuracyCalculator`` and ``Calculator``.

The cases, their inputs and their expected values are those of pytorch-metric-learning's
``tests/utils/test_calculate_accuracies.py`` and
``tests/utils/test_calculate_accuracies_large_k.py`` (KevinMusgrave/pytorch-metric-learning,
MIT licence), rewritten as pytest cases. Every case runs for both classes: ``Calculator``
subclasses ``AccuracyCalculator`` and must give the parent's results for everything the
parent accepts.

Where PML's tests rely on the parent's defaults, the cases pass them explicitly, because
``Calculator``'s own defaults differ by design: ``k=None`` (``Calculator``: ``"max_bin_count"``),
and an empty ``include`` (every metric) becomes :func:`every_metric`
(``Calculator`` computes ``mean_average_precision`` and ``mean_reciprocal_rank`` only when
``include`` names them). The parent gets exactly PML's inputs.

Not reproduced: ``test_get_lone_query_labels_custom`` and ``..._multi_dim``, which test
PML's module functions that ``Calculator`` calls unchanged for such labels (the custom and
multi-dimensional comparison cases below run through them).
"""

from __future__ import annotations

import functools
import itertools
import logging

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import accuracy_calculator as pml_acc
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.common_functions import LOGGER
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKMeans, FaissKNN

from pml_plugins.experiment import evaluate
from pml_plugins.experiment.evaluate import OPT_IN_METRICS, Calculator

CPU = torch.device("cpu")
CLASSES = [AccuracyCalculator, Calculator]
NUMPY = pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy", "torch"])


@pytest.fixture(params=CLASSES, ids=lambda cls: cls.__name__)
def cls(request):
    return request.param


def every_metric(cls, exclude=()) -> tuple[str, ...]:
    """PML's default ``include`` (every metric) for ``cls``: ``()`` for the parent; for
    ``Calculator`` its default metrics and :data:`OPT_IN_METRICS`, named."""
    if cls is AccuracyCalculator:
        return ()
    named = (m for m in OPT_IN_METRICS if m not in exclude)
    return (*named, *Calculator(device=CPU, exclude=exclude).get_curr_metrics())


def make(cls, **kwargs):
    """``cls(**kwargs)`` with PML's defaults of ``k`` and ``include`` spelled out."""
    kwargs.setdefault("k", None)
    kwargs.setdefault("device", CPU)
    kwargs.setdefault("include", every_metric(cls, kwargs.get("exclude", ())))
    return cls(**kwargs)


def isclose(x, y, many=False):
    """PML's tolerance: relative 1e-6."""
    if many:
        return np.allclose(x, y, atol=0, rtol=1e-6)
    return bool(np.isclose(x, y, atol=0, rtol=1e-6))


def arange_embeddings(n, use_numpy):
    return np.arange(n)[:, None] if use_numpy else torch.arange(n).unsqueeze(1)


def as_labels(labels, use_numpy):
    return np.array(labels) if use_numpy else torch.tensor(labels)


# ---------------------------------------------------------------- the metric hooks


QUERY_LABELS = torch.tensor([1, 1, 2, 3, 4, 0])
KNN_LABELS = torch.tensor(
    [
        [0, 1, 1, 2, 2],
        [1, 0, 1, 1, 3],
        [4, 4, 4, 4, 2],
        [3, 1, 3, 1, 3],
        [0, 0, 4, 2, 2],
        [1, 2, 3, 4, 5],
    ]
)
LABEL_COUNTS = ([0, 1, 2, 3, 4], [2, 3, 5, 4, 5])  # lists, as PML's test passes them


def per_query(accs, avg_of_avgs, return_per_class):
    """PML's expected value from the six queries' values (classes 1, 1, 2, 3, 4, 0)."""
    by_class = [accs[5], (accs[0] + accs[1]) / 2, accs[2], accs[3], accs[4]]
    if avg_of_avgs:
        return np.mean(by_class)
    if return_per_class:
        return by_class
    return np.mean(accs)


#: per query, without and with the query in the reference (PML's expected values)
EXPECTED = {
    "precision_at_1": ([0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]),
    "r_precision": (
        [2 / 3, 2 / 3, 1 / 5, 2 / 4, 1 / 5, 0],
        [1 / 1, 1 / 2, 1 / 4, 1 / 3, 1 / 4, 0],
    ),
    "mean_average_precision_at_r": (
        [(1 / 2 + 2 / 3) / 3, (1 + 2 / 3) / 3, (1 / 5) / 5, (1 + 2 / 3) / 4, (1 / 3) / 5, 0],
        [1, (1 / 2) / 2, (1 / 4) / 4, (1 / 2) / 3, (1 / 2) / 4, 0],
    ),
    "mean_average_precision": (
        [
            (1 / 2 + 2 / 3) / 3,
            (1 + 2 / 3 + 3 / 4) / 3,
            (1 / 5) / 5,
            (1 + 2 / 3 + 3 / 5) / 4,
            (1 / 3) / 5,
            0,
        ],
        [1, (1 / 2 + 2 / 3) / 2, (1 / 4) / 4, (1 / 2 + 2 / 4) / 3, (1 / 2) / 4, 0],
    ),
    "mean_reciprocal_rank": (
        [1 / 2, 1, 1 / 5, 1, 1 / 3, 0],
        [1, 1 / 2, 1 / 4, 1 / 2, 1 / 2, 0],
    ),
}


@pytest.mark.parametrize("avg_of_avgs", [False, True])
@pytest.mark.parametrize("return_per_class", [False, True])
@pytest.mark.parametrize("lone", [False, True], ids=["in-reference", "all-lone"])
def test_accuracy_calculator(cls, avg_of_avgs, return_per_class, lone):
    """PML's ``test_accuracy_calculator``: the metric hooks on given neighbour labels and
    ``label_counts`` as lists; with every query lone (labels shifted by 5), NaN."""
    init_kwargs = {
        "exclude": ("NMI", "AMI"),
        "avg_of_avgs": avg_of_avgs,
        "return_per_class": return_per_class,
    }
    if avg_of_avgs and return_per_class:
        with pytest.raises(ValueError):
            make(cls, **init_kwargs)
        return
    calc = make(cls, **init_kwargs)
    if lone:
        knn_labels = KNN_LABELS + 5
        label_counts = ([5, 6, 7, 8, 9], [2, 3, 5, 4, 5])
    else:
        knn_labels, label_counts = KNN_LABELS, LABEL_COUNTS
    kwargs = {
        "query_labels": QUERY_LABELS,
        "label_counts": label_counts,
        "knn_labels": knn_labels,
        "not_lone_query_mask": torch.full((6,), not lone),
    }
    function_dict = calc.get_function_dict()
    for ref_includes_query in (False, True):
        if ref_includes_query:
            kwargs["knn_labels"] = kwargs["knn_labels"][:, 1:]
        kwargs["ref_includes_query"] = ref_includes_query
        acc = calc._get_accuracy(function_dict, **kwargs)
        for metric, per_query_values in EXPECTED.items():
            if lone:
                assert np.all(np.isnan(acc[metric])), metric
                continue
            want = per_query(per_query_values[ref_includes_query], avg_of_avgs, return_per_class)
            assert isclose(acc[metric], want, many=return_per_class), (metric, acc[metric], want)


@pytest.mark.parametrize(
    "helpers",
    [
        (pml_acc.get_label_match_counts, pml_acc.get_lone_query_labels),
        (
            lambda q, r, fn: evaluate.label_match_counts(q, r),
            lambda q, counts, same, fn: evaluate.lone_query_labels(q, counts, same),
        ),
    ],
    ids=["pml", "calculator"],
)
def test_get_lone_query_labels(helpers):
    """PML's ``test_get_lone_query_labels``, for PML's functions and the calculator's."""
    match_counts, lone_labels = helpers
    query_labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    reference_labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5])
    label_counts = match_counts(query_labels, reference_labels, pml_acc.EQUALITY)
    for same_source, correct in [(True, [1, 3, 4, 5, 6]), (False, [6])]:
        lone, _ = lone_labels(query_labels, label_counts, same_source, pml_acc.EQUALITY)
        assert torch.equal(lone, torch.tensor(correct))


# ---------------------------------------------------------------- get_accuracy end to end


@NUMPY
@pytest.mark.parametrize("knn", ["default", "custom", "custom-batch-3"])
def test_accuracy_calculator_and_faiss(cls, use_numpy, knn):
    """PML's ``_test_accuracy_calculator_and_faiss``."""
    knn_func = {
        "default": None,
        "custom": CustomKNN(LpDistance(normalize_embeddings=False, power=2)),
        "custom-batch-3": CustomKNN(LpDistance(normalize_embeddings=False, power=2), batch_size=3),
    }[knn]
    calc = make(cls, knn_func=knn_func)
    query = arange_embeddings(10, use_numpy)
    labels = as_labels(list(range(10)), use_numpy)
    acc = calc.get_accuracy(query, labels, query, labels, False)
    for metric in ("precision_at_1", "r_precision", "mean_average_precision_at_r"):
        assert isclose(acc[metric], 1), metric
    assert isclose(acc["mean_average_precision"], 1)

    # reference: 0, 1, ..., 9 (labels 0..9), then 0.5, 1.5, ..., 9.5 (label 1)
    halves = (np.arange(20) / 2.0)[:, None]
    reference = np.concatenate([halves[::2], halves[1::2]], axis=0)
    reference_labels = np.concatenate([np.arange(10), np.ones(10)]).astype(np.float64)
    if not use_numpy:
        reference = torch.tensor(reference, dtype=torch.float32)
        reference_labels = torch.tensor(reference_labels, dtype=torch.float32)
    acc = calc.get_accuracy(query, labels, reference, reference_labels, True)
    assert isclose(acc["precision_at_1"], 1)
    assert isclose(acc["r_precision"], 0.5)
    assert isclose(acc["mean_average_precision_at_r"], (1 + 2 / 2 + 3 / 5 + 4 / 7 + 5 / 9) / 10)
    # only query 1 has another item of its class; it finds them at ranks 1, 2, 5, ..., 19
    ranks = (1, 2, 5, 7, 9, 11, 13, 15, 17, 19)
    want = sum(i / r for i, r in enumerate(ranks, 1)) / 10
    assert isclose(acc["mean_average_precision"], want)


@NUMPY
def test_accuracy_calculator_and_faiss_avg_of_avgs(cls, use_numpy):
    """PML's ``_test_accuracy_calculator_and_faiss_avg_of_avgs``."""
    global_average = make(cls, avg_of_avgs=False)
    per_class_average = make(cls, avg_of_avgs=True)
    query_labels = as_labels([0] * 9 + [1], use_numpy)
    reference_labels = as_labels([1] + [0] * 9, use_numpy)
    check_nine_of_ten(global_average, per_class_average, query_labels, reference_labels, use_numpy)


def check_nine_of_ten(global_average, per_class_average, query_labels, reference_labels, use_numpy):
    """PML's ten queries: nine of one class hit; the last, of the class whose one reference
    item is far away, finds it at rank 10: 0.9 over the queries, 0.5 over the classes."""
    query = arange_embeddings(10, use_numpy)
    reference = arange_embeddings(10, use_numpy)
    query[-1] = 100
    reference[0] = -100
    for calc, want, want_map in (
        (global_average, 0.9, 0.9 + 0.01),
        (per_class_average, 0.5, (1 + 0.1) / 2),
    ):
        acc = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
        for metric in ("precision_at_1", "r_precision", "mean_average_precision_at_r"):
            assert isclose(acc[metric], want), metric
        assert isclose(acc["mean_average_precision"], want_map)


def first_equal_second_differs(x, y):
    return (x[..., 0] == y[..., 0]) & (x[..., 1] != y[..., 1])


@NUMPY
def test_accuracy_calculator_custom_comparison_function(cls, use_numpy):
    """PML's ``_test_accuracy_calculator_custom_comparison_function`` (2-D labels)."""
    with pytest.raises(NotImplementedError):
        make(cls, include=("NMI", "AMI"), label_comparison_fn=first_equal_second_differs)
    exclude = ("NMI", "AMI")
    global_average = make(cls, exclude=exclude, label_comparison_fn=first_equal_second_differs)
    per_class_average = make(
        cls, exclude=exclude, avg_of_avgs=True, label_comparison_fn=first_equal_second_differs
    )
    query_labels = as_labels([(0, 2)] * 9 + [(1, 2)], use_numpy)
    reference_labels = as_labels([(1, 3)] + [(0, 3)] * 9, use_numpy)
    check_nine_of_ten(global_average, per_class_average, query_labels, reference_labels, use_numpy)

    # the simple case
    query = arange_embeddings(2, use_numpy)
    reference = arange_embeddings(5, use_numpy)
    query_labels = as_labels([(1, 3), (7, 3)], use_numpy)
    reference_labels = as_labels([(1, 3), (7, 4), (1, 4), (1, 5), (1, 6)], use_numpy)
    correct = {
        "precision_at_1": 0.5,
        "r_precision": (1 / 3 + 1) / 2,
        "mean_average_precision_at_r": ((1 / 3) / 3 + 1) / 2,
        "mean_average_precision": ((1 / 3 + 2 / 4 + 3 / 5) / 3 + 1) / 2,
    }
    for calc in (global_average, per_class_average):
        acc = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
        for metric, want in correct.items():
            assert isclose(acc[metric], want), metric


def closer_than_one(x, y):
    return torch.abs(x - y) < 1


@NUMPY
def test_accuracy_calculator_float_custom_comparison_function(cls, use_numpy):
    """PML's ``_test_accuracy_calculator_float_custom_comparison_function``."""
    with pytest.raises(NotImplementedError):
        make(cls, include=("NMI", "AMI"), label_comparison_fn=closer_than_one)
    calc = make(cls, exclude=("NMI", "AMI"), label_comparison_fn=closer_than_one)

    def column(values):
        return np.array(values)[:, None] if use_numpy else torch.tensor(values).unsqueeze(1)

    query, reference = column([0, 3]), column([0, 3, 1, 2])
    query_labels = as_labels([0.01, 0.02], use_numpy)
    reference_labels = as_labels([10.0, 0.03, 0.04, 0.05], use_numpy)
    correct = {
        "precision_at_1": (0 + 1) / 2,
        "r_precision": (2 / 3 + 3 / 3) / 2,
        "mean_average_precision_at_r": ((0 + 1 / 2 + 2 / 3) / 3 + 1) / 2,
        "mean_average_precision": ((0 + 1 / 2 + 2 / 3 + 3 / 4) / 3 + 1) / 2,
    }
    acc = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
    for metric, want in correct.items():
        assert isclose(acc[metric], want), metric

    # the query in the reference
    reference_labels = as_labels([0.01, 0.02, 10, 0.03], use_numpy)
    correct = {
        "precision_at_1": 0.5,
        "r_precision": 0.5,
        "mean_average_precision_at_r": ((0 + 1 / 2) / 2 + (1) / 2) / 2,
        "mean_average_precision": ((0 + 1 / 2 + 2 / 3) / 2 + (1 + 2 / 3) / 2) / 2,
    }
    acc = calc.get_accuracy(query, query_labels, reference, reference_labels, True)
    for metric, want in correct.items():
        assert isclose(acc[metric], want), metric


# ---------------------------------------------------------------- k


@pytest.mark.parametrize("k", [-1, 0, 1.5, "max", "all"])
def test_valid_k(cls, k):
    """PML's ``test_valid_k`` (and "all", which PML 2.9 refuses too)."""
    with pytest.raises(ValueError):
        cls(k=k, device=CPU)


K_WARNING = "is less than the max bin count"


@pytest.mark.parametrize("k", [10, 100, 2000, "max_bin_count"])
def test_k_warning(cls, k, caplog):
    """PML's ``test_k_warning``: an integer ``k`` below the largest class (1000 of 10000
    items) warns that R-precision and MAP@R are wrong; the others do not."""
    calc = make(cls, k=k)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(10000, 32, generator=g)
    labels = torch.randint(0, 10, size=(10000,), generator=g)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        calc.get_accuracy(embeddings, labels)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and K_WARNING in r.message]
    assert bool(warned) == (k in (10, 100))


# ---------------------------------------------------------------- kNN and k-means functions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_specify_gpu(cls):
    """PML's ``test_specify_gpu``: ``FaissKNN(gpus=...)`` for every set of GPUs (up to 4)."""
    if evaluate.faiss_gpus() == 0:
        pytest.skip("faiss without GPU support")
    max_world_size = min(4, torch.cuda.device_count())
    g = torch.Generator().manual_seed(0)
    for i in range(1, max_world_size + 1):
        for gpus in itertools.combinations(range(max_world_size), i):
            calc = make(cls, knn_func=FaissKNN(gpus=gpus), device=torch.device("cuda"))
            embeddings = torch.randn(1000, 32, generator=g)
            labels = torch.randint(0, 10, size=(1000,), generator=g)
            acc = calc.get_accuracy(embeddings, labels)
            assert 0 <= acc["precision_at_1"] <= 1


def test_index_type(cls):
    """PML's ``test_index_type``: the given ``knn_func`` (an inner-product index) is used."""
    knn_func = FaissKNN(reset_after=False, index_init_fn=faiss.IndexFlatIP)
    calc = make(cls, knn_func=knn_func)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1000, 32, generator=g)
    labels = torch.randint(0, 10, size=(1000,), generator=g)
    calc.get_accuracy(embeddings, labels)
    assert isinstance(calc.knn_func.index, faiss.IndexFlatIP)


@pytest.mark.parametrize("dataset_size", [200, 1000])
@pytest.mark.parametrize("batch_size", [None, 32, 33, 2000])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_custom_knn(cls, dataset_size, batch_size, ref_includes_query):
    """PML's ``test_custom_knn``: ``CustomKNN`` (L2, batched) gives faiss's metrics."""
    g = torch.Generator().manual_seed(6920)
    for k in [None, 1, 2, 10, 100]:
        custom = CustomKNN(LpDistance(normalize_embeddings=False, power=2), batch_size)
        calc1 = make(cls, k=k, knn_func=custom, exclude=("AMI", "NMI"))
        calc2 = make(cls, k=k, knn_func=FaissKNN(), exclude=("AMI", "NMI"))
        embeddings = torch.randn(dataset_size, 32, generator=g)
        labels = torch.randint(0, 10, size=(dataset_size,), generator=g)
        args = (embeddings, labels, embeddings, labels, ref_includes_query)
        acc1, acc2 = calc1.get_accuracy(*args), calc2.get_accuracy(*args)
        assert set(acc1) == set(acc2)
        for name, value in acc1.items():
            assert np.isclose(value, acc2[name], rtol=1e-3), (k, name, value, acc2[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_within_autocast(cls):
    """PML's ``test_within_autocast``: ``get_accuracy`` under fp16 autocast."""
    calc = make(cls, device=torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1000, 32, generator=g)
    labels = torch.randint(0, 10, size=(1000,), generator=g)
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        acc = calc.get_accuracy(embeddings, labels)
    assert 0 <= acc["precision_at_1"] <= 1


def sklearn_kmeans(x, nmb_clusters):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=2, random_state=0).fit_predict(x.cpu().numpy())


@pytest.mark.parametrize("offset", [0.5, 1])
@pytest.mark.parametrize("kmeans", ["default", "faiss-300-10", "sklearn"])
def test_mutual_information(cls, offset, kmeans):
    """PML's ``test_mutual_information``: NMI and AMI with the given (or default) k-means
    within 10% of scikit-learn's on two shifted Gaussian blobs."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    kmeans_func = {
        "default": None,
        "faiss-300-10": FaissKMeans(niter=300, nredo=10),
        "sklearn": sklearn_kmeans,
    }[kmeans]
    g = torch.Generator().manual_seed(0)
    dataset_size = 2000
    emb = torch.cat(
        [
            torch.randn(dataset_size, 32, generator=g),
            torch.randn(dataset_size, 32, generator=g) + offset,
        ]
    )
    labels = torch.cat([torch.zeros(dataset_size), torch.ones(dataset_size)])
    calc = make(cls, kmeans_func=kmeans_func, include=("AMI", "NMI"))
    acc = calc.get_accuracy(emb, labels, emb, labels, False)
    assert set(acc) == {"AMI", "NMI"}
    clusters = KMeans(n_clusters=2, random_state=0).fit_predict(emb)
    assert np.isclose(acc["AMI"], adjusted_mutual_info_score(labels.numpy(), clusters), rtol=0.1)
    assert np.isclose(acc["NMI"], normalized_mutual_info_score(labels.numpy(), clusters), rtol=0.1)


# ---------------------------------------------------------------- the query in the reference


def test_tied_distances(cls):
    """PML's ``test_tied_distances``: with items of different labels at the same place, the
    query itself (not its twin) is the item dropped from its neighbours."""
    emb = torch.tensor([[10], [10], [20], [20]])
    labels = torch.tensor([1, 0, 1, 0])
    calc = make(cls, include=("precision_at_1",))
    assert calc.get_accuracy(emb, labels)["precision_at_1"] == 0


def test_many_tied_distances(cls):
    """PML's ``test_many_tied_distances``: 10000 identical embeddings, ``k=1``."""
    emb = torch.zeros(10000, 2)
    labels = torch.randint(0, 2, size=(10000,), generator=torch.Generator().manual_seed(0))
    calc = make(cls, include=("precision_at_1",), k=1)
    assert np.isclose(calc.get_accuracy(emb, labels)["precision_at_1"], 0.5, rtol=0.1)


def test_query_within_reference(cls):
    """PML's ``test_query_within_reference``: ``ref_includes_query=True`` needs the query
    to be the reference's first items."""
    query = torch.tensor([0, 10, 20]).unsqueeze(1)
    ref = torch.tensor([0, 5, 10, 15, 20]).unsqueeze(1)
    query_labels = torch.tensor([0, 1, 2])
    ref_labels = torch.tensor([0, 9, 1, 8, 2])
    calc = make(cls, include=("precision_at_1",))
    assert calc.get_accuracy(query, query_labels, ref, ref_labels, False)["precision_at_1"] == 1
    with pytest.raises(ValueError):
        calc.get_accuracy(query, query_labels, ref, ref_labels, True)
    ref = torch.tensor([0, 10, 20, 5, 15]).unsqueeze(1)
    ref_labels[:3] = query_labels
    acc = calc.get_accuracy(query, query_labels, ref, ref_labels, True)
    assert acc["precision_at_1"] == 1  # query 20 (the one not lone): its neighbour 15, label 2


# ---------------------------------------------------------------- large k


LARGE_K_CASES = list(
    itertools.product([False, True], [None, 98, "max_bin_count"], [1000, 2100], [2, 11, 103])
)


@functools.cache
def large_k_inputs() -> dict:
    """PML's random features and labels for each case, drawn in PML's loop order."""
    rng = np.random.RandomState(493)
    inputs = {}
    for case in LARGE_K_CASES:
        encs = rng.rand(case[2], 5).astype(np.float32)
        inputs[case] = (encs, rng.randint(0, case[3], size=(case[2],)))
    return inputs


@functools.cache
def reference_metrics(case: tuple) -> tuple[float, float, float]:
    """PML's ``evaluate`` of ``test_calculate_accuracies_large_k`` (after V. Christlein's
    gist): P@1, MAP and MAP@R from faiss's neighbour lists, per query with numpy arrays
    instead of its loop over the ranks."""
    ecfss, max_k = case[:2]
    encs, labels = large_k_inputs()[case]
    torch_encs = torch.from_numpy(encs)
    k = len(encs) - 1 if ecfss else len(encs)
    _, all_indices = FaissKNN()(torch_encs, k, torch_encs, ecfss)
    if max_k is None:
        max_k, indices = k, all_indices
    else:
        if max_k == "max_bin_count":
            max_k = int(max(np.bincount(labels))) - int(ecfss)
        _, indices = FaissKNN()(torch_encs, max_k, torch_encs, ecfss)
    all_indices, indices = all_indices.numpy(), indices.numpy()[:, :max_k]
    all_rel = (labels[all_indices] == labels[:, None]).sum(axis=1)
    hit = labels[indices] == labels[:, None]
    rank = np.arange(1, max_k + 1)
    precision = np.where(hit, np.cumsum(hit, axis=1) / rank, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        average_precision = np.where(all_rel > 0, precision.sum(axis=1) / all_rel, 0)
        at_r = np.where(rank[None, :] <= all_rel[:, None], precision, 0.0).sum(axis=1)
        average_precision_at_r = np.where(all_rel > 0, at_r / all_rel, 0)
    return hit[:, 0].mean(), average_precision.mean(), average_precision_at_r.mean()


@pytest.mark.parametrize("ecfss", [False, True])
@pytest.mark.parametrize("max_k", [None, 98, "max_bin_count"])
def test_accuracy_calculator_large_k(cls, ecfss, max_k):
    """PML's ``test_accuracy_calculator_large_k`` (PML issue 290): P@1, MAP and MAP@R
    against a plain implementation, for k = every item, 98 and the largest class."""
    for num_embeddings in [1000, 2100]:
        for num_classes in [2, 11, 103]:
            case = (ecfss, max_k, num_embeddings, num_classes)
            encs, labels = large_k_inputs()[case]
            correct = reference_metrics(case)
            if max_k is None:
                k = len(encs) - 1 if ecfss else len(encs)
                calcs = [make(cls), make(cls, k=k)]
            else:
                calcs = [make(cls, k=max_k)]
            for calc in calcs:
                d = calc.get_accuracy(
                    encs,
                    labels,
                    encs,
                    labels,
                    ecfss,
                    include=(
                        "mean_average_precision",
                        "mean_average_precision_at_r",
                        "precision_at_1",
                    ),
                )
                got = (
                    d["precision_at_1"],
                    d["mean_average_precision"],
                    d["mean_average_precision_at_r"],
                )
                # PML: assertAlmostEqual(places=5)
                np.testing.assert_allclose(got, correct, rtol=0, atol=5e-6)
