"""Every plugin loss against PML's generic loss contract, the way PML's own losses keep it.

One table of plugin losses, each checked for what any PML user may pass: the tuples of
PML's pair and triplet miners (and empty ones), ``ref_emb`` (where the loss supports it,
a clear ``ValueError`` where not), the input's dtype back out (float16 in, float16 out, as
PML's ``ContrastiveLoss``), every PML reducer its reduction types admit, degenerate batches,
and PML's ``MultipleLosses`` wrapper. Per-loss formula checks live in each loss's own test
file; this file is about the contract.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss, MultipleLosses
from pytorch_metric_learning.miners import (
    BatchHardMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    TripletMarginMiner,
)
from pytorch_metric_learning.reducers import (
    ClassWeightedReducer,
    DoNothingReducer,
    MeanReducer,
    SumReducer,
    ThresholdReducer,
)
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugins.losses import (
    GradMLLoss,
    LoOpLoss,
    NRALoss,
    SoftContrastiveLoss,
    SoftMultiSimilarityLoss,
    SoftProxyAnchorLoss,
)
from tests.loss_contract import (
    assert_finite_loss_and_grad,
    check_empty_and_single_class,
    check_finite_edge_cases,
    random_batch,
)

DIM, CLASSES = 8, 4
LOSSES = {
    "GradMLLoss": GradMLLoss,
    "GradMLLoss-k1": lambda **kw: GradMLLoss(k=1, **kw),
    "NRALoss": NRALoss,
    "LoOpLoss-hphn": LoOpLoss,
    "LoOpLoss-triplet": lambda **kw: LoOpLoss(base="triplet", **kw),
    "LoOpLoss-ms": lambda **kw: LoOpLoss(base="multi_similarity", **kw),
    "LoOpLoss-npair": lambda **kw: LoOpLoss(base="npair", **kw),
    "SoftContrastiveLoss": SoftContrastiveLoss,
    "SoftMultiSimilarityLoss": SoftMultiSimilarityLoss,
    "SoftProxyAnchorLoss": lambda **kw: SoftProxyAnchorLoss(
        num_classes=CLASSES, embedding_size=DIM, **kw
    ),
}
#: losses that take no ref_emb (and say so; PML's ProxyAnchorLoss neither)
NO_REF_EMB = {
    "LoOpLoss-hphn",
    "LoOpLoss-triplet",
    "LoOpLoss-ms",
    "LoOpLoss-npair",
    "SoftProxyAnchorLoss",
}
#: losses whose pairs do not come from indices_tuple (proxies)
NO_TUPLES = {"SoftProxyAnchorLoss"}
MINERS = {
    "pairs": lambda: PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    "triplets": lambda: TripletMarginMiner(margin=0.2),
    "batch-hard": BatchHardMiner,
    "multi-similarity": lambda: MultiSimilarityMiner(epsilon=0.1),
}
REDUCERS = {
    "mean": MeanReducer,
    "sum": SumReducer,
    "threshold-high": lambda: ThresholdReducer(high=100.0),
    "class-weighted": lambda: ClassWeightedReducer(weights=torch.linspace(0.5, 2.0, CLASSES)),
}


def batch(seed: int = 0, dtype: torch.dtype = torch.float64):
    emb, labels = random_batch(16, DIM, n_classes=CLASSES, dtype=dtype, seed=seed)
    return emb.detach(), labels


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("miner", MINERS)
def test_pml_miners_tuples(name, miner):
    emb, labels = batch(1)
    tuples = MINERS[miner]()(emb, labels)
    loss = assert_finite_loss_and_grad(LOSSES[name](), emb, labels, indices_tuple=tuples)
    assert loss.dtype == emb.dtype


@pytest.mark.parametrize("name", sorted(set(LOSSES) - NO_TUPLES))
@pytest.mark.parametrize("size", [3, 4])
def test_empty_tuples_give_zero(name, size):
    emb, labels = batch(2)
    empty = tuple(torch.zeros(0, dtype=torch.long) for _ in range(size))
    e = emb.clone().requires_grad_(True)
    loss = LOSSES[name]()(e, labels, empty)
    assert loss.item() == 0.0
    loss.backward()  # a zero that is still part of the graph, as PML's
    assert e.grad is None or torch.count_nonzero(e.grad) == 0


#: losses built on PML's GenericPairLoss, which gives zero below two pairs of each kind
PAIR_TEMPLATE = [
    "GradMLLoss",
    "GradMLLoss-k1",
    "NRALoss",
    "SoftContrastiveLoss",
    "SoftMultiSimilarityLoss",
]


@pytest.mark.parametrize("name", PAIR_TEMPLATE)
def test_one_pair_of_each_kind_gives_zero_as_pmls_pair_losses(name):
    emb, labels = batch(9)
    a1, p, a2, n = (t[:1] for t in lmu.get_all_pairs_indices(labels))
    one = (a1, p, a2, n)
    assert ContrastiveLoss()(emb, labels, one).item() == 0.0
    assert LOSSES[name]()(emb, labels, one).item() == 0.0
    two = (torch.cat([a1, a1]), torch.cat([p, p]), a2, n)  # the pair twice: no longer zero
    assert LOSSES[name]()(emb, labels, two).item() != 0.0


@pytest.mark.parametrize("name", LOSSES)
def test_ref_emb(name):
    emb, labels = batch(3)
    ref, ref_labels = batch(4)
    if name in NO_REF_EMB:
        with pytest.raises(ValueError, match="ref_emb"):
            LOSSES[name]()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
        return
    loss = assert_finite_loss_and_grad(
        LOSSES[name](), emb, labels, ref_emb=ref, ref_labels=ref_labels
    )
    # the reference set matters
    assert loss != LOSSES[name]()(emb, labels, ref_emb=ref[:8], ref_labels=ref_labels[:8])


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtype_in_is_dtype_out_as_pmls_losses(name, dtype):
    emb, labels = batch(5, dtype=torch.float32)
    emb = emb.to(dtype)
    pml = ContrastiveLoss()(emb, labels)
    loss = LOSSES[name]()(emb, labels)
    assert loss.dtype == pml.dtype == dtype
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reducer", REDUCERS)
def test_pml_reducers(name, reducer):
    emb, labels = batch(6)
    loss = assert_finite_loss_and_grad(LOSSES[name](reducer=REDUCERS[reducer]()), emb, labels)
    assert loss.dim() == 0


@pytest.mark.parametrize("name", LOSSES)
def test_do_nothing_reducer_gives_the_unreduced_terms(name):
    """PML's ``DoNothingReducer`` returns the loss dict; its terms, mean-reduced per
    sub-loss and summed, are what the default ``MeanReducer`` gives where that is the
    default reducer."""
    emb, labels = batch(7)
    out = LOSSES[name](reducer=DoNothingReducer())(emb, labels)
    assert isinstance(out, dict) and out
    total = 0.0
    for term in out.values():
        assert term["reduction_type"] in ("element", "pos_pair", "neg_pair", "triplet")
        assert torch.isfinite(term["losses"]).all()
        total += term["losses"].mean()
    default = LOSSES[name]()
    if isinstance(default.reducer, MeanReducer):
        assert total.item() == pytest.approx(default(emb, labels).item(), rel=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_degenerate_batches(name):
    check_empty_and_single_class(LOSSES[name])
    check_finite_edge_cases(LOSSES[name])


@pytest.mark.parametrize("name", LOSSES)
def test_inside_pmls_multiple_losses(name):
    emb, labels = batch(8)
    inner = LOSSES[name]()
    combined = MultipleLosses([inner, ContrastiveLoss()], weights=[0.5, 2.0])
    got = assert_finite_loss_and_grad(combined, emb, labels)
    want = 0.5 * inner(emb, labels) + 2.0 * ContrastiveLoss()(emb, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
