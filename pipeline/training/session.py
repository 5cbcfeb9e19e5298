"""Where the loop runs: a Ray Train worker, or a plain process (benchmarks, tests, debugging).

The loop only reports metrics and checkpoints and asks for the latest checkpoint; these two
classes are the only code that knows whether Ray is underneath.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.training.checkpoint import fallback_line, newest_intact, nothing_intact, read_meta, verify_checkpoint


class StepSink(Protocol):
    """Where each history entry goes as training runs (the runtime passes MLflow's live logger
    to rank 0's session; pipeline/tracking/live.py)."""

    def log(self, entry: dict[str, Any]) -> None: ...
    def tag(self, tags: dict[str, str]) -> None: ...
    def close(self) -> None: ...


class _LiveSteps:
    """What both sessions do with each history entry: hand it to the live sink, if any."""

    _live: StepSink | None = None

    def log_step(self, entry: dict[str, Any]) -> None:
        """One history entry, to the MLflow run while training runs (where a live sink was given)."""
        if self._live is not None:
            self._live.log(entry)

    def tag_run(self, tags: dict[str, str]) -> None:
        """Tags of the MLflow run (what the workers decided: backend, kernels), set as training
        starts where a live sink was given; the driver sets them again from the last checkpoint."""
        if self._live is not None:
            self._live.tag(tags)

    def close(self) -> None:
        """Send what the live sink still holds (bounded wait) and stop it."""
        if self._live is not None:
            self._live.close()


# a step's folder, or its copy moved aside (.old); not a staging (.tmp) or set-aside (.damaged) one
_STEP_DIR = re.compile(r"checkpoint_\d+(\.old)?$")
SET_ASIDE = ".damaged"  # a checkpoint folder renamed so, kept to look into, is never resumed from


def step_of(name: str) -> int:
    """The step a checkpoint folder's name holds (`checkpoint_00000042`, `.old` or not): folders
    are ordered by it, not by name, which puts step 100000000 before 99999999."""
    return int(name.removesuffix(".old").split("_")[1])


class LocalSession(_LiveSteps):
    """Checkpoints as step-numbered folders under `root` (if given), outside Ray Train.

    Used in one process (tests, benchmarks, debugging), by several processes of one
    torch.distributed group, and under Horovod. Each rank copies its part of a checkpoint into
    `checkpoint_<step>.tmp`; after a barrier rank 0 renames it into place, so a crash mid-write
    never leaves a folder that looks complete (a failed copy removes its staging folder, and
    staging folders a crash left behind go at the next start). Only the newest `keep_last_k` are
    kept. Resuming verifies the newest checkpoint against its checksums and passes over damaged
    ones to the newest intact one, saying so in one line.
    """

    def __init__(self, root: Path | None = None, device: torch.device | None = None, *,
                 rank: int | None = None, world: int | None = None,
                 barrier: Callable[[], None] | None = None, keep_last_k: int = 0,
                 live: StepSink | None = None) -> None:
        import torch.distributed as dist

        spread = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if spread else 0)
        self.world = world if world is not None else (dist.get_world_size() if spread else 1)
        self._barrier = barrier or (dist.barrier if spread else (lambda: None))
        self.device = device or torch.device("cpu")
        self.root = root
        self.keep_last_k = keep_last_k
        self.reports: list[dict[str, Any]] = []
        self._live = live

    @property
    def storage(self) -> Path | None:
        """Where checkpoints go (named in a full-disk error)."""
        return self.root

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is None or self.root is None:
            return
        dest = self.root / f"checkpoint_{metrics['step']:08d}"
        staging = dest.with_name(dest.name + ".tmp")
        try:
            shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
        except BaseException:  # a full disk, say: leave no half-written folder behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._barrier()
        if self.rank == 0:
            finish_interrupted_replace(self.root)
            # A checkpoint of this step already there (a finished run run again reports its last
            # one again) is moved aside, not deleted, until the new copy is in place: a crash in
            # between leaves a complete copy under one name or the other (`_complete` reads both).
            aside = dest.with_name(dest.name + ".old")
            if dest.exists():
                shutil.rmtree(aside, ignore_errors=True)
                dest.rename(aside)
            staging.rename(dest)
            shutil.rmtree(aside, ignore_errors=True)
            # checkpoints of later steps are those a resume passed over as damaged (an intact one would
            # have been resumed from): set aside, so they neither count among the newest k, which
            # deleted this run's only intact checkpoints, nor stop the next resume
            for later in self._complete():
                if step_of(later.name) > metrics["step"]:
                    target = later.with_name(later.name.removesuffix(".old") + SET_ASIDE)
                    shutil.rmtree(target, ignore_errors=True)
                    later.rename(target)
            if self.keep_last_k:
                for old in self._complete()[:-self.keep_last_k]:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first. A copy `report` moved aside (`.old`) when it
        stopped before the new copy got the name counts as that step's checkpoint: read as it is
        (every rank sees the same folders; rank 0 puts it back at its next report)."""
        if not (self.root and self.root.exists()):
            return []
        found = {}
        for p in self.root.glob("checkpoint_*"):
            m = _STEP_DIR.match(p.name)
            if m and (p / "meta.json").is_file() and (not m.group(1) or not p.with_name(p.name[:-4]).exists()):
                found[p.name.removesuffix(".old")] = p
        return [found[name] for name in sorted(found, key=step_of)]  # by number: 100000000 after 99999999

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        if self.rank == 0 and self.root is not None and self.root.exists():
            for stale in self.root.glob("checkpoint_*.tmp"):  # a copy a crash interrupted
                shutil.rmtree(stale, ignore_errors=True)
        found = self._complete()
        if not found:
            yield None
            return
        intact, damaged = newest_intact(found[::-1])
        if intact is None:
            raise nothing_intact(damaged, self.root)
        if damaged and self.rank == 0:
            print(fallback_line(damaged, read_meta(intact)["step"], intact), flush=True)
        yield intact


def finish_interrupted_replace(root: Path) -> None:
    """Undo what a stop in the middle of `LocalSession.report`'s replacement left: a checkpoint
    moved aside (`.old`) whose new copy never got its name is put back; one that did is dropped."""
    for aside in root.glob("checkpoint_*.old"):
        dest = aside.with_name(aside.name[:-len(".old")])
        if dest.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(dest)


class RaySession(_LiveSteps):
    """Inside `TorchTrainer`: ranks from the train context, checkpoints through `ray.train.report`.

    `verified`: the name of the checkpoint the driver has already checked against its checksums
    (`pipeline.runtime.recovery.recover`); any other one Ray hands over (remote storage) is checked
    here, and a damaged one stops the run with `DamagedFile`."""

    def __init__(self, verified: str | None = None, live: StepSink | None = None) -> None:
        import logging

        import ray.train

        logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is ours to print
        try:  # Ray 2.60 names this logger by file path, so LoggingConfig's level filter misses it
            from ray.train.v2._internal.execution import context as _ctx

            _ctx.logger.setLevel(logging.WARNING)
        except (ImportError, AttributeError):
            pass
        ctx = ray.train.get_context()
        self.verified = verified
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        try:
            self.storage: str | None = ctx.get_storage().experiment_fs_path
        except Exception:  # a DeveloperAPI: only used to name the place in a full-disk error
            self.storage = None
        if torch.cuda.is_available():
            self.device = torch.device("cuda", ctx.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self._live = live

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Checkpoints go to Ray Train; metrics alone do not. Each `ray.train.report` is a barrier
        across ranks and then waits, on a queue of one, until the controller takes the previous
        report, which it does once per poll (every 2 s on a cluster by default): a metrics-only
        report at every logged step held a 4-worker run to one step per 2 s (measured on the
        4-node test cluster, 0.3 s of compute). Nothing reads those reports; the step history
        reaches MLflow live (`_LiveSteps`) and in every checkpoint."""
        import ray.train

        if checkpoint_dir is None:
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            if Path(d).name != self.verified:
                verify_checkpoint(Path(d))
            yield Path(d)

