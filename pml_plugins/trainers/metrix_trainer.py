"""Metrix feature and input mixing as a PML trainer."""

from __future__ import annotations

import torch
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f

from ..losses.metrix import MetrixLoss
from ..models.backbones import MapTrunk


class MetrixTrainer(MetricLossOnly):
    r"""PML's ``MetricLossOnly`` with Metrix mixing of trunk outputs or of images.

    Paper: S. Venkataramanan, B. Psomas, E. Kijak, L. Amsaleg, K. Karantzalos, Y. Avrithis,
    "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
    https://arxiv.org/abs/2106.04990 (Metrix/feature and Metrix/input).

    ``loss_funcs["metric_loss"]`` must be a :class:`pml_plugins.losses.MetrixLoss`; its
    ``mode`` chooses what is mixed, with one :math:`\lambda \sim \mathrm{Beta}(\alpha,\alpha)`
    per iteration:

    - ``"feature"``: the trunk runs once per iteration on the clean batch. Where the trunk
      is a :class:`~pml_plugins.models.backbones.MapTrunk` (``SmallCNN``, ``ResNet50``,
      ``GoogLeNet``; a ``DistributedDataParallel`` wrapper is looked through), its feature
      maps are mixed before pooling, :math:`\mathrm{pool}(\lambda F(x) + (1-\lambda) F(x'))`,
      as the authors mix ResNet-50's ``layer4`` maps before GAP + GMP; any other trunk's
      output rows are mixed, :math:`\lambda f(x) + (1-\lambda) f(x')`. Only the mixed
      points go through the pooling and the embedder.
    - ``"input"``: the mixed images (by default each positive of an anchor with the
      anchor's hardest negative under the iteration's clean embeddings, no extra forward
      pass to find it) go through trunk and embedder: one extra forward pass per mixed
      point.
    - ``"embed"``: the loss mixes embeddings itself; the trainer is ``MetricLossOnly``.

    The mixing pairs are :meth:`MetrixLoss.mixing_pairs` of the clean loss's pairs
    (``tuple_miner`` if given, else the loss's own miner). The iteration's loss is
    ``clean + weight * mixed``: the clean loss is ``MetrixLoss``'s inner loss on the batch,
    the mixed loss is :meth:`MetrixLoss.compute_mixed_loss` between the clean embeddings
    (anchors, with gradient) and the mixed embeddings. Everything else (optimizers,
    schedulers, hooks, samplers, ``freeze_these``, batch norm freezing) is PML's.

    Paper vs project: running the trunk once per iteration (the released code runs it
    three times; with frozen BatchNorm the result is the same) is a project decision. A
    trunk that is not a ``MapTrunk`` has its output mixed, which equals mixing the maps
    only where its pooling is linear (average pooling).
    """

    #: the loss modes that train data-parallel (``pml_plugins.experiment.distributed``):
    #: feature and input mode make their mixed embeddings outside the loss, which is the
    #: part that sees the batch gathered from all ranks
    distributed_modes = {"embed": True, "feature": False, "input": False}

    def custom_setup(self) -> None:
        loss = self.loss_funcs.get("metric_loss")
        if not isinstance(loss, MetrixLoss):
            raise TypeError(
                "MetrixTrainer needs loss_funcs['metric_loss'] to be a MetrixLoss, "
                f"got {type(loss).__name__}"
            )

    def calculate_loss(self, curr_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss_fn: MetrixLoss = self.loss_funcs["metric_loss"]
        if loss_fn.mode == "embed":
            return super().calculate_loss(curr_batch)
        data, labels = curr_batch
        data = c_f.to_device(data, device=self.data_device, dtype=self.dtype)
        maps = None
        if loss_fn.mode == "feature" and isinstance(self.map_trunk(), MapTrunk):
            maps = self.models["trunk"](data, pooled=False)
            trunk_output = self.map_trunk().pool(maps)
        else:
            trunk_output = self.get_trunk_output(data)
        embeddings = self.get_final_embeddings(trunk_output)
        indices_tuple = self.maybe_mine_embeddings(embeddings, labels)
        if self.loss_weights.get("metric_loss", 0) <= 0:
            self.losses["metric_loss"] = 0
            return None
        labels = c_f.to_device(labels, embeddings)
        indices_tuple = loss_fn.clean_indices(embeddings, labels, indices_tuple)
        clean = loss_fn(embeddings, labels, indices_tuple)
        lam = loss_fn.sample_lambda()
        pairs = loss_fn.mixing_pairs(labels, embeddings, indices_tuple)
        if pairs.num_pairs == 0:  # nothing to mix (e.g. one class)
            mixed_emb = embeddings[:0]
        elif loss_fn.mode == "input":  # mixed images
            mixed_emb = self.compute_embeddings(loss_fn.build_mixed_embeddings(data, pairs, lam))
        elif maps is None:  # mixed trunk outputs
            mixed = loss_fn.build_mixed_embeddings(trunk_output, pairs, lam)
            mixed_emb = self.get_final_embeddings(mixed)
        else:  # mixed feature maps, pooled after mixing
            mixed = loss_fn.build_mixed_embeddings(maps, pairs, lam)
            mixed_emb = self.get_final_embeddings(self.map_trunk().pool(mixed))
        mixed = loss_fn.compute_mixed_loss(embeddings, labels, mixed_emb, pairs, lam)
        self.losses["metric_loss"] = clean + loss_fn.weight * mixed
        return None

    def map_trunk(self) -> torch.nn.Module:
        """The trunk, unwrapped from ``DistributedDataParallel`` / ``DataParallel``."""
        trunk = self.models["trunk"]
        return getattr(trunk, "module", trunk)
