"""Soft-label contrastive, multi-similarity and proxy-anchor losses (Metrix).

Each is checked against a naive loop over the soft-label formula and against PML's own
loss on 0/1 labels.
"""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, ProxyAnchorLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner, TripletMarginMiner
from pytorch_metric_learning.reducers import DoNothingReducer, MeanReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugins.losses import SoftContrastiveLoss, SoftMultiSimilarityLoss, SoftProxyAnchorLoss
from tests.loss_contract import (
    check_autocast_finite,
    check_empty_and_single_class,
    check_finite_edge_cases,
    check_gradcheck,
    check_labels_vs_indices_tuple,
    random_batch,
)

NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- naive references
def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def euclid(u: list[float], v: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)))


def cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(unit(u), unit(v), strict=True))


def soft_matrix(n_rows: int, n_cols: int, seed: int, nan_frac: float = 0.3) -> torch.Tensor:
    """Random soft labels with some exact 0s and 1s and some NaN (not a pair)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n_rows, n_cols, generator=g, dtype=torch.float64)
    pick = torch.rand(n_rows, n_cols, generator=g)
    y[pick < 0.15] = 0.0
    y[(pick >= 0.15) & (pick < 0.3)] = 1.0
    y[torch.rand(n_rows, n_cols, generator=g) < nan_frac] = NAN
    return y


def naive_contrastive(
    anchors, others, y, pos_margin, neg_margin, similarity=False, avg_nonzero=True
):
    """Sum over the two parts of: reduce_v y*rho+ ; reduce_v (1-y)*rho-."""
    A, Oth, Y = anchors.tolist(), others.tolist(), y.tolist()
    pos_terms, neg_terms = [], []
    for i in range(len(A)):
        for j in range(len(Oth)):
            yij = Y[i][j]
            if math.isnan(yij):
                continue
            if similarity:
                s = cos(A[i], Oth[j])
                rho_pos, rho_neg = max(pos_margin - s, 0.0), max(s - neg_margin, 0.0)
            else:
                d = euclid(unit(A[i]), unit(Oth[j]))
                rho_pos, rho_neg = max(d - pos_margin, 0.0), max(neg_margin - d, 0.0)
            if yij > 0:
                pos_terms.append(yij * rho_pos)
            if yij < 1:
                neg_terms.append((1 - yij) * rho_neg)

    def reduce(terms):
        if avg_nonzero:
            terms = [t for t in terms if t > 0]
        return sum(terms) / len(terms) if terms else 0.0

    return reduce(pos_terms) + reduce(neg_terms)


def naive_ms(anchors, others, y, alpha, beta, base):
    """mean_a (1/alpha) ln(1 + sum y e^{-alpha(s-m)}) + (1/beta) ln(1 + sum (1-y) e^{beta(s-m)})."""
    A, Oth, Y = anchors.tolist(), others.tolist(), y.tolist()
    total = 0.0
    for i in range(len(A)):
        pos_sum, neg_sum = 0.0, 0.0
        for j in range(len(Oth)):
            yij = Y[i][j]
            if math.isnan(yij):
                continue
            s = cos(A[i], Oth[j])
            pos_sum += yij * math.exp(-alpha * (s - base))
            neg_sum += (1 - yij) * math.exp(beta * (s - base))
        total += math.log(1 + pos_sum) / alpha + math.log(1 + neg_sum) / beta
    return total / len(A)


def naive_pa(embeddings, proxies, y, alpha, margin):
    """Proxy-anchor with memberships y (N, C): pos over proxies with y>0, neg over all C."""
    E, P, Y = embeddings.tolist(), proxies.tolist(), y.tolist()
    pos_total, neg_total, n_with_pos = 0.0, 0.0, 0
    for c in range(len(P)):
        pos_sum, neg_sum, has_pos = 0.0, 0.0, False
        for x in range(len(E)):
            s = cos(E[x], P[c])
            pos_sum += Y[x][c] * math.exp(-alpha * (s - margin))
            neg_sum += (1 - Y[x][c]) * math.exp(alpha * (s + margin))
            has_pos = has_pos or Y[x][c] > 0
        pos_total += math.log(1 + pos_sum)
        neg_total += math.log(1 + neg_sum)
        n_with_pos += int(has_pos)
    return (pos_total / n_with_pos if n_with_pos else 0.0) + neg_total / len(P)


def hard_label_matrix(labels: torch.Tensor, ref_labels: torch.Tensor, same: bool) -> torch.Tensor:
    y = (labels[:, None] == ref_labels[None, :]).double()
    if same:
        y.fill_diagonal_(NAN)
    return y


# ---------------------------------------------------------------- soft labels vs naive
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "distance, margins, similarity",
    [(None, (0.0, 1.0), False), (None, (0.2, 0.5), False), (CosineSimilarity(), (0.8, 0.3), True)],
)
@pytest.mark.parametrize("avg_nonzero", [True, False])
def test_soft_contrastive_matches_naive(seed, distance, margins, similarity, avg_nonzero):
    anchors, _ = random_batch(7, 5, seed=seed)
    others, _ = random_batch(9, 5, seed=seed + 10)
    y = soft_matrix(7, 9, seed)
    kw = {"distance": distance} if distance is not None else {}
    if not avg_nonzero:
        kw["reducer"] = MeanReducer()
    loss = SoftContrastiveLoss(pos_margin=margins[0], neg_margin=margins[1], **kw)
    got = loss.soft_loss(anchors, others, y)
    want = naive_contrastive(anchors, others, y, *margins, similarity, avg_nonzero)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha, beta, base", [(2.0, 50.0, 0.5), (17.97, 75.66, 0.77)])
def test_soft_multi_similarity_matches_naive(seed, alpha, beta, base):
    anchors, _ = random_batch(6, 4, seed=seed)
    others, _ = random_batch(10, 4, seed=seed + 10)
    y = soft_matrix(6, 10, seed)
    loss = SoftMultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    got = loss.soft_loss(anchors, others, y)
    assert got.item() == pytest.approx(naive_ms(anchors, others, y, alpha, beta, base), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha, margin", [(32.0, 0.1), (8.0, 0.3)])
def test_soft_proxy_anchor_matches_naive(seed, alpha, margin):
    emb, _ = random_batch(9, 4, seed=seed)
    y = soft_matrix(9, 5, seed, nan_frac=0.0)
    y[:, 4] = 0.0  # a proxy without any positive membership
    loss = SoftProxyAnchorLoss(num_classes=5, embedding_size=4, alpha=alpha, margin=margin)
    got = loss.soft_loss(emb, y)
    want = naive_pa(emb, loss.proxies.detach().double(), y, alpha, margin)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_metrix_style_mixed_memberships_for_proxies():
    """A mix of classes c, c' with label lam for p_c and 1 - lam for p_c'."""
    emb, _ = random_batch(4, 4, seed=3)
    lam = 0.3
    c, c2 = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 0, 1])
    y = (
        lam * torch.nn.functional.one_hot(c, 3).double()
        + (1 - lam) * torch.nn.functional.one_hot(c2, 3).double()
    )
    loss = SoftProxyAnchorLoss(num_classes=3, embedding_size=4)
    want = naive_pa(emb, loss.proxies.detach().double(), y, 32.0, 0.1)
    assert loss.soft_loss(emb, y).item() == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- loss dicts from distances
def test_mat_loss_dict_of_any_similarity_matrix_multi_similarity():
    """``mat_loss_dict`` takes any (A, N) matrix: one eq. per anchor, by a loop, 0 for an
    anchor whose labels are all NaN."""
    alpha, beta, base = 2.0, 10.0, 0.5
    g = torch.Generator().manual_seed(5)
    mat = 2 * torch.rand(5, 7, generator=g, dtype=torch.float64) - 1
    y = soft_matrix(5, 7, seed=5)
    y[3] = NAN
    loss = SoftMultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    out = loss.mat_loss_dict(mat, y)["loss"]
    want = []
    for i in range(5):
        pairs = [(mat[i, j].item(), y[i, j].item()) for j in range(7) if not y[i, j].isnan()]
        pos = sum(t * math.exp(-alpha * (s - base)) for s, t in pairs)
        neg = sum((1 - t) * math.exp(beta * (s - base)) for s, t in pairs)
        want.append(math.log1p(pos) / alpha + math.log1p(neg) / beta)
    assert out["losses"].flatten().tolist() == pytest.approx(want, rel=1e-12)
    assert out["losses"][3].item() == 0.0
    assert out["indices"].tolist() == list(range(5))
    assert out["reduction_type"] == "element"


def test_pair_loss_dict_terms_and_indices_contrastive():
    """Each pair's terms y [d - m+]_+ (y > 0) and (1 - y) [m- - d]_+ (y < 1), under the
    indices given."""
    loss = SoftContrastiveLoss(pos_margin=0.1, neg_margin=0.8)
    dists = torch.tensor([0.05, 0.5, 0.3, 1.2, 0.6], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    anchors, others = torch.tensor([4, 3, 2, 1, 0]), torch.tensor([7, 8, 9, 10, 11])
    out = loss.pair_loss_dict(dists, y, anchors, others)
    pos, neg = out["pos_loss"], out["neg_loss"]
    assert pos["losses"].tolist() == pytest.approx([0.0, 0.25 * 0.2, 0.5 * 1.1, 0.5])
    assert [t.tolist() for t in pos["indices"]] == [[4, 2, 1, 0], [7, 9, 10, 11]]
    assert neg["losses"].tolist() == pytest.approx([0.3, 0.75 * 0.5, 0.0])
    assert [t.tolist() for t in neg["indices"]] == [[3, 2, 1], [8, 9, 10]]
    assert (pos["reduction_type"], neg["reduction_type"]) == ("pos_pair", "neg_pair")


@pytest.mark.parametrize("distance", [CosineSimilarity(), LpDistance()], ids=["cos", "euclid"])
@pytest.mark.parametrize("y", [0.0, 0.3, 1.0])
def test_rows_loss_dict_is_mat_loss_dict_of_each_anchors_rows_side_by_side(distance, y):
    """``rows_loss_dict``: an anchor's pairs spread over several rows (in any order), all of
    label ``y``, give the loss of ``mat_loss_dict`` on the anchor's rows laid side by side;
    0 for an anchor without a row (1) or whose rows have no pair (3)."""
    anchors = torch.tensor([2, 0, 2, 3, 2])
    g = torch.Generator().manual_seed(9)
    mat = 2 * torch.rand(5, 4, generator=g, dtype=torch.float64) - 1
    seen = torch.rand(5, 4, generator=g) < 0.7
    seen[3] = False
    loss = SoftMultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5, distance=distance)
    out = loss.rows_loss_dict(mat, seen, y, anchors, 4)["loss"]
    side_mat = torch.zeros(4, 12, dtype=torch.float64)
    side_y = torch.full((4, 12), NAN, dtype=torch.float64)
    for a in range(4):
        rows = (anchors == a).nonzero().flatten().tolist()
        for k, r in enumerate(rows):
            side_mat[a, 4 * k : 4 * (k + 1)] = mat[r]
            side_y[a, 4 * k : 4 * (k + 1)][seen[r]] = y
    want = loss.mat_loss_dict(side_mat, side_y)["loss"]
    assert out["losses"].shape == want["losses"].shape == (4, 1)
    torch.testing.assert_close(out["losses"], want["losses"], rtol=1e-12, atol=0)
    assert out["losses"][1].item() == out["losses"][3].item() == 0.0
    if y > 0:  # a real positive term: the check above is not vacuous
        assert torch.all(out["losses"][[0, 2]] > 0)
    assert out["indices"].tolist() == list(range(4))
    assert out["reduction_type"] == "element"


def test_rows_loss_dict_rejects_a_label_outside_0_1():
    loss = SoftMultiSimilarityLoss()
    mat, seen = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="0, 1"):
        loss.rows_loss_dict(mat, seen, 1.5, torch.tensor([0, 1]), 2)


@pytest.mark.parametrize("kind", ["contrastive", "multi_similarity"])
def test_mat_loss_dict_of_the_distances_is_soft_loss_dict(kind):
    _, loss = pml_and_soft(kind, reducer=DoNothingReducer())
    anchors, _ = random_batch(6, 4, seed=7)
    others, _ = random_batch(9, 4, seed=8)
    y = soft_matrix(6, 9, seed=7)
    got = loss.mat_loss_dict(loss.distance(anchors, others), y)
    want = loss.soft_loss(anchors, others, y)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name]["losses"], want[name]["losses"], rtol=0, atol=0)


# ---------------------------------------------------------------- 0/1 labels == PML's losses
def pml_and_soft(kind: str, **kw):
    if kind == "contrastive":
        return ContrastiveLoss(**kw), SoftContrastiveLoss(**kw)
    return MultiSimilarityLoss(**kw), SoftMultiSimilarityLoss(**kw)


def assert_same_loss_and_grad(loss_a, loss_b, emb, labels, *args, **kwargs):
    e1 = emb.detach().clone().requires_grad_(True)
    e2 = emb.detach().clone().requires_grad_(True)
    la, lb = loss_a(e1, labels, *args, **kwargs), loss_b(e2, labels, *args, **kwargs)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    if la.requires_grad or lb.requires_grad:
        la.backward()
        lb.backward()
        torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "kind, kw",
    [
        ("contrastive", {}),
        ("contrastive", {"pos_margin": 0.1, "neg_margin": 0.5}),
        ("contrastive", {"distance": CosineSimilarity(), "pos_margin": 0.9, "neg_margin": 0.2}),
        ("contrastive", {"reducer": MeanReducer()}),
        ("multi_similarity", {}),
        ("multi_similarity", {"alpha": 17.97, "beta": 75.66, "base": 0.77}),
        ("multi_similarity", {"distance": LpDistance(), "base": 0.9}),
    ],
)
def test_hard_labels_equal_pml(seed, kind, kw):
    pml, soft = pml_and_soft(kind, **kw)
    emb, labels = random_batch(16, 6, n_classes=4, seed=seed)
    assert_same_loss_and_grad(pml, soft, emb, labels)
    # the same through a miner's tuples (pairs and triplets)
    for miner in (MultiSimilarityMiner(epsilon=0.3), TripletMarginMiner(margin=0.5)):
        tuples = miner(emb.detach(), labels)
        assert_same_loss_and_grad(pml, soft, emb, labels, tuples)
    # and with a reference set
    ref, ref_labels = random_batch(10, 6, n_classes=4, seed=seed + 100)
    assert_same_loss_and_grad(pml, soft, emb, labels, ref_emb=ref.detach(), ref_labels=ref_labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_labels_equal_pml_proxy_anchor(seed):
    emb, labels = random_batch(16, 6, n_classes=5, seed=seed)
    labels[labels == 4] = 3  # proxy 4 has no positive in the batch
    pml = ProxyAnchorLoss(num_classes=6, embedding_size=6)
    soft = SoftProxyAnchorLoss(num_classes=6, embedding_size=6)
    soft.proxies.data = pml.proxies.data.clone()
    assert_same_loss_and_grad(pml, soft, emb, labels)
    tuples = MultiSimilarityMiner(epsilon=0.2)(emb.detach(), labels)
    assert_same_loss_and_grad(pml, soft, emb, labels, tuples)
    # the proxies' gradients agree too
    pml.proxies.grad = None
    soft.proxies.grad = None
    pml(emb.detach(), labels).backward()
    soft(emb.detach(), labels).backward()
    torch.testing.assert_close(pml.proxies.grad, soft.proxies.grad)


@pytest.mark.parametrize("kind", ["contrastive", "multi_similarity"])
def test_soft_loss_with_01_matrix_equals_forward(kind):
    """soft_loss on the 0/1 label matrix of a batch (self-pairs NaN) is the hard-label loss."""
    _, soft = pml_and_soft(kind)
    emb, labels = random_batch(12, 5, n_classes=3, seed=4)
    y = hard_label_matrix(labels, labels, same=True)
    torch.testing.assert_close(soft.soft_loss(emb, emb, y), soft(emb, labels))


def test_soft_loss_01_proxy_anchor_equals_forward():
    emb, labels = random_batch(12, 5, n_classes=3, seed=5)
    loss = SoftProxyAnchorLoss(num_classes=3, embedding_size=5)
    y = torch.nn.functional.one_hot(labels, 3).double()
    torch.testing.assert_close(loss.soft_loss(emb, y), loss(emb, labels))


def test_fractional_label_enters_both_terms():
    """y strictly inside (0, 1) weighs both terms; at 0 or 1 only one remains."""
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    o = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # d = sqrt(0.8) ~ 0.894
    d = math.sqrt(0.8)
    loss = SoftContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    for y in (0.0, 0.25, 1.0):
        got = loss.soft_loss(a, o, torch.tensor([[y]], dtype=torch.float64)).item()
        assert got == pytest.approx(y * d + (1 - y) * (1 - d))


# ---------------------------------------------------------------- PML contract
def seeded_proxy_anchor() -> SoftProxyAnchorLoss:
    """Fresh loss, same proxies every call (the contract checks compare fresh losses)."""
    torch.manual_seed(0)
    return SoftProxyAnchorLoss(num_classes=4, embedding_size=8)


def factories():
    return {
        "contrastive": lambda: SoftContrastiveLoss(),
        "multi_similarity": lambda: SoftMultiSimilarityLoss(),
        "proxy_anchor": seeded_proxy_anchor,
    }


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity", "proxy_anchor"])
def test_contract(name):
    make = factories()[name]
    torch.manual_seed(0)
    check_empty_and_single_class(make)
    check_finite_edge_cases(make)
    check_autocast_finite(make)
    emb, labels = random_batch(16, 8, n_classes=4)
    check_labels_vs_indices_tuple(make, emb, labels, lmu.get_all_pairs_indices(labels))
    emb, labels = random_batch(8, 8, n_classes=4, seed=1)
    check_gradcheck(make, emb, labels)


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_gradcheck_soft_pairs(name):
    loss = factories()[name]()
    others, _ = random_batch(7, 4, seed=8)
    y = soft_matrix(5, 7, seed=8)
    anchors, _ = random_batch(5, 4, seed=9)
    assert torch.autograd.gradcheck(
        lambda a, o: loss.soft_loss(a, o, y), (anchors, others), eps=1e-6, atol=1e-5
    )


def test_gradcheck_soft_proxy_anchor():
    loss = SoftProxyAnchorLoss(num_classes=4, embedding_size=4, alpha=8.0)
    emb, _ = random_batch(6, 4, seed=10)
    y = soft_matrix(6, 4, seed=10, nan_frac=0.0)
    assert torch.autograd.gradcheck(lambda e: loss.soft_loss(e, y), (emb,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_soft_edge_cases_are_finite(name):
    loss = factories()[name]()
    anchors, _ = random_batch(4, 8, seed=11)
    # no pair at all -> 0; the mixed point equal to the anchor; float32
    empty = torch.full((4, 3), NAN, dtype=torch.float64)
    out = loss.soft_loss(anchors, anchors[:3], empty)
    assert out.item() == 0.0
    y = torch.full((4, 4), 0.5, dtype=torch.float64)
    for a, o, yy in [
        (anchors, anchors.detach().clone(), y),
        (anchors.float(), anchors.detach().float(), y.float()),
        (anchors, anchors[:0], torch.zeros(4, 0, dtype=torch.float64)),
    ]:
        a = a.detach().clone().requires_grad_(True)
        out = loss.soft_loss(a, o, yy)
        assert torch.isfinite(out)
        out.backward()
        assert a.grad is None or torch.isfinite(a.grad).all()


def test_bad_soft_labels_raise():
    anchors, _ = random_batch(3, 4)
    with pytest.raises(ValueError, match="shape"):
        SoftMultiSimilarityLoss().soft_loss(
            anchors, anchors, torch.zeros(3, 2, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SoftContrastiveLoss().soft_loss(
            anchors, anchors, torch.full((3, 3), 1.5, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="NaN"):
        SoftProxyAnchorLoss(2, 4).soft_loss(anchors, torch.full((3, 2), NAN, dtype=torch.float64))
    labels = torch.tensor([0, 0, 1])
    both = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 0]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positive or negative"):
        SoftMultiSimilarityLoss()(anchors, labels, both)
    with pytest.raises(ValueError, match="ref_emb"):
        SoftProxyAnchorLoss(2, 4)(anchors, labels, ref_emb=anchors.detach(), ref_labels=labels)
