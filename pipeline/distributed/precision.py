"""Mixed precision as one object: the autocast context, loss scaling for fp16, and its state."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """fp32: nothing. bf16: autocast, no scaling. fp16: autocast plus a dynamic GradScaler."""

    def __init__(self, dtype: str, device: torch.device) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"precision.dtype: unknown '{dtype}' (known: {', '.join(DTYPES)})")
        self.name, self.dtype, self.device = dtype, DTYPES[dtype], device
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grads_finite: bool) -> bool:
        """Step the optimizer unless gradients overflowed. Returns whether it stepped."""
        if self.scaler:
            scale_before = self.scaler.get_scale()
            self.scaler.step(optimizer)  # skips by itself on inf/nan
            self.scaler.update()
            return grads_finite and self.scaler.get_scale() >= scale_before
        if grads_finite:
            optimizer.step()
        return grads_finite

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
