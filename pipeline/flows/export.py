"""The export and register stages' work."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from pipeline.atomic import atomic_dir, atomic_write_text
from pipeline.config.schema import PipelineConfig
from pipeline.data.shard_format import load_manifest
from pipeline.data.shard_tokenizer import checked_tokenizer
from pipeline.data.text import EOS
from pipeline.export.hf_export import HF_DIR, export_hf
from pipeline.export.load_alone import check_loads_alone, check_loads_here
from pipeline.export.onnx_export import export_onnx
from pipeline.export.pyfunc import GENERATION, SAMPLER, example_input, log_pyfunc, pyfunc_files, sampler_settings
from pipeline.export.quantize import accuracy_change, quantize_int8
from pipeline.flows.evaluate import EVAL_RUN, check_trained_on
from pipeline.tasks import task_for_spec
from pipeline.tracking import mlflow_runs
from pipeline.tracking.registry import (
    Registration,
    check_logged_model,
    describe_version,
    eval_config_tags,
    loss_settings_tag,
    register,
    shipped_files,
    version_tags,
)
from pipeline.training.checkpoint import (
    SPEC,
    WEIGHTS,
    DamagedFile,
    load_model,
    model_checksums,
    read_json,
    record_string,
    verify_model_dir,
    write_checksums,
)

INFO = "model_info.json"
INT8 = "model.int8.onnx"

# mlflow.pyfunc.log_model's warning for every python_model given as an object: ours is the
# project's own class, shipped with its code (code_paths), so there is nothing to act on
_CLOUDPICKLE_NOTICE = "Passing a Python object as `python_model` causes it to be serialized using CloudPickle"
_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class _CloudPickleNotice(logging.Filter):
    """Drops `_CLOUDPICKLE_NOTICE` only; every other record of the logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_CLOUDPICKLE_NOTICE)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Around the MLflow calls of the export: without `_CLOUDPICKLE_NOTICE`, and without MLflow's
    "Downloading artifacts" bar where stderr is no terminal (DVC's log: there a tqdm bar is one
    line of carriage returns). Warnings and errors of any other kind are still printed."""
    logger, notice = logging.getLogger("mlflow.pyfunc"), _CloudPickleNotice()
    logger.addFilter(notice)
    before = os.environ.get(_PROGRESS_BAR_ENV)
    if not sys.stderr.isatty():
        os.environ[_PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        logger.removeFilter(notice)
        if before is None:
            os.environ.pop(_PROGRESS_BAR_ENV, None)
        else:
            os.environ[_PROGRESS_BAR_ENV] = before


def export(cfg: PipelineConfig, task: str, model_dir: Path, shards: Path, out_dir: Path,
           metrics_dir: Path) -> dict[str, Any]:
    tcfg = cfg.task(task)
    tokenizer = checked_tokenizer(shards)  # what the export ships must be what the shards were written with
    run = mlflow_runs.read_run_file(model_dir)
    check_trained_on(run, model_dir, shards)  # and the shards must be those the model was trained on
    mlflow_runs.continue_run(run, model_dir, "export")  # the run it logs into, found before any work
    model, spec = load_model(model_dir)
    with atomic_dir(out_dir) as tmp:
        for name in (WEIGHTS, SPEC, mlflow_runs.RUN_FILE):
            shutil.copy2(model_dir / name, tmp / name)
        if tokenizer is not None:
            shutil.copy2(tokenizer, tmp / tokenizer.name)
            (tmp / GENERATION).write_text(json.dumps({"eos_token": load_manifest(shards).get("eos_token", EOS)}))
        if spec["task"] == "diffusion":  # the sampler the evaluate stage scored: the served model's default
            (tmp / SAMPLER).write_text(json.dumps(sampler_settings(tcfg.eval)))
        diff, int8, hf = None, {}, {}
        if spec["task"] == "lm" and tcfg.export.hf:  # before the MLflow model, which then carries hf/ too
            hf = export_hf(model, spec, shards, tmp / HF_DIR, tcfg.export)
        if tcfg.export.onnx:
            diff = export_onnx(model, spec, tmp / "model.onnx")
            if not diff <= tcfg.export.onnx_max_abs_diff:  # NaN (damaged weights) fails too
                raise ValueError(f"ONNX output differs from PyTorch by {diff:.2e} > "
                                 f"export.onnx_max_abs_diff {tcfg.export.onnx_max_abs_diff:.0e}"
                                 + ("" if math.isfinite(diff) else " (the outputs are not finite: damaged weights?)"))
        if tcfg.export.quantize_int8:
            quantize_int8(tmp / "model.onnx", tmp / INT8)
            int8 = accuracy_change(tmp / "model.onnx", tmp / INT8, shards, tcfg.export.int8_eval_rows)
        write_checksums(tmp)  # every file so far (the MLflow model's folder carries its share of the record)
        with _quiet_mlflow(), mlflow.start_run(run_id=run["run_id"]):
            info, expected = log_pyfunc(tmp, spec)
            if diff is not None:
                # the graph and its external weights file (model.onnx.data) belong together
                for f in sorted(tmp.glob("model.onnx*")):
                    mlflow.log_artifact(str(f), artifact_path="onnx")
                mlflow.log_metric("export/onnx_max_abs_diff", diff)
            if int8:
                for f in sorted(tmp.glob(INT8 + "*")):
                    mlflow.log_artifact(str(f), artifact_path="onnx_int8")
                mlflow.log_metrics({f"export/{k}": v for k, v in int8.items()})
            if hf:
                mlflow.set_tag("export.hf_architecture", hf["hf_architecture"] or f"none: {hf['hf_skipped']}")
                mlflow.log_metrics({f"export/{k}": v for k, v in hf_metrics(hf).items()})
        # Round trip: the logged model, as the artifact store holds it, must load and predict what it
        # predicted here in a fresh process that sees only its code and requirements, before anything
        # is registered (`load_alone`).
        with _quiet_mlflow():
            if tcfg.export.load_alone:
                prediction = check_loads_alone(info.model_uri, example_input(spec), expected)
            else:
                prediction = check_loads_here(info.model_uri, example_input(spec), expected)
        result = {"model_uri": info.model_uri, "run_id": run["run_id"], "onnx_max_abs_diff": diff,
                  "pyfunc_rows": len(next(iter(prediction.values()))), **int8, **hf,
                  "shipped_files": shipped_files(info.model_uri)}  # the pickle and code, checked at register
        (tmp / INFO).write_text(json.dumps(result, indent=2))
        write_checksums(tmp, add=(INFO,))  # the register stage verifies the whole folder
    metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(metrics_dir / "export.json",
                      json.dumps({"onnx_max_abs_diff": diff, **int8, **hf_metrics(hf)}, indent=2))
    return result


def hf_metrics(hf: dict[str, Any]) -> dict[str, float]:
    """The Hugging Face check's numbers (what metrics/<task>/export.json and MLflow get)."""
    return {k: v for k, v in hf.items() if k.startswith("hf_") and isinstance(v, int | float)}


