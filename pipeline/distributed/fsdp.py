"""torch FSDP2 (`fully_shard`): every Transformer block is its own sharding unit, so each rank
keeps 1/N of the parameters, gradients and optimizer state and gathers one block at a time.

Initialisation is sharded too: the model arrives on the meta device, is sharded there, and
each rank then draws one unit (a block, or the embeddings) whole at a time and keeps its slice
(`pipeline.distributed.sharded_init`), so no rank ever holds the whole model and the weights
equal a DDP run's with the same seed.

Checkpoints use torch.distributed.checkpoint (DCP, `dcp_state`): each rank writes its own shard
file and rank 0 the metadata, so the per-rank directories merge into one sharded checkpoint,
which loads at another world size or under another layout (tensor or pipeline
parallel, DDP). Export gathers one tensor at a time to rank 0, which writes it and drops it
(`Strategy.full_tensors`): the whole model is never in one process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed import dcp_state
from pipeline.distributed.base import OptimizerFactory, Strategy, grad_norm_and_clip
from pipeline.distributed.sharded_init import init_by_unit, to_empty_keeping_ties
from pipeline.distributed.units import repeated_blocks


class FSDPStrategy(Strategy):
    name = "fsdp"
    gathers_weights = True

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("strategy fsdp needs torch.distributed to be initialised (Ray Train does it)")
        if self.precision.scaler is not None:
            # Each rank sees only its gradient shard: the sharded scaler all-reduces "found inf",
            # so every rank skips the same steps.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.precision.scaler = ShardedGradScaler(self.device.type)
        self.checkpoint_activations(model)
        self.compile(model)  # before fully_shard, as torchtitan does
        low = self.precision.dtype if self.precision.dtype != torch.float32 else None
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for block in repeated_blocks(model):
            fully_shard(block, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        if any(p.is_meta for p in model.parameters()):
            self._materialize_sharded(model)
        else:  # built eagerly (a small model in a test): sharding kept each rank's slice of it
            model.to(self.device)
        self.model = model
        self.optimizer = make_optimizer(model)
        self.precision.refresh_fp8_scales(model)

    def _materialize_sharded(self, model: nn.Module) -> None:
        """Allocate each rank's local shards (`to_empty` swaps tensors in place, so tied
        parameters stay tied), then initialise unit by unit, keeping this rank's slice."""
        to_empty_keeping_ties(model, self.device)
        init_by_unit(model, self.device, keep_local_slices, weights=self.init_from,
                     key=self.init_from_key)

    @property
    def unwrapped(self) -> nn.Module:
        assert self.model is not None
        return self.model  # FSDP2 shards in place: the module is still the model

    def describe(self) -> str:
        return f"fsdp (FSDP2, reshard_after_forward={self.cfg.reshard_after_forward})"

    def no_sync(self, last_micro_batch: bool):
        return gradient_sync(self.model, last_micro_batch)

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor | float, torch.Tensor]:
        assert self.optimizer is not None
        self.precision.unscale_(self.optimizer)
        norm = grad_norm_and_clip([p for p in self.model.parameters() if p.grad is not None], max_norm)
        stepped = self.precision.step(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.refresh_fp8_scales(self.model)
        return norm, stepped

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        dcp_state.save(directory, self.model, self.optimizer, extra)
        dcp_state.save_scaler(directory, self.precision.state_dict(), write=dist.get_rank() == 0)

    def load(self, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        extra = dcp_state.load(directory, self.model, self.optimizer, extra)  # in place, into this rank's shards
        self.precision.load_state_dict(dcp_state.load_scaler(directory))
        self.precision.refresh_fp8_scales(self.model)
        return extra

    def export_state(self) -> dict[str, torch.Tensor]:
        """This rank's shards (DTensors) under the plain module's names, as DCP names them:
        `full_tensors` gathers them one at a time, so no rank ever holds the whole model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients in this backward only when `enabled` (the last accumulation micro-batch);
    for any FSDP2 module, `fully_shard` or `replicate`."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of `full` that this rank's shard of the DTensor `param` holds (any placements)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def keep_local_slices(pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Copy each whole tensor's local slice into the sharded parameter (plain ones whole).
    Parameters still on the meta device belong to no part this rank holds (another pipeline
    stage's units): their whole tensors were drawn only to keep the random stream, and are dropped."""
    for param, full in pairs:
        if param.is_meta:
            continue
        if hasattr(param, "to_local"):
            param.to_local().copy_(local_slice(param, full.data))
        else:
            param.data.copy_(full.data)
