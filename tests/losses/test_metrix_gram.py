"""MetrixLoss embed mode: the Gram-matrix path against the generic path that builds the mixed
points (loss, gradients, reducer input, stats), and the fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)
from pytorch_metric_learning.reducers import DoNothingReducer
from pytorch_metric_learning.regularizers import LpRegularizer

from pml_plugins.losses import (
    MetrixLoss,
    SoftContrastiveLoss,
    SoftMultiSimilarityLoss,
    SoftProxyAnchorLoss,
)
from pml_plugins.losses.metrix_gram import matmul_fp32, row_distances
from tests.loss_contract import random_batch

RTOL, ATOL = 1e-10, 1e-12

DISTANCES = {
    "cosine": lambda: CosineSimilarity(),
    "cosine^2": lambda: CosineSimilarity(power=2),
    "dot": lambda: DotProductSimilarity(normalize_embeddings=False),
    "dot_normalised": lambda: DotProductSimilarity(),
    "euclid": lambda: LpDistance(),
    "euclid^2": lambda: LpDistance(power=2),
    "euclid_raw": lambda: LpDistance(normalize_embeddings=False),
    "euclid_raw^2": lambda: LpDistance(normalize_embeddings=False, power=2),
}
INNER = {
    "multi_similarity": lambda d: SoftMultiSimilarityLoss(
        alpha=2.0, beta=10.0, base=0.5, distance=d
    ),
    "contrastive": lambda d: SoftContrastiveLoss(pos_margin=0.1, neg_margin=0.9, distance=d),
    "proxy_anchor": lambda d: SoftProxyAnchorLoss(
        num_classes=5, embedding_size=6, margin=0.1, alpha=8.0, distance=d
    ),
}
#: 2 classes of 3, 2 of 2, one singleton (anchors with and without positives)
LABELS = torch.tensor([0, 1, 2, 0, 3, 1, 2, 0, 4, 1, 3])


def make(loss_name: str, dist_name: str, **kw) -> MetrixLoss:
    torch.manual_seed(3)
    return MetrixLoss(INNER[loss_name](DISTANCES[dist_name]()), **kw).double()


def both_paths(loss: MetrixLoss, emb: torch.Tensor, labels: torch.Tensor, lam: float):
    """(value, grads) of the Gram path and of the generic path on the same mixed points."""
    pairs = loss.mixing_pairs(labels, emb)
    params = [emb, *loss.parameters()]
    out = []
    for gram_path in (True, False):
        if gram_path:
            value = loss.compute_embed_mixed_loss(emb, labels, pairs, lam)
        else:
            value = generic(loss, emb, labels, pairs, lam)
        used = [p for p in params if p.requires_grad]
        out.append((value, torch.autograd.grad(value, used, allow_unused=True)))
    return out


def generic(loss: MetrixLoss, emb, labels, pairs, lam):
    """The generic path: the mixed points built, then the soft-label loss."""
    mixed_emb = loss.build_mixed_embeddings(emb, pairs, lam)
    return loss.compute_mixed_loss(emb, labels, mixed_emb, pairs, lam)


def assert_same(fast, generic):
    (v1, g1), (v2, g2) = fast, generic
    torch.testing.assert_close(v1, v2, rtol=RTOL, atol=ATOL)
    for a, b in zip(g1, g2, strict=True):
        if a is None or b is None:
            assert a is None and b is None or torch.all((a if b is None else b) == 0)
        else:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss_name", list(INNER))
@pytest.mark.parametrize("dist_name", list(DISTANCES))
@pytest.mark.parametrize("positives", ["first", "all"])
@pytest.mark.parametrize("negatives", ["all", "hardest"])
def test_gram_path_equals_generic_path(loss_name, dist_name, positives, negatives):
    loss = make(loss_name, dist_name, positives=positives, negatives=negatives)
    assert loss.gram_path_applies()
    emb, _ = random_batch(len(LABELS), 6, seed=11)
    for lam in (0.37, 0.81):
        assert_same(*both_paths(loss, emb, LABELS, lam))


@pytest.mark.parametrize("loss_name", list(INNER))
@pytest.mark.parametrize("dist_name", ["cosine", "euclid", "euclid_raw^2"])
@pytest.mark.parametrize("positives", ["first", "all"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gram_path_equals_generic_path_at_extreme_lambda(loss_name, dist_name, positives, lam):
    """λ ∈ {0, 1}: a mixed point can be its anchor (Euclidean distance exactly 0). A batch
    this small (at most 22 mixed points) keeps ``torch.cdist`` (generic path) on its exact branch:
    above 25 points it switches to a matrix-product form that returns 0 or ~1e-8 there."""
    labels = torch.tensor([0, 0, 1, 0, 1, 2])  # 2 has no positive
    loss = make(loss_name, dist_name, positives=positives)
    emb, _ = random_batch(len(labels), 6, seed=12)
    assert_same(*both_paths(loss, emb, labels, lam))


@pytest.mark.parametrize("loss_name", ["multi_similarity", "contrastive"])
@pytest.mark.parametrize("positives", ["first", "all"])
def test_gram_path_gives_the_reducer_the_same_input(loss_name, positives):
    """Per-anchor / per-pair losses and their indices, in the same order."""
    dist = "cosine" if loss_name == "multi_similarity" else "euclid"
    loss = make(loss_name, dist, positives=positives)
    loss.loss.reducer = DoNothingReducer()
    emb, _ = random_batch(len(LABELS), 6, seed=13)
    pairs = loss.mixing_pairs(LABELS, emb)
    fast = loss.compute_embed_mixed_loss(emb, LABELS, pairs, 0.6)
    slow = generic(loss, emb, LABELS, pairs, 0.6)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name]["losses"], slow[name]["losses"], rtol=RTOL, atol=ATOL)
        assert fast[name]["reduction_type"] == slow[name]["reduction_type"]
        idx_fast, idx_gen = fast[name]["indices"], slow[name]["indices"]
        if isinstance(idx_gen, tuple):
            assert all(torch.equal(a, b) for a, b in zip(idx_fast, idx_gen, strict=True))
        else:
            assert torch.equal(idx_fast, idx_gen)


@pytest.mark.parametrize("loss_name", list(INNER))
def test_gram_path_records_the_same_stats(loss_name):
    loss = make(loss_name, "cosine", collect_stats=True)
    loss.loss.distance.collect_stats = True
    emb, _ = random_batch(len(LABELS), 6, seed=14)
    emb = emb * torch.linspace(0.5, 2.0, len(LABELS), dtype=emb.dtype).unsqueeze(1)
    pairs = loss.mixing_pairs(LABELS, emb)
    names = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm"]
    names += ["final_avg_ref_norm"]

    def stats():
        return [getattr(loss.loss.distance, k) for k in names] + [
            loss.mixed_loss,
            loss.num_mixed,
            loss.num_mixed_pairs,
        ]

    loss.compute_embed_mixed_loss(emb, LABELS, pairs, 0.3)
    fast = stats()
    generic(loss, emb, LABELS, pairs, 0.3)
    assert fast == pytest.approx(stats(), rel=1e-10)


def test_forward_uses_the_gram_path_with_the_same_result():
    """forward = clean loss + weight x mixed loss whichever path computes the mixed loss."""
    emb, _ = random_batch(len(LABELS), 6, seed=15)
    loss = MetrixLoss("multi_similarity", lam=0.45, miner=None).double()
    assert loss.gram_path_applies()
    pairs = loss.mixing_pairs(LABELS, emb)
    want = loss.compute_clean_loss(emb, LABELS) + 0.4 * generic(loss, emb, LABELS, pairs, 0.45)
    torch.testing.assert_close(loss(emb, LABELS), want, rtol=RTOL, atol=ATOL)


class ShiftedCosine(CosineSimilarity):
    """A user-supplied distance: cosine similarity minus a constant."""

    def compute_mat(self, query_emb, ref_emb):
        return super().compute_mat(query_emb, ref_emb) - 0.1


@pytest.mark.parametrize(
    "distance",
    [LpDistance(p=1), LpDistance(p=3), SNRDistance(), ShiftedCosine()],
    ids=["L1", "L3", "SNR", "user"],
)
def test_unsupported_distances_fall_back_to_the_generic_path(distance):
    loss = MetrixLoss(SoftMultiSimilarityLoss(distance=distance), lam=0.3, miner=None)
    assert not loss.gram_path_applies()
    emb, _ = random_batch(len(LABELS), 6, seed=16)
    pairs = loss.mixing_pairs(LABELS, emb)
    want = generic(loss, emb, LABELS, pairs, 0.3)
    assert loss.compute_embed_mixed_loss(emb, LABELS, pairs, 0.3) == want


def test_other_fallbacks():
    """Proxy-Anchor with an embedding regularizer (it would need the mixed points) and
    ``anchor_pairs="all"`` take the generic path."""
    pa = SoftProxyAnchorLoss(num_classes=5, embedding_size=6, embedding_regularizer=LpRegularizer())
    assert not MetrixLoss(pa).gram_path_applies()
    loss = MetrixLoss("multi_similarity", miner=None, anchor_pairs="all").double()
    assert not loss.gram_path_applies()
    emb, _ = random_batch(len(LABELS), 6, seed=17)
    pairs = loss.mixing_pairs(LABELS)
    want = generic(loss, emb, LABELS, pairs, 0.3)
    assert loss.compute_embed_mixed_loss(emb, LABELS, pairs, 0.3) == want


def test_gram_path_float32_and_no_mixes():
    emb, _ = random_batch(len(LABELS), 6, seed=18)
    loss = MetrixLoss("multi_similarity", miner=None).double()
    pairs = loss.mixing_pairs(LABELS, emb)
    want = both_paths(loss, emb, LABELS, 0.3)[1][0]
    got = loss.float().compute_embed_mixed_loss(emb.float(), LABELS, pairs, 0.3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    one_class = torch.zeros(len(LABELS), dtype=torch.long)
    pairs = loss.mixing_pairs(one_class, emb)
    assert pairs.num_pairs == 0
    assert loss.double().compute_embed_mixed_loss(emb, one_class, pairs, 0.3) == 0


@pytest.mark.parametrize("loss_name", list(INNER))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_path_half_precision_large_norms(loss_name, dtype):
    """Raw embeddings of norm 1000: their Gram matrix would overflow float16, so it is taken
    in float32; the loss keeps the embeddings' dtype and stays close to its float64 value."""
    loss = make(loss_name, "cosine")
    emb, _ = random_batch(len(LABELS), 6, seed=19, requires_grad=False)
    emb = emb * 1000 / emb.norm(dim=1, keepdim=True)
    pairs = loss.mixing_pairs(LABELS, emb)
    want = loss.compute_embed_mixed_loss(emb, LABELS, pairs, 0.3)
    low = emb.to(dtype).requires_grad_(True)
    got = loss.compute_embed_mixed_loss(low, LABELS, pairs, 0.3)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=1e-3)
    got.backward()
    assert torch.isfinite(low.grad).all()


