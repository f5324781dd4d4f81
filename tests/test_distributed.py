"""DDP on the CPU (gloo, 2 processes): each method's loss and gradient equal one process's.

One ``torch.multiprocessing.spawn`` runs every method: each rank embeds its half of a batch
with a ``DistributedDataParallel`` linear model, computes the wrapped loss (PML's
``DistributedLossWrapper``/``DistributedMinerWrapper``, ``efficient=False``: the loss of
the batch gathered from both ranks, times the world size) and backpropagates. The test
then checks, in this process, that loss / world_size and DDP's averaged parameter gradient
equal the loss and gradient of one process on the concatenated batch.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.utils.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
)
from pytorch_metric_learning.utils.distributed import all_gather as pml_all_gather

from pml_plugins.experiment import distributed
from pml_plugins.losses import GradMLLoss, LoOpLoss, MetrixLoss, NRALoss
from pml_plugins.miners import RepresentativeMiner

WORLD = 2
PER_RANK = 12
IN_DIM, EMB_DIM, CLASSES = 10, 6, 4
METHODS = ("GradMLLoss", "NRALoss", "LoOpLoss", "MetrixLoss", "AP-Contrastive")
#: losses whose value does not depend on the order of the batch: PML's own wrappers (this
#: rank's rows first) give the same loss on every rank. LoOpLoss pairs samples in batch
#: order and MetrixLoss is no BaseMetricLossFunction: they need distributed.DistributedLoss.
PML_ORDER_FREE = ("GradMLLoss", "NRALoss", "AP-Contrastive")


def make_loss(name: str):
    """(loss, miner) of each method, identical in every process."""
    if name == "GradMLLoss":
        return GradMLLoss(), None
    if name == "NRALoss":
        return NRALoss(), None
    if name == "LoOpLoss":
        return LoOpLoss(), None
    if name == "MetrixLoss":  # embed mode, fixed lambda; inner MS loss + its MS miner
        return MetrixLoss(lam=0.3), None
    # Alternating Projections' base loss path: a PML loss on representative-anchored pairs
    return ContrastiveLoss(), RepresentativeMiner()


def data():
    """The full batch (both ranks), continuous, and a representative mask."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * PER_RANK, IN_DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (WORLD * PER_RANK,), generator=g)
    mask = torch.rand(WORLD * PER_RANK, generator=g) < 0.3
    return x, labels, mask


def model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN_DIM, EMB_DIM).double()


