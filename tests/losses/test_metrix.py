"""MetrixLoss (embedding mixing) against naive loops that build the mixed points by hand."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugins import registry
from pml_plugins.losses import (
    MetrixLoss,
    SoftContrastiveLoss,
    SoftMultiSimilarityLoss,
    SoftProxyAnchorLoss,
)
from pml_plugins.losses.metrix_pairs import mixed_labels, mixed_pairs
from tests.loss_contract import (
    check_autocast_finite,
    check_empty_and_single_class,
    check_finite_edge_cases,
    check_gradcheck,
    check_labels_vs_indices_tuple,
    random_batch,
)

MS = {"alpha": 17.97, "beta": 75.66, "base": 0.77}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- naive references
def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def cos(u, v):
    return sum(a * b for a, b in zip(unit(u), unit(v), strict=True))


def euclid_unit(u, v):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(unit(u), unit(v), strict=True)))


def mix(lam, u, v):
    return [lam * a + (1 - lam) * b for a, b in zip(u, v, strict=True)]


def naive_triples(
    labels: list[int], positives: str = "first", pos_pairs=None, neg_pairs=None
) -> list[list[tuple[int, int]]]:
    """Per anchor, the (first, second) of its mixes: its first positive (``"first"``, the
    authors' choice) or each positive (``"all"``) with each negative; an anchor without
    positives: itself with each negative. ``pos_pairs``/``neg_pairs``: the candidate pairs
    (default: all of the labels)."""
    n = len(labels)
    if pos_pairs is None:
        pos_pairs = {
            (a, p) for a in range(n) for p in range(n) if p != a and labels[p] == labels[a]
        }
        neg_pairs = {(a, x) for a in range(n) for x in range(n) if labels[x] != labels[a]}
    out = []
    for a in range(n):
        pos = sorted(p for b, p in pos_pairs if b == a)
        neg = sorted(x for b, x in neg_pairs if b == a)
        sources = (pos[:1] if positives == "first" else pos) or [a]
        out.append([(p, x) for p in sources for x in neg])
    return out


def naive_clean_pairs(labels: list[int]) -> list[list[tuple[int, float]]]:
    """Per anchor, (candidate, hard label) for every other sample."""
    return [
        [(j, 1.0 if labels[j] == labels[a] else 0.0) for j in range(len(labels)) if j != a]
        for a in range(len(labels))
    ]


def naive_ms(per_anchor, alpha, beta, base):
    """per_anchor[a] = (anchor vector, [(candidate vector, y), ...])."""
    total = 0.0
    for a_vec, cands in per_anchor:
        pos = sum(y * math.exp(-alpha * (cos(a_vec, v) - base)) for v, y in cands)
        neg = sum((1 - y) * math.exp(beta * (cos(a_vec, v) - base)) for v, y in cands)
        total += math.log(1 + pos) / alpha + math.log(1 + neg) / beta
    return total / len(per_anchor)


def naive_contrastive(per_anchor, pos_margin, neg_margin):
    pos, neg = [], []
    for a_vec, cands in per_anchor:
        for v, y in cands:
            d = euclid_unit(a_vec, v)
            if y > 0:
                pos.append(y * max(d - pos_margin, 0.0))
            if y < 1:
                neg.append((1 - y) * max(neg_margin - d, 0.0))
    pos, neg = [t for t in pos if t > 0], [t for t in neg if t > 0]
    return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)


def naive_pa(points, memberships, proxies, alpha=32.0, margin=0.1):
    pos_total, neg_total, with_pos = 0.0, 0.0, 0
    for c, p in enumerate(proxies):
        ps = sum(
            m[c] * math.exp(-alpha * (cos(x, p) - margin))
            for x, m in zip(points, memberships, strict=True)
        )
        ns = sum(
            (1 - m[c]) * math.exp(alpha * (cos(x, p) + margin))
            for x, m in zip(points, memberships, strict=True)
        )
        pos_total += math.log(1 + ps)
        neg_total += math.log(1 + ns)
        with_pos += int(any(m[c] > 0 for m in memberships))
    return (pos_total / with_pos if with_pos else 0.0) + neg_total / len(proxies)


def naive_metrix(loss_name, emb, labels, lam, weight, proxies=None, positives="first"):
    E, L = emb.tolist(), labels.tolist()
    triples = naive_triples(L, positives)
    if loss_name == "proxy_anchor":
        C = len(proxies)
        onehot = [[1.0 if c == lab else 0.0 for c in range(C)] for lab in L]
        clean = naive_pa(E, onehot, proxies)
        pairs = sorted({pair for per in triples for pair in per})  # each mixed point once
        points = [mix(lam, E[f], E[s]) for f, s in pairs]
        members = [
            [lam * (c == L[f]) + (1 - lam) * (c == L[s]) for c in range(C)] for f, s in pairs
        ]
        return clean + weight * naive_pa(points, members, proxies)
    clean_in = [
        (E[a], [(E[j], y) for j, y in cands]) for a, cands in enumerate(naive_clean_pairs(L))
    ]
    mixed_in = [
        (E[a], [(mix(lam, E[f], E[s]), lam) for f, s in per]) for a, per in enumerate(triples)
    ]
    if loss_name == "multi_similarity":
        f = lambda x: naive_ms(x, **MS)  # noqa: E731
    else:
        f = lambda x: naive_contrastive(x, 0.0, 0.5)  # noqa: E731
    return f(clean_in) + weight * f(mixed_in)


def seeded_metrix(loss="multi_similarity", **kw) -> MetrixLoss:
    torch.manual_seed(0)
    if loss == "proxy_anchor":
        kw.setdefault("num_classes", 5)
        kw.setdefault("embedding_size", 8)
    return MetrixLoss(loss, **kw)


LABEL_SETS = {
    "balanced": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]),
    "singletons": torch.tensor([0, 0, 0, 1, 1, 2, 3, 4]),  # 2, 3, 4 have no positive
}


# ---------------------------------------------------------------- embed mode vs naive
@pytest.mark.parametrize("loss_name", ["multi_similarity", "contrastive", "proxy_anchor"])
@pytest.mark.parametrize("labels_name", ["balanced", "singletons"])
@pytest.mark.parametrize("lam", [0.0, 0.27, 0.5, 0.81, 1.0])
@pytest.mark.parametrize("positives", [None, "all"])
def test_embed_mode_matches_naive(loss_name, labels_name, lam, positives):
    """Default (None): each anchor's first positive, as the authors' code."""
    labels = LABEL_SETS[labels_name]
    emb, _ = random_batch(len(labels), 8, seed=int(lam * 100))
    loss = seeded_metrix(loss_name, lam=lam, miner=None, positives=positives)
    proxies = loss.loss.proxies.detach().double().tolist() if loss_name == "proxy_anchor" else None
    got = loss(emb, labels)
    want = naive_metrix(loss_name, emb, labels, lam, 0.4, proxies, positives or "first")
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_first_positive_and_all_positives_differ():
    """On 5 classes x 16 the two pair choices give clearly different mixed terms, and the
    first-positive choice has 15x fewer (anchor, mixed point) pairs."""
    emb, labels = random_batch(80, 16, n_classes=5, seed=11)
    labels = torch.arange(80) // 16
    first = MetrixLoss(lam=0.5, miner=None, collect_stats=True)
    every = MetrixLoss(lam=0.5, miner=None, positives="all", collect_stats=True)
    first(emb, labels)
    every(emb, labels)
    assert first.num_mixed_pairs == 80 * 64 and every.num_mixed_pairs == 15 * 80 * 64
    assert abs(first.mixed_loss - every.mixed_loss) > 0.01 * every.mixed_loss


def test_anchor_pairs_all_matches_naive():
    """Every anchor against every mixed point, labels mix_lam(y, y') (incl. neg-neg = 0)."""
    labels = LABEL_SETS["singletons"]
    emb, _ = random_batch(len(labels), 6, seed=5)
    lam = 0.35
    loss = MetrixLoss("multi_similarity", lam=lam, miner=None, anchor_pairs="all", weight=1.0)
    E, L = emb.tolist(), labels.tolist()
    pairs = sorted({pair for per in naive_triples(L) for pair in per})
    mixed_in = [
        (
            E[a],
            [
                (mix(lam, E[f], E[s]), lam * (L[f] == L[a]) + (1 - lam) * (L[s] == L[a]))
                for f, s in pairs
            ],
        )
        for a in range(len(L))
    ]
    clean_in = [(E[a], [(E[j], y) for j, y in c]) for a, c in enumerate(naive_clean_pairs(L))]
    want = naive_ms(clean_in, **MS) + naive_ms(mixed_in, **MS)
    assert loss(emb, labels).item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("mine_mixed", [True, False])
def test_mixes_come_from_the_mined_pairs(mine_mixed):
    """mine_mixed (default): the mixed pairs are built from the miner's pairs, as the
    authors' MS code; False: from every pair of the batch."""
    emb, labels = random_batch(16, 8, n_classes=4, seed=12)
    miner = MultiSimilarityMiner(epsilon=0.1)
    loss = MetrixLoss(lam=0.4, miner=miner, mine_mixed=mine_mixed)
    a1, p, a2, n = miner(emb, labels)
    assert 0 < len(a2) < int((labels[:, None] != labels[None, :]).sum())  # mining drops pairs
    L, E = labels.tolist(), emb.tolist()
    if mine_mixed:
        pos = set(zip(a1.tolist(), p.tolist(), strict=True))
        triples = naive_triples(L, "first", pos, set(zip(a2.tolist(), n.tolist(), strict=True)))
    else:
        triples = naive_triples(L)
    mixed_in = [
        (E[a], [(mix(0.4, E[f], E[s]), 0.4) for f, s in per]) for a, per in enumerate(triples)
    ]
    clean = SoftMultiSimilarityLoss(**MS)(emb, labels, (a1, p, a2, n))
    want = clean.item() + 0.4 * naive_ms(mixed_in, **MS)
    assert loss(emb, labels).item() == pytest.approx(want, rel=1e-9)
    assert MetrixLoss().mine_mixed


# ---------------------------------------------------------------- mixed labels, pinned
def test_mixed_label_values_by_pair_type():
    lam = 0.3
    anchor = torch.tensor([0])
    pairs = {  # (first label, second label) -> expected label w.r.t. anchor of class 0
        "positive-negative": (0, 1, lam),
        "anchor-negative": (0, 2, lam),  # the anchor is its own positive
        "negative-negative": (1, 2, 0.0),
        "positive-positive": (0, 0, 1.0),
        "negative-positive": (1, 0, 1 - lam),
    }
    for name, (f, s, want) in pairs.items():
        got = mixed_labels(anchor, torch.tensor([f]), torch.tensor([s]), lam)
        assert got.item() == pytest.approx(want), name


def seen_mixes(loss: MetrixLoss, labels: torch.Tensor, lam: float) -> dict:
    """anchor -> {(first, second): label} of the mixed points it sees."""
    pairs = loss.mixing_pairs(labels)
    y = loss.mix_labels(labels, pairs, lam, torch.float64)
    first, second, _ = pairs.points
    return {
        a: {
            (f, s): y[a, m].item()
            for m, (f, s) in enumerate(zip(first.tolist(), second.tolist(), strict=True))
            if not math.isnan(y[a, m])
        }
        for a in range(len(labels))
    }


def test_metrix_labels_per_anchor():
    """Batch [0, 0, 0, 1, 2]: anchor 0 sees its first positive 1 mixed with negatives 3, 4
    (y = lam), anchors 1, 2 their first positive 0; anchor 3 (no positive) sees itself
    mixed with 0, 1, 2, 4; with ``positives="all"`` anchor 0 sees positive 2's mixes too;
    ``anchor_pairs="all"`` labels a negative-negative mix 0."""
    labels = torch.tensor([0, 0, 0, 1, 2])
    lam = 0.3
    seen = seen_mixes(MetrixLoss("contrastive"), labels, lam)
    assert seen[0] == pytest.approx({(1, 3): lam, (1, 4): lam})
    assert seen[1] == seen[2] == pytest.approx({(0, 3): lam, (0, 4): lam})
    assert seen[3] == pytest.approx({(3, 0): lam, (3, 1): lam, (3, 2): lam, (3, 4): lam})
    seen_all = seen_mixes(MetrixLoss("contrastive", positives="all"), labels, lam)
    assert seen_all[0] == pytest.approx({(p, n): lam for p in (1, 2) for n in (3, 4)})
    loss_all = MetrixLoss("contrastive", anchor_pairs="all")
    pairs = loss_all.mixing_pairs(labels)
    y_all = loss_all.mix_labels(labels, pairs, lam, torch.float64)
    points = list(zip(*[t.tolist() for t in pairs.points[:2]], strict=True))
    assert y_all[4, points.index((0, 3))].item() == 0.0  # anchor 4: negative-negative
    assert y_all[0, points.index((3, 0))].item() == pytest.approx(1 - lam)


def test_proxy_memberships_of_mixes():
    labels = torch.tensor([0, 0, 1, 2])
    loss = MetrixLoss("proxy_anchor", num_classes=4, embedding_size=3)
    pairs = loss.mixing_pairs(labels)
    y = loss.mix_labels(labels, pairs, 0.3, torch.float64)
    first, second, _ = pairs.points
    for m, (f, s) in enumerate(zip(first.tolist(), second.tolist(), strict=True)):
        want = [0.0] * 4
        want[labels[f]] += 0.3
        want[labels[s]] += 0.7
        assert y[m].tolist() == pytest.approx(want)


@pytest.mark.parametrize("positives", ["first", "all"])
def test_each_triple_mixed_once(positives):
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])
    pairs = mixed_pairs(labels, positives=positives)
    rows, seconds = pairs.entries
    triples = list(
        zip(
            pairs.anchors[rows].tolist(), pairs.firsts[rows].tolist(), seconds.tolist(), strict=True
        )
    )
    want = [
        (a, f, s) for a, per in enumerate(naive_triples(labels.tolist(), positives)) for f, s in per
    ]
    assert sorted(triples) == sorted(want) and len(set(triples)) == len(triples)


