"""Next-token prediction on packed token rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import GPTConfig, TaskConfig
from pipeline.models.gpt import GPT
from pipeline.tasks.base import Task


class LanguageModeling(Task):
    kind = "text"
    item_name = "tokens"

    def model_spec(self, cfg: TaskConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"task": "lm", "model": cfg.model.model_dump(mode="json"),
                "vocab_size": manifest["vocab_size"], "max_seq_len": manifest["seq_len"]}

    def build(self, spec: dict[str, Any]) -> GPT:
        return GPT(GPTConfig.model_validate(spec["model"]), spec["vocab_size"], spec["max_seq_len"])

    def batch_to_tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(batch["tokens"].astype(np.int64)).to(device, non_blocking=True)
        return {"x": tokens[:, :-1], "y": tokens[:, 1:]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor:
        return self.output_loss(model(batch["x"]), batch["y"], self.label_smoothing if model.training else 0.0)

    def pipeline_io(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (batch["x"],), batch["y"]

    def output_loss(self, output: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten(), label_smoothing=smoothing)

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["y"].numel()

    def flops_per_item(self, model: nn.Module, spec: dict[str, Any]) -> float:
        return model.flops_per_token(spec["max_seq_len"])
