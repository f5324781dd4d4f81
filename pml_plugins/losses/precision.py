"""The losses' precision rule: compute in float32 at least, answer in the input's dtype.

float16 and bfloat16 lose too much in the losses' exponentials, logs, ranks and closest
points, so those are computed in float32; the terms handed to PML's reducer are then cast
back, so that float16 embeddings give a float16 loss, as PML's own losses do.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 where ``dtype`` is float16 or bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 where it is float16 or bfloat16, else ``x`` itself."""
    return x.to(compute_dtype(x.dtype))


def in_dtype(loss_dict: dict, dtype: torch.dtype) -> dict:
    """``loss_dict`` (PML's ``{name: {"losses": ..., ...}}``) with every tensor of losses
    cast to ``dtype``, in place; a term that is a plain number (no pairs) stays as it is."""
    for term in loss_dict.values():
        if torch.is_tensor(term["losses"]):
            term["losses"] = term["losses"].to(dtype)
    return loss_dict


class InInputDtype:
    """Mixin for a PML loss (listed before it): the loss dict of ``compute_loss`` in the
    embeddings' dtype (:func:`in_dtype`), whatever dtype its distances were computed in."""

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> dict:
        loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return in_dtype(loss_dict, embeddings.dtype)
