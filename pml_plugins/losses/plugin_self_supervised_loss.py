"""PML's SelfSupervisedLoss, accepting the plugin losses that support a reference set."""

from __future__ import annotations

from pytorch_metric_learning.losses import SelfSupervisedLoss

from .plugin_wrapper_support import AcceptsPluginLosses


class PluginSelfSupervisedLoss(AcceptsPluginLosses, SelfSupervisedLoss):
    r"""PML's :class:`~pytorch_metric_learning.losses.SelfSupervisedLoss` for plugin losses.

    The embeddings of a batch and of its augmentation are labelled by position
    (:math:`y_i = i` for both), so that each sample's augmentation is its only positive;
    with ``symmetric=True`` (default) the loss runs on the concatenation of the two, else on
    ``embeddings`` against ``ref_emb``. PML's wrapper accepts losses by class name from a
    fixed list and refuses every plugin loss; this class is PML's wrapper unchanged, with
    ``GradMLLoss``, ``NRALoss``, ``SoftContrastiveLoss`` and ``SoftMultiSimilarityLoss``
    added to the list.

    Args: as PML's ``SelfSupervisedLoss(loss, symmetric=True)``.
    """
