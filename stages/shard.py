"""shard: prepared splits -> fixed-size Arrow IPC shards with a manifest (rows, sha256, schema)."""

import json
from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.data.build import shard
from pipeline.runtime import connect


def run(cfg: PipelineConfig, task: str) -> None:
    if getattr(cfg.task(task).data, "ray", False):  # text data: per-file work as Ray tasks
        print(f"[{task}] shard on {connect(cfg.cluster)}")
    path = shard(cfg.task(task).data, Path(f"data/{task}/prepared"), Path(f"data/{task}/shards"))
    manifest = json.loads(path.read_text())
    counts = {s: f"{v['rows']} rows / {len(v['shards'])} shards" for s, v in manifest["splits"].items()}
    print(f"[{task}] sharded: {counts}")


if __name__ == "__main__":
    stage_main("shard", run)
