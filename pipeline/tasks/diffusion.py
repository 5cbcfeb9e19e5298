"""Class-conditional denoising on images in [-1, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import DiTConfig, TaskConfig, UNetConfig
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.models.dit import DiT
from pipeline.models.unet import UNet
from pipeline.tasks.base import Task


class Denoising(Task):
    kind = "images"
    item_name = "images"

    def model_spec(self, cfg: TaskConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"task": "diffusion", "model": cfg.model.model_dump(mode="json"),
                "image_shape": manifest["image_shape"], "num_classes": manifest["num_classes"]}

    def build(self, spec: dict[str, Any]) -> nn.Module:
        shape, classes = tuple(spec["image_shape"]), spec["num_classes"]
        if spec["model"]["kind"] == "unet":
            return UNet(UNetConfig.model_validate(spec["model"]), shape, classes)
        return DiT(DiTConfig.model_validate(spec["model"]), shape, classes)

    def batch_to_tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        out = {"x": torch.from_numpy(batch["image"]).float().to(device),
               "y": torch.from_numpy(batch["label"]).long().to(device)}
        if "weight" in batch:  # data.balance=weights: per-example class weights
            out["w"] = torch.from_numpy(batch["weight"]).float().to(device)
        return out

    def __init__(self) -> None:
        self._process: GaussianDiffusion | None = None

    def process(self, model: nn.Module) -> GaussianDiffusion:
        """The noise process of this model (cached; a plain object, not a submodule of the model)."""
        if self._process is None:
            raw = getattr(model, "module", model)
            device = next(raw.parameters()).device
            self._process = GaussianDiffusion(raw.cfg.diffusion).to(device)
        return self._process

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor:
        raw = getattr(model, "module", model)
        return self.process(model).loss(model, batch["x"], batch["y"], raw.num_classes, generator, batch.get("w"))

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["x"].shape[0]
