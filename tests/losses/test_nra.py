"""NRALoss and its transfer function against naive loops over the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import PairMarginMiner, TripletMarginMiner
from pytorch_metric_learning.reducers import DoNothingReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugins.losses import NRALoss
from pml_plugins.losses.nra import transfer
from tests.loss_contract import (
    check_autocast_finite,
    check_empty_and_single_class,
    check_finite_edge_cases,
    check_gradcheck,
    check_labels_vs_indices_tuple,
    random_batch,
)

RTOL = {torch.float32: 1e-5, torch.float64: 1e-7}
ALPHAS = [1.0, 2.0, 4.0, 6.0]


def w_paper(r: float, alpha: float) -> float:
    """Eq. (10) of the paper."""
    if r < 0.5:
        return 0.5 * (2 * r) ** alpha
    return 1 - 0.5 * (2 * (1 - r)) ** alpha


def paper_rank(d, d_min, d_max):
    """Eqs. (11)-(12): (d - D_min) / (D_max - D_min); 0 where all candidates are equally far."""
    span = d_max - d_min
    if (span.item() if torch.is_tensor(span) else span) == 0:
        return 0.0 * d
    return (d - d_min) / span


def naive_nra(emb, labels, alpha, eps=1e-4, ref=None, ref_labels=None, pairs=None):
    """Loop over anchors: ranks, similarities s = 1 - w(r), eq. (13) per anchor, mean.

    Returns (loss, mean r+, mean r-, fraction saturated).
    """
    x = [[float(t) for t in row] for row in emb]
    same_set = ref is None
    y = x if same_set else [[float(t) for t in row] for row in ref]
    lab = [int(t) for t in labels] if labels is not None else None
    rlab = lab if same_set else [int(t) for t in ref_labels]
    if pairs is not None:
        a1, p, a2, n = (list(map(int, t)) for t in pairs)
        pos_pairs, neg_pairs = set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True))
    per_anchor, r_pos, r_neg, saturated = [], [], [], []
    for i in range(len(x)):
        if pairs is None:
            others = [j for j in range(len(y)) if not (same_set and j == i)]
            P = [j for j in others if lab[i] == rlab[j]]
            N = [j for j in others if lab[i] != rlab[j]]
        else:
            P = [j for j in range(len(y)) if (i, j) in pos_pairs]
            N = [j for j in range(len(y)) if (i, j) in neg_pairs]
        S = P + N
        if not S:
            continue
        D = {j: math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], y[j], strict=True))) for j in S}
        d_min, d_max = min(D[j] for j in S), max(D[j] for j in S)
        loss_i, sat = 0.0, False
        if P:
            d_pos = max(D[j] for j in P)
            r = paper_rank(d_pos, d_min, d_max)
            s_pos = 1 - w_paper(r, alpha)
            loss_i -= math.log(s_pos + eps)
            r_pos.append(r)
            sat = sat or d_pos == d_max
        if N:
            d_neg = min(D[j] for j in N)
            r = paper_rank(d_neg, d_min, d_max)
            s_neg = 1 - w_paper(r, alpha)
            loss_i -= math.log(1 - s_neg + eps)
            r_neg.append(r)
            sat = sat or d_neg == d_min
        per_anchor.append(loss_i)
        saturated.append(sat)

    def mean(v):
        return sum(v) / len(v) if v else 0.0

    return mean(per_anchor), mean(r_pos), mean(r_neg), mean([float(s) for s in saturated])


def batch_with_singletons(m, d, c, dtype, seed):
    """Random batch in which the last label occurs once (an anchor without positives)."""
    emb, labels = random_batch(m, d, c, dtype=dtype, seed=seed)
    labels = labels.clone()
    labels[-1] = c + 1
    return emb, labels


SHAPES = [(8, 4, 2), (12, 3, 4), (16, 8, 5), (30, 6, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_loop_all_anchors(dtype, alpha, shape):
    m, d, c = shape
    emb, labels = batch_with_singletons(m, d, c, dtype, seed=m + int(alpha))
    loss_fn = NRALoss(alpha=alpha, collect_stats=True)
    loss = loss_fn(emb, labels)
    naive, r_pos, r_neg, frac_sat = naive_nra(emb.detach(), labels, alpha)
    assert loss.item() == pytest.approx(naive, rel=RTOL[dtype])
    assert loss_fn.mean_pos_rank == pytest.approx(r_pos, rel=RTOL[dtype])
    assert loss_fn.mean_neg_rank == pytest.approx(r_neg, rel=RTOL[dtype], abs=1e-7)
    assert loss_fn.frac_saturated == pytest.approx(frac_sat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_detached_normalizers_same_value(dtype, alpha):
    emb, labels = random_batch(12, 4, 3, dtype=dtype, seed=1)
    naive = naive_nra(emb.detach(), labels, alpha)[0]
    loss = NRALoss(alpha=alpha, detach_normalizers=True)(emb, labels)
    assert loss.item() == pytest.approx(naive, rel=RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_naive_loop_with_ref_emb(dtype, alpha):
    emb, labels = random_batch(10, 5, 3, dtype=dtype, seed=2)
    ref, ref_labels = random_batch(13, 5, 4, dtype=dtype, seed=3)
    loss = NRALoss(alpha=alpha)(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    naive = naive_nra(emb.detach(), labels, alpha, ref=ref.detach(), ref_labels=ref_labels)[0]
    assert loss.item() == pytest.approx(naive, rel=RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(
    "miner",
    [
        PairMarginMiner(pos_margin=0.5, neg_margin=1.5),
        TripletMarginMiner(margin=0.5, type_of_triplets="all"),
    ],
    ids=["pairs", "triplets"],
)
def test_matches_naive_loop_with_miner(dtype, alpha, miner):
    emb, labels = random_batch(16, 6, 4, dtype=dtype, seed=4)
    indices_tuple = miner(emb, labels)
    assert len(indices_tuple[0]) > 0
    loss = NRALoss(alpha=alpha)(emb, labels, indices_tuple)
    pairs = lmu.convert_to_pairs(indices_tuple, labels)
    naive = naive_nra(emb.detach(), labels, alpha, pairs=pairs)[0]
    assert loss.item() == pytest.approx(naive, rel=RTOL[dtype])
    torch.testing.assert_close(NRALoss(alpha=alpha)(emb, None, indices_tuple), loss)


def test_labels_vs_indices_tuple():
    emb, labels = random_batch(12, 5, 3, seed=5)
    check_labels_vs_indices_tuple(NRALoss, emb, labels, lmu.get_all_pairs_indices(labels))


def test_similarity_ranks_on_negated_similarity():
    emb, labels = random_batch(12, 5, 3, seed=6)
    unit = torch.nn.functional.normalize(emb.detach(), dim=1)
    loss = NRALoss(distance=CosineSimilarity())(emb, labels)
    # a similarity is ranked through its negation; 1 - cos is -cos shifted, same ranks
    cos = unit @ unit.T
    naive = _naive_nra_on_matrix(1 - cos, labels, 4.0)
    assert loss.item() == pytest.approx(naive, rel=1e-7)


def _naive_nra_on_matrix(D, labels, alpha, eps=1e-4):
    """The same loop as ``naive_nra`` on a given dissimilarity matrix."""
    m = len(labels)
    total, count = 0.0, 0
    for i in range(m):
        P = [j for j in range(m) if j != i and labels[i] == labels[j]]
        N = [j for j in range(m) if labels[i] != labels[j]]
        S = P + N
        d_min, d_max = min(float(D[i, j]) for j in S), max(float(D[i, j]) for j in S)
        li = 0.0
        if P:
            r = paper_rank(max(float(D[i, j]) for j in P), d_min, d_max)
            li -= math.log(1 - w_paper(r, alpha) + eps)
        if N:
            r = paper_rank(min(float(D[i, j]) for j in N), d_min, d_max)
            li -= math.log(1 - (1 - w_paper(r, alpha)) + eps)
        total += li
        count += 1
    return total / count


@pytest.mark.parametrize("alpha", [0.5, *ALPHAS])
def test_transfer_matches_eq10(alpha):
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    got = transfer(r, alpha)
    expected = torch.tensor([w_paper(float(t), alpha) for t in r], dtype=torch.float64)
    # alpha < 1 keeps the base of the power >= the smallest normal number: 7e-155 at r = 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-150)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_transfer_properties(alpha):
    half = torch.tensor(0.5, dtype=torch.float64)
    assert transfer(half, alpha).item() == 0.5
    for delta in (1e-6, 1e-9):
        below = transfer(half - delta, alpha).item()
        above = transfer(half + delta, alpha).item()
        assert abs(above - below) < 4 * alpha * delta  # continuous at 1/2
    h = 1e-7  # one-sided differences on both sides of 1/2; error alpha*(alpha-1)*h
    left = (transfer(half, alpha) - transfer(half - h, alpha)).item() / h
    right = (transfer(half + h, alpha) - transfer(half, alpha)).item() / h
    assert left == pytest.approx(alpha, rel=1e-5)
    assert right == pytest.approx(alpha, rel=1e-5)
    r = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(transfer(1 - r, alpha), 1 - transfer(r, alpha))  # symmetry
    assert transfer(torch.tensor(0.0), alpha).item() == 0.0
    assert transfer(torch.tensor(1.0), alpha).item() == 1.0


def test_transfer_identity_for_alpha_one():
    r = torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(transfer(r, 1.0), r)
    r = r.clone().requires_grad_(True)
    transfer(r, 1.0).sum().backward()
    torch.testing.assert_close(r.grad, torch.ones_like(r))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_transfer_gradient_finite_at_ends(alpha):
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    transfer(r, alpha).sum().backward()
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_perfectly_separated_batch_is_at_the_minimum(alpha, eps):
    # each class collapsed to a point, classes equidistant: r+ = 0 and r- -> 1 everywhere
    centres = 1e6 * torch.eye(3, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(4)
    emb = centres[labels]
    lower_bound = -2 * math.log(1 + eps)
    loss = NRALoss(alpha=alpha, eps=eps)(emb, labels)
    assert loss.item() >= lower_bound - 1e-12
    assert loss.item() == pytest.approx(lower_bound, rel=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_loss_within_bounds_on_random_batches(alpha):
    eps = 1e-4
    for seed in range(5):
        emb, labels = random_batch(16, 4, 4, seed=seed)
        loss = NRALoss(alpha=alpha)(emb, labels).item()
        assert -2 * math.log(1 + eps) <= loss <= -2 * math.log(eps)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_saturated_worst_case_is_minus_log_eps_per_term(alpha):
    # corners of a square, diagonals share a class: for every anchor the nearest sample
    # is a negative (r- = 0) and the farthest is its positive (r+ = 1): -log(eps) each
    side = 1e-3
    emb = side * torch.tensor([[0, 0], [1, 1], [1, 0], [0, 1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    eps = 1e-4
    loss_fn = NRALoss(alpha=alpha, eps=eps, collect_stats=True)
    loss = loss_fn(emb, labels)
    assert loss.item() == pytest.approx(-2 * math.log(eps), rel=1e-12)
    assert loss_fn.frac_saturated == 1.0
    assert loss_fn.mean_neg_rank == 0.0


def test_literal_saturation_has_zero_gradient_unless_detached():
    # every label distinct: no positives, each anchor's nearest sample is its closest
    # negative, so r- = 0 identically and the literal formula has no gradient
    emb, _ = random_batch(6, 3, seed=7)
    labels = torch.arange(6)
    emb_a = emb.detach().clone().requires_grad_(True)
    loss = NRALoss(alpha=1.0)(emb_a, labels)
    assert loss.item() == pytest.approx(-math.log(1e-4), rel=1e-12)
    loss.backward()
    assert torch.count_nonzero(emb_a.grad) == 0
    emb_b = emb.detach().clone().requires_grad_(True)
    NRALoss(alpha=1.0, detach_normalizers=True)(emb_b, labels).backward()
    assert torch.isfinite(emb_b.grad).all() and emb_b.grad.abs().max() > 1.0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradcheck(alpha):
    emb, labels = batch_with_singletons(8, 3, 3, torch.float64, seed=8)
    check_gradcheck(lambda: NRALoss(alpha=alpha), emb, labels)
    ref, ref_labels = random_batch(5, 3, 3, seed=9)
    check_gradcheck(
        lambda: NRALoss(alpha=alpha), emb, labels, ref_emb=ref.detach(), ref_labels=ref_labels
    )


def loop_nra_torch(emb, labels, alpha, detach, eps=1e-4):
    """Eq. (13) by a loop over anchors in differentiable torch scalars; with ``detach``
    the per-anchor D_min and D_max are Python floats (constants)."""
    m = len(labels)
    terms = []
    for i in range(m):
        P = [j for j in range(m) if j != i and labels[i] == labels[j]]
        N = [j for j in range(m) if labels[i] != labels[j]]
        D = {j: torch.sqrt(((emb[i] - emb[j]) ** 2).sum()) for j in P + N}
        d_min = min((D[j] for j in P + N), key=lambda t: t.item())
        d_max = max((D[j] for j in P + N), key=lambda t: t.item())
        if detach:
            d_min, d_max = d_min.item(), d_max.item()
        li = 0
        if P:
            r = paper_rank(max((D[j] for j in P), key=lambda t: t.item()), d_min, d_max)
            w = 0.5 * (2 * r) ** alpha if r < 0.5 else 1 - 0.5 * (2 * (1 - r)) ** alpha
            li = li - torch.log(1 - w + eps)
        if N:
            r = paper_rank(min((D[j] for j in N), key=lambda t: t.item()), d_min, d_max)
            w = 0.5 * (2 * r) ** alpha if r < 0.5 else 1 - 0.5 * (2 * (1 - r)) ** alpha
            li = li - torch.log(w + eps)
        terms.append(li)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("detach", [False, True])
def test_gradient_matches_loop(alpha, detach):
    # detached normalisers are not the gradient of the loss (gradcheck does not apply):
    # compare with a loop where D_min and D_max are constants
    emb, labels = batch_with_singletons(10, 4, 3, torch.float64, seed=12)
    a = emb.detach().clone().requires_grad_(True)
    NRALoss(alpha=alpha, detach_normalizers=detach)(a, labels).backward()
    b = emb.detach().clone().requires_grad_(True)
    loop_nra_torch(b, labels, alpha, detach).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10)
    if detach:  # the normalisers' share of the gradient is really left out
        c = emb.detach().clone().requires_grad_(True)
        loop_nra_torch(c, labels, alpha, False).backward()
        assert not torch.allclose(a.grad, c.grad)


@pytest.mark.parametrize("detach", [False, True])
def test_edge_cases_finite(detach):
    check_empty_and_single_class(lambda: NRALoss(detach_normalizers=detach))
    check_finite_edge_cases(lambda: NRALoss(detach_normalizers=detach))
    check_finite_edge_cases(lambda: NRALoss(alpha=0.5, detach_normalizers=detach))


def test_small_batches():
    emb, _ = random_batch(2, 3, seed=10)
    # two classes of one sample: one negative each, r- = 0, -log(eps) per anchor
    loss = NRALoss()(emb, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(-math.log(1e-4), rel=1e-12)
    # one class of two samples: one positive each, r+ = 0, -log(1 + eps) per anchor
    loss = NRALoss()(emb, torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(-math.log(1 + 1e-4), rel=1e-12)
    # a single sample has nothing to compare with
    assert NRALoss()(emb[:1], torch.tensor([0])).item() == 0.0


def test_no_pairs_is_zero():
    emb, labels = random_batch(4, 3, seed=11)
    empty = (torch.tensor([], dtype=torch.long),) * 4
    loss = NRALoss()(emb, labels, empty)
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("detach", [False, True])
def test_autocast(dtype, detach):
    check_autocast_finite(lambda: NRALoss(detach_normalizers=detach), dtype=dtype)


def test_rejects_bad_alpha():
    with pytest.raises(ValueError):
        NRALoss(alpha=0)
    with pytest.raises(ValueError):
        transfer(torch.tensor(0.3), -1.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_ranks_are_invariant_to_the_scale_of_the_distances(alpha):
    """Eqs. (11)-(12) have no epsilon: the ranks, and so the loss, are the same for the
    embeddings scaled by 1e-3 (an epsilon in the denominator would change the ranks)."""
    emb, labels = batch_with_singletons(16, 4, 4, torch.float64, seed=13)
    loss_fn = NRALoss(alpha=alpha, collect_stats=True)
    loss = loss_fn(emb, labels).item()
    ranks = loss_fn.mean_pos_rank, loss_fn.mean_neg_rank
    small = loss_fn(emb * 1e-3, labels).item()
    assert small == pytest.approx(loss, rel=1e-12)
    assert (loss_fn.mean_pos_rank, loss_fn.mean_neg_rank) == pytest.approx(ranks, rel=1e-12)


def test_equally_far_candidates_give_rank_zero_and_no_gradient():
    """D_max = D_min (a single candidate, or all at one distance) is 0/0: rank 0, and no
    gradient through it (no 1/eps spike)."""
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    emb.requires_grad_(True)
    labels = torch.tensor([0, 0, 1])
    loss_fn = NRALoss(collect_stats=True, reducer=DoNothingReducer())
    out = loss_fn(emb, labels)["loss"]
    # anchor 0: positive and negative both at distance 1: r+ = r- = 0
    per_anchor = dict(zip(out["indices"].tolist(), out["losses"].tolist(), strict=True))
    assert per_anchor[0] == pytest.approx(-math.log(1 + 1e-4) - math.log(1e-4), rel=1e-12)
    out["losses"][out["indices"] == 0].sum().backward()
    assert torch.count_nonzero(emb.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16])  # PML's LpDistance has no bfloat16 CPU cdist
def test_low_precision_in_low_precision_out(dtype):
    """As PML's own losses: float16 embeddings give a float16 loss."""
    emb, labels = random_batch(12, 4, 3, seed=14)
    loss = NRALoss()(emb.to(dtype), labels)
    assert loss.dtype == dtype
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(NRALoss()(emb, labels).item(), rel=2e-2)
