"""source: a record of the raw data prepare reads (`data/<task>/source.json`), rewritten on every
`dvc repro` so that an edited `data.source` reruns prepare (pipeline/data/fingerprint.py)."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.data.fingerprint import write_record


def run(cfg: PipelineConfig, task: str) -> None:
    data, model = cfg.task(task).data, cfg.task(task).model
    line = write_record(data.source, data.kind, getattr(model, "init_from", None),
                        Path(f"data/{task}/source.json"))
    print(f"[{task}] source {line}")


if __name__ == "__main__":
    stage_main("source", run)