def ms_rows_reference(inner, mat, seen, lam, anchors, n):
    """The MS loss dict's losses of the Gram path before c324494 (``metrix_gram``'s
    ``ms_rows_loss_dict`` and ``grouped_log1p_exp_sum``), op for op: per row a
    log-sum-exp, the label's log and the base added after it, then per anchor a
    log1p-sum-exp shifted by the anchor's largest row."""
    y = torch.tensor(lam, dtype=torch.float64).to(mat.dtype)
    sign = -1.0 if inner.distance.is_inverted else 1.0
    mask = torch.zeros_like(mat).masked_fill_(~seen, float("-inf"))
    terms = []
    for weight, coef in zip(
        (y.item(), (1 - y).item()), (sign * inner.alpha, -sign * inner.beta), strict=True
    ):
        if weight <= 0:
            terms.append(mat.new_zeros(n))
            continue
        rows = torch.logsumexp(torch.add(mask, mat, alpha=coef), dim=1)
        rows = rows + (math.log(weight) - coef * inner.base)
        with torch.no_grad():
            shift = torch.zeros(n, dtype=rows.dtype).scatter_reduce(
                0, anchors, rows, "amax", include_self=True
            )
        total = torch.zeros_like(shift).index_add(0, anchors, torch.exp(rows - shift[anchors]))
        terms.append(shift + torch.log(torch.exp(-shift) + total))
    return ((1.0 / inner.alpha) * terms[0] + (1.0 / inner.beta) * terms[1]).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dist_name", ["cosine", "euclid_raw^2"])
