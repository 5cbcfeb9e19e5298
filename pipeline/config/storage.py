"""Checks on where a run keeps its checkpoints (`cluster.storage_path`), run when the config is
validated: a combination that cannot work stops with one line naming the keys, before Ray
places a worker.

Ray Train (DDP, FSDP2, DeepSpeed) writes checkpoints through pyarrow's file systems, so a URL
such as s3://bucket/prefix works on a cluster whose hosts share nothing. Horovod runs outside
Ray Train (`horovod.ray.RayExecutor`, pipeline/runtime/horovod.py): its ranks write checkpoint
files themselves, into a folder every worker must see, which on several hosts means a shared
file system (pipeline/runtime/horovod.py checks that at start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


def is_url(path: str) -> bool:
    """Whether a storage path names a remote file system (s3://, gs://, ...) rather than a folder."""
    return "://" in path


def check_storage(cfg: PipelineConfig) -> None:
    """Raise ValueError (one line, naming the keys) for a storage path the strategy cannot use."""
    path = cfg.cluster.storage_path
    if cfg.strategy.name == "horovod" and is_url(path):
        raise ValueError(
            f"cluster.storage_path={path}: strategy.name=horovod writes checkpoints into a folder every worker "
            "sees (horovod.ray runs outside Ray Train, which is what uploads to object stores); give it a path "
            "on a shared file system, or use ddp, fsdp or deepspeed with this storage")
