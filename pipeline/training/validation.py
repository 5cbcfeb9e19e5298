"""Validation loss inside the training loop (for reduce-on-plateau and early stopping).

Deterministic: the first `batches` global batches of the val split in order, each rank its
slice, and noise fixed per row for losses that draw it (`Task.fix_draws`), so a resumed run sees
the same numbers, at any number of ranks and any accumulation.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.distributed.base import Strategy
from pipeline.tasks import Task


@torch.no_grad()
def validation_loss(task: Task, strategy: Strategy, val: dict[str, np.ndarray], global_batch: int,
                    batches: int, device: torch.device, seed: int) -> float:
    """This rank's mean loss; the caller averages over ranks. Each data-parallel replica reads
    its slice (every tensor- or pipeline-parallel rank of a replica the same one). The batches'
    losses stay on the device until all have run, then come back in one read."""
    n = len(next(iter(val.values())))
    rank, local = strategy.dp_rank, global_batch // strategy.dp_size
    gen = torch.Generator(device=device).manual_seed(seed)  # (for a loss that draws without fix_draws)
    model = strategy.model
    was_training = model.training
    model.eval()
    losses = []
    for b in range(batches):
        rows = np.arange(b * global_batch + rank * local, b * global_batch + (rank + 1) * local)
        batch = task.batch_to_tensors({k: v[rows % n] for k, v in val.items()}, device)
        batch = task.fix_draws(batch, rows, seed)
        losses.append(strategy.eval_loss(batch, task, gen).to(torch.float64).reshape(()))
    model.train(was_training)
    return float(np.mean(torch.stack(losses).tolist()))
