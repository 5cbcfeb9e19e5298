"""source: a record of the raw data prepare reads (`data/<task>/source.json`), rewritten on every
`dvc repro` so that an edited `data.source` reruns prepare (pipeline/data/fingerprint.py)."""

import json

from pipeline.atomic import atomic_write_text
from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.data.fingerprint import timed_fingerprint


def run(cfg: PipelineConfig, task: str) -> None:
    tcfg = cfg.task(task)
    record, line = timed_fingerprint(tcfg.data.source, getattr(tcfg.model, "init_from", None))
    atomic_write_text(f"data/{task}/source.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"[{task}] source {line}")


if __name__ == "__main__":
    stage_main("source", run)
