"""GradMLLoss against a naive loop over eq. (11) and its batch generalisation."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import PairMarginMiner, TripletMarginMiner
from pytorch_metric_learning.reducers import (
    AvgNonZeroReducer,
    MultipleReducers,
    SumReducer,
    ThresholdReducer,
)
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugins.losses import GradMLLoss
from pml_plugins.miners import DisjointQuadrupleMiner
from tests.loss_contract import (
    check_autocast_finite,
    check_empty_and_single_class,
    check_finite_edge_cases,
    check_gradcheck,
    check_labels_vs_indices_tuple,
    random_batch,
)

RTOL = {torch.float32: 1e-5, torch.float64: 1e-7}
EPS = 1e-8


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(t * t for t in v))
    return [t / n for t in v]


def dist_pow_k(u: list[float], v: list[float], k: float, eps: float = EPS) -> float:
    d2 = sum((a - b) ** 2 for a, b in zip(u, v, strict=True))
    return d2 if k == 2 else (d2 + eps) ** (k / 2)


def naive_gradml(emb, labels, k, w, ref=None, ref_labels=None, pairs=None, normalize=True):
    """2 * mean over positive pairs of d^k - 4w * mean over negative pairs, by loops.

    Returns (loss, positive term, negative term, mean pos d^k, mean neg d^k).
    """
    x = [[float(t) for t in row] for row in emb]
    same_set = ref is None
    y = x if same_set else [[float(t) for t in row] for row in ref]
    if normalize:
        x, y = [unit(r) for r in x], [unit(r) for r in y]
    lab = [int(t) for t in labels] if labels is not None else None
    rlab = lab if same_set else [int(t) for t in ref_labels]
    pos, neg = [], []
    if pairs is None:
        for i in range(len(x)):
            for j in range(len(y)):
                if same_set and i == j:
                    continue
                (pos if lab[i] == rlab[j] else neg).append(dist_pow_k(x[i], y[j], k))
    else:
        a1, p, a2, n = (list(map(int, t)) for t in pairs)
        pos = [dist_pow_k(x[i], y[j], k) for i, j in zip(a1, p, strict=True)]
        neg = [dist_pow_k(x[i], y[j], k) for i, j in zip(a2, n, strict=True)]
    mean_pos = sum(pos) / len(pos) if pos else 0.0
    mean_neg = sum(neg) / len(neg) if neg else 0.0
    pos_term, neg_term = 2 * mean_pos, -4 * w * mean_neg
    return pos_term + neg_term, pos_term, neg_term, mean_pos, mean_neg


def eq11(x1, x2, y1, y2, k, w, normalize=True):
    """The paper's eq. (11) for one quadruple, written out term by term."""
    if normalize:
        x1, x2, y1, y2 = unit(x1), unit(x2), unit(y1), unit(y2)

    def dk(u, v):
        return dist_pow_k(u, v, k)

    return dk(x1, x2) + dk(y1, y2) - w * (dk(x1, y1) + dk(x1, y2) + dk(x2, y1) + dk(x2, y2))


def assert_matches_naive(loss, naive, dtype):
    value, pos_term, neg_term = naive[:3]
    tol = RTOL[dtype] * (abs(pos_term) + abs(neg_term)) + 1e-12
    assert abs(loss.item() - value) <= tol, (loss.item(), value)


