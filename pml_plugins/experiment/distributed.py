"""Data-parallel training (DDP) of any PML trainer: one process per GPU under ``torchrun``.

    torchrun --standalone --nproc_per_node 4 -m pml_plugins.cli train CONFIG --set distributed=true

What ``distributed: true`` does (``run.train_and_evaluate`` calls these helpers):

- :func:`init_from_env` joins the process group that ``torchrun`` describes in the
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``):
  NCCL and ``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU. Started without ``torchrun``
  (no ``WORLD_SIZE``) the run is an ordinary single process.
- :func:`with_ddp` composes :class:`DistributedMixin` (or :class:`RepresentativeMaskMixin`)
  before the trainer class, overriding ``BaseTrainer`` methods; :func:`wrap_trainer`
  turns the built trainer into a data-parallel one: its models go into
  ``DistributedDataParallel`` (gradients averaged over ranks), its ``metric_loss`` into
  :class:`DistributedLoss` and its ``tuple_miner`` into :class:`DistributedMiner`,
  subclasses of PML's ``DistributedLossWrapper``/``DistributedMinerWrapper``
  (``efficient=False``): every rank mines and computes the loss on the batch gathered
  from all ranks, so the loss sees ``world_size x batch_size`` samples per iteration, as
  one process with that batch would. Unlike PML's wrappers, the gathered batch is in rank
  order on every rank, so every rank computes the same loss even for losses that depend
  on the order of the batch (``LoOpLoss``). Gradients only flow into each rank's own
  embeddings; the loss is multiplied by ``world_size`` (PML's convention) so that DDP's
  average gives the single-process gradient. Learnable loss parameters (proxies) are not in
  DDP: their gradients are summed over ranks and divided by ``world_size**2`` after
  ``backward`` (the same correction).
- Only rank 0 writes (run folder, logs, checkpoints) and evaluates; :func:`is_main`.

Sampling: each rank draws its own batches with its own RNG stream (rank 0 keeps the
single-process stream, the others are reseeded from ``(seed, rank, epoch)``), so PML's
``MPerClassSampler`` and the plugin samplers keep their per-batch class structure. This is
sampling with independent streams, not a partition of the data as torch's
``DistributedSampler`` does: a ``DistributedSampler`` would shard the index list and break
the m-per-class structure of the batches. A sampler with its own fixed ``seed`` would give
every rank the same batches and is refused. An epoch is ``len(sampler or dataset) //
(batch_size * world_size)`` iterations per rank (unless ``iterations_per_epoch`` is set),
so it draws about one pass over the data in total.

Checkpoints hold the unwrapped state dicts, the same files as a single-process run.

Not supported: PML's ``subset_batch_miner``; a loss mode that the trainer class declares
unsupported in ``distributed_modes`` (``MetrixTrainer``'s feature and input mode: its mixed
embeddings are made outside the loss; embed mode works). BatchNorm statistics are per
rank (rank 0's buffers are broadcast at each forward); use ``SyncBatchNorm`` in the trunk
if that matters.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import distributed as pml_dist

from .checkpoint import seed_everything

LOG = logging.getLogger("pml_plugins")
#: rank 0 evaluates while the others wait in their next collective; allow a long test
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """A process group with more than one process is initialised."""
    return pml_dist.is_distributed() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if pml_dist.is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if pml_dist.is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that writes files."""
    return rank() == 0


def init_from_env(device: torch.device | str = "cpu") -> Context:
    """Join the process group described by ``torchrun``'s environment variables.

    ``device``: the run's device; a CUDA device becomes ``cuda:LOCAL_RANK`` (and the
    backend NCCL), anything else the CPU with gloo. Without ``WORLD_SIZE`` in the
    environment (not started by ``torchrun``), or with ``WORLD_SIZE=1``, nothing is
    initialised and the context is a single process on ``device``.
    """
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        if "WORLD_SIZE" not in os.environ:
            LOG.warning("distributed: true, but not started by torchrun: one process")
        return Context(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def finish() -> None:
    """Leave the process group (no-op when none was initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _collective_device(like: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


def gather_in_rank_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated in rank order (the same tensor on every rank).

    This rank's rows are ``x`` itself, so gradients flow into them; the other ranks' rows
    are copies without gradient. Every rank must call it with the same shape.
    """
    if not is_distributed():
        return x
    y = x.to(_collective_device(x))
    if y.dtype == torch.bool:
        y = y.to(torch.uint8)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y.contiguous())
    parts = [p.to(device=x.device, dtype=x.dtype) for p in parts]
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def _gather_pair(emb: torch.Tensor, labels: torch.Tensor | None):
    if labels is not None:
        labels = gather_in_rank_order(c_f.to_device(labels, device=emb.device))
    return gather_in_rank_order(emb), labels


