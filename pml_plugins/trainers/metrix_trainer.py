"""Metrix feature and input mixing as a PML trainer."""

from __future__ import annotations

import torch
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f

from ..losses.metrix import MetrixLoss


class MetrixTrainer(MetricLossOnly):
    r"""PML's ``MetricLossOnly`` with Metrix mixing of trunk outputs or of images.

    Paper: S. Venkataramanan, B. Psomas, E. Kijak, L. Amsaleg, K. Karantzalos, Y. Avrithis,
    "It Takes Two to Tango: Mixup for Deep Metric Learning", ICLR 2022,
    https://arxiv.org/abs/2106.04990 (Metrix/feature and Metrix/input).

    ``loss_funcs["metric_loss"]`` must be a :class:`pml_plugins.losses.MetrixLoss`; its
    ``mode`` chooses what is mixed, with one :math:`\lambda \sim \mathrm{Beta}(\alpha,\alpha)`
    per iteration:

    - ``"feature"``: the trunk runs once per iteration on the clean batch; pairs of its
      output rows are mixed, :math:`\lambda f(x) + (1-\lambda) f(x')`, and only the mixed
      rows go through the embedder. Pairs: every ordered pair of different labels
      (``negatives="all"``) or each sample with its hardest negative
      (``negatives="hardest"``).
    - ``"input"``: each image is mixed with its hardest negative under the clean
      embeddings of this iteration (no extra forward pass to find it), and the mixed images
      go through trunk and embedder: one extra forward pass per sample.
    - ``"embed"``: the loss mixes embeddings itself; the trainer is ``MetricLossOnly``.

    The iteration's loss is ``clean + weight * mixed``: the clean loss is ``MetrixLoss``'s
    inner loss on the batch (``tuple_miner`` if given, else the loss's own miner), the mixed
    loss is :meth:`MetrixLoss.compute_mixed_loss` between the clean embeddings (anchors,
    with gradient) and the mixed embeddings. Everything else (optimizers, schedulers, hooks,
    samplers, ``freeze_these``, batch norm freezing) is PML's.

    Paper vs project: Metrix/feature mixes the ResNet-50 ``layer4`` maps before pooling.
    Here the trunk's output is mixed, whatever it is: the trunks of this project
    (``SmallCNN``, torchvision backbones with the classifier removed) return pooled vectors
    (B, F), so feature mode mixes the pooled feature. With global average pooling alone
    this equals mixing the maps (pooling is linear); with GAP+GMP it does not. Running the
    trunk once per iteration (the released code runs it three times) and taking the
    hardest negative of each mixed sample in input mode (the code takes the anchor's) are
    project decisions.
    """

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
        trunk_output = self.get_trunk_output(data)
        embeddings = self.get_final_embeddings(trunk_output)
        indices_tuple = self.maybe_mine_embeddings(embeddings, labels)
        if self.loss_weights.get("metric_loss", 0) <= 0:
            self.losses["metric_loss"] = 0
            return None
        labels = c_f.to_device(labels, embeddings)
        clean = loss_fn(embeddings, labels, indices_tuple)
        lam = loss_fn.sample_lambda()
        first, second = loss_fn.mixing_pairs(labels, embeddings)
        if len(first) == 0:  # one class only: nothing to mix
            mixed = loss_fn.compute_mixed_loss(
                embeddings, labels, embeddings[:0], first, second, lam
            )
        else:
            mixed_emb = self.compute_mixed_embeddings(data, trunk_output, first, second, lam)
            mixed = loss_fn.compute_mixed_loss(embeddings, labels, mixed_emb, first, second, lam)
        self.losses["metric_loss"] = clean + loss_fn.weight * mixed
        return None

    def compute_mixed_embeddings(
        self,
        data: torch.Tensor,
        trunk_output: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        lam: float,
    ) -> torch.Tensor:
        """Embeddings of the mixed trunk outputs (feature mode) or mixed images (input)."""
        if self.loss_funcs["metric_loss"].mode == "feature":
            mixed = lam * trunk_output[first] + (1 - lam) * trunk_output[second]
            return self.get_final_embeddings(mixed)
        first, second = first.to(data.device), second.to(data.device)
        mixed_data = lam * data[first] + (1 - lam) * data[second]
        return self.compute_embeddings(mixed_data)
