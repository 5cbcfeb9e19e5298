"""source: records of what the later stages read beyond DVC's deps, rewritten on every `dvc repro`:
the raw data prepare reads (`data/<task>/source.json`), so an edited `data.source` reruns prepare,
and the weights training starts from (`data/<task>/init_from.json`), so weights replaced at the same
`init_from` path retrain (pipeline/data/fingerprint.py)."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.data.fingerprint import write_init_record, write_record


def run(cfg: PipelineConfig, task: str) -> None:
    tcfg = cfg.task(task)
    data, model = tcfg.data, tcfg.model
    line = write_record(data.source, data.kind, getattr(model, "init_from", None),
                        Path(f"data/{task}/source.json"))
    print(f"[{task}] source {line}")
    weights = getattr(model, "init_from", None) or tcfg.trainer.init_from
    print(f"[{task}] weights: {write_init_record(weights, Path(f'data/{task}/init_from.json'))}")


if __name__ == "__main__":
    stage_main("source", run)