class _Delegating(torch.nn.Module):
    """Public attributes and state dicts of the wrapped component, as if unwrapped."""

    _inner_name = "loss"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            inner = super().__getattr__(self._inner_name)
            return getattr(inner, name)

    def state_dict(self, *args, **kwargs):
        return getattr(self, self._inner_name).state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return getattr(self, self._inner_name).load_state_dict(state_dict, strict, assign)


class DistributedLoss(_Delegating, pml_dist.DistributedLossWrapper):
    """PML's ``DistributedLossWrapper`` (``efficient=False``), with the batch gathered in
    rank order, for any loss module.

    Every rank computes ``world_size * loss(all_emb, all_labels, indices_tuple)`` on the
    batch gathered from all ranks, as PML's wrapper does. Two differences:

    - the gathered batch is in rank order on every rank (PML puts this rank's rows first),
      so every rank computes the same loss and DDP's gradient is the gradient of the loss of
      one process on the concatenated batch. This matters for losses that depend on the
      order of the batch, like ``LoOpLoss``, which pairs the samples of a class in batch
      order: with PML's order rank 0 and rank 1 pair them differently;
    - any loss module is accepted, not only ``BaseMetricLossFunction`` (``MetrixLoss`` is a
      ``BaseLossWrapper``).

    ``indices_tuple`` must index the gathered batch: mine with :class:`DistributedMiner`.
    Attribute reads (``mode``, ``weight``, ...) and state dicts pass through to the wrapped
    loss. ``CrossBatchMemory`` goes through PML's own path.
    """

    def __init__(self, loss: torch.nn.Module, efficient: bool = False) -> None:
        torch.nn.Module.__init__(self)
        if efficient:
            # PML's efficient mode pairs local anchors with gathered references
            # (ref_emb); not every plugin loss takes ref_emb.
            raise ValueError("only efficient=False is supported")
        self.loss = loss
        self.efficient = efficient

    def forward_regular_loss(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size):
        if world_size <= 1:
            return self.loss(emb, labels, indices_tuple, ref_emb, ref_labels)
        all_emb, all_labels = _gather_pair(emb, labels)
        all_ref_emb = all_ref_labels = None
        if ref_emb is not None:
            all_ref_emb, all_ref_labels = _gather_pair(ref_emb, ref_labels)
        loss = self.loss(all_emb, all_labels, indices_tuple, all_ref_emb, all_ref_labels)
        return loss * world_size


class DistributedMiner(_Delegating, pml_dist.DistributedMinerWrapper):
    """PML's ``DistributedMinerWrapper`` (``efficient=False``) on the batch gathered in rank
    order (as :class:`DistributedLoss`), and a gathered ``RepresentativeMiner`` mask.

    The miner runs on the gathered batch, so a per-sample mask must cover it:
    :meth:`set_representative_mask` takes this rank's mask and gives the miner the masks
    of all ranks in rank order. A collective call: every rank must call it for every batch.
    """

    _inner_name = "miner"

    def __init__(self, miner: torch.nn.Module, efficient: bool = False) -> None:
        if efficient:
            raise ValueError("only efficient=False is supported")
        pml_dist.DistributedMinerWrapper.__init__(self, miner, efficient=False)

    def forward(self, emb, labels, ref_emb=None, ref_labels=None):
        if world_size() <= 1:
            return self.miner(emb, labels, ref_emb, ref_labels)
        all_emb, all_labels = _gather_pair(emb, labels)
        if ref_emb is None:
            return self.miner(all_emb, all_labels)
        all_ref_emb, all_ref_labels = _gather_pair(ref_emb, ref_labels)
        return self.miner(all_emb, all_labels, all_ref_emb, all_ref_labels)

    def set_representative_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            mask = gather_in_rank_order(torch.as_tensor(mask).bool())
        self.miner.set_representative_mask(mask)


def wrap_loss(loss: torch.nn.Module) -> torch.nn.Module:
    """``loss`` computed on the gathered batch when distributed; ``loss`` itself otherwise."""
    if not is_distributed() or isinstance(loss, DistributedLoss):
        return loss
    return DistributedLoss(loss)


def wrap_miner(miner: torch.nn.Module | None) -> torch.nn.Module | None:
    """``miner`` mining the gathered batch when distributed; ``miner`` itself otherwise."""
    if miner is None or not is_distributed() or isinstance(miner, DistributedMiner):
        return miner
    return DistributedMiner(miner)


