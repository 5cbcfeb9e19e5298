"""Where the loop runs: a Ray Train worker, or a plain process (benchmarks, tests, debugging).

The loop only reports metrics and checkpoints and asks for the latest checkpoint; these two
classes are the only code that knows whether Ray is underneath.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class LocalSession:
    """One process; checkpoints are kept as step-numbered folders under `root` (if given)."""

    def __init__(self, root: Path | None = None, device: torch.device | None = None) -> None:
        self.rank, self.world = 0, 1
        self.device = device or torch.device("cpu")
        self.root = root
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None and self.root is not None:
            dest = self.root / f"checkpoint_{metrics['step']:08d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = sorted(self.root.glob("checkpoint_*")) if self.root and self.root.exists() else []
        yield found[-1] if found else None


class RaySession:
    """Inside `TorchTrainer`: ranks from the train context, checkpoints through `ray.train.report`."""

    def __init__(self) -> None:
        import logging

        import ray.train

        logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is ours to print
        try:  # Ray 2.60 names this logger by file path, so LoggingConfig's level filter misses it
            from ray.train.v2._internal.execution import context as _ctx

            _ctx.logger.setLevel(logging.WARNING)
        except (ImportError, AttributeError):
            pass
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", ctx.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)
