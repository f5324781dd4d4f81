"""Mixed precision for any PML trainer: autocast around the loss, a grad scaler for fp16.

PML's trainers have no autocast switch. :func:`with_amp` composes :class:`AmpMixin` before
a trainer class (PML's or a plugin's), so one mixin serves every trainer the registry
builds without subclassing each one.
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpMixin:
    """Overrides of PML's ``BaseTrainer``: ``calculate_loss`` under ``torch.autocast`` (the
    trunk, the embedder, miners and the loss) and, for fp16, ``backward`` and
    ``step_optimizers`` through a ``torch.amp.GradScaler`` (:attr:`grad_scaler`).

    ``amp_dtype`` is set by :func:`with_amp`; the device type is the trainer's
    ``data_device``.
    """

    amp_dtype = torch.bfloat16

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.amp_device_type = torch.device(self.data_device).type
        fp16 = self.amp_dtype == torch.float16
        self.grad_scaler = torch.amp.GradScaler(self.amp_device_type) if fp16 else None

    def calculate_loss(self, curr_batch):
        with torch.autocast(device_type=self.amp_device_type, dtype=self.amp_dtype):
            return super().calculate_loss(curr_batch)

    def backward(self) -> None:
        if self.grad_scaler is None:
            return super().backward()
        self.grad_scaler.scale(self.losses["total_loss"]).backward()

    def step_optimizers(self) -> None:
        if self.grad_scaler is None:
            return super().step_optimizers()
        for opt in self.optimizers.values():
            self.grad_scaler.step(opt)
        self.grad_scaler.update()


def with_amp(trainer_class: type, amp: str) -> type:
    """``trainer_class`` in mixed precision ``amp`` ("bf16" or "fp16"): a subclass with
    :class:`AmpMixin` first; "off" gives ``trainer_class`` itself."""
    if amp == "off":
        return trainer_class
    return type(
        f"Amp{trainer_class.__name__}", (AmpMixin, trainer_class), {"amp_dtype": DTYPES[amp]}
    )
