"""Exponential moving average of model weights (used for diffusion sampling and evaluation).

The decay ramps up as min(decay, (1 + step) / (10 + step)) so that early averages are not
dominated by the random initialisation.

The average is kept over whatever the strategy hands out as its local weights
(`Strategy.ema_source`): the whole state dict under DDP, each rank's DTensor shards under FSDP2,
each rank's fp32 master partitions under ZeRO-3, and in bf16/fp16 each rank's fragment of the fp32
master under ZeRO-1/2 (the whole fp32 master under ZeRO-0). So a sharded run keeps a sharded EMA, updated
without any communication; only export gathers it, one tensor at a time (`Strategy.full_tensors`).
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, source: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in source.items()}

    @torch.no_grad()
    def update(self, source: dict[str, torch.Tensor], step: int, applied: torch.Tensor | bool = True) -> None:
        """Average in the weights after step `step`. `applied`: whether the optimizer stepped,
        a bool or a device bool tensor (then a skipped step leaves the average unchanged,
        decided on the device: the weight of the new value becomes 0)."""
        if applied is False:
            return
        d = min(self.decay, (1 + step) / (10 + step))
        weight: float | torch.Tensor = 1 - d
        if isinstance(applied, torch.Tensor):
            weight = torch.where(applied, weight, 0.0).to(torch.float32)
        for k, v in source.items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), weight)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy fit for safetensors (no shared storage between tied entries)."""
        return {k: v.clone() for k, v in self.shadow.items()}
