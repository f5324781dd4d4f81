"""DisjointQuadrupleMiner: the pairs inside disjoint quadruples, and nothing else."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.samplers import MPerClassSampler

from pml_plugins.losses import GradMLLoss
from pml_plugins.miners import DisjointQuadrupleMiner


def pair_sets(indices_tuple):
    a1, p, a2, n = (t.tolist() for t in indices_tuple)
    pos = [frozenset(t) for t in zip(a1, p, strict=True)]
    neg = [frozenset(t) for t in zip(a2, n, strict=True)]
    return pos, neg


def expected_pairs(quads):
    """Loop over quadruples (x1, x2, y1, y2): 2 positive and 4 negative pairs each."""
    pos, neg = [], []
    for x1, x2, y1, y2 in quads:
        pos += [frozenset((x1, x2)), frozenset((y1, y2))]
        neg += [frozenset((x, y)) for x in (x1, x2) for y in (y1, y2)]
    return pos, neg


def naive_quadruples(labels):
    """Classes in order of first appearance, >= 2 samples, first two each, paired up."""
    order, members = [], {}
    for i, c in enumerate(labels):
        if c not in members:
            order.append(c)
            members[c] = []
        members[c].append(i)
    eligible = [c for c in order if len(members[c]) >= 2]
    quads = []
    for q in range(len(eligible) // 2):
        a, b = eligible[2 * q], eligible[2 * q + 1]
        quads.append((*members[a][:2], *members[b][:2]))
    return quads


def test_mperclass_layout_gives_consecutive_quadruples():
    labels = torch.tensor([7, 7, 2, 2, 9, 9, 0, 0, 4, 4, 3, 3])
    emb = torch.randn(12, 4)
    pos, neg = pair_sets(DisjointQuadrupleMiner()(emb, labels))
    quads = [(4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3) for q in range(3)]
    exp_pos, exp_neg = expected_pairs(quads)
    assert sorted(pos, key=sorted) == sorted(exp_pos, key=sorted)
    assert sorted(neg, key=sorted) == sorted(exp_neg, key=sorted)


def test_batch_from_pml_mperclass_sampler():
    dataset_labels = torch.arange(40).repeat_interleave(5)
    sampler = MPerClassSampler(dataset_labels, m=2, batch_size=16, length_before_new_iter=64)
    batch = list(sampler)[:16]
    labels = dataset_labels[batch]
    miner = DisjointQuadrupleMiner()
    pos, neg = pair_sets(miner(torch.randn(16, 3), labels))
    exp_pos, exp_neg = expected_pairs([tuple(range(4 * q, 4 * q + 4)) for q in range(4)])
    assert sorted(pos, key=sorted) == sorted(exp_pos, key=sorted)
    assert sorted(neg, key=sorted) == sorted(exp_neg, key=sorted)
    assert miner.num_pos_pairs == 8 and miner.num_neg_pairs == 16


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_on_irregular_batches(seed):
    g = torch.Generator().manual_seed(seed)
    size = int(torch.randint(1, 40, (1,), generator=g))
    labels = torch.randint(0, 9, (size,), generator=g)
    indices_tuple = DisjointQuadrupleMiner()(torch.randn(size, 3), labels)
    pos, neg = pair_sets(indices_tuple)
    exp_pos, exp_neg = expected_pairs(naive_quadruples(labels.tolist()))
    assert sorted(pos, key=sorted) == sorted(exp_pos, key=sorted)
    assert sorted(neg, key=sorted) == sorted(exp_neg, key=sorted)
    a1, p, a2, n = indices_tuple
    assert (labels[a1] == labels[p]).all() and (labels[a2] != labels[n]).all()
    # every sample is in at most one quadruple
    used = torch.cat([a1, p])
    assert len(set(used.tolist())) == len(used)


def test_singletons_odd_leftover_and_extra_samples_left_out():
    # class 5 has one sample, class 8 three (only the first two used), class 1 is the
    # odd leftover
    labels = torch.tensor([3, 5, 8, 3, 8, 6, 8, 6, 1, 1])
    pos, neg = pair_sets(DisjointQuadrupleMiner()(torch.randn(10, 2), labels))
    # eligible classes by first appearance: 3, 8, 6, 1 -> quadruples (3, 8), (6, 1)
    exp_pos, exp_neg = expected_pairs([(0, 3, 2, 4), (5, 7, 8, 9)])
    assert sorted(pos, key=sorted) == sorted(exp_pos, key=sorted)
    assert sorted(neg, key=sorted) == sorted(exp_neg, key=sorted)
    # without class 1 the remaining classes 3, 8, 6 leave 6 as the odd one out
    labels_odd = torch.tensor([3, 5, 8, 3, 8, 6, 8, 6])
    pos, neg = pair_sets(DisjointQuadrupleMiner()(torch.randn(8, 2), labels_odd))
    exp_pos, exp_neg = expected_pairs([(0, 3, 2, 4)])
    assert sorted(pos, key=sorted) == sorted(exp_pos, key=sorted)
    assert sorted(neg, key=sorted) == sorted(exp_neg, key=sorted)


@pytest.mark.parametrize(
    "labels",
    [[], [0], [0, 0], [0, 1, 2, 3], [0, 0, 1], [4, 4, 4, 4]],
    ids=["empty", "one", "one-class", "all-singletons", "one-eligible", "one-class-of-4"],
)
def test_no_quadruple(labels):
    labels = torch.tensor(labels, dtype=torch.long)
    out = DisjointQuadrupleMiner()(torch.randn(len(labels), 3), labels)
    assert all(len(t) == 0 for t in out)
    loss = GradMLLoss()(torch.randn(len(labels), 3, requires_grad=True), labels, out)
    assert loss.item() == 0.0


def test_ref_emb_not_supported():
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError):
        DisjointQuadrupleMiner()(emb, labels, torch.randn(4, 3), labels.clone())
