"""prepare: raw data -> cleaned, de-duplicated, split (augmented, tokenizer) files + statistics."""

import json
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.data.build import prepare
from pipeline.runtime import connect


def run(cfg: PipelineConfig, task: str) -> None:
    if getattr(cfg.task(task).data, "ray", False):  # text data: per-file work as Ray tasks
        print(f"[{task}] prepare on {connect(cfg.cluster)}")
    pretrained = getattr(cfg.task(task).model, "init_from", None)  # a Hugging Face checkpoint brings its tokenizer
    stats = prepare(cfg.task(task).data, cfg.seed, Path(f"data/{task}/prepared"),
                    tokenizer_from=Path(pretrained) if pretrained else None, task=task)
    # atomic (it makes its folder): DVC and readers never see half a file after a crash or a full disk
    atomic_write_text(f"metrics/{task}/data.json", json.dumps(stats, indent=2, sort_keys=True))
    print(f"[{task}] prepared: " + ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, int)))


if __name__ == "__main__":
    stage_main("prepare", run)