def _registry_value(metrics: Any, path: Path, task: str, metric: str) -> float:
    """The registry metric from eval.json: a finite number, or one line naming the file and key.
    (A NaN champion would block every later promotion; null or text would be a traceback.)"""
    if not isinstance(metrics, dict):
        raise DamagedFile(path, f"not a JSON object of metrics (a {type(metrics).__name__}); "
                                "run the evaluate stage again")
    if metric not in metrics:
        raise KeyError(f"tasks.{task}.registry.metric: '{metric}' is not an evaluation metric "
                       f"(have: {', '.join(sorted(metrics))})")
    value = metrics[metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: {metric} is {value!r}, not a number; run the evaluate stage again")
    if not math.isfinite(value):
        raise ValueError(f"{path}: {metric} is {value}, not a finite number: the model cannot be ranked "
                         "(damaged weights or a diverged run); nothing registered")
    return float(value)


def register_export(cfg: PipelineConfig, task: str, export_dir: Path, metrics_dir: Path, out: Path) -> Registration:
    tcfg = cfg.task(task)
    info = read_json(export_dir / INFO, "export")
    metrics = read_json(metrics_dir / "eval.json", "evaluate")
    run_id = record_string(info, export_dir / INFO, "run_id", "export")
    model_uri = record_string(info, export_dir / INFO, "model_uri", "export")
    value = _registry_value(metrics, metrics_dir / "eval.json", task, tcfg.registry.metric)
    evaluated_file = metrics_dir / EVAL_RUN
    evaluated = record_string(read_json(evaluated_file, "evaluate"), evaluated_file, "run_id", "evaluate")
    if evaluated != run_id:
        raise ValueError(f"{export_dir / INFO} is the export of MLflow run {run_id}, but {metrics_dir / 'eval.json'} "
                         f"holds the metrics of run {evaluated} ({metrics_dir / EVAL_RUN}): rerun the evaluate "
                         "stage on this model before registering it")
    verify_model_dir(export_dir)  # every file as the export stage wrote it
    run = mlflow_runs.read_run_file(export_dir)
    trained = mlflow_runs.continue_run(run, export_dir, "register")
    if run["run_id"] != run_id:
        raise ValueError(f"{export_dir / INFO} names MLflow run {run_id}, {export_dir / mlflow_runs.RUN_FILE} run "
                         f"{run['run_id']}: the folder mixes two exports; rerun the export stage")
    # the logged model's files are in the artifact store (those of the folder the pyfunc carries)
    check_logged_model(model_uri, {k: v for k, v in pyfunc_files(model_checksums(export_dir)).items() if k != INFO},
                       task, shipped=info.get("shipped_files"))  # (exports before the record: by listing only)
    spec = read_json(export_dir / SPEC, "export")
    example = example_input(spec).to_dict("list")

    def describe(version: str) -> str:
        return describe_version(tcfg.registry.name, version, trained, metrics, tcfg.registry, run["tracking_uri"],
                                example=repr(example), hf_architecture=info.get("hf_architecture"))

    # the version carries its own lineage only (the run keeps the rest) and says what it is, with the
    # evaluation it was registered on (a run evaluated anew holds only its latest eval/* metrics) and the
    # eval config that scored it (DVC reran evaluate on any change to it), which `pipeline reproduce` applies
    scores = {f"eval/{k}": str(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    scored_with = {**eval_config_tags(tcfg.eval.model_dump(mode="json")),
                   **loss_settings_tag(task_for_spec(spec).loss_settings(spec))}
    reg = register(model_uri, run_id, tcfg.registry, value, {**version_tags(trained), **scores, **scored_with},
                   describe)
    atomic_write_text(out, json.dumps(dataclasses.asdict(reg), indent=2))
    return reg