def _run_method(name: str, net, x, labels, mask, pml_wrappers: bool) -> dict:
    """Forward + backward of one method through the DDP model on this rank's rows."""
    loss_fn, miner = make_loss(name)
    if pml_wrappers:
        wrapped = DistributedLossWrapper(loss_fn, efficient=False)
    else:
        wrapped = distributed.wrap_loss(loss_fn)
    net.zero_grad()
    emb = net(x)
    out = {}
    indices_tuple = None
    if miner is not None:
        if pml_wrappers:  # PML's gathered order: this rank's rows first, then the others
            wrapped_miner = DistributedMinerWrapper(miner, efficient=False)
            gathered = torch.cat([mask, pml_all_gather(mask.to(torch.uint8)).bool()])
            miner.set_representative_mask(gathered)
        else:
            wrapped_miner = distributed.wrap_miner(miner)
            out["miner_is_pml_wrapper"] = isinstance(wrapped_miner, DistributedMinerWrapper)
            wrapped_miner.set_representative_mask(mask)  # gathered inside
        out["gathered_mask"] = miner.representative_mask.clone()
        indices_tuple = wrapped_miner(emb, labels)
    loss = wrapped(emb, labels, indices_tuple)
    loss.backward()
    out.update(
        loss=loss.item(),
        weight=net.module.weight.grad.clone(),
        bias=net.module.bias.grad.clone(),
        wrapper=type(wrapped).__name__,
        mode=getattr(wrapped, "mode", None),
    )
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD)
    try:
        x, labels, mask = data()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        net = torch.nn.parallel.DistributedDataParallel(model())
        results = {"is_main": distributed.is_main(), "world_size": distributed.world_size()}
        for name in METHODS:
            results[name] = _run_method(name, net, x[mine], labels[mine], mask[mine], False)
        for name in PML_ORDER_FREE:
            results[name, "pml"] = _run_method(name, net, x[mine], labels[mine], mask[mine], True)
        results["ap_trainer"] = _ap_trainer_steps(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ap_trainer_steps(rank: int) -> dict:
    """Two iterations of the AlternatingProjections trainer made data-parallel by
    ``distributed.with_ddp`` and ``distributed.wrap_trainer``: its miner must see the
    gathered mask, parameters stay equal on both ranks."""
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    from pml_plugins.samplers import RepresentativeSampler
    from pml_plugins.trainers import AlternatingProjections

    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(8)
    ds = torch.utils.data.TensorDataset(torch.randn(len(labels), 5), labels)
    models = {"trunk": torch.nn.Linear(5, 5), "embedder": torch.nn.Linear(5, 4)}
    if rank == 1:  # different initial weights: DDP must broadcast rank 0's
        models["trunk"].weight.data.add_(1.0)
    params = [p for m in models.values() for p in m.parameters()]
    ctx = distributed.Context(rank=rank, world_size=WORLD)
    batches = []

    class Recording(distributed.with_ddp(AlternatingProjections, ctx)):
        def start_batch(self, indices):
            batches.append(torch.as_tensor(indices).clone())
            return super().start_batch(indices)

    trainer = Recording(
        models=models,
        optimizers={"trunk_optimizer": torch.optim.SGD(params, lr=0.1)},
        batch_size=12,
        loss_funcs={"metric_loss": MultiSimilarityLoss()},
        mining_funcs={},
        dataset=ds,
        sampler=RepresentativeSampler(
            labels, classes_per_batch=3, samples_per_class=4, iterations_per_projection=2
        ),
        representative_anchors_only=True,
        proximal_weight=0.1,
        dataloader_num_workers=0,
    )
    distributed.wrap_trainer(trainer, ctx, seed=0)
    seen = []
    miner = trainer.mining_funcs["tuple_miner"]
    mine = miner.forward

    def recording_forward(*args, **kwargs):
        seen.append(len(miner.miner.representative_mask))
        return mine(*args, **kwargs)

    miner.forward = recording_forward
    losses = []
    trainer.end_of_iteration_hook = lambda t: losses.append(t.losses["total_loss"].item())
    trainer.iterations_per_epoch = 2
    trainer.train(1, 1)
    return {
        "mask_lengths": seen,
        "losses": losses,
        "first_batch": batches[0],
        "params": [p.detach().clone() for m in models.values() for p in m.parameters()],
    }


def _tiny_trainer(trainer_class: type, loss: torch.nn.Module, ctx: distributed.Context):
    labels = torch.arange(4).repeat(2)
    return distributed.with_ddp(trainer_class, ctx)(
        models={"trunk": torch.nn.Linear(3, 3)},
        optimizers={},
        batch_size=4,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(torch.randn(len(labels), 3), labels),
        dataloader_num_workers=0,
    )


def test_with_ddp_composes_a_mixin_and_leaves_a_single_process_alone():
    from pytorch_metric_learning.trainers import MetricLossOnly

    from pml_plugins.trainers import AlternatingProjections

    ctx = distributed.Context(world_size=WORLD)
    assert distributed.with_ddp(MetricLossOnly, distributed.Context()) is MetricLossOnly
    plain = distributed.with_ddp(MetricLossOnly, ctx)
    assert plain.__mro__[1:3] == (distributed.DistributedMixin, MetricLossOnly)
    ap = distributed.with_ddp(AlternatingProjections, ctx)  # it declares its masks
    assert issubclass(ap, distributed.RepresentativeMaskMixin)
    assert not issubclass(plain, distributed.RepresentativeMaskMixin)


@pytest.mark.parametrize("mode", ["feature", "input"])
def test_metrix_trainer_refuses_feature_and_input_mode(mode):
    from pml_plugins.trainers import MetrixTrainer

    ctx = distributed.Context(world_size=WORLD)
    trainer = _tiny_trainer(MetrixTrainer, MetrixLoss(mode=mode), ctx)
    message = "distributed: MetrixTrainer in feature/input mode is not supported (embed mode is)"
    with pytest.raises(ValueError) as err:
        distributed.wrap_trainer(trainer, ctx)
    assert str(err.value) == message


def test_a_trainer_not_built_from_with_ddp_is_refused():
    from pytorch_metric_learning.trainers import MetricLossOnly

    ctx = distributed.Context(world_size=WORLD)
    trainer = _tiny_trainer(MetricLossOnly, ContrastiveLoss(), distributed.Context())
    assert distributed.wrap_trainer(trainer, distributed.Context()) is trainer  # one process
    with pytest.raises(TypeError, match="with_ddp"):
        distributed.wrap_trainer(trainer, ctx)


@pytest.fixture(scope="module")
def ranks():
    # a private folder: pytest's numbered temp folders can be pruned by concurrent sessions
    with tempfile.TemporaryDirectory(prefix="pml-ddp-") as tmp:
        torch.multiprocessing.spawn(
            _worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True
        )
        return [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)
        ]