def test_hardest_negative_pairs():
    """negatives="hardest": each anchor's hardest negative (the authors' input mode)."""
    emb, labels = random_batch(10, 4, n_classes=3, seed=6)
    loss = MetrixLoss("multi_similarity", negatives="hardest", positives="all")
    pairs = loss.mixing_pairs(labels, emb)
    E, L = emb.tolist(), labels.tolist()
    rows, seconds = pairs.entries
    anchors = pairs.anchors[rows].tolist()
    for a, f, s in zip(anchors, pairs.firsts[rows].tolist(), seconds.tolist(), strict=True):
        negs = [n for n in range(10) if L[n] != L[a]]
        assert s == max(negs, key=lambda n: cos(E[a], E[n]))
        assert (L[f] == L[a] and f != a) or (f == a and L.count(L[a]) == 1)
    want = sum(max(L.count(L[a]) - 1, 1) for a in range(10))
    assert len(anchors) == want


def test_input_mode_defaults_are_the_authors():
    loss = MetrixLoss(mode="input")
    assert (loss.positives, loss.negatives) == ("all", "hardest")
    loss = MetrixLoss(mode="feature")
    assert (loss.positives, loss.negatives) == ("first", "all")


# ---------------------------------------------------------------- lambda
def test_lambda_is_beta_distributed_and_recorded():
    loss = MetrixLoss("contrastive", alpha=2.0, collect_stats=True)
    torch.manual_seed(1)
    draws = torch.tensor([loss.sample_lambda() for _ in range(2000)])
    assert ((draws > 0) & (draws < 1)).all()
    assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
    assert draws.var().item() == pytest.approx(1 / (4 * (2 * 2.0 + 1)), abs=0.006)  # Beta(2,2)
    torch.manual_seed(2)
    a = [loss.sample_lambda() for _ in range(3)]
    torch.manual_seed(2)
    assert a == [loss.sample_lambda() for _ in range(3)]
    # the recorded lambda is the one the loss used
    emb, labels = random_batch(12, 6, n_classes=3, seed=7)
    out = loss(emb, labels)
    fixed = MetrixLoss("contrastive", lam=loss.mix_lambda, collect_stats=True)
    torch.testing.assert_close(out, fixed(emb, labels))
    assert loss.clean_loss + 0.4 * loss.mixed_loss == pytest.approx(out.item())
    triples = naive_triples(labels.tolist())
    assert loss.num_mixed_pairs == sum(len(t) for t in triples)
    assert loss.num_mixed == len({pair for per in triples for pair in per})


