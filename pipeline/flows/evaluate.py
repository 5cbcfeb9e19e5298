"""The evaluate stage's work: metrics to JSON (DVC) and to the training run (MLflow)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow

from pipeline.atomic import atomic_write_text
from pipeline.config.schema import TaskConfig
from pipeline.data.build import file_md5
from pipeline.data.shard_format import MANIFEST, load_manifest
from pipeline.evaluation.device import eval_device
from pipeline.tracking import mlflow_runs
from pipeline.training.checkpoint import load_model

# Beside eval.json (which stays numbers only, for `dvc metrics show` and the registry): the MLflow
# run the metrics are of, so the register stage never pairs one model's export with another's metrics.
EVAL_RUN = "eval_run.json"


def check_trained_on(info: Any, model_dir: Path, shards: Path) -> None:
    """Refuse a model trained on other shards than `shards` (re-prepared with another vocabulary,
    say): its scores would be garbage and its export would ship the wrong tokenizer. The train
    stage records the md5 of the shards' manifest in run.json; older runs without it are not checked."""
    recorded = info.get("data_manifest_md5") if isinstance(info, dict) else None
    if recorded is None:
        return
    if not (shards / MANIFEST).is_file():
        load_manifest(shards)  # one line naming the missing manifest and the stage that writes it
    actual = file_md5(shards / MANIFEST)
    if actual != recorded:
        raise ValueError(f"{model_dir / mlflow_runs.RUN_FILE}: the model was trained on shards with manifest "
                         f"{recorded}, these shards ({shards / MANIFEST}) are {actual}: rerun the train stage")


def check_finite(metrics: dict[str, float]) -> None:
    """A NaN or infinite metric means damaged weights or a diverged run: refused before eval.json is
    written, so nothing downstream (export, register, the champion alias) takes it for a score."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise ValueError("evaluation gave non-finite " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
                         + ": the model's weights are damaged or training diverged; eval.json not written "
                         "(rerun the train stage)")


def evaluate(tcfg: TaskConfig, model_dir: Path, shards: Path, metrics_dir: Path, reports_dir: Path) -> dict[str, float]:
    import torch

    device = eval_device(tcfg.eval.device)  # before loading: a bad choice fails at once
    info = mlflow_runs.read_run_file(model_dir)
    check_trained_on(info, model_dir, shards)
    mlflow_runs.continue_run(info, model_dir, "evaluate")  # the run the metrics go to, found before any work
    torch.manual_seed(0)
    model, spec = load_model(model_dir)
    model.to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    print(f"[{spec['task']}] evaluating on {where} (eval.device={tcfg.eval.device})", flush=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    if spec["task"] == "lm":
        from pipeline.evaluation.lm import evaluate_lm

        metrics, sample = evaluate_lm(model, shards, tcfg.eval)
        artifacts = [reports_dir / "sample.txt"]
    else:
        from pipeline.evaluation.diffusion import denoise_loss, sample_grid, save_grid, score_with_classifier

        metrics = {f"{s}_denoise_loss": denoise_loss(model, shards, s, tcfg.eval) for s in ("val", "test")}
        _, images = sample_grid(model, tcfg.eval)
        if tcfg.eval.samples_per_class:
            metrics.update(score_with_classifier(model, shards, tcfg.eval))
        artifacts = [reports_dir / "samples.png"]
    check_finite(metrics)  # before any report is written: a diverged model's does not replace the last good one
    if spec["task"] == "lm":
        atomic_write_text(reports_dir / "sample.txt", sample + "\n")
    else:
        save_grid(images, tcfg.eval.sample_cols, reports_dir / "samples.png")
    metrics_dir.mkdir(parents=True, exist_ok=True)
    # the run record goes first and comes back last, once the run holds the metrics too: a crash or a
    # tracking failure in between leaves no pairing the register stage would trust
    (metrics_dir / EVAL_RUN).unlink(missing_ok=True)
    atomic_write_text(metrics_dir / "eval.json", json.dumps(metrics, indent=2, sort_keys=True))
    mlflow.set_tracking_uri(info["tracking_uri"])  # (again: evaluation may have imported code that reset it)
    with mlflow.start_run(run_id=info["run_id"]):
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        mlflow.set_tag("eval.device", device.type)
        for a in artifacts:
            mlflow.log_artifact(str(a), artifact_path="evaluation")
    atomic_write_text(metrics_dir / EVAL_RUN, json.dumps({"run_id": info["run_id"]}, indent=2))
    return metrics
