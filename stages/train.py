"""train: Ray Train TorchTrainer over the shards; resumes an interrupted run of the same config."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.flows.train import train_task


def run(cfg: PipelineConfig, task: str) -> None:
    out = train_task(cfg, task, Path(f"data/{task}/shards"), Path(f"models/{task}"), Path(f"metrics/{task}"),
                     Path(f"reports/{task}"))
    print(f"[{task}] trained {out.steps} steps in {out.seconds:.0f}s, final loss {out.final_loss:.4f}; "
          f"MLflow run {out.run_id}")


if __name__ == "__main__":
    stage_main("train", run)
