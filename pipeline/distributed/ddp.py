"""torch DistributedDataParallel (replicated model, all-reduced gradients)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.distributed.base import OptimizerFactory, world_size
from pipeline.distributed.replicated import ReplicatedStrategy


class DDPStrategy(ReplicatedStrategy):
    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.checkpoint_activations(model)
        self.compile(model)
        model = self.materialize(model)  # DDP replicates: every rank holds the whole model
        self._plain = model
        if world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model  # one process: DDP would only add overhead
        self.optimizer = make_optimizer(self._plain)

    def no_sync(self, last_micro_batch: bool):
        if isinstance(self.model, DistributedDataParallel) and not last_micro_batch:
            return self.model.no_sync()
        return super().no_sync(last_micro_batch)

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor | float, torch.Tensor]:
        assert self.optimizer is not None
        self.precision.unscale_(self.optimizer)
        norm = self._clip(max_norm)
        stepped = self.precision.step(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped
