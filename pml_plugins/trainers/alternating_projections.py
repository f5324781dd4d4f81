"""PML's ``MetricLossOnly`` with the proximal term of alternating projections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f
from torch.utils.data import Dataset, default_collate

from ..miners.representative_miner import RepresentativeMiner
from ..samplers.representative_sampler import RepresentativeSampler
from .proximal_term import ProximalTerm

PROXIMAL_LOSS = "proximal_loss"


class _WithIndices(Dataset):
    """``dataset[i]`` -> ``(dataset[i], i)``, so a batch carries its dataset indices."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index], index


class _CollateWithIndices:
    """Applies the user's collate function to the items and stacks the indices."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __call__(self, batch: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        items = [item for item, _ in batch]
        indices = torch.tensor([index for _, index in batch], dtype=torch.long)
        return self.collate_fn(items), indices


class AlternatingProjections(MetricLossOnly):
    """Metric learning by alternating projections onto relaxed feasible sets.

    From "Deep Metric Learning with Alternating Projections onto Feasible Sets", O. Can,
    Y. Z. Gürbüz, A. A. Alatan, ICIP 2021, https://arxiv.org/abs/1907.07585.

    Only the abstract is available; it fixes that the feasible set is an intersection of
    relaxed sets, each enforcing the constraints for one sample per class, that alternating
    projections onto them "introduce a regularization term", and that batches hold the
    same sample of each class for a number of iterations. The formulation below is the
    project's **reconstruction**: projection ``k`` approximately solves

        theta_{k+1} ~ argmin_theta  L_{R_k}(theta) + lambda / 2 * ||theta - theta_k||^2

    by the iterations of one projection of :class:`RepresentativeSampler` (T batches that
    all hold the representatives ``R_k`` of their classes). ``L`` is the trainer's
    ``metric_loss`` (any PML or plugin loss); ``theta`` is every parameter of the ``trunk``
    and ``embedder`` models; ``theta_k`` is snapshotted at the first batch of each
    projection (when the sampler has redrawn the representatives). ``proximal_weight=0``
    gives plain ``MetricLossOnly`` training with the representative sampler.

    What this adds to ``MetricLossOnly``:

    - ``sampler`` must be a :class:`RepresentativeSampler` with ``k * m == batch_size``.
    - Batches carry their dataset indices: the trainer builds its ``DataLoader`` on a view
      of ``dataset`` whose items are ``(dataset[i], i)`` and collates the indices beside the
      items (the user's ``collate_fn`` and ``data_and_label_getter`` see the items as
      before). With the indices the sampler tells the projection of each batch and the
      positions of its representatives, correct with any ``dataloader_num_workers``.
    - The embeddings of each batch refresh the sampler's representative embeddings (for
      hard class mining), detached, with no extra forward pass.
    - ``loss_funcs["proximal_loss"]`` is a :class:`ProximalTerm` (added by the trainer)
      that holds ``theta_k``; ``losses["proximal_loss"]`` is its value, so ``total_loss`` is
      the penalised objective. Its ``state_dict()`` (``theta_k``, the projection index and
      the sampler's state) is saved and loaded with the other ``loss_funcs`` by PML's
      ``HookContainer``, and is what :meth:`state_dict` / :meth:`load_state_dict` give.
    - ``representative_anchors_only=True`` puts a :class:`RepresentativeMiner` in
      ``mining_funcs["tuple_miner"]`` (wrapping a given tuple miner as its ``inner_miner``),
      so the loss sees only tuples anchored at representatives. Every
      ``RepresentativeMiner`` in ``mining_funcs`` gets each batch's representative mask.
    - record-keeper: ``proximal_loss`` under the loss histories; ``proximal_value``,
      ``squared_distance`` (``||theta - theta_k||^2``), ``proximal_share`` (the term's
      share of the weighted total loss, :meth:`record_proximal_share`), ``projection``
      and ``weight`` of the ``proximal_loss`` module.

    A ``subset_batch_miner`` is not supported (it would drop representatives).

    Args:
        *args: PML ``MetricLossOnly`` arguments.
        proximal_weight: lambda. AP's own value is unknown. The term follows the
            convention of the same authors' follow-up code (CCP): summed over all
            parameters, not normalised (:class:`ProximalTerm`). Its size grows with how far
            the parameters move in one projection, so CCP's ``2e-4`` (for a projection of
            several epochs at Adam's learning rate ``1e-5``) has no effect on the default
            grid (T = 10 at ``1e-3``): there the term is ``1e-5`` of the loss. The default
            ``1.0`` is the largest weight of the default grid's sweep
            (``benchmarks/ap_lambda_sweep.py``, docs/methods/alternating_projections.md)
            that did not lower test MAP@R; it halves ``||theta - theta_k||^2`` and its
            gradient is about a tenth of the base loss's. Set it per setting from the
            recorded ``proximal_share`` and ``squared_distance``.
        representative_anchors_only: restrict the loss to representative-anchored tuples.
        representative_tuple_type: ``"pairs"`` or ``"triplets"``, for the miner added by
            ``representative_anchors_only`` when no tuple miner is given.
        **kwargs: PML ``MetricLossOnly`` keyword arguments.
    """

    #: data-parallel training (``pml_plugins.experiment.distributed``) hands the miners the
    #: representative mask of the batch gathered from all ranks after :meth:`start_batch`
    distributed_representative_masks = True

    def __init__(
        self,
        *args: Any,
        proximal_weight: float = 1.0,
        representative_anchors_only: bool = False,
        representative_tuple_type: str = "pairs",
        **kwargs: Any,
    ) -> None:
        self.proximal_weight = float(proximal_weight)
        self.representative_anchors_only = representative_anchors_only
        self.representative_tuple_type = representative_tuple_type
        self.batch_indices: torch.Tensor | None = None
        self.representative_mask: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def custom_setup(self) -> None:
        if not isinstance(self.sampler, RepresentativeSampler):
            raise ValueError(
                "AlternatingProjections needs sampler=RepresentativeSampler(...), got "
                f"{type(self.sampler).__name__}"
            )
        if int(self.batch_size) != self.sampler.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} must equal the sampler's classes_per_batch * "
                f"samples_per_class = {self.sampler.batch_size}"
            )
        if "subset_batch_miner" in self.mining_funcs:
            raise ValueError(
                "AlternatingProjections does not support a subset_batch_miner: it would drop "
                "representatives from the batch"
            )
        if self.representative_anchors_only:
            inner = self.mining_funcs.get("tuple_miner")
            if not isinstance(inner, RepresentativeMiner):
                miner = RepresentativeMiner(
                    tuple_type=self.representative_tuple_type, inner_miner=inner
                )
                self.mining_funcs = {**self.mining_funcs, "tuple_miner": miner}
        named = [
            (f"{model_name}.{name}", p)
            for model_name in ("trunk", "embedder")
            if model_name in self.models
            for name, p in self.models[model_name].named_parameters()
        ]
        proximal = ProximalTerm(named, self.proximal_weight, sampler=self.sampler)
        self.loss_funcs = {**self.loss_funcs, PROXIMAL_LOSS: proximal}
        if PROXIMAL_LOSS not in self.loss_names:
            self.loss_names.append(PROXIMAL_LOSS)
        if self.loss_weights is not None and PROXIMAL_LOSS not in self.loss_weights:
            self.loss_weights = {**self.loss_weights, PROXIMAL_LOSS: 1}

    def modify_schema(self) -> None:
        self.schema["loss_funcs"].keys += [PROXIMAL_LOSS]

    @property
    def proximal_term(self) -> ProximalTerm:
        return self.loss_funcs[PROXIMAL_LOSS]

    def initialize_dataloader(self) -> None:
        c_f.LOGGER.info("Initializing dataloader")
        self.dataloader = c_f.get_train_dataloader(
            _WithIndices(self.dataset),
            self.batch_size,
            self.sampler,
            self.dataloader_num_workers,
            _CollateWithIndices(self.collate_fn),
        )
        if not self.iterations_per_epoch:
            self.iterations_per_epoch = len(self.dataloader)
        self.dataloader_iter = iter(self.dataloader)

    def get_batch(self) -> tuple[Any, torch.Tensor]:
        self.dataloader_iter, (curr_batch, indices) = c_f.try_next_on_generator(
            self.dataloader_iter, self.dataloader
        )
        data, labels = self.data_and_label_getter(curr_batch)
        labels = c_f.process_label(labels, self.label_hierarchy_level, self.label_mapper)
        self.start_batch(indices)
        return data, labels

    def start_batch(self, indices: torch.Tensor) -> None:
        """Projection bookkeeping for a batch with these dataset indices.

        Snapshots ``theta_k`` when the batch belongs to a new projection and hands the
        representative mask to every ``RepresentativeMiner``.
        """
        projection, mask = self.sampler.batch_info(indices)
        if projection != self.proximal_term.projection:
            self.proximal_term.snapshot(projection)
        self.batch_indices = torch.as_tensor(indices)
        self.representative_mask = torch.from_numpy(mask)
        for miner in self.mining_funcs.values():
            if isinstance(miner, RepresentativeMiner):
                miner.set_representative_mask(self.representative_mask)

    def calculate_loss(self, curr_batch: tuple[Any, torch.Tensor]) -> None:
        data, labels = curr_batch
        embeddings = self.compute_embeddings(data)
        if self.batch_indices is not None:
            self.sampler.update_representative_embeddings(self.batch_indices, embeddings)
        indices_tuple = self.maybe_mine_embeddings(embeddings, labels)
        self.losses["metric_loss"] = self.maybe_get_metric_loss(embeddings, labels, indices_tuple)
        self.losses[PROXIMAL_LOSS] = self.proximal_term()
        self.record_proximal_share()

    def record_proximal_share(self) -> float:
        """The proximal term's share of this batch's weighted total loss (recorded).

        ``w_p P / (|sum_{other losses l} w_l L_l| + w_p P)``, with the weights of
        ``loss_weights`` (1 where absent), computed from the current ``losses`` before
        PML's loss tracker weights and sums them.
        """
        weights = self.loss_weights or {}
        others = 0.0
        for name, value in self.losses.items():
            if name in (PROXIMAL_LOSS, "total_loss"):
                continue
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            others += float(weights.get(name, 1)) * value
        return self.proximal_term.record_share(others, weights.get(PROXIMAL_LOSS, 1))

    def state_dict(self) -> dict[str, Any]:
        """``theta_k``, its projection index and the sampler's state."""
        return self.proximal_term.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.proximal_term.load_state_dict(state)
