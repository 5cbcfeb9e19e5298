"""Run the training loop on Ray Train workers with `TorchTrainer`.

The run is named by a digest of its config and data, under `cluster.storage_path`: rerunning
the same configuration after an interruption resumes from its latest checkpoint, while a
changed configuration starts a fresh run instead of resuming a stale one.

Damaged state: before every attempt, `recovery.recover` checks the run's storage folder (unregistered
checkpoint folders removed, a damaged one set aside). A failed attempt is retried here, up to
`cluster.max_failures` times (Ray Train itself is told not to retry: its `FailureConfig` cannot
tell errors apart); what retrying would only repeat (`failures.fatal_error`: a damaged file, a full
disk, a worker's config or input check, a non-finite stop) ends the run in one line.

Paths: the workers run in another folder than the stage (Ray's session folder), so every local
path they are handed is absolute: the shards and the storage folder, and the weights a run starts
from (`absolute_init_paths`), resolved against the folder the stage runs in.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.config.schema import ClusterConfig, PipelineConfig
from pipeline.config.storage import is_url
from pipeline.distributed import process_group_backend
from pipeline.runtime.connect import ClusterUnavailable
from pipeline.runtime.failures import _QuietKnownErrors, _summary, fatal_error
from pipeline.runtime.recovery import recover, remove_unfinished, run_dir_of, storage_root
from pipeline.training.checkpoint import CheckpointError, StorageFull


def nodes_line(task: str, ips: list[Any]) -> str:
    """`[task] N worker(s) on M node(s): <ip> (ranks ...); ...` from each rank's node IP, in rank
    order: on a cluster, the first thing to check when a run is slower than it should be, or a
    rendezvous reached the wrong address."""
    by_node: dict[str, list[int]] = {}
    for r, ip in enumerate(ips):
        by_node.setdefault(str(ip), []).append(r)
    nodes = "; ".join(f"{ip} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                      for ip, rs in by_node.items())
    return f"[{task}] {len(ips)} worker(s) on {len(by_node)} node(s): {nodes}"


def _announce_nodes(task: str, rank: int, world: int) -> None:
    """Rank 0 prints `nodes_line`."""
    import ray
    import torch.distributed as dist

    ip = ray.util.get_node_ip_address()
    ips: list[Any] = [ip]
    if world > 1 and dist.is_initialized():
        ips = [None] * world
        dist.all_gather_object(ips, ip)
    if rank == 0:
        print(nodes_line(task, ips), flush=True)


def _worker(config: dict[str, Any]) -> None:
    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import RaySession

    logging.getLogger("ray.train.v2._internal.util").addFilter(_QuietKnownErrors())
    import ray.train

    from pipeline.tracking.live import LiveMetrics, node_metrics

    live, ctx = config.get("live"), ray.train.get_context()
    sink = LiveMetrics(live["run_id"], live["tracking_uri"]) if live and ctx.get_world_rank() == 0 else None
    session = RaySession(config.get("verified"), live=sink)
    _announce_nodes(config["task"], ctx.get_world_rank(), ctx.get_world_size())
    try:
        with node_metrics(live, ctx.get_local_rank()):  # every training node's, not only the driver's
            train(validate(config["cfg"]), config["task"], config["shards"], session)
    finally:
        session.close()


def absolute_init_paths(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with every task's `model.init_from` and `trainer.init_from` made absolute, resolved
    against the folder the stage runs in (the project's root), as the shards and the storage folder
    are: a Ray worker runs in a folder of its own, where a relative path names nothing. URLs
    (s3://...) and absolute paths are left as they are; the same `cfg` when nothing changes."""

    def absolute(path: str | None) -> str | None:
        return path if not path or is_url(path) or Path(path).is_absolute() else str(Path(path).resolve())

    tasks = {}
    for name, tcfg in cfg.tasks.items():
        update = {}
        model_path = getattr(tcfg.model, "init_from", None)
        if absolute(model_path) != model_path:
            update["model"] = tcfg.model.model_copy(update={"init_from": absolute(model_path)})
        if absolute(tcfg.trainer.init_from) != tcfg.trainer.init_from:
            update["trainer"] = tcfg.trainer.model_copy(update={"init_from": absolute(tcfg.trainer.init_from)})
        tasks[name] = tcfg.model_copy(update=update) if update else tcfg
    if all(tasks[name] is cfg.tasks[name] for name in tasks):
        return cfg
    return cfg.model_copy(update={"tasks": tasks})


