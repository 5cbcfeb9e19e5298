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
    name: str  # the task's one name: its registry key, its config chain (`tasks.<name>`), the spec's `task`
    data_kind: str  # the `data.kind` it trains on ("text", "images")
    item_name: str  # the unit throughput counts ("tokens", "images"), as in `tokens_per_s`
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

    def fix_draws(self, batch: dict[str, torch.Tensor], rows: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        """The batch with the random draws its loss makes fixed per row (`rows`: the rows'
        positions in the split), for validation: the loss then depends on the rows alone, not on
        how ranks and micro-batches cut them (an elastic resize would otherwise move the
        validation loss the best weights and early stopping compare). A loss that draws nothing
        keeps the batch as it is."""
        return batch

    def loss_settings(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The settings of the model `spec` that define what its loss measures, beyond the
        evaluated rows: two models whose settings differ have validation losses in different
        units (the registry does not rank one against the other). None for most tasks."""
        return {}

    def pipeline_io(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(the model's positional inputs, the loss target): how a pipeline schedule feeds the
        first stage and scores the last. Tasks whose loss draws noise inside it do not pipeline."""
        raise NotImplementedError(f"task '{self.name}' cannot run under pipeline parallelism")

    def output_loss(self, output: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """The loss from the model's output (the pipeline's last stage computes it)."""
        raise NotImplementedError(f"task '{self.name}' cannot run under pipeline parallelism")

    def compile_loss(self, **options: Any) -> None:
        """torch.compile this task's loss (`trainer.compile_loss`; `options` go to torch.compile,
        the memory planner passes its own backend); a task whose loss gains nothing from it
        (small outputs, or noise drawn inside it) keeps it eager."""
        return None

    @abstractmethod
    def items(self, batch: dict[str, torch.Tensor]) -> int:
        """Units of work in the batch, for throughput."""

    def flops_per_item(self, model: nn.Module, spec: dict[str, Any]) -> float | None:
        return None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor of a batch on the training device without making the host wait: to a GPU
    through pinned memory (a copy from pageable memory may wait for the device's queue),
    asynchronously."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
