"""LoOpLoss against naive loops over pairs of pairs, built from the same closest-point solver."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import DoNothingReducer, SumReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugins import registry
from pml_plugins.geometry import closest_points_on_arcs, closest_points_on_segments
from pml_plugins.losses import LoOpLoss
from pml_plugins.losses.loop import form_positive_pairs
from tests.loss_contract import (
    assert_finite_loss_and_grad,
    check_autocast_finite,
    check_empty_and_single_class,
    check_finite_edge_cases,
    check_gradcheck,
    check_labels_vs_indices_tuple,
    kink_free,
    random_batch,
)

BASES = ("hphn_triplet", "triplet", "lifted", "multi_similarity", "npair")
GEOMETRIES = ("arc", "segment")


# ------------------------------------------------------------ naive reference
def naive_pairs(labels: list[int]) -> list[tuple[int, int]]:
    """Within each class, consecutive samples in index order; odd leftover unpaired."""
    pairs = []
    for c in sorted(set(labels)):
        members = [k for k, lab in enumerate(labels) if lab == c]
        for r in range(0, len(members) - 1, 2):
            pairs.append((members[r], members[r + 1]))
    return sorted(pairs)


def naive_loop(emb, labels, base, geometry, pairs=None, **hp) -> dict[int, float]:
    """Per-pair losses {first member index: loss}, by explicit loops over the formulas."""
    x = F.normalize(emb, dim=1) if geometry == "arc" else emb
    lab = [int(t) for t in labels]
    B = len(lab)
    pairs = naive_pairs(lab) if pairs is None else pairs
    solver = closest_points_on_arcs if geometry == "arc" else closest_points_on_segments

    def d_star(i: int, j: int) -> float:
        (a, b), (c, d) = pairs[i], pairs[j]
        return float(solver(x[a], x[b], x[c], x[d])[2])

    def dist(u: int, v: int) -> float:
        return float(torch.linalg.norm(x[u] - x[v]))

    def sim(u: int, v: int) -> float:
        return float(x[u] @ x[v])

    def s_star(i: int, j: int) -> float:
        if geometry == "arc":
            return 1.0 - d_star(i, j) ** 2 / 2.0
        return max(sim(u, v) for u in pairs[i] for v in pairs[j])

    out: dict[int, float] = {}
    if base == "triplet":
        half = len(pairs) // 2
        for i in range(half):
            j = i + half
            if lab[pairs[i][0]] == lab[pairs[j][0]]:
                continue
            a, b = pairs[i]
            out[a] = max(dist(a, b) - d_star(i, j) + hp["margin"], 0.0)
        return out
    for i, (a, b) in enumerate(pairs):
        c = lab[a]
        negs = [j for j in range(len(pairs)) if lab[pairs[j][0]] != c]
        if not negs:
            continue
        if base in ("hphn_triplet", "lifted"):
            d_ap = max(dist(m, k) for m in (a, b) for k in range(B) if k != m and lab[k] == c)
            if base == "hphn_triplet":
                out[a] = max(d_ap - min(d_star(i, j) for j in negs) + hp["margin"], 0.0)
            else:
                lse = math.log(sum(math.exp(-d_star(i, j)) for j in negs))
                out[a] = max(lse + d_ap + hp["margin"], 0.0)
        elif base == "npair":
            total = sum(math.exp(s_star(i, j)) for j in negs)
            out[a] = math.log(1.0 + math.exp(-sim(a, b)) * total)
        else:  # multi_similarity
            alpha, beta, lam, th = hp["alpha"], hp["beta"], hp["ms_base"], hp["mining_threshold"]
            pos, seen = [], set()
            for m in (a, b):
                for k in range(B):
                    if k != m and lab[k] == c and frozenset((m, k)) not in seen:
                        seen.add(frozenset((m, k)))
                        pos.append(sim(m, k))
            negative = [s_star(i, j) for j in negs]
            neg_kept = [s for s in negative if s > min(pos) - th]
            pos_kept = [s for s in pos if s < max(negative) + th]
            if not neg_kept and not pos_kept:
                continue
            pos_term = math.log(1.0 + sum(math.exp(-alpha * (s - lam)) for s in pos_kept)) / alpha
            neg_term = math.log(1.0 + sum(math.exp(beta * (s - lam)) for s in neg_kept)) / beta
            out[a] = pos_term + neg_term
    return out


def element_losses(loss_fn: LoOpLoss, emb, labels, indices_tuple=None) -> dict[int, float]:
    """The loss's per-pair losses, through PML's DoNothingReducer."""
    loss_fn.reducer = DoNothingReducer()
    out = loss_fn(emb, labels, indices_tuple)["loss"]
    if out["reduction_type"] == "already_reduced":
        return {}
    assert out["reduction_type"] == "element"
    return {int(i): float(v) for i, v in zip(out["indices"], out["losses"], strict=True)}


def hp_for(base: str, **override) -> dict[str, float]:
    hp = {
        "hphn_triplet": {"margin": 1e-5},
        "triplet": {"margin": 1e-5},
        "lifted": {"margin": 1e-5},
        "multi_similarity": {
            "alpha": 2.0,
            "beta": 50.0,
            "ms_base": 0.4,
            "mining_threshold": -0.02,
        },
        "npair": {},
    }[base]
    hp.update(override)
    return hp


def uneven_batch(seed: int = 0, dim: int = 5, dtype=torch.float64):
    """Classes of 2, 3, 4, 5 and 1 samples, shuffled: odd leftovers and a lone sample."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 2 + [1] * 3 + [2] * 4 + [3] * 5 + [4])
    labels = labels[torch.randperm(len(labels), generator=g)]
    emb = torch.randn(len(labels), dim, generator=g, dtype=dtype)
    return emb, labels


