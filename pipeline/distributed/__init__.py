"""Parallelism backends behind one `Strategy` interface, chosen by `strategy.name`."""

from __future__ import annotations

import torch

from pipeline.config.schema import StrategyConfig
from pipeline.distributed.base import Strategy
from pipeline.distributed.ddp import DDPStrategy
from pipeline.distributed.precision import Precision

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy}


def build_strategy(cfg: StrategyConfig, precision: Precision, device: torch.device) -> Strategy:
    if cfg.name not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy '{cfg.name}' (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[cfg.name](precision, device)


def process_group_backend(cfg: StrategyConfig, use_gpu: bool) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if use_gpu else "gloo"


__all__ = ["STRATEGIES", "Strategy", "build_strategy", "process_group_backend"]