@pytest.mark.parametrize("positives", ["first", "all"])
def test_gram_path_ms_keeps_its_summation_order(dtype, dist_name, positives):
    """The committed reference runs (float32 training) depend on the order in which the
    Gram path sums MS's terms, which no tolerance test sees (in float32 another order moves
    a default-grid MAP@R by 3e-3): loss and gradient are the pre-c324494 order's to the
    bit."""
    loss = make("multi_similarity", dist_name, positives=positives).to(dtype)
    loss.loss.reducer = DoNothingReducer()
    labels = torch.cat([LABELS, LABELS.flip(0)])  # several rows per anchor with "all"
    emb, _ = random_batch(len(labels), 6, seed=20, requires_grad=False)
    emb = emb.to(dtype).requires_grad_(True)
    pairs = loss.mixing_pairs(labels, emb)
    for lam in (0.0, 0.37, 1.0):
        got = loss.compute_embed_mixed_loss(emb, labels, pairs, lam)["loss"]["losses"]
        mat = row_distances(loss.loss.distance, matmul_fp32(emb, emb.T), pairs, lam)
        want = ms_rows_reference(loss.loss, mat, pairs.seen, lam, pairs.anchors, len(labels))
        assert got.dtype == dtype
        assert torch.equal(got, want)
        assert torch.equal(*(torch.autograd.grad(x.sum(), emb)[0] for x in (got, want)))


