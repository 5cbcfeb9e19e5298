"""Class-conditional denoising on images in [-1, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import DiffusionProcessConfig, DiTConfig, TaskConfig, UNetConfig
from pipeline.config.schema.models import without_sampler
from pipeline.models.diffusion import GaussianDiffusion
from pipeline.models.dit import DiT
from pipeline.models.unet import UNet
from pipeline.tasks.base import Task, to_device


class Denoising(Task):
    """The loss needs the noise process and the class count. Both come from the model spec the
    task builds from (`build`), not from the model it is handed: that model is whatever the
    strategy wraps it in (DDP, a DeepSpeed engine), and the task never looks inside it."""

    name = "diffusion"
    data_kind = "images"
    item_name = "images"

    def __init__(self) -> None:
        self._process_cfg: DiffusionProcessConfig | None = None
        self._num_classes: int | None = None
        self._process: GaussianDiffusion | None = None

    def model_spec(self, cfg: TaskConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"task": self.name, "model": cfg.model.model_dump(mode="json"),
                "image_shape": manifest["image_shape"], "num_classes": manifest["num_classes"]}

    def build(self, spec: dict[str, Any]) -> nn.Module:
        shape, classes = tuple(spec["image_shape"]), spec["num_classes"]
        model_cls, model_cfg = (UNet, UNetConfig) if spec["model"]["kind"] == "unet" else (DiT, DiTConfig)
        cfg = model_cfg.model_validate(without_sampler(spec["model"])[0])  # (an older spec held the sampler)
        self._process_cfg, self._num_classes, self._process = cfg.diffusion, classes, None
        return model_cls(cfg, shape, classes)

    def loss_settings(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The target (eps or v) and the noise levels the denoise loss averages over (timesteps and
        schedule): an eps model's loss and a v model's are not in the same units."""
        process = spec["model"].get("diffusion", {})
        defaults = DiffusionProcessConfig().model_dump(mode="json")
        return {k: process.get(k, defaults[k]) for k in ("prediction", "schedule", "timesteps")}

    def batch_to_tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        out = {"x": to_device(torch.from_numpy(batch["image"]).float(), device),
               "y": to_device(torch.from_numpy(batch["label"]).long(), device)}
        if "weight" in batch:  # data.balance=weights: per-example class weights
            out["w"] = to_device(torch.from_numpy(batch["weight"]).float(), device)
        return out

    def process(self, device: torch.device) -> GaussianDiffusion:
        """The noise process of the built model, on `device` (a plain object, not a submodule)."""
        if self._process_cfg is None:
            raise RuntimeError("Denoising.build(spec) must run before the loss: the noise process and the "
                               "class count come from the model spec")
        if self._process is None or self._process.alpha_bar.device != device:
            self._process = GaussianDiffusion(self._process_cfg).to(device)
        return self._process

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor:
        return self.process(batch["x"].device).loss(model, batch["x"], batch["y"], self._num_classes, generator,
                                                    batch.get("w"), batch.get("t"), batch.get("noise"))

    def fix_draws(self, batch: dict[str, torch.Tensor], rows: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        """Each row's timestep and noise from a CPU generator of its own, seeded with `seed` plus
        its position (`row_generators`), moved to the batch's device."""
        from pipeline.models.diffusion import row_draws

        x = batch["x"]
        t, noise = row_draws(rows, seed, self.process(x.device).cfg.timesteps, tuple(x.shape[1:]))
        return {**batch, "t": to_device(t, x.device), "noise": to_device(noise, x.device)}

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["x"].shape[0]

    def flops_per_item(self, model: nn.Module, spec: dict[str, Any]) -> float:
        """Training FLOPs per image: the denoiser's forward on one image, counted by torch's
        FLOP counter (matmuls, convolutions, attention) on the meta device where the loop built
        it (no storage, no compute), times 3 for forward and backward (the 6N of a Transformer)."""
        from torch.utils.flop_counter import FlopCounterMode

        device = next(model.parameters()).device
        x = torch.zeros(1, *spec["image_shape"], device=device)
        label = torch.zeros(1, dtype=torch.long, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, label, label)
        return 3.0 * counter.get_total_flops()