# --------------------------------------------------------------------- tests
def test_pairs_from_labels():
    labels = torch.tensor([3, 1, 3, 3, 1, 2, 3, 0, 1, 3])
    first, second = form_positive_pairs(labels)
    pairs = list(zip(first.tolist(), second.tolist(), strict=True))
    assert pairs == naive_pairs(labels.tolist()) == [(0, 2), (1, 4), (3, 6)]
    # the official P-K layout (2 consecutive samples per class) gives (0,1), (2,3), ...
    pk = torch.tensor([5, 5, 2, 2, 9, 9, 2, 2])
    first, second = form_positive_pairs(pk)
    assert list(zip(first.tolist(), second.tolist(), strict=True)) == [
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
    ]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("base", BASES)
def test_matches_naive_loop(base, geometry):
    for seed in range(3):
        emb, labels = uneven_batch(seed)
        if base == "multi_similarity" and seed > 0:
            hp = hp_for(base, mining_threshold=0.3)  # mine more than the default does
        else:
            hp = hp_for(base)
        got = element_losses(LoOpLoss(base=base, geometry=geometry, **hp), emb, labels)
        want = naive_loop(emb, labels, base, geometry, **hp)
        assert got.keys() == want.keys()
        assert len(want) > 0
        for k in want:
            assert math.isclose(got[k], want[k], rel_tol=1e-7, abs_tol=1e-9), (k, got[k], want[k])
        # the default reducer is the mean over pairs
        total = LoOpLoss(base=base, geometry=geometry, **hp)(emb, labels)
        assert math.isclose(
            float(total), sum(want.values()) / len(want), rel_tol=1e-7, abs_tol=1e-9
        )


def test_multi_similarity_mining_skips_and_keeps():
    # with the default thresholds, this batch has pairs with nothing mined (skipped)
    emb, labels = uneven_batch(11, dim=16)
    n_pairs = len(naive_pairs(labels.tolist()))
    for geometry in GEOMETRIES:
        hp = hp_for("multi_similarity")
        want = naive_loop(emb, labels, "multi_similarity", geometry, **hp)
        assert 0 < len(want) < n_pairs
        got = element_losses(LoOpLoss(base="multi_similarity", geometry=geometry), emb, labels)
        assert got.keys() == want.keys()
        for k in want:
            assert math.isclose(got[k], want[k], rel_tol=1e-7, abs_tol=1e-9)


@pytest.mark.parametrize("base", BASES)
def test_defaults_are_the_documented_ones(base):
    loss = LoOpLoss(base=base)
    for name, value in hp_for(base).items():
        assert getattr(loss, name) == value
    assert loss.geometry == ("segment" if base == "npair" else "arc")
    assert isinstance(loss.distance, LpDistance)
    assert loss.distance.normalize_embeddings == (base != "npair")
    assert registry.get("LoOpLoss") is LoOpLoss


