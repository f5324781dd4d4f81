"""RepresentativeMiner: only tuples anchored at representatives, against naive loops."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner, TripletMarginMiner

from pml_plugins.miners import RepresentativeMiner


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    emb = torch.randn(len(labels), 5, generator=g)
    mask = torch.tensor([True, False, False, False, True, False, True, False, True])
    return emb, labels, mask


def naive_pairs(labels, ref_labels, mask, same):
    pos, neg = set(), set()
    for a in range(len(labels)):
        if not mask[a]:
            continue
        for j in range(len(ref_labels)):
            if same and a == j:
                continue
            if labels[a] == ref_labels[j]:
                pos.add((a, j))
            else:
                neg.add((a, j))
    return pos, neg


def naive_triplets(labels, mask):
    out = set()
    for a in range(len(labels)):
        for p in range(len(labels)):
            for n in range(len(labels)):
                if mask[a] and p != a and labels[p] == labels[a] and labels[n] != labels[a]:
                    out.add((a, p, n))
    return out


def as_set(*tensors: torch.Tensor) -> set[tuple[int, ...]]:
    return set(zip(*(t.tolist() for t in tensors), strict=True))


def test_pairs_are_all_pairs_anchored_at_representatives() -> None:
    emb, labels, mask = batch()
    miner = RepresentativeMiner()
    miner.set_representative_mask(mask)
    a1, p, a2, n = miner(emb, labels)
    pos, neg = naive_pairs(labels.tolist(), labels.tolist(), mask.tolist(), same=True)
    assert as_set(a1, p) == pos and len(a1) == len(pos)
    assert as_set(a2, n) == neg and len(a2) == len(neg)
    assert mask[a1].all() and mask[a2].all()


def test_triplets_are_all_triplets_anchored_at_representatives() -> None:
    emb, labels, mask = batch()
    miner = RepresentativeMiner(tuple_type="triplets")
    miner.set_representative_mask(mask)
    a, p, n = miner(emb, labels)
    expected = naive_triplets(labels.tolist(), mask.tolist())
    assert as_set(a, p, n) == expected and len(a) == len(expected)


def test_ref_emb_pairs() -> None:
    emb, labels, mask = batch()
    ref_emb, ref_labels = emb[:5] + 0.1, torch.tensor([0, 1, 1, 2, 4])
    miner = RepresentativeMiner()
    miner.set_representative_mask(mask)
    a1, p, a2, n = miner(emb, labels, ref_emb, ref_labels)
    pos, neg = naive_pairs(labels.tolist(), ref_labels.tolist(), mask.tolist(), same=False)
    assert as_set(a1, p) == pos and as_set(a2, n) == neg


@pytest.mark.parametrize(
    "inner", [MultiSimilarityMiner(epsilon=0.5), TripletMarginMiner(margin=0.5)]
)
def test_inner_miner_output_is_filtered_to_representative_anchors(inner) -> None:
    emb, labels, mask = batch()
    full = inner(emb, labels)
    miner = RepresentativeMiner(inner_miner=inner)
    miner.set_representative_mask(mask)
    kept = miner(emb, labels)
    assert len(kept) == len(full)
    if len(full) == 4:
        pos = {(a, q) for a, q in as_set(full[0], full[1]) if mask[a]}
        neg = {(a, q) for a, q in as_set(full[2], full[3]) if mask[a]}
        assert as_set(kept[0], kept[1]) == pos and as_set(kept[2], kept[3]) == neg
    else:
        expected = {t for t in as_set(*full) if mask[t[0]]}
        assert as_set(*kept) == expected
        assert len(expected) < len(full[0])  # something was actually dropped


def test_no_representative_gives_no_tuples_and_zero_loss() -> None:
    emb, labels, _ = batch()
    miner = RepresentativeMiner()
    miner.set_representative_mask(torch.zeros(len(labels), dtype=torch.bool))
    tuples = miner(emb, labels)
    assert all(len(t) == 0 for t in tuples)
    emb = emb.clone().requires_grad_(True)
    loss = ContrastiveLoss()(emb, labels, tuples)
    assert loss.item() == 0.0 and torch.isfinite(loss)


def test_missing_or_wrong_mask_raises() -> None:
    emb, labels, mask = batch()
    miner = RepresentativeMiner()
    with pytest.raises(ValueError, match="set_representative_mask"):
        miner(emb, labels)
    miner.set_representative_mask(mask[:-1])
    with pytest.raises(ValueError, match="shape"):
        miner(emb, labels)
    with pytest.raises(ValueError, match="tuple_type"):
        RepresentativeMiner(tuple_type="quadruples")


def test_loss_on_mined_pairs_matches_naive_contrastive() -> None:
    """The mined pairs, given to a PML loss, give the loss of representative pairs only."""
    emb, labels, mask = batch()
    miner = RepresentativeMiner()
    miner.set_representative_mask(mask)
    loss = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)(emb, labels, miner(emb, labels))
    pos, neg = naive_pairs(labels.tolist(), labels.tolist(), mask.tolist(), same=True)
    x = torch.nn.functional.normalize(emb, dim=1)
    pos_terms = [float(torch.dist(x[a], x[j])) for a, j in pos]
    neg_terms = [max(0.0, 1.0 - float(torch.dist(x[a], x[j]))) for a, j in neg]
    nonzero_pos = [t for t in pos_terms if t > 0]
    nonzero_neg = [t for t in neg_terms if t > 0]
    expected = sum(nonzero_pos) / len(nonzero_pos) + sum(nonzero_neg) / len(nonzero_neg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
