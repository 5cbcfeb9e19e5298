"""evaluate: held-out metrics (LM perplexity; diffusion denoising loss and a sample grid)."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.flows.evaluate import evaluate


def run(cfg: PipelineConfig, task: str) -> None:
    metrics = evaluate(cfg.task(task), Path(f"models/{task}"), Path(f"data/{task}/shards"), Path(f"metrics/{task}"),
                       Path(f"reports/{task}"))
    print(f"[{task}] " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    stage_main("evaluate", run)