def test_mined_pairs_through_indices_tuple():
    emb, labels = uneven_batch(1)
    # all positive pairs of a PML miner, in both orders: used as unordered arcs
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    unique = sorted({(min(i, j), max(i, j)) for i, j in zip(a1.tolist(), p.tolist(), strict=True)})
    for base in ("hphn_triplet", "lifted", "multi_similarity"):
        hp = hp_for(base)
        got = element_losses(LoOpLoss(base=base, **hp), emb, labels, (a1, p, a2, n))
        want = naive_loop(emb, labels, base, "arc", pairs=unique, **hp)
        assert got.keys() == want.keys()
        for k in want:
            assert math.isclose(got[k], want[k], rel_tol=1e-7, abs_tol=1e-9)
    # the loss's own pairs, given as a pair tuple or as triplets, change nothing
    first, second = form_positive_pairs(labels)
    none = torch.zeros(0, dtype=torch.long)
    for base in BASES:
        check_labels_vs_indices_tuple(
            lambda b=base: LoOpLoss(base=b), emb, labels, (first, second, none, none)
        )
        check_labels_vs_indices_tuple(
            lambda b=base: LoOpLoss(base=b), emb, labels, (first, second, none)
        )
    bad = (torch.tensor([0]), torch.tensor([int((labels != labels[0]).nonzero()[0])]), none, none)
    with pytest.raises(ValueError, match="same class"):
        LoOpLoss()(emb, labels, bad)


def min_pair_distance(emb: torch.Tensor, labels: torch.Tensor, geometry: str) -> float:
    """The smallest closest-point distance d* between the batch's positive pairs."""
    x = F.normalize(emb.detach(), dim=1) if geometry == "arc" else emb.detach()
    solver = closest_points_on_arcs if geometry == "arc" else closest_points_on_segments
    pairs = naive_pairs([int(t) for t in labels])
    return min(
        float(solver(x[a], x[b], x[c], x[d])[2])
        for i, (a, b) in enumerate(pairs)
        for (c, d) in pairs[i + 1 :]
    )


def test_kink_free_tells_a_branch_switch_from_curvature():
    """The guard of the gradchecks: a slope jump or a step within 1e-5 of the input is
    found, however small; steep but smooth functions pass, however curved."""
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    assert kink_free(lambda v: torch.exp(50.0 * v).sum(), [x])  # f'' = 2500 e^15
    assert kink_free(lambda v: (v.abs() + torch.relu(v - 0.31)).sum(), [x])  # kinks 1e-2 away
    assert kink_free(lambda v: 1.0 / (v - 0.29), [x])  # smooth, 1e-2 from a pole
    for offset in (0.0, 3e-7, 5e-6):
        assert not kink_free(lambda v, o=offset: torch.relu(v - 0.3 - o).sum(), [x])
        assert not kink_free(lambda v, o=offset: 1e-4 * torch.relu(v - 0.3 - o).sum(), [x])
        assert not kink_free(lambda v, o=offset: (v < 0.3 + o).double().sum() * 1e-3, [x])
        x2 = (x.clone(), x.clone())  # the kink in the second input only
        assert not kink_free(lambda a, b, o=offset: a.sum() + torch.relu(b[1] + 0.2 - o), x2)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("base", BASES)
def test_gradcheck(base, geometry):
    """At a batch where the loss is differentiable, robustly so: no two pairs' arcs or
    segments cross (there d* = 0 and its gradient is rounding noise: in 3-D, crossing
    arcs are common; seed 2 had d* = 1.7e-16, the Intel failures) and no branch switch
    (closest-point candidates, hinges, hardest examples, mining thresholds) lies within
    1e-5 (``check_gradcheck`` asserts ``kink_free``). Near either, the CPU's rounding
    picks the gradient."""
    hp = hp_for(base, mining_threshold=0.3) if base == "multi_similarity" else {}
    emb, labels = random_batch(8, 3, n_classes=3, seed=3)
    assert min_pair_distance(emb, labels, geometry) > 1e-3
    check_gradcheck(lambda: LoOpLoss(base=base, geometry=geometry, **hp), emb, labels)


