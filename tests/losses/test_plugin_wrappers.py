"""The plugin losses inside PML's loss wrappers: CrossBatchMemory and SelfSupervisedLoss.

PML's wrappers refuse every loss whose class name is not on their list. The plugin
versions must be PML's wrappers unchanged for the losses they add: each is checked against
PML's own wrapper with the plugin's class name allow-listed (losses and gradients over
several batches, with and without a miner and an enqueue mask)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import CrossBatchMemory, SelfSupervisedLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from pml_plugins import registry
from pml_plugins.losses import (
    GradMLLoss,
    LoOpLoss,
    NRALoss,
    PluginCrossBatchMemory,
    PluginSelfSupervisedLoss,
    SoftContrastiveLoss,
    SoftMultiSimilarityLoss,
    SoftProxyAnchorLoss,
)
from tests.loss_contract import random_batch

DIM = 6
PLUGINS = {
    "GradMLLoss": lambda: GradMLLoss(),
    "NRALoss": lambda: NRALoss(),
    "SoftContrastiveLoss": lambda: SoftContrastiveLoss(),
    "SoftMultiSimilarityLoss": lambda: SoftMultiSimilarityLoss(),
}


@pytest.fixture
def allow_listed(monkeypatch):
    """PML's own wrappers with every plugin of ``PLUGINS`` added to their lists."""
    for wrapper in (CrossBatchMemory, SelfSupervisedLoss):
        names = [*wrapper.supported_losses(), *PLUGINS]
        monkeypatch.setattr(wrapper, "supported_losses", staticmethod(lambda names=names: names))


def batches(n: int, size: int = 10, seed: int = 0):
    for i in range(n):
        emb, labels = random_batch(size, DIM, n_classes=3, seed=seed + i)
        yield emb.detach().float(), labels


def run_xbm(wrapper, use_mask: bool) -> tuple[list[float], list[torch.Tensor]]:
    losses, grads = [], []
    for emb, labels in batches(5):
        emb = emb.clone().requires_grad_(True)
        kwargs = {}
        if use_mask:
            kwargs["enqueue_mask"] = torch.arange(len(labels)) % 2 == 0
        loss = wrapper(emb, labels, **kwargs)
        loss.backward()
        losses.append(loss.item())
        grads.append(emb.grad.clone())
    return losses, grads


@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("use_miner", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_cross_batch_memory_equals_pmls_wrapper(allow_listed, name, use_miner, use_mask):
    def make(cls):
        miner = MultiSimilarityMiner(epsilon=0.5) if use_miner else None
        return cls(PLUGINS[name](), embedding_size=DIM, memory_size=24, miner=miner)

    ours = run_xbm(make(PluginCrossBatchMemory), use_mask)
    pml = run_xbm(make(CrossBatchMemory), use_mask)
    assert ours[0] == pml[0]
    assert any(v != 0 for v in ours[0])
    for a, b in zip(ours[1], pml[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", PLUGINS)
def test_cross_batch_memory_is_the_loss_against_the_memory(name):
    """Once the memory holds earlier batches, the loss is the inner loss of the batch against
    them (the memory does not reach the gradient)."""
    xbm = PluginCrossBatchMemory(PLUGINS[name](), embedding_size=DIM, memory_size=100)
    seen_emb, seen_labels = [], []
    for emb, labels in batches(3):
        last = xbm(emb, labels)
        seen_emb.append(emb)
        seen_labels.append(labels)
    mem, mem_labels = torch.cat(seen_emb), torch.cat(seen_labels)
    n = len(emb)
    # all pairs of the batch against the memory, without each sample's own slot
    a, r = torch.meshgrid(torch.arange(n), torch.arange(len(mem)), indexing="ij")
    keep = r != a + len(mem) - n
    a, r = a[keep], r[keep]
    same = labels[a] == mem_labels[r]
    pairs = (a[same], r[same], a[~same], r[~same])
    want = PLUGINS[name]()(emb, labels, pairs, mem, mem_labels)
    assert last.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_loss_equals_pmls_wrapper(allow_listed, name, symmetric):
    emb, _ = random_batch(8, DIM, seed=5)
    emb = emb.detach()
    aug = emb + 0.1 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(6))
    out = []
    for cls in (PluginSelfSupervisedLoss, SelfSupervisedLoss):
        e = emb.clone().requires_grad_(True)
        loss = cls(PLUGINS[name](), symmetric=symmetric)(e, aug)
        loss.backward()
        out.append((loss.item(), e.grad))
    assert out[0][0] == out[1][0] != 0
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("name", PLUGINS)
def test_pmls_own_wrappers_refuse_the_plugins(name):
    """Why the plugin wrappers exist: PML's lists name none of the plugin losses."""
    for wrapper in (CrossBatchMemory, SelfSupervisedLoss):
        kwargs = {"embedding_size": DIM} if wrapper is CrossBatchMemory else {}
        with pytest.raises(Exception, match=name):
            wrapper(PLUGINS[name](), **kwargs)


@pytest.mark.parametrize(
    "loss, why",
    [
        (lambda: LoOpLoss(), "no ref_emb"),
        (lambda: SoftProxyAnchorLoss(num_classes=3, embedding_size=DIM), "proxy"),
    ],
)
def test_losses_without_a_reference_set_are_refused_with_the_reason(loss, why):
    with pytest.raises(ValueError, match=why):
        PluginCrossBatchMemory(loss(), embedding_size=DIM)
    with pytest.raises(ValueError, match=why):
        PluginSelfSupervisedLoss(loss())


def test_pml_losses_are_still_accepted():
    from pytorch_metric_learning.losses import ContrastiveLoss

    emb, labels = random_batch(8, DIM, seed=7)
    emb = emb.detach()
    ours = PluginCrossBatchMemory(ContrastiveLoss(), embedding_size=DIM)(emb.float(), labels)
    pml = CrossBatchMemory(ContrastiveLoss(), embedding_size=DIM)(emb.float(), labels)
    assert ours.item() == pml.item()


def test_built_by_name_from_a_config():
    xbm = registry.build(
        {"PluginCrossBatchMemory": {"loss": {"NRALoss": {"alpha": 2}}, "embedding_size": DIM}},
        "losses",
    )
    assert isinstance(xbm, PluginCrossBatchMemory) and xbm.loss.alpha == 2
