"""Run the training loop on Ray Train workers with `TorchTrainer`.

The run is named by a digest of its config and data, under `cluster.storage_path`: rerunning
the same configuration after an interruption resumes from its latest checkpoint, while a
changed configuration starts a fresh run instead of resuming a stale one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.distributed import process_group_backend


def _worker(config: dict[str, Any]) -> None:
    from pipeline.config import validate
    from pipeline.training.loop import train
    from pipeline.training.session import RaySession

    train(validate(config["cfg"]), config["task"], config["shards"], RaySession())


def storage_root(cfg: PipelineConfig) -> str:
    path = cfg.cluster.storage_path
    return path if "://" in path else str(Path(path).resolve())


def registered_step(run_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train's controller has registered for a run (0 if
    none yet). A checkpoint folder on disk counts only once it is listed here: one the
    controller never took in is not resumed from."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or mid-write
        return 0


def fit(cfg: PipelineConfig, task_name: str, shards: str, run_name: str):
    """Train on Ray; returns the `ray.train.Result` (or its Horovod equivalent), whose `error`
    is set if training failed for good. Horovod brings its own launcher (RayExecutor).

    `shards` is where every worker reads the shards: an absolute local path (one node or a
    shared file system) or a URL such as s3://... (cached on each node)."""
    if cfg.strategy.name == "horovod":
        from pipeline.runtime.horovod import fit_horovod

        return fit_horovod(cfg, task_name, shards, Path(storage_root(cfg)) / run_name)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cl = cfg.cluster
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "task": task_name, "shards": shards},
        scaling_config=ScalingConfig(num_workers=cl.num_workers, use_gpu=cl.use_gpu,
                                     resources_per_worker={"CPU": cl.cpus_per_worker}),
        torch_config=TorchConfig(backend=process_group_backend(cfg.strategy, cl.use_gpu)),
        run_config=RunConfig(
            name=run_name, storage_path=storage_root(cfg),
            failure_config=FailureConfig(max_failures=cl.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.task(task_name).trainer.keep_last_k),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines say enough
        ),
    )
    return trainer.fit()