@pytest.mark.parametrize("base", BASES)
def test_contract_edge_cases(base):
    for geometry in GEOMETRIES:

        def make(b=base, g=geometry):
            return LoOpLoss(base=b, geometry=g)

        check_empty_and_single_class(make)
        check_finite_edge_cases(make)
        check_autocast_finite(make, torch.bfloat16)
        check_autocast_finite(make, torch.float16)
        # a single pair (with a lone sample of another class): zero, not NaN
        emb, _ = random_batch(3, 8, dtype=torch.float32)
        one_pair = assert_finite_loss_and_grad(make(), emb, torch.tensor([0, 0, 1]))
        assert one_pair.item() == 0.0
        # one class only: zero
        single = assert_finite_loss_and_grad(make(), emb, torch.tensor([2, 2, 2]))
        assert single.item() == 0.0
        # antipodal, coincident and zero embeddings, float32 and float64
        for dtype in (torch.float32, torch.float64):
            e, lab = random_batch(8, 6, n_classes=2, dtype=dtype, seed=9)
            e = e.detach().clone()
            e[1] = -e[0]
            e[3] = e[2]
            e[4] = 0.0
            e[5] = -e[2]
            assert_finite_loss_and_grad(make(), e, lab)


def test_float32_agrees_with_float64():
    emb, labels = uneven_batch(5, dim=16)
    for base in BASES:
        for geometry in GEOMETRIES:
            a = LoOpLoss(base=base, geometry=geometry)(emb, labels)
            b = LoOpLoss(base=base, geometry=geometry)(emb.float(), labels)
            assert math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-5), (base, geometry)


def test_sum_reducer_and_degenerate_arcs():
    emb, labels = uneven_batch(6)
    n_valid = len(naive_loop(emb, labels, "hphn_triplet", "arc", margin=1e-5))
    mean = LoOpLoss()(emb, labels)
    total = LoOpLoss(reducer=SumReducer())(emb, labels)
    assert math.isclose(float(total), n_valid * float(mean), rel_tol=1e-9)
    # a degenerate arc (both members equal) is kept as a point, not dropped
    first, second = form_positive_pairs(labels)
    emb = emb.detach().clone()
    emb[second[0]] = emb[first[0]]
    got = element_losses(LoOpLoss(base="lifted"), emb, labels)
    want = naive_loop(emb, labels, "lifted", "arc", margin=1e-5)
    assert int(first[0]) in got and got.keys() == want.keys()
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-7, abs_tol=1e-9)


def test_stats():
    emb, labels = random_batch(24, 8, n_classes=6, seed=3)
    for base in BASES:
        loss = LoOpLoss(base=base, collect_stats=True)
        loss(emb, labels)
        assert loss.num_pairs == 12
        assert 0 < loss.mean_optimal_neg_dist <= loss.mean_endpoint_neg_dist
        assert 0.0 <= loss.frac_interior_solutions <= 1.0
        assert 0.0 <= loss.frac_corner_solutions <= 1.0
        assert loss.frac_interior_solutions + loss.frac_corner_solutions <= 1.0
    assert "mean_optimal_neg_dist" in loss._record_these_stats


def test_clear_errors():
    emb, labels = random_batch(8, 4)
    with pytest.raises(ValueError, match="ref_emb"):
        LoOpLoss()(emb, labels, ref_emb=emb.detach().clone(), ref_labels=labels)
    with pytest.raises(ValueError, match="labels"):
        LoOpLoss()(emb, None, (torch.tensor([0]), torch.tensor([1]), torch.tensor([0])))
    with pytest.raises(ValueError, match="base"):
        LoOpLoss(base="contrastive")
    with pytest.raises(ValueError, match="geometry"):
        LoOpLoss(geometry="sphere")
    with pytest.raises(ValueError, match="margin"):
        LoOpLoss(base="npair", margin=0.1)
    with pytest.raises(ValueError, match="alpha"):
        LoOpLoss(base="hphn_triplet", alpha=2.0)
    with pytest.raises(ValueError, match="LpDistance"):
        LoOpLoss(distance=CosineSimilarity())
    with pytest.raises(ValueError, match="normalize_embeddings"):
        LoOpLoss(distance=LpDistance(normalize_embeddings=False))
    # segments between normalised embeddings are allowed
    LoOpLoss(geometry="segment", distance=LpDistance(normalize_embeddings=True))(emb, labels)
