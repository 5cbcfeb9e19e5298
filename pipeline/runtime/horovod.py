"""Horovod on Ray: `horovod.ray.RayExecutor` starts one actor per worker and wires up Horovod's
gloo rendezvous between them (Ray removed its own `HorovodTrainer`).

Ray Train is not involved, so this module does what Ray Train does for the other strategies:
checkpoints go to `<storage>/<run name>/checkpoint_<step>` through `LocalSession` (all ranks
copy, rank 0 commits with a rename), and a failed attempt is retried up to
`cluster.max_failures` times, resuming from the newest complete checkpoint. The storage path
must be visible to every worker (one machine, or a shared file system on a cluster): the driver
writes a file into the run's folder and every rank looks for it before training, so a path that
is local to each host stops the run at once, naming the ranks and hosts that cannot see it. A
URL (s3://...) is refused when the config is validated (pipeline/config/storage.py).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.schema import ClusterConfig, PipelineConfig


@dataclass
class FitResult:
    """The part of `ray.train.Result` the train flow reads; also what a fit whose retries are all
    spent returns (Horovod's, and Ray Train's: its error then ends the stage in one line,
    `TrainingFailed`, not Ray's traceback)."""

    checkpoint: Any  # ray.train.Checkpoint of the newest complete checkpoint
    error: BaseException | None = None


def _barrier() -> None:
    import horovod.torch as hvd
    import torch

    hvd.allreduce(torch.zeros(1), name="pipeline.session_barrier")


def _worker(config: dict[str, Any]) -> int:
    import horovod.torch as hvd
    import torch

    from pipeline.config import validate
    from pipeline.tracking.live import LiveMetrics, node_metrics
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    hvd.init()
    _check_shared(Path(config["marker"]), hvd.rank(), config["task"])
    if config["use_gpu"]:
        device = torch.device("cuda", hvd.local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(config["threads"])))
    cfg = validate(config["cfg"])
    live = config.get("live")
    session = LocalSession(Path(config["root"]), device, rank=hvd.rank(), world=hvd.size(), barrier=_barrier,
                           keep_last_k=cfg.task(config["task"]).trainer.keep_last_k,
                           live=LiveMetrics(live["run_id"], live["tracking_uri"]) if live and hvd.rank() == 0 else None)
    try:
        with node_metrics(live, hvd.local_rank()):  # every training node's system metrics, as Ray Train's workers
            return train(cfg, config["task"], config["shards"], session).step
    finally:
        session.close()


def _check_shared(marker: Path, rank: int, task: str) -> None:
    """Every rank: whether it sees the file the driver wrote into the run's folder. All ranks
    learn the answer (an all-gather), so all of them stop together instead of some waiting in
    a collective for the others. Rank 0 also says which node each rank runs on, as Ray Train's
    workers do (`nodes_line`)."""
    import horovod.torch as hvd
    import ray

    from pipeline.runtime.trainer import nodes_line
    from pipeline.training.checkpoint import StorageNotShared

    views = hvd.allgather_object((rank, marker.is_file(), ray.util.get_node_ip_address()))
    if rank == 0:
        print(nodes_line(task, [ip for _, _, ip in sorted(views)]), flush=True)
    blind = sorted((r, ip) for r, seen, ip in views if not seen)
    if blind:
        who = ", ".join(f"rank {r} on {ip}" for r, ip in blind)
        raise StorageNotShared(
            f"cluster.storage_path: {marker.parent} is not shared by the workers' hosts ({who} cannot see "
            "the file the driver wrote there); strategy.name=horovod needs a folder every worker sees: a shared "
            "file system, or use ddp, fsdp or deepspeed, which also take an s3:// storage_path")


def run_horovod(fn: Callable[..., Any], args: list[Any], num_workers: int, cpus_per_worker: float,
                use_gpu: bool) -> list[Any]:
    """Run `fn(*args)` on `num_workers` Horovod ranks on the connected Ray; returns each rank's result."""
    from horovod.ray import RayExecutor

    settings = RayExecutor.create_settings(timeout_s=300)
    # (the reservation as configured, as Ray Train makes it: a fraction rounded up asked Ray for CPUs that the
    # embedded Ray, sized to num_workers x cpus_per_worker, does not have, until the placement group timed out)
    executor = RayExecutor(settings, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                           use_gpu=use_gpu, gpus_per_worker=1 if use_gpu else None)
    try:  # (a start that fails after creating its placement group or workers frees them too)
        executor.start()
        return executor.run(fn, args=args)
    finally:
        executor.shutdown()


def fit_horovod(cfg: PipelineConfig, task_name: str, shards: str, run_dir: Path,
                live: dict[str, str] | None = None) -> FitResult:
    """Train on Horovod ranks, retrying a failed attempt from the newest complete checkpoint."""
    cl = cfg.cluster
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / f".shared-{uuid.uuid4().hex}"  # each rank must see it (_check_shared)
    marker.write_text(f"written by the driver on {socket.gethostname()}\n")
    config = {"cfg": cfg.model_dump(mode="json"), "task": task_name, "shards": shards,
              "root": str(run_dir), "use_gpu": cl.use_gpu, "live": live, "marker": str(marker),
              "threads": os.environ.get("OMP_NUM_THREADS", int(cl.cpus_per_worker))}
    try:
        return _attempts(config, cl, task_name, run_dir)
    finally:
        marker.unlink(missing_ok=True)


def _attempts(config: dict[str, Any], cl: ClusterConfig, task_name: str, run_dir: Path) -> FitResult:
    """Up to 1 + cluster.max_failures runs of the Horovod group, then the newest complete checkpoint."""
    from ray.train import Checkpoint

    from pipeline.training.session import LocalSession

    for attempt in range(cl.max_failures + 1):
        try:
            run_horovod(_worker, [config], cl.num_workers, cl.cpus_per_worker, cl.use_gpu)
            break
        except Exception as e:
            from pipeline.runtime.failures import fatal_error

            if attempt == cl.max_failures or fatal_error(e) is not None:  # a damaged file, a full disk: no retry
                return FitResult(None, e)
            print(f"[{task_name}] horovod attempt {attempt + 1} failed ({type(e).__name__}: {e}); "
                  "restarting from the last checkpoint", flush=True)
    with LocalSession(run_dir).latest_checkpoint() as latest:
        if latest is None:
            return FitResult(None, RuntimeError(f"no complete checkpoint under {run_dir}"))
        return FitResult(Checkpoint.from_directory(str(latest)))
