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


def apex_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("apex") is not None


def check_kernels(cfg) -> None:
    """On the driver, before any Ray resource is taken (beside `pipeline.distributed.preflight`):
    a task asking for Apex kernels (`optim.impl` or `model.norm_impl` apex) where Apex is not
    installed stops with one line. `cfg` is the PipelineConfig."""
    for task_name, task in cfg.tasks.items():
        wants_apex = task.optim.impl == "apex" or getattr(task.model, "norm_impl", "torch") == "apex"
        if wants_apex and not apex_available():
            key = "optim.impl" if task.optim.impl == "apex" else "model.norm_impl"
            raise ValueError(f"tasks.{task_name}.{key}: 'apex' was asked for, but NVIDIA Apex is not "
                             "installed here; install it, or use auto/torch")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer, with the kernel implementation `cfg.impl` asks for.

    auto: torch's fused Adam(W) kernel when every parameter is on CUDA, else torch's default (its
    per-parameter loop on CPU, as `impl: torch`; the log names which ran)
    (apex is never picked silently: its FusedAdam is about as fast as torch's fused kernel).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 partition is 1-d: its logical shape is `ds_shape`
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.device.type == "cuda" for p in decay + no_decay)
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise ValueError("optim.impl: 'apex' was asked for, but apex does not import here "
                             f"({e}); install NVIDIA Apex, or use impl=auto") from e
        return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         adam_w_mode=cfg.name == "adamw")
    fused = True if cfg.impl == "fused" or (cfg.impl == "auto" and on_cuda) else None
    foreach = False if cfg.impl == "torch" else None  # torch = the plain per-parameter loop
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused,
                                 foreach=foreach)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused,
                                foreach=foreach)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=foreach)
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.beta2, eps=cfg.eps, momentum=cfg.momentum,
                               foreach=foreach)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation actually runs, for the log and MLflow (e.g. 'torch AdamW (fused)')."""
    cls = type(optimizer)
    base = next((c for c in cls.__mro__ if c.__module__.startswith(("torch.optim", "apex"))), cls)
    if base.__module__.startswith("apex"):
        return f"apex {base.__name__}"
    d = optimizer.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
    if not d.get("fused") and d.get("foreach") is None:  # torch picks at the first step: as it will pick
        kind = f"{'foreach' if _torch_default_foreach(optimizer) else 'for-loop'} (default)"
    return f"torch {base.__name__} ({kind})"


def _torch_default_foreach(optimizer: torch.optim.Optimizer) -> bool:
    """What torch's `foreach=None` resolves to for these parameters: foreach on CUDA, the
    per-parameter loop on CPU (the log said foreach on CPU, where the loop ran)."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]


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
    best_step: int = 0  # the step of `best` (0: no validation yet)

    def observe(self, loss: float, cfg: OptimConfig, early_stop_patience: int, step: int = 0) -> bool:
        """Record the validation loss after `step` steps; returns True when training should stop
        early. A tie is not an improvement: the earlier weights stay the best."""
        if loss < self.best:
            self.best, self.evals_since_best, self.bad_for_plateau, self.best_step = loss, 0, 0, step
            return False
        self.evals_since_best += 1
        self.bad_for_plateau += 1
        if cfg.schedule == "plateau" and self.bad_for_plateau >= cfg.plateau_patience:
            self.plateau_scale *= cfg.plateau_factor
            self.bad_for_plateau = 0
        return bool(early_stop_patience) and self.evals_since_best >= early_stop_patience

    def state_dict(self) -> dict[str, float]:
        return asdict(self)
