"""A task ties a model family to its data: how to build the model from a shard manifest, how to
turn a batch into a loss, and how much work (tokens, images) a batch is.

The model spec (a JSON-able dict) is what export writes beside the weights, so any later stage
rebuilds exactly the trained architecture without the training config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import TaskConfig


class Task(ABC):
    kind: str
    item_name: str  # what throughput counts: "tokens" or "images"
    label_smoothing: float = 0.0  # training-time only; set by the loop for classification-style losses

    @abstractmethod
    def model_spec(self, cfg: TaskConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to rebuild the model: its config plus what the data fixes (vocab, shapes)."""

    @abstractmethod
    def build(self, spec: dict[str, Any]) -> nn.Module: ...

    @abstractmethod
    def batch_to_tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor: ...

    def pipeline_io(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(the model's positional inputs, the loss target): how a pipeline schedule feeds the
        first stage and scores the last. Tasks whose loss draws noise inside it do not pipeline."""
        raise NotImplementedError(f"task '{self.kind}' cannot run under pipeline parallelism")

    def output_loss(self, output: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """The loss from the model's output (the pipeline's last stage computes it)."""
        raise NotImplementedError(f"task '{self.kind}' cannot run under pipeline parallelism")

    @abstractmethod
    def items(self, batch: dict[str, torch.Tensor]) -> int:
        """Units of work in the batch, for throughput."""

    def flops_per_item(self, model: nn.Module, spec: dict[str, Any]) -> float | None:
        return None
