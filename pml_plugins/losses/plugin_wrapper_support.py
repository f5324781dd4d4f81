"""Which plugin losses PML's loss wrappers can take, and why the others cannot."""

from __future__ import annotations

#: plugin losses that honour PML's full loss contract with a reference set: ``indices_tuple``
#: pairs from the reference set, ``ref_emb`` and ``ref_labels`` (what ``CrossBatchMemory``
#: and an asymmetric ``SelfSupervisedLoss`` pass)
REFERENCE_SET_LOSSES = (
    "GradMLLoss",
    "NRALoss",
    "SoftContrastiveLoss",
    "SoftMultiSimilarityLoss",
)

#: plugin losses that cannot work with a reference set, and why (for the error message)
UNSUPPORTED = {
    "LoOpLoss": "its negatives are arcs between pairs of the batch, so it takes no ref_emb",
    "MetrixLoss": "it is itself a wrapper that mixes the batch; wrap its inner loss instead",
    "SoftProxyAnchorLoss": "a proxy loss has no pairs to take from a memory (as PML's "
    "ProxyAnchorLoss)",
}


class AcceptsPluginLosses:
    """Mixin for a PML ``BaseLossWrapper`` subclass: PML's list of supported loss names
    (from the next class in the MRO) plus :data:`REFERENCE_SET_LOSSES`."""

    @classmethod
    def supported_losses(cls) -> list[str]:
        return [*super().supported_losses(), *REFERENCE_SET_LOSSES]  # type: ignore[misc]

    @classmethod
    def check_loss_support(cls, loss_name: str) -> None:
        if loss_name not in cls.supported_losses():
            why = f" ({UNSUPPORTED[loss_name]})" if loss_name in UNSUPPORTED else ""
            raise ValueError(
                f"{cls.__name__} does not support {loss_name}{why}; "
                f"supported: {', '.join(cls.supported_losses())}"
            )
