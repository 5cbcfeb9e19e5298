"""Checks for an elastic worker range (`cluster.min_workers` .. `cluster.num_workers`), run when
the config is validated: a range that some strategy, layout or batch cannot follow stops with one
line naming the keys, before Ray places a worker.

What elastic means here: a run resumes from its last checkpoint at whatever worker count Ray
Train starts it with, consuming exactly the samples an uninterrupted run would (the reader's
position is global, pipeline/data/reader.py) with the same global batch (the micro-batch per
worker adjusts). That needs a checkpoint every layout can load at another world size: DDP's and
FSDP2's can (replicated state; DCP reshards), DeepSpeed's cannot.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig

# Strategies whose checkpoints cannot be loaded by another number of ranks, and why.
CANNOT_RESHARD = {
    "deepspeed": "DeepSpeed cannot resume a checkpoint at another data-parallel size (its ZeRO partitions "
                 "are per rank; DeepSpeed issue 7628)",
}
# Strategies that cannot change their number of workers within one run, and why.
FIXED_WORLD = {
    **CANNOT_RESHARD,
    "horovod": "horovod.ray's RayExecutor runs a fixed number of workers (its elastic executor is not wired "
               "here); a Horovod run resumes at another cluster.num_workers, but not within one run",
}


def strategy_reshards(name: str) -> bool:
    """Whether a checkpoint of this strategy loads at another number of ranks."""
    return name not in CANNOT_RESHARD


def worker_counts(cfg: PipelineConfig) -> range:
    """Every worker count a run of this config may train on."""
    cl = cfg.cluster
    return range(cl.min_workers or cl.num_workers, cl.num_workers + 1)


def check_elastic(cfg: PipelineConfig) -> None:
    cl = cfg.cluster
    if cl.min_workers is None:
        return
    if cl.min_workers > cl.num_workers:
        raise ValueError(f"cluster.min_workers ({cl.min_workers}) must not exceed cluster.num_workers "
                         f"({cl.num_workers}), the most workers a run uses")
    if cl.min_workers == cl.num_workers:
        return
    if cfg.strategy.name in FIXED_WORLD:
        raise ValueError(f"cluster.min_workers={cl.min_workers} (elastic) cannot combine with "
                         f"strategy.name={cfg.strategy.name}: {FIXED_WORLD[cfg.strategy.name]}; use strategy ddp "
                         "or fsdp, or unset cluster.min_workers")
    if cfg.parallel.tp * cfg.parallel.pp > 1:
        raise ValueError(f"cluster.min_workers={cl.min_workers} (elastic) cannot combine with parallel.tp/"
                         "parallel.pp > 1: the device mesh is sized for a fixed number of workers; unset one")


def check_task_elastic(cfg: PipelineConfig, name: str) -> None:
    """One task's batch against the worker range (the train stage asks before taking any
    resource; another chain of the same config may train at a fixed count)."""
    if cfg.parallel.tp * cfg.parallel.pp > 1:
        # the batch splits over the data-parallel replicas (workers / (tp x pp)), not the workers:
        # the layout's own check asks that (check_task_parallel), and such a run is never elastic
        return
    counts = worker_counts(cfg)
    tr = cfg.task(name).trainer
    bad = [w for w in counts if tr.global_batch_size % (w * tr.grad_accum_steps)]
    if bad:
        step = math.lcm(*counts) * tr.grad_accum_steps
        fit = -(-tr.global_batch_size // step) * step
        where = (f"at every worker count from cluster.min_workers to cluster.num_workers "
                 f"({counts.start}..{counts.stop - 1})" if len(counts) > 1
                 else f"over cluster.num_workers ({counts.start})")
        raise ValueError(
            f"tasks.{name}.trainer.global_batch_size ({tr.global_batch_size}) must split evenly {where} "
            f"x grad_accum_steps ({tr.grad_accum_steps}), and does not at {', '.join(map(str, bad))} "
            f"worker(s); for example global_batch_size={fit}")