def sync_gradients(params: Iterable[torch.nn.Parameter], size: int) -> None:
    """Sum the gradients of ``params`` over ranks and divide by ``size**2``.

    For the learnable parameters of a loss wrapped by :class:`DistributedLoss`: each rank
    holds ``size`` times the gradient of the loss on the gathered batch.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(size * size)


def reseed_for_rank(seed: int, epoch: int = 0) -> None:
    """Give rank > 0 its own data-order stream (python, numpy, torch, PML's RNG)."""
    r = rank()
    if r > 0:
        seed_everything(int(np.random.SeedSequence([seed, r, epoch]).generate_state(1)[0]))


class DistributedMixin:
    """Overrides of PML's ``BaseTrainer`` for a data-parallel trainer (composed by
    :func:`with_ddp`, set up by :func:`wrap_trainer`): ``backward`` sums the gradients of
    the loss's learnable parameters over the ranks (:func:`sync_gradients`)."""

    distributed_context = Context()
    distributed_loss_parameters: tuple[torch.nn.Parameter, ...] = ()

    def backward(self) -> None:
        super().backward()
        if self.distributed_loss_parameters:
            sync_gradients(self.distributed_loss_parameters, self.distributed_context.world_size)


class RepresentativeMaskMixin(DistributedMixin):
    """For a trainer class that sets ``distributed_representative_masks`` (Alternating
    Projections): after its ``start_batch``, the wrapped miners that take a representative
    mask get the gathered batch's (:meth:`DistributedMiner.set_representative_mask`)."""

    def start_batch(self, indices: torch.Tensor) -> None:
        super().start_batch(indices)
        for miner in self.mining_funcs.values():
            if isinstance(miner, DistributedMiner) and hasattr(
                miner.miner, "set_representative_mask"
            ):
                miner.set_representative_mask(self.representative_mask)


def with_ddp(trainer_class: type, ctx: Context) -> type:
    """A subclass of ``trainer_class`` with :class:`DistributedMixin` (or
    :class:`RepresentativeMaskMixin`) first, for :func:`wrap_trainer`; ``trainer_class``
    itself for a single process."""
    if ctx.world_size <= 1:
        return trainer_class
    masks = getattr(trainer_class, "distributed_representative_masks", False)
    mixin = RepresentativeMaskMixin if masks else DistributedMixin
    return type(f"Distributed{trainer_class.__name__}", (mixin, trainer_class), {})


def wrap_trainer(trainer, ctx: Context, seed: int = 0, epoch: int = 0):
    """Make a PML trainer built from :func:`with_ddp`'s class data-parallel (see the module
    docstring). Returns it.

    Call after the trainer is built and a checkpoint is loaded (the state dicts are then
    the plain ones); a no-op for a single process. A loss mode that the trainer class
    declares unsupported in ``distributed_modes`` (``{mode: supported}``) is refused.
    """
    if ctx.world_size <= 1:
        return trainer
    if not isinstance(trainer, DistributedMixin):
        raise TypeError(
            f"distributed: build the trainer from distributed.with_ddp({type(trainer).__name__}, "
            "ctx), not from the trainer class itself"
        )
    if "subset_batch_miner" in trainer.mining_funcs:
        raise ValueError("distributed: a subset_batch_miner is not supported")
    loss = trainer.loss_funcs.get("metric_loss")
    modes = getattr(trainer, "distributed_modes", {})
    if not modes.get(getattr(loss, "mode", None), True):
        declared_by = next(c for c in type(trainer).__mro__ if "distributed_modes" in vars(c))
        refused = "/".join(m for m, ok in modes.items() if not ok)
        allowed = "/".join(m for m, ok in modes.items() if ok)
        raise ValueError(
            f"distributed: {declared_by.__name__} in {refused} mode is not supported "
            f"({allowed} mode is)"
        )
    if getattr(trainer.sampler, "seed", None) is not None:
        raise ValueError(
            f"distributed: the sampler {type(trainer.sampler).__name__} has its own seed, so "
            "every rank would draw the same batches; leave its seed unset"
        )
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    trainer.models = {
        k: torch.nn.parallel.DistributedDataParallel(m, device_ids=device_ids)
        if any(p.requires_grad for p in m.parameters())
        else m
        for k, m in trainer.models.items()
    }
    trainer.distributed_context = ctx
    if loss is not None:
        trainer.loss_funcs = {**trainer.loss_funcs, "metric_loss": wrap_loss(loss)}
        trainer.distributed_loss_parameters = tuple(p for p in loss.parameters() if p.requires_grad)
    if "tuple_miner" in trainer.mining_funcs:
        trainer.mining_funcs = {
            **trainer.mining_funcs,
            "tuple_miner": wrap_miner(trainer.mining_funcs["tuple_miner"]),
        }
    if not trainer.iterations_per_epoch:
        sampler = trainer.sampler
        if isinstance(sampler, torch.utils.data.BatchSampler):
            n = len(sampler) * int(trainer.batch_size)
        else:
            n = len(sampler) if sampler is not None else len(trainer.dataset)
        trainer.iterations_per_epoch = max(1, n // (int(trainer.batch_size) * ctx.world_size))
    reseed_for_rank(seed, epoch)
    return trainer
