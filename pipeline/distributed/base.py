"""The one interface every parallelism backend implements.

The training loop talks only to a `Strategy`: it never asks which backend is running. A
strategy wraps any `nn.Module` (it knows no model class) and owns everything that differs
between backends: how gradients are synchronised, how the optimizer steps, and what a
checkpoint holds.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeline.distributed.precision import Precision

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy(ABC):
    """Wrap a model and optimizer; run backward and step; save, load and consolidate state."""

    name: str = "base"

    def __init__(self, precision: Precision, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.model: nn.Module | None = None  # what forward() is called on
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Shard and wrap the model, materialise it, then build the optimizer over the result.

        The model may arrive on the meta device (the loop builds it there): sharding strategies
        shard first and materialise only their shard, so a large model is never whole on a rank.
        """

    def materialize(self, model: nn.Module) -> nn.Module:
        """Allocate a meta-device model (or the local shards of one) on this rank's device and
        initialise it. The caller seeds the RNG identically on every rank."""
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self.device)
            model.init_weights()
        return model.to(self.device)

    @property
    @abstractmethod
    def unwrapped(self) -> nn.Module:
        """The plain module, for evaluation and export."""

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager[None]:
        """Skip gradient synchronisation on all but the last micro-batch of an accumulation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scale(loss).backward()

    @abstractmethod
    def clip_and_step(self, max_norm: float) -> tuple[float, bool]:
        """Unscale, clip (0 = off), step if gradients are finite, zero them. Returns (norm, stepped)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model and optimizer state (and scaler)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 model weights, as a plain module would have them (for export)."""

    def parameters(self) -> Iterator[nn.Parameter]:
        assert self.model is not None
        return self.model.parameters()
