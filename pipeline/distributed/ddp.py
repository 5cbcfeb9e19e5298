"""torch DistributedDataParallel (replicated model, all-reduced gradients)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.distributed.base import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        model = self.materialize(model)  # DDP replicates: every rank holds the whole model
        self._plain = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model  # one process: DDP would only add overhead
        self.optimizer = make_optimizer(self._plain)

    @property
    def unwrapped(self) -> nn.Module:
        return self._plain

    def no_sync(self, last_micro_batch: bool):
        if isinstance(self.model, DistributedDataParallel) and not last_micro_batch:
            return self.model.no_sync()
        return super().no_sync(last_micro_batch)

    def clip_and_step(self, max_norm: float) -> tuple[float, bool]:
        assert self.optimizer is not None
        self.precision.unscale_(self.optimizer)
        params = [p for p in self._plain.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        finite = math.isfinite(norm)
        stepped = self.precision.step(self.optimizer, finite)
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return {"model": self._plain.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self._plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("scaler", {}))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        # clone: tied weights share storage, which safetensors refuses
        return {k: v.detach().float().cpu().clone() for k, v in self._plain.state_dict().items()}
