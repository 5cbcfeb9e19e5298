"""Validation loss inside the training loop (for reduce-on-plateau and early stopping).

Deterministic: the first `batches` global batches of the val split in order, each rank its
slice, and fixed noise for losses that draw it, so a resumed run sees the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.distributed.precision import Precision
from pipeline.tasks import Task


@torch.no_grad()
def validation_loss(task: Task, model: torch.nn.Module, val: dict[str, np.ndarray], global_batch: int,
                    batches: int, rank: int, world: int, device: torch.device, precision: Precision,
                    seed: int) -> float:
    """This rank's mean loss; the caller averages over ranks."""
    n = len(next(iter(val.values())))
    local = global_batch // world
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    was_training = model.training
    model.eval()
    losses = []
    for b in range(batches):
        idx = np.arange(b * global_batch + rank * local, b * global_batch + (rank + 1) * local) % n
        batch = task.batch_to_tensors({k: v[idx] for k, v in val.items()}, device)
        with precision.autocast():
            losses.append(task.loss(model, batch, gen).item())
    model.train(was_training)
    return float(np.mean(losses))
