"""Optimizers and learning-rate schedules chosen by config.

Weight decay never applies to biases and norm weights (1-d parameters). Schedules are pure
functions of the step, so there is no scheduler state to checkpoint, except reduce-on-plateau,
whose scale lives in `ValidationTracker` and is saved with the loop state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.config.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type == "cuda" for p in decay + no_decay) or None  # torch's fused kernels on GPU
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.beta2, eps=cfg.eps, momentum=cfg.momentum)


def lr_at(step: int, cfg: OptimConfig, max_steps: int, plateau_scale: float = 1.0) -> float:
    """Learning rate for `step` (0-based)."""
    if cfg.schedule == "onecycle":
        start = cfg.lr / 25
        if step < cfg.warmup_steps:
            return start + (cfg.lr - start) * step / cfg.warmup_steps
    elif step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    after = step - cfg.warmup_steps
    if cfg.schedule in ("cosine", "onecycle"):
        progress = min(1.0, after / max(1, max_steps - cfg.warmup_steps))
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (after // cfg.step_size)
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.gamma**after
    if cfg.schedule == "plateau":
        return cfg.lr * plateau_scale
    return cfg.lr


@dataclass
class ValidationTracker:
    """Best validation loss so far, and what it implies: a reduced LR (plateau) or a stop."""

    best: float = math.inf
    evals_since_best: int = 0
    plateau_scale: float = 1.0
    bad_for_plateau: int = 0

    def observe(self, loss: float, cfg: OptimConfig, early_stop_patience: int) -> bool:
        """Record a validation loss; returns True when training should stop early."""
        if loss < self.best:
            self.best, self.evals_since_best, self.bad_for_plateau = loss, 0, 0
            return False
        self.evals_since_best += 1
        self.bad_for_plateau += 1
        if cfg.schedule == "plateau" and self.bad_for_plateau >= cfg.plateau_patience:
            self.plateau_scale *= cfg.plateau_factor
            self.bad_for_plateau = 0
        return bool(early_stop_patience) and self.evals_since_best >= early_stop_patience

    def state_dict(self) -> dict[str, float]:
        return asdict(self)
