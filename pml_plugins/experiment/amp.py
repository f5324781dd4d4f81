"""Mixed precision for any PML trainer: autocast around the loss, a grad scaler for fp16.

PML's trainers have no autocast switch. ``enable_amp`` wraps one trainer instance's
``calculate_loss`` in ``torch.autocast`` and, for fp16, its ``backward`` and
``step_optimizers`` in a ``torch.amp.GradScaler``; so it works for every trainer the
registry builds (PML's and the plugins' subclasses) without subclassing each one.
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def enable_amp(trainer, device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """Switch ``trainer`` to mixed precision ``amp`` ("bf16" or "fp16"); "off" does nothing."""
    if amp == "off":
        return None
    dtype = DTYPES[amp]
    calculate_loss = trainer.calculate_loss

    def calculate_loss_autocast(curr_batch):
        with torch.autocast(device_type=device.type, dtype=dtype):
            return calculate_loss(curr_batch)

    trainer.calculate_loss = calculate_loss_autocast
    if amp != "fp16":
        return None
    scaler = torch.amp.GradScaler(device.type)

    def backward():
        scaler.scale(trainer.losses["total_loss"]).backward()

    def step_optimizers():
        for opt in trainer.optimizers.values():
            scaler.step(opt)
        scaler.update()

    trainer.backward = backward
    trainer.step_optimizers = step_optimizers
    return scaler