SHAPES = [(8, 4, 2), (12, 3, 4), (16, 8, 5), (30, 6, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_loop_all_pairs(dtype, k, shape):
    m, d, c = shape
    emb, labels = random_batch(m, d, c, dtype=dtype, seed=m + int(10 * k))
    for w in (0.5, 1.0, 2.0):
        loss_fn = GradMLLoss(k=k, w=w, collect_stats=True)
        loss = loss_fn(emb, labels)
        naive = naive_gradml(emb.detach(), labels, k, w)
        assert_matches_naive(loss, naive, dtype)
        assert loss_fn.mean_pos_dist_k == pytest.approx(naive[3], rel=RTOL[dtype])
        assert loss_fn.mean_neg_dist_k == pytest.approx(naive[4], rel=RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1.0, 2.0, 2.5, 3.0])
def test_matches_naive_loop_with_ref_emb(dtype, k):
    emb, labels = random_batch(10, 5, 3, dtype=dtype, seed=1)
    ref, ref_labels = random_batch(13, 5, 4, dtype=dtype, seed=2)
    loss = GradMLLoss(k=k, w=1.0)(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    naive = naive_gradml(emb.detach(), labels, k, 1.0, ref.detach(), ref_labels)
    assert_matches_naive(loss, naive, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize(
    "miner",
    [
        PairMarginMiner(pos_margin=0.8, neg_margin=1.2),
        TripletMarginMiner(margin=0.3, type_of_triplets="all"),
    ],
    ids=["pairs", "triplets"],
)
def test_matches_naive_loop_with_miner(dtype, k, miner):
    emb, labels = random_batch(16, 6, 4, dtype=dtype, seed=3)
    indices_tuple = miner(emb, labels)
    assert len(indices_tuple[0]) > 0
    loss = GradMLLoss(k=k, w=0.7)(emb, labels, indices_tuple)
    pairs = lmu.convert_to_pairs(indices_tuple, labels)
    naive = naive_gradml(emb.detach(), labels, k, 0.7, pairs=pairs)
    assert_matches_naive(loss, naive, dtype)
    # labels are not needed once the pairs are given
    loss_no_labels = GradMLLoss(k=k, w=0.7)(emb, None, indices_tuple)
    torch.testing.assert_close(loss_no_labels, loss)


@pytest.mark.parametrize("k", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("w", [0.5, 1.0, 2.0])
def test_one_quadruple_is_eq11(k, w):
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = GradMLLoss(k=k, w=w)(emb, labels)
    rows = [[float(t) for t in r] for r in emb]
    expected = eq11(rows[0], rows[1], rows[2], rows[3], k, w)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("w", [0.5, 1.0, 2.0])
def test_k2_gradient_closed_form(w):
    g = torch.Generator().manual_seed(5)
    x1, x2, y1, y2 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    emb = torch.stack([x1, x2, y1, y2]).requires_grad_(True)
    loss_fn = GradMLLoss(k=2, w=w, distance=LpDistance(normalize_embeddings=False))
    loss_fn(emb, torch.tensor([0, 0, 1, 1])).backward()
    expected = torch.stack(
        [
            2 * ((1 - 2 * w) * x1 - x2 + w * (y1 + y2)),
            2 * ((1 - 2 * w) * x2 - x1 + w * (y1 + y2)),
            2 * ((1 - 2 * w) * y1 - y2 + w * (x1 + x2)),
            2 * ((1 - 2 * w) * y2 - y1 + w * (x1 + x2)),
        ]
    )
    torch.testing.assert_close(emb.grad, expected, rtol=1e-9, atol=1e-9)
    # the paper's Table 1 row, 2w(y1 + y2 - x2), is not what eq. (11) gives
    assert not torch.allclose(emb.grad[0], 2 * w * (y1 + y2 - x2))


@pytest.mark.parametrize("k", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("w", [0.5, 1.0])
def test_miner_quadruples_give_mean_of_eq11(k, w):
    g = torch.Generator().manual_seed(6)
    num_quads = 5
    emb = torch.randn(4 * num_quads, 7, generator=g, dtype=torch.float64)
    class_ids = torch.randperm(50, generator=g)[: 2 * num_quads]
    labels = class_ids.repeat_interleave(2)  # MPerClassSampler(m=2) layout
    indices_tuple = DisjointQuadrupleMiner()(emb, labels)
    loss = GradMLLoss(k=k, w=w)(emb, labels, indices_tuple)
    rows = [[float(t) for t in r] for r in emb]
    per_quad = [eq11(*rows[4 * q : 4 * q + 4], k, w) for q in range(num_quads)]
    assert loss.item() == pytest.approx(sum(per_quad) / num_quads, rel=1e-10, abs=1e-12)


def test_reducer_is_swappable():
    emb, labels = random_batch(12, 4, 3, seed=7)
    loss = GradMLLoss(reducer=SumReducer())(emb, labels)
    x = emb.detach()
    _, pos_term, neg_term, _, _ = naive_gradml(x, labels, 2.0, 1.0)
    matches, diffs = lmu.get_matches_and_diffs(labels)
    # SumReducer sums per-pair values: 2 d^k over positive pairs, -4w d^k over negative pairs
    expected = pos_term * matches.sum().item() + neg_term * diffs.sum().item()
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("k", [1.0, 2.0, 2.5, 3.0])
def test_gradcheck(k):
    emb, labels = random_batch(10, 4, 3, seed=8)
    check_gradcheck(lambda: GradMLLoss(k=k, w=0.8), emb, labels)
    ref, ref_labels = random_batch(6, 4, 3, seed=9)
    check_gradcheck(
        lambda: GradMLLoss(k=k), emb, labels, ref_emb=ref.detach(), ref_labels=ref_labels
    )
    indices_tuple = DisjointQuadrupleMiner()(emb, labels)
    check_gradcheck(lambda: GradMLLoss(k=k), emb, labels, indices_tuple=indices_tuple)


def test_labels_vs_indices_tuple():
    emb, labels = random_batch(12, 5, 3, seed=10)
    check_labels_vs_indices_tuple(GradMLLoss, emb, labels, lmu.get_all_pairs_indices(labels))


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0, 2.5, 3.0])
def test_edge_cases_finite(k):
    check_empty_and_single_class(lambda: GradMLLoss(k=k))
    check_finite_edge_cases(lambda: GradMLLoss(k=k))
    check_finite_edge_cases(
        lambda: GradMLLoss(k=k, distance=LpDistance(normalize_embeddings=False))
    )


def test_single_class_is_positive_term_only():
    emb, _ = random_batch(6, 4, 1, seed=11)
    labels = torch.zeros(6, dtype=torch.long)
    loss = GradMLLoss()(emb, labels)
    naive = naive_gradml(emb.detach(), labels, 2.0, 1.0)
    assert naive[2] == 0.0
    assert loss.item() == pytest.approx(naive[0], rel=1e-10)


def test_no_pairs_is_zero():
    emb, _ = random_batch(4, 3, seed=12)
    loss = GradMLLoss()(emb, torch.arange(4), (torch.tensor([], dtype=torch.long),) * 4)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1.0, 2.0, 2.5])
def test_autocast(dtype, k):
    check_autocast_finite(lambda: GradMLLoss(k=k), dtype=dtype)


def test_rejects_similarity_and_bad_k():
    from pytorch_metric_learning.distances import CosineSimilarity

    with pytest.raises(ValueError):
        GradMLLoss(distance=CosineSimilarity())
    with pytest.raises(ValueError):
        GradMLLoss(k=0)


@pytest.mark.parametrize(
    "reducer",
    [
        lambda: AvgNonZeroReducer(),
        lambda: ThresholdReducer(low=0.0),
        lambda: ThresholdReducer(low=0.5, high=10.0),
        lambda: MultipleReducers({"neg_loss": AvgNonZeroReducer()}),
        lambda: MultipleReducers({}, default_reducer=ThresholdReducer(low=0)),
    ],
)
def test_reducer_that_drops_the_repulsion_term_is_refused(reducer):
    """Every negative-pair term is -4 w d^k <= 0: a reducer keeping only terms above 0 would
    silently train with attraction alone."""
    with pytest.raises(ValueError, match="neg_loss"):
        GradMLLoss(reducer=reducer())
    loss = GradMLLoss()
    loss.reducer = reducer()  # replaced after construction: refused when used
    emb, labels = random_batch(8, 4, n_classes=2, seed=3)
    with pytest.raises(ValueError, match="repulsion"):
        loss(emb, labels)


@pytest.mark.parametrize(
    "reducer",
    [
        lambda: MultipleReducers({"pos_loss": AvgNonZeroReducer()}),
        lambda: ThresholdReducer(high=10.0),
        lambda: ThresholdReducer(low=-100.0),
    ],
)
def test_reducers_that_keep_the_repulsion_term_are_accepted(reducer):
    emb, labels = random_batch(8, 4, n_classes=2, seed=3)
    got = GradMLLoss(reducer=reducer())(emb, labels)
    assert got.item() == pytest.approx(GradMLLoss()(emb, labels).item(), rel=1e-6)


def test_low_precision_in_low_precision_out():
    """As PML's own losses: float16 embeddings give a float16 loss."""
    emb, labels = random_batch(12, 4, n_classes=3, seed=4)
    loss = GradMLLoss()(emb.half(), labels)
    assert loss.dtype == torch.float16
    assert loss.item() == pytest.approx(GradMLLoss()(emb, labels).item(), abs=2e-2)
