"""register: a new MLflow registry version aliased `challenger`; `champion` if its metric is better."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.flows.export import register_export


def run(cfg: PipelineConfig, task: str) -> None:
    reg = register_export(cfg, task, Path(f"export/{task}"), Path(f"metrics/{task}"), Path(f"registry/{task}.json"))
    if reg.promoted:
        verdict = "now champion"
    elif reg.previous_champion == reg.version:
        verdict = "champion"
    elif reg.champion_ranked_by:
        registry = cfg.task(task).registry
        verdict = (f"champion stays v{reg.previous_champion}, ranked by {reg.champion_ranked_by}: this config ranks by "
                   f"{registry.metric}, {'higher' if registry.greater_is_better else 'lower'} is better, so the two "
                   f"are not compared (`pipeline promote {reg.name}@{reg.version}` makes this version champion)")
    else:
        verdict = f"champion stays v{reg.previous_champion} ({reg.previous_metric:.4f})"
    done = "already registered as" if reg.reused else "registered"
    print(f"[{task}] {done} {reg.name} v{reg.version} ({cfg.task(task).registry.metric}={reg.metric:.4f}), "
          f"alias challenger; {verdict}")


if __name__ == "__main__":
    stage_main("register", run)