def test_metrix_leaves_the_inner_losss_formula_to_it():
    """MetrixLoss uses no private name of its inner loss and none of its formula's
    parameters (the loss dicts come from the loss's public methods), and the Gram module
    computes distances only: it never sees the loss."""
    import ast
    import inspect

    from pml_plugins.losses import metrix, metrix_gram

    formula = {"alpha", "beta", "base", "margin", "pos_margin", "neg_margin"}
    formula |= {"pos_calc", "neg_calc", "get_per_pair_loss"}

    def is_inner_loss(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id == "loss"
        return isinstance(node, ast.Attribute) and node.attr == "loss"

    used = [
        node.attr
        for node in ast.walk(ast.parse(inspect.getsource(metrix)))
        if isinstance(node, ast.Attribute)
        and is_inner_loss(node.value)
        and (node.attr.startswith("_") or node.attr in formula)
    ]
    assert used == []
    gram = ast.parse(inspect.getsource(metrix_gram))
    names = {node.id for node in ast.walk(gram) if isinstance(node, ast.Name)}
    names |= {node.arg for node in ast.walk(gram) if isinstance(node, ast.arg)}
    assert "loss" not in names


def doubled(base: type) -> type:
    """A subclass of ``base`` with its own formula (each term of ``mat_loss_dict`` doubled),
    under ``base``'s name: MetrixLoss accepts the three class names only, as PML's wrappers."""

    def mat_loss_dict(self, *args):
        loss_dict = base.mat_loss_dict(self, *args)
        for term in loss_dict.values():
            term["losses"] = 2 * term["losses"]
        return loss_dict

    return type(base.__name__, (base,), {"mat_loss_dict": mat_loss_dict})


@pytest.mark.parametrize(
    "base", [SoftContrastiveLoss, SoftMultiSimilarityLoss, SoftProxyAnchorLoss]
)
def test_a_subclass_takes_the_gram_path_only_where_it_declares_it(base):
    """``supports_gram_path`` is read from the inner loss's own class: a subclass that changes
    the formula inherits the attribute but not the Gram path (which would skip its formula),
    unless it declares the attribute again."""
    kwargs = {"num_classes": 5, "embedding_size": 6} if base is SoftProxyAnchorLoss else {}
    torch.manual_seed(3)
    plain = MetrixLoss(base(**kwargs)).double()
    torch.manual_seed(3)
    sub = MetrixLoss(doubled(base)(**kwargs)).double()
    assert plain.gram_path_applies() and sub.loss.supports_gram_path
    assert not sub.gram_path_applies()
    emb, _ = random_batch(len(LABELS), 6, seed=21)
    pairs = sub.mixing_pairs(LABELS, emb)
    got = sub.compute_embed_mixed_loss(emb, LABELS, pairs, 0.3)
    assert got == generic(sub, emb, LABELS, pairs, 0.3)
    want = 2 * plain.compute_embed_mixed_loss(emb, LABELS, pairs, 0.3)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    declared = type(base.__name__, (base,), {"supports_gram_path": True})
    assert MetrixLoss(declared(**kwargs)).gram_path_applies()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positives", ["first", "all"])
@pytest.mark.parametrize("loss_name", ["contrastive", "multi_similarity"])
def test_mixed_loss_dict_is_the_former_per_pair_and_per_row_call(loss_name, positives, dtype):
    """The inner loss's ``mixed_loss_dict`` equals, to the bit (losses, gradient, indices),
    what MetrixLoss called before it chose by type: contrastive's ``pair_loss_dict`` of the
    pairs in ``entries`` order with (anchor, mixed point) indices, MS's ``rows_loss_dict``."""
    inner = INNER[loss_name](DISTANCES["euclid" if loss_name == "contrastive" else "cosine"]())
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 5, (24,), generator=gen)
        emb = torch.randn(24, 6, generator=gen, dtype=dtype).requires_grad_(True)
        pairs = MetrixLoss(inner, positives=positives).mixing_pairs(labels, emb)
        lam = float(torch.rand(1, generator=gen))
        mat = row_distances(inner.distance, matmul_fp32(emb, emb.T), pairs, lam)
        y = torch.tensor(lam, dtype=torch.float64).to(dtype)
        got = inner.mixed_loss_dict(mat, pairs, y)
        if loss_name == "contrastive":
            rows, seconds = pairs.entries
            anchors, points = pairs.pair_anchors(), pairs.points[2]
            want = inner.pair_loss_dict(mat[rows, seconds], y.expand(len(rows)), anchors, points)
        else:
            want = inner.rows_loss_dict(mat, pairs.seen, y, pairs.anchors, pairs.batch_size)
        assert got.keys() == want.keys()
        for name in got:
            a, b = got[name], want[name]
            assert a.keys() == b.keys() and a["reduction_type"] == b["reduction_type"]
            assert torch.equal(a["losses"], b["losses"])
            grads = [
                torch.autograd.grad(x["losses"].sum(), emb, retain_graph=True)[0] for x in (a, b)
            ]
            assert torch.equal(*grads)
            indices = [
                x["indices"] if isinstance(x["indices"], tuple) else (x["indices"],) for x in (a, b)
            ]
            assert all(torch.equal(i, j) for i, j in zip(*indices, strict=True))


def test_metrix_names_the_soft_losses_only_in_its_table():
    """MetrixLoss tests no inner loss's class (``isinstance``, ``type(...) in``): each soft
    loss's class is named once in metrix.py's code, in ``METRIX_LOSSES``; what differs between
    the losses is what each declares (``proxy_anchors``, ``supports_gram_path``,
    ``metrix_miner``, ``mixed_loss_dict``)."""
    import ast
    import inspect

    from pml_plugins.losses import metrix

    classes = {"SoftContrastiveLoss", "SoftMultiSimilarityLoss", "SoftProxyAnchorLoss"}
    tree = ast.parse(inspect.getsource(metrix))
    named = [
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in classes
    ]
    assert sorted(named) == sorted(classes)
    table = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "METRIX_LOSSES"
    )
    assert {node.id for node in ast.walk(table) if isinstance(node, ast.Name)} >= classes