def single_process(name: str) -> dict:
    x, labels, mask = data()
    loss_fn, miner = make_loss(name)
    net = model()
    emb = net(x)
    indices_tuple = None
    if miner is not None:
        miner.set_representative_mask(mask)
        indices_tuple = miner(emb, labels)
    loss = loss_fn(emb, labels, indices_tuple)
    loss.backward()
    return {"loss": loss.item(), "weight": net.weight.grad, "bias": net.bias.grad}


def check_equal(got: dict, expected: dict, rank: int) -> None:
    # the wrappers multiply by the world size so that DDP's gradient average is the full one
    assert got["loss"] / WORLD == pytest.approx(expected["loss"], rel=1e-9, abs=1e-12), rank
    torch.testing.assert_close(got["weight"], expected["weight"], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got["bias"], expected["bias"], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", METHODS)
def test_ddp_loss_and_gradient_equal_single_process_on_gathered_batch(ranks, name):
    expected = single_process(name)
    assert expected["loss"] != 0 and expected["weight"].abs().sum() > 0
    for rank, res in enumerate(ranks):
        assert res[name]["wrapper"] == "DistributedLoss"
        check_equal(res[name], expected, rank)


@pytest.mark.parametrize("name", PML_ORDER_FREE)
def test_pml_wrappers_agree_for_order_free_losses(ranks, name):
    expected = single_process(name)
    for rank, res in enumerate(ranks):
        assert res[name, "pml"]["wrapper"] == "DistributedLossWrapper"
        check_equal(res[name, "pml"], expected, rank)


def test_ddp_helpers_see_the_process_group(ranks):
    assert [r["is_main"] for r in ranks] == [True, False]
    assert all(r["world_size"] == WORLD for r in ranks)
    assert ranks[0]["MetrixLoss"]["mode"] == "embed"  # attribute reads pass through
    assert ranks[0]["AP-Contrastive"]["miner_is_pml_wrapper"]
    _, _, mask = data()
    first, second = mask[:PER_RANK], mask[PER_RANK:]
    # distributed.DistributedMiner: both ranks' masks in rank order, on every rank
    for res in ranks:
        assert torch.equal(res["AP-Contrastive"]["gathered_mask"], mask)
    # PML's order: this rank's rows first
    assert torch.equal(
        ranks[1]["AP-Contrastive", "pml"]["gathered_mask"], torch.cat([second, first])
    )


def test_wrap_trainer_alternating_projections_mines_the_gathered_batch(ranks):
    a, b = ranks[0]["ap_trainer"], ranks[1]["ap_trainer"]
    assert a["mask_lengths"] == [2 * 12, 2 * 12] == b["mask_lengths"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)  # the same gathered loss
    assert all(v > 0 for v in a["losses"])
    for p, q in zip(a["params"], b["params"], strict=True):
        torch.testing.assert_close(p, q)  # DDP keeps the ranks' models identical
    assert not torch.equal(a["first_batch"], b["first_batch"])  # each rank draws its own