@pytest.mark.parametrize("loss_name", ["multi_similarity", "contrastive", "proxy_anchor"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_extreme_lambda_finite(loss_name, lam):
    emb, labels = random_batch(12, 8, n_classes=4, seed=8, dtype=torch.float32)
    loss = seeded_metrix(loss_name, lam=lam)
    out = loss(emb, labels)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(emb.grad).all()


# ---------------------------------------------------------------- clean loss and miner
def test_default_miner_enters_clean_ms_loss_only():
    emb, labels = random_batch(16, 8, n_classes=4, seed=9)
    loss = MetrixLoss("multi_similarity", weight=0.0)
    assert isinstance(loss.miner, MultiSimilarityMiner) and loss.miner.epsilon == 0.39
    inner = SoftMultiSimilarityLoss(**MS)
    tuples = MultiSimilarityMiner(epsilon=0.39)(emb, labels)
    torch.testing.assert_close(loss(emb, labels), inner(emb, labels, tuples))
    # an explicit indices_tuple wins over the loss's miner
    all_pairs = lmu.get_all_pairs_indices(labels)
    torch.testing.assert_close(loss(emb, labels, all_pairs), inner(emb, labels))
    assert MetrixLoss("contrastive").miner is None
    assert MetrixLoss("multi_similarity", miner=None).miner is None


def test_default_miner_is_the_one_the_inner_loss_declares():
    """``miner="default"``: the inner loss's ``metrix_miner()`` (MS, given by name or as an
    instance: a new ``MultiSimilarityMiner(epsilon=0.39)`` each), none for a loss without
    one (contrastive, Proxy-Anchor)."""
    first, second = MetrixLoss(SoftMultiSimilarityLoss(**MS)), MetrixLoss(SoftMultiSimilarityLoss())
    for loss in (first, second):
        assert type(loss.miner) is MultiSimilarityMiner and loss.miner.epsilon == 0.39
    assert first.miner is not second.miner
    assert MetrixLoss(SoftContrastiveLoss()).miner is None
    assert MetrixLoss(SoftProxyAnchorLoss(num_classes=3, embedding_size=4)).miner is None
    assert MetrixLoss("proxy_anchor", num_classes=3, embedding_size=4).miner is None


@pytest.mark.parametrize("mode", ["feature", "input"])
def test_feature_and_input_modes_return_the_clean_loss(mode):
    emb, labels = random_batch(12, 8, n_classes=3, seed=10)
    loss = MetrixLoss("contrastive", mode=mode)
    torch.testing.assert_close(loss(emb, labels), SoftContrastiveLoss(neg_margin=0.5)(emb, labels))


# ---------------------------------------------------------------- PML contract
@pytest.mark.parametrize("loss_name", ["multi_similarity", "contrastive", "proxy_anchor"])
def test_contract(loss_name):
    def make():
        return seeded_metrix(loss_name, lam=0.4, miner=None)

    check_empty_and_single_class(make)
    check_finite_edge_cases(make)
    check_autocast_finite(make)
    emb, labels = random_batch(16, 8, n_classes=4)
    check_labels_vs_indices_tuple(make, emb, labels, lmu.get_all_pairs_indices(labels))
    emb, labels = random_batch(8, 8, n_classes=4, seed=1)
    check_gradcheck(make, emb, labels)


def test_sampled_lambda_autocast_and_defaults():
    loss = MetrixLoss()
    assert isinstance(loss.loss, SoftMultiSimilarityLoss)
    assert (loss.loss.alpha, loss.loss.beta, loss.loss.base) == (17.97, 75.66, 0.77)
    assert (loss.alpha, loss.weight, loss.mode) == (2.0, 0.4, "embed")
    c = MetrixLoss("contrastive").loss
    assert (c.pos_margin, c.neg_margin) == (0.0, 0.5)
    pa = MetrixLoss("proxy_anchor", num_classes=3, embedding_size=4).loss
    assert (pa.margin, pa.alpha) == (0.1, 32.0)
    check_autocast_finite(lambda: MetrixLoss("contrastive"))


def test_errors():
    emb, labels = random_batch(6, 4)
    with pytest.raises(ValueError, match="ref_emb"):
        MetrixLoss()(emb, labels, ref_emb=emb, ref_labels=labels)
    with pytest.raises(ValueError, match="labels"):
        MetrixLoss()(emb, None)
    with pytest.raises(ValueError, match="mode"):
        MetrixLoss(mode="pixels")
    with pytest.raises(ValueError, match="loss must be"):
        MetrixLoss("triplet")
    with pytest.raises(ValueError, match="soft-label loss"):
        MetrixLoss(ContrastiveLoss())
    with pytest.raises(ValueError, match="instance"):
        MetrixLoss(SoftContrastiveLoss(), neg_margin=0.3)
    with pytest.raises(ValueError, match="lam"):
        MetrixLoss(lam=1.5)
    with pytest.raises(ValueError, match="positives"):
        MetrixLoss(positives="some")


def test_registry_builds_metrix_with_an_inner_loss_spec():
    loss = registry.build(
        {"MetrixLoss": {"loss": {"SoftContrastiveLoss": {"neg_margin": 0.5}}, "weight": 0.3}}
    )
    assert isinstance(loss, MetrixLoss) and isinstance(loss.loss, SoftContrastiveLoss)
    assert loss.weight == 0.3 and loss.loss.neg_margin == 0.5
    assert registry.get("SoftProxyAnchorLoss") is SoftProxyAnchorLoss


def test_proxy_anchor_shape_is_taken_from_runtime_arguments():
    from pml_plugins import registry

    metrix = registry.build(
        {"MetrixLoss": {"loss": "proxy_anchor"}}, num_classes=7, embedding_size=5
    )
    assert tuple(metrix.loss.proxies.shape) == (7, 5)
    ms = registry.build(
        {"MetrixLoss": {"loss": "multi_similarity"}}, num_classes=7, embedding_size=5
    )
    assert not hasattr(ms.loss, "proxies")
