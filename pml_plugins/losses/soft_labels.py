"""Helpers shared by the soft-label losses (``SoftContrastiveLoss``,
``SoftMultiSimilarityLoss``, ``SoftProxyAnchorLoss``).

A soft label ``y`` in [0, 1] says how much a pair (or a sample-proxy entry) is positive:
``y = 1`` is a positive pair, ``y = 0`` a negative pair, ``0 < y < 1`` both at once, with
weight ``y`` on the positive term and ``1 - y`` on the negative term. In a pair-label
matrix, NaN marks "not a pair".
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


def pair_label_matrix(
    indices_tuple: tuple[torch.Tensor, ...],
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The (n_rows, n_cols) soft-label matrix of hard pairs ``(a1, p, a2, n)``.

    1 at positive pairs, 0 at negative pairs, NaN everywhere else. A pair listed as both
    positive and negative raises ``ValueError`` (PML's pair losses assert the same).
    """
    a1, p, a2, n = indices_tuple
    y = torch.full((n_rows, n_cols), float("nan"), dtype=dtype, device=device)
    y[a2, n] = 0
    y[a1, p] = 1
    if torch.any(y[a2, n] != 0):
        raise ValueError("each pair must be either positive or negative, not both")
    return y


def reduce_loss_dict(
    loss: BaseMetricLossFunction, loss_dict: dict, embeddings: torch.Tensor
) -> torch.Tensor:
    """What PML's ``forward`` does with ``compute_loss``'s dict: ``loss``'s embedding
    regularizer on ``embeddings`` added, then ``loss``'s reducer (no labels)."""
    loss.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
    return loss.reducer(loss_dict, embeddings, None)


def check_soft_labels(y: torch.Tensor, shape: tuple[int, int], allow_nan: bool) -> None:
    """Raise ``ValueError`` unless ``y`` has ``shape`` and values in [0, 1] (or NaN)."""
    if tuple(y.shape) != tuple(shape):
        raise ValueError(f"soft labels must have shape {tuple(shape)}, got {tuple(y.shape)}")
    if not torch.is_floating_point(y):
        raise ValueError(f"soft labels must be a floating-point tensor, got {y.dtype}")
    nan = torch.isnan(y)
    if not allow_nan and torch.any(nan):
        raise ValueError("soft labels must not contain NaN here")
    known = y[~nan]
    if torch.any((known < 0) | (known > 1)):
        raise ValueError("soft labels must lie in [0, 1]")


def weighted_logsumexp(x: torch.Tensor, weights: torch.Tensor, dim: int = 1) -> torch.Tensor:
    r""":math:`\log(1 + \sum_j w_j e^{x_j})` along ``dim``, over the entries with ``w > 0``.

    Computed as PML's ``lmu.logsumexp(x + log w, keep_mask=w > 0, add_one=True)``; where all
    weights are 0 the result is 0. A weight of exactly 1 adds ``log 1 = 0``, so with 0/1
    weights this is PML's masked log-sum-exp to the bit.
    """
    keep = weights > 0
    log_w = torch.log(torch.where(keep, weights, torch.ones_like(weights)))
    return lmu.logsumexp(x + log_w.to(x.dtype), keep_mask=keep, add_one=True, dim=dim)
