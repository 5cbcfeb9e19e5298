"""Parallelism backends behind one `Strategy` interface, chosen by `strategy.name`."""

from __future__ import annotations

import importlib

import torch

from pipeline.distributed.base import StepSettings, Strategy
from pipeline.distributed.precision import Precision

# name -> "module:Class", imported on use: DeepSpeed and Horovod are heavy and optional at import time.
STRATEGIES: dict[str, str] = {
    "ddp": "pipeline.distributed.ddp:DDPStrategy",
    "fsdp": "pipeline.distributed.fsdp:FSDPStrategy",
    "deepspeed": "pipeline.distributed.deepspeed:DeepSpeedStrategy",
    "horovod": "pipeline.distributed.horovod:HorovodStrategy",
}


def build_strategy(cfg, precision: Precision, device: torch.device, settings: StepSettings) -> Strategy:
    """`cfg` is the strategy's own config model (DDPConfig, FSDPConfig, DeepSpeedConfig, HorovodConfig)."""
    if cfg.name not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy '{cfg.name}' (known: {', '.join(STRATEGIES)})")
    module, cls = STRATEGIES[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, precision, device, settings)


def process_group_backend(cfg, use_gpu: bool) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if use_gpu else "gloo"


__all__ = ["STRATEGIES", "StepSettings", "Strategy", "build_strategy", "process_group_backend"]
