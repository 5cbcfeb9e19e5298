"""The evaluate stage's work: metrics to JSON (DVC) and to the training run (MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from pipeline.atomic import atomic_write_text
from pipeline.config.schema import TaskConfig
from pipeline.evaluation.device import eval_device
from pipeline.tracking import mlflow_runs
from pipeline.training.checkpoint import load_model


def evaluate(tcfg: TaskConfig, model_dir: Path, shards: Path, metrics_dir: Path, reports_dir: Path) -> dict[str, float]:
    import torch

    device = eval_device(tcfg.eval.device)  # before loading: a bad choice fails at once
    info = mlflow_runs.read_run_file(model_dir)  # the run the metrics go to: missing or damaged, before any work
    torch.manual_seed(0)
    model, spec = load_model(model_dir)
    model.to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    print(f"[{spec['task']}] evaluating on {where} (eval.device={tcfg.eval.device})", flush=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    if spec["task"] == "lm":
        from pipeline.evaluation.lm import evaluate_lm

        metrics, sample = evaluate_lm(model, shards, tcfg.eval)
        atomic_write_text(reports_dir / "sample.txt", sample + "\n")
        artifacts = [reports_dir / "sample.txt"]
    else:
        from pipeline.evaluation.diffusion import denoise_loss, sample_grid, save_grid, score_with_classifier

        metrics = {f"{s}_denoise_loss": denoise_loss(model, shards, s, tcfg.eval) for s in ("val", "test")}
        _, images = sample_grid(model, tcfg.eval)
        save_grid(images, tcfg.eval.sample_cols, reports_dir / "samples.png")
        if tcfg.eval.samples_per_class:
            metrics.update(score_with_classifier(model, shards, tcfg.eval))
        artifacts = [reports_dir / "samples.png"]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(metrics_dir / "eval.json", json.dumps(metrics, indent=2, sort_keys=True))
    mlflow.set_tracking_uri(info["tracking_uri"])
    with mlflow.start_run(run_id=info["run_id"]):
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        mlflow.set_tag("eval.device", device.type)
        for a in artifacts:
            mlflow.log_artifact(str(a), artifact_path="evaluation")
    return metrics
