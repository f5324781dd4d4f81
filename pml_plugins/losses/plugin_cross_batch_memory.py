"""PML's CrossBatchMemory, accepting the plugin losses that support a reference set."""

from __future__ import annotations

from pytorch_metric_learning.losses import CrossBatchMemory

from .plugin_wrapper_support import AcceptsPluginLosses


class PluginCrossBatchMemory(AcceptsPluginLosses, CrossBatchMemory):
    r"""PML's :class:`~pytorch_metric_learning.losses.CrossBatchMemory` (XBM) for plugin losses.

    Paper: X. Wang, H. Zhang, W. Huang, M. R. Scott, "Cross-Batch Memory for Embedding
    Learning", CVPR 2020.

    PML's wrapper accepts losses by class name from a fixed list, so it refuses every
    plugin loss, even a subclass of a loss it allows. This class is PML's wrapper unchanged
    (same queue, same pairs, same ``miner``, ``enqueue_mask`` and ``indices_tuple``
    handling); it only adds to the list the plugin losses that honour PML's contract with a
    reference set (``ref_emb``, ``ref_labels`` and reference-set ``indices_tuple``):
    ``GradMLLoss``, ``NRALoss``, ``SoftContrastiveLoss`` and ``SoftMultiSimilarityLoss``.
    Each batch's loss is the inner loss of the batch against the memory:

    .. math::
        L = \mathcal{L}(\text{batch}, \text{labels}; \text{ref\_emb} = M_E,
            \text{ref\_labels} = M_L)

    with self-comparisons removed, exactly as PML computes it for its own losses.

    Args: as PML's ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``.
    """
