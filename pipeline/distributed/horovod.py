"""Horovod: ring all-reduce of gradients over gloo, the model replicated on every rank.

Horovod brings its own launcher; on Ray that is `horovod.ray.RayExecutor` (Ray removed its
`HorovodTrainer`), driven by `pipeline.runtime.horovod`. Gradient accumulation is Horovod's
`backward_passes_per_step`: gradients are all-reduced once every k backward passes.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.distributed.base import OptimizerFactory
from pipeline.distributed.replicated import ReplicatedStrategy


class HorovodStrategy(ReplicatedStrategy):
    name = "horovod"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import horovod.torch as hvd

        if not hvd.is_initialized():
            hvd.init()
        self.checkpoint_activations(model)
        self.compile(model)
        model = self.materialize(model)
        self._plain = self.model = model
        base = make_optimizer(model)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.optimizer = hvd.DistributedOptimizer(
            base, named_parameters=model.named_parameters(), op=hvd.Average,
            backward_passes_per_step=self.settings.grad_accum_steps)
        # No broadcast_optimizer_state: the state is empty at start, and Horovod fills an empty
        # state with a zero-gradient step, which moves AdamW weights (decay) and its step count.
        # On resume every rank loads the same state.pt instead.

    def describe(self) -> str:
        return "horovod (gloo ring all-reduce)"

    def _rank(self) -> int:
        import horovod.torch as hvd

        return hvd.rank()

    # Horovod never initialises torch.distributed, whose rank and size the base class reads: every
    # rank would take itself for the only replica and validate the whole global batch.
    @property
    def dp_rank(self) -> int:
        return self._rank()

    @property
    def dp_size(self) -> int:
        import horovod.torch as hvd

        return hvd.size()

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor | float, torch.Tensor]:
        assert self.optimizer is not None
        self.optimizer.synchronize()  # wait for the all-reduce before reading gradients
        self.precision.unscale_(self.optimizer)
        norm = self._clip(max_norm)
        with self.optimizer.skip_synchronize():
            stepped = self.precision.step(self.optimizer, norm)
        self.optimizer.zero_grad()  # Horovod's override takes no set_to_none (torch's default: True)
        return norm, stepped

    def all_mean(self, values: list[float | torch.Tensor]) -> list[float]:
        import horovod.torch as hvd

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)  # gloo: on the host
        return hvd.allreduce(t, op=hvd.Average, name="pipeline.all_mean").tolist()