def worker_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as the workers get it (`validate` runs again there): plain JSON, local paths absolute."""
    return absolute_init_paths(cfg).model_dump(mode="json")


def fit(cfg: PipelineConfig, task_name: str, shards: str, run_name: str, live: dict[str, str] | None = None):
    """Train on Ray; returns the `ray.train.Result` (or its Horovod equivalent). Horovod brings
    its own launcher (RayExecutor). A failed attempt is retried from the last checkpoint up to
    `cluster.max_failures` times, then its error is raised; a damaged checkpoint file or a full
    disk raises `CheckpointError` (one line) at once, and a worker's config or input check
    (`recurring_error`) raises that worker's own exception at once (the stage prints its message).

    `shards` is where every worker reads the shards: an absolute local path (one node or a
    shared file system) or a URL such as s3://... (cached on each node). `live` (run_id,
    tracking_uri) makes rank 0 log the per-step history to that MLflow run while it trains."""
    cfg = absolute_init_paths(cfg)  # the workers run in another folder
    if cfg.strategy.name == "horovod":
        from pipeline.runtime.horovod import fit_horovod

        recover(cfg, task_name, run_name)
        result = fit_horovod(cfg, task_name, shards, Path(storage_root(cfg)) / run_name, live)
        if result.error is not None and (fatal := fatal_error(result.error)) is not None:
            raise _final(fatal, cfg, run_name) from None
        return result
    from ray.train import CheckpointConfig, ControllerError, LoggingConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from pipeline.config.elastic import worker_counts
    from pipeline.runtime.connect import embedded
    from pipeline.runtime.embedded_trainer import embedded_trainer_class, remove_leftover_placement_groups
    from pipeline.runtime.rendezvous import torch_config

    cl, counts = cfg.cluster, worker_counts(cfg)
    trainer_class = embedded_trainer_class() if embedded() else TorchTrainer
    no_cleaner = trainer_class is not TorchTrainer  # the lean trainer runs without Ray Train's placement-group cleaner
    for attempt in range(cl.max_failures + 1):
        found = recover(cfg, task_name, run_name)
        if no_cleaner:
            remove_leftover_placement_groups()
        trainer = trainer_class(
            train_loop_per_worker=_worker,
            train_loop_config={"cfg": worker_config(cfg), "task": task_name, "shards": shards,
                               "verified": found.verified if found else None, "live": live},
            # a range makes Ray Train start with the workers the cluster has room for (elastic)
            scaling_config=ScalingConfig(num_workers=(counts.start, counts.stop - 1) if len(counts) > 1
                                         else cl.num_workers, use_gpu=cl.use_gpu,
                                         resources_per_worker={"CPU": cl.cpus_per_worker},
                                         elastic_resize_monitor_interval_s=cl.resize_check_s),
            torch_config=torch_config(process_group_backend(cfg.strategy, cl.use_gpu), single_node=embedded()),
            run_config=RunConfig(
                name=run_name, storage_path=storage_root(cfg),
                failure_config=failure_config(cl),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.task(task_name).trainer.keep_last_k),
                logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines say enough
            ),
        )
        try:
            return trainer.fit()
        except WorkerGroupError as e:
            if (fatal := fatal_error(e)) is not None:
                raise _final(fatal, cfg, run_name) from None
            if attempt == cl.max_failures:  # spent: the train flow ends the stage in one line (TrainingFailed)
                from pipeline.runtime.horovod import FitResult

                return FitResult(None, e)
            print(f"[{task_name}] training attempt {attempt + 1} of {cl.max_failures + 1} failed ({_summary(e)}); "
                  "restarting from the last checkpoint", flush=True)
        except Exception as e:
            if isinstance(e, ControllerError) and _startup_failure(e):  # its retries are spent (`failure_config`)
                raise workers_did_not_start(e, cl.start_attempts, task_name) from None
            if (fatal := fatal_error(e)) is not None:
                raise _final(fatal, cfg, run_name) from None
            raise
    raise AssertionError("unreachable")


def _startup_failure(error: BaseException) -> bool:
    """Whether a controller error is the worker group failing to start (or finding no room in
    time), the errors Ray retries `cluster.start_attempts` times; any other (a full disk under the
    controller's checkpoint list, a callback's error) is raised at its first occurrence."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    return isinstance(getattr(error, "controller_failure", None),
                      WorkerGroupStartupFailedError | WorkerGroupStartupTimeoutError)


def failure_config(cl: ClusterConfig) -> Any:
    """Ray Train's retry policy for the pipeline's runs: a training attempt that fails is not
    retried inside `fit` (`max_failures=0`) but by `fit` here, where a damaged checkpoint or a
    config error can be told from a worker that died; starting the worker group is tried
    `cluster.start_attempts` times (Ray's default, -1, retried a node that cannot start a worker
    for ever, within one `fit`)."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=0, controller_failure_limit=cl.start_attempts - 1)


def workers_did_not_start(error: BaseException, attempts: int, task: str) -> ClusterUnavailable:
    """One line for a worker group Ray Train could not start `attempts` times: its last reason."""
    cause = getattr(error, "controller_failure", error)
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
    return ClusterUnavailable(f"[{task}] the workers could not be started ({attempts} attempts, "
                              f"cluster.start_attempts): {type(cause).__name__}: {first[:300]}")


def _final(fatal: BaseException, cfg: PipelineConfig, run_name: str) -> BaseException:
    """The error a run ends with, once the half-written checkpoint folders it left are gone (a
    worker's config or input error: as the worker raised it)."""
    run_dir = run_dir_of(cfg, run_name)
    if not isinstance(fatal, CheckpointError) or run_dir is None or not run_dir.is_dir():
        return fatal
    if cfg.strategy.name == "horovod":
        removed = [p.name for p in run_dir.glob("checkpoint_*.tmp")]
        for name in removed:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    else:
        removed = remove_unfinished(run_dir, set_aside=not isinstance(fatal, StorageFull))
    if removed and isinstance(fatal, StorageFull):
        return StorageFull(f"{fatal}; removed the unfinished checkpoint folder(s) {', '.join(sorted(removed))}")
    return fatal
