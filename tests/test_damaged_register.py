"""Damaged input to evaluate, export and register: NaN metrics and weights, an export paired with
another model's metrics, a model trained on other shards, eval.json / model_info.json that are not
what the stages write, and registry names MLflow refuses. Each is one line naming the file and key,
before anything is written or registered."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.config import ConfigError, validate
from pipeline.data.build import file_md5
from pipeline.data.shard_format import MANIFEST
from pipeline.flows.evaluate import EVAL_RUN, check_finite, evaluate
from pipeline.flows.export import INFO, export, register_export
from pipeline.tracking.mlflow_runs import RUN_FILE
from pipeline.tracking.registry import CHAMPION, is_better, register
from pipeline.training.checkpoint import SPEC, WEIGHTS, CheckpointError, DamagedFile
from tests.conftest import tiny_raw


@pytest.fixture
def store(tmp_path):
    """An empty MLflow SQLite store, and the tracking URI reset afterwards."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("damaged-register")
    yield uri
    mlflow.set_tracking_uri(None)


def _register_inputs(tmp_path: Path, metrics: object, run_id: str = "run-a", evaluated: str | None = "run-a",
                     info: object = None) -> tuple[Path, Path]:
    """export/<task>/model_info.json and metrics/<task>/eval.json (+ eval_run.json) as written on disk."""
    export_dir, metrics_dir = tmp_path / "export", tmp_path / "metrics"
    export_dir.mkdir(exist_ok=True)
    metrics_dir.mkdir(exist_ok=True)
    info = {"run_id": run_id, "model_uri": f"runs:/{run_id}/model"} if info is None else info
    (export_dir / INFO).write_text(json.dumps(info))
    (metrics_dir / "eval.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    if evaluated is not None:
        (metrics_dir / EVAL_RUN).write_text(json.dumps({"run_id": evaluated}))
    return export_dir, metrics_dir


# --- 1. a NaN metric never becomes champion, and a NaN champion never blocks ------------------------

def test_damaged_nan_is_never_better_and_never_blocks():
    nan = float("nan")
    assert not is_better(nan, None, False) and not is_better(nan, 1.0, False) and not is_better(nan, 1.0, True)
    assert is_better(5.0, nan, False) and is_better(5.0, nan, True) and is_better(5.0, float("inf"), False)
    assert is_better(1.0, 2.0, False) and not is_better(3.0, 2.0, False) and is_better(3.0, 2.0, True)


def test_damaged_nan_champion_gives_way_to_a_finite_value(store):
    """A champion whose stored value is NaN (registered before this check) loses to a finite one;
    a non-finite value is refused before a version is created."""
    from mlflow.tracking import MlflowClient

    cfg = validate(tiny_raw()).task("lm").registry
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("flavors: {}\n", "model/MLmodel")  # as much of a model as registering looks for
    uri = f"runs:/{run.info.run_id}/model"
    client.create_registered_model(cfg.name)  # (another model of the run: the same one would be reused)
    client.create_model_version(cfg.name, f"runs:/{run.info.run_id}/older", run.info.run_id,
                                tags={"metric_name": cfg.metric, "metric_value": "nan"})
    client.set_registered_model_alias(cfg.name, CHAMPION, "1")
    with pytest.raises(ValueError, match=r"val_loss is nan: not a finite number; nothing registered"):
        register(uri, run.info.run_id, cfg, float("nan"), {})
    assert len(client.search_model_versions(f"name='{cfg.name}'")) == 1
    reg = register(uri, run.info.run_id, cfg, 4.5, {})
    assert (reg.version, reg.promoted, reg.previous_champion) == ("2", True, "1")
    assert math.isnan(reg.previous_metric)
    assert str(client.get_model_version_by_alias(cfg.name, CHAMPION).version) == "2"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_damaged_register_refuses_a_non_finite_registry_metric(tmp_path, value):
    export_dir, metrics_dir = _register_inputs(tmp_path, f'{{"val_loss": {value}, "test_loss": 1.0}}')
    with pytest.raises(ValueError, match=rf"^{metrics_dir / 'eval.json'}: val_loss is -?(nan|inf), not a finite "
                                         r"number"):
        register_export(validate(tiny_raw()), "lm", export_dir, metrics_dir, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


# --- 2. NaN weights: evaluate refuses, export's checks fail on NaN ---------------------------------

def test_damaged_evaluate_refuses_non_finite_metrics(tmp_path, monkeypatch, store):
    """A model with NaN weights scores NaN: evaluate names the metrics, exits through the CLI's one
    line, and leaves the previous eval.json as it was."""
    import pipeline.evaluation.lm as lm_eval
    import pipeline.flows.evaluate as flow

    check_finite({"val_loss": 1.0, "val_perplexity": 2.7})
    model_dir, metrics_dir = tmp_path / "model", tmp_path / "metrics"
    model_dir.mkdir()
    metrics_dir.mkdir()
    with mlflow.start_run() as run:
        pass
    (model_dir / RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": store}))
    (metrics_dir / "eval.json").write_text('{"val_loss": 3.0}')
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "sample.txt").write_text("the last good sample\n")  # a report of the last evaluation
    monkeypatch.setattr(flow, "load_model", lambda d: (torch.nn.Linear(1, 1), {"task": "lm"}))
    nan = float("nan")
    monkeypatch.setattr(lm_eval, "evaluate_lm", lambda *a: ({"val_loss": nan, "val_perplexity": nan,
                                                            "test_loss": 1.0, "test_perplexity": 2.7}, "s"))
    with pytest.raises(ValueError, match=r"^evaluation gave non-finite val_loss=nan, val_perplexity=nan: "):
        evaluate(validate(tiny_raw()).task("lm"), model_dir, tmp_path / "shards", metrics_dir, tmp_path / "r")
    assert (metrics_dir / "eval.json").read_text() == '{"val_loss": 3.0}' and not (metrics_dir / EVAL_RUN).exists()
    assert (tmp_path / "r" / "sample.txt").read_text() == "the last good sample\n"  # (it was replaced)
    assert mlflow.MlflowClient(store).get_run(run.info.run_id).data.metrics == {}  # nothing logged to the run either


def test_damaged_sample_grid_write_leaves_the_last_grid_whole(tmp_path, monkeypatch):
    """reports/<task>/samples.png (a DVC output and plot) was written by PIL straight into place: a
    kill or a full disk mid-save left a truncated PNG where the last good one was. It is encoded
    first and swapped in whole: a failing encoder leaves the last grid as it was."""
    from PIL import Image

    from pipeline.evaluation.diffusion import save_grid

    path = tmp_path / "samples.png"
    save_grid(torch.zeros(4, 1, 8, 8), 2, path)
    good = path.read_bytes()
    assert Image.open(path).size == (2 * 34 + 2, 2 * 34 + 2)

    def full_disk(image, fp, filename, *args, **kwargs):  # the encoder writes part, then the disk is full
        fp.write(good[:33])
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(Image.SAVE, "PNG", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_grid(torch.ones(4, 1, 8, 8), 2, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["samples.png"]


def test_damaged_evaluation_the_run_did_not_get_is_not_paired_with_it(tmp_path, monkeypatch, store):
    """The metrics reach eval.json, then logging them to the run fails (the tracking store went away):
    eval_run.json, the pairing the register stage trusts, is not written (it was, before the logging),
    so register refuses the evaluation instead of registering a version whose run lacks its metrics."""
    import pipeline.evaluation.lm as lm_eval
    import pipeline.flows.evaluate as flow

    model_dir, metrics_dir = tmp_path / "model", tmp_path / "metrics"
    model_dir.mkdir()
    with mlflow.start_run() as run:
        pass
    (model_dir / RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": store}))
    monkeypatch.setattr(flow, "load_model", lambda d: (torch.nn.Linear(1, 1), {"task": "lm"}))
    monkeypatch.setattr(lm_eval, "evaluate_lm", lambda *a: ({"val_loss": 3.0, "val_perplexity": 20.1,
                                                            "test_loss": 3.1, "test_perplexity": 22.2}, "s"))

    def store_gone(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(flow.mlflow, "log_metrics", store_gone)
    with pytest.raises(ConnectionError):
        evaluate(validate(tiny_raw()).task("lm"), model_dir, tmp_path / "shards", metrics_dir, tmp_path / "r")
    assert json.loads((metrics_dir / "eval.json").read_text())["val_loss"] == 3.0
    assert not (metrics_dir / EVAL_RUN).exists()
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / INFO).write_text(json.dumps({"run_id": run.info.run_id, "model_uri": "runs:/x/model"}))
    with pytest.raises(FileNotFoundError, match=rf"^{metrics_dir / EVAL_RUN} is missing: run the evaluate stage"):
        register_export(validate(tiny_raw()), "lm", export_dir, metrics_dir, tmp_path / "out.json")


def _fake_model_dir(tmp_path: Path, run: dict) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    for name in (WEIGHTS, SPEC):
        (model_dir / name).write_text("{}")
    (model_dir / RUN_FILE).write_text(json.dumps(run))
    return model_dir


def _fake_shards(tmp_path: Path, vocab: int = 300) -> Path:
    shards = tmp_path / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    (shards / MANIFEST).write_text(json.dumps({"splits": {}, "vocab_size": vocab}))
    return shards


def test_damaged_export_fails_on_a_nan_onnx_difference(tmp_path, monkeypatch, store):
    """NaN outputs make the ONNX difference NaN, and `NaN > limit` is False: the check must fail."""
    import pipeline.flows.export as flow

    cfg = validate(tiny_raw(["tasks.lm.export.hf=false"]))
    with mlflow.start_run() as run:
        pass
    model_dir = _fake_model_dir(tmp_path, {"run_id": run.info.run_id, "tracking_uri": store})
    monkeypatch.setattr(flow, "load_model", lambda d: (torch.nn.Linear(1, 1), {"task": "lm"}))
    monkeypatch.setattr(flow, "export_onnx", lambda *a: float("nan"))
    try:
        with pytest.raises(ValueError, match=r"ONNX output differs from PyTorch by nan > export.onnx_max_abs_diff "
                                             r"1e-03 \(the outputs are not finite"):
            export(cfg, "lm", model_dir, _fake_shards(tmp_path), tmp_path / "out", tmp_path / "metrics")
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics").exists()


def test_damaged_hf_export_fails_on_a_nan_logit_difference(tmp_path, monkeypatch):
    import numpy as np

    import pipeline.data.shard_store as store
    import pipeline.export.hf_export as hf

    ecfg = validate(tiny_raw()).task("lm").export
    monkeypatch.setattr(hf, "write_hf_folder", lambda *a: {"hf_architecture": "LlamaForCausalLM", "hf_dtype": "f"})
    monkeypatch.setattr(store, "read_split", lambda *a, **k: {"tokens": np.zeros((1, 4), dtype=np.int64)})
    monkeypatch.setattr(hf, "check_hf_folder", lambda *a: {"hf_max_abs_logit_diff": float("nan"),
                                                           "hf_greedy_tokens_equal": True, "hf_tokenizer_equal": True})
    with pytest.raises(ValueError, match=r"logits differ from ours by nan > export.hf_max_abs_diff"):
        hf.export_hf(torch.nn.Linear(1, 1), {"task": "lm"}, tmp_path, tmp_path / "hf", ecfg)


# --- 3. the export and the metrics must be of the same run ------------------------------------------

def test_damaged_register_refuses_metrics_of_another_run(tmp_path):
    cfg = validate(tiny_raw())
    export_dir, metrics_dir = _register_inputs(tmp_path, {"val_loss": 1.0}, run_id="run-new", evaluated="run-old")
    with pytest.raises(ValueError, match=rf"^{export_dir / INFO} is the export of MLflow run run-new, but "
                                         rf"{metrics_dir / 'eval.json'} holds the metrics of run run-old .*rerun the "
                                         r"evaluate stage"):
        register_export(cfg, "lm", export_dir, metrics_dir, tmp_path / "out.json")
    (metrics_dir / EVAL_RUN).unlink()  # an evaluation from before the record (or one cut short): not trusted
    with pytest.raises(FileNotFoundError, match=rf"^{metrics_dir / EVAL_RUN} is missing: run the evaluate stage"):
        register_export(cfg, "lm", export_dir, metrics_dir, tmp_path / "out.json")
    (metrics_dir / EVAL_RUN).write_text("[]")
    with pytest.raises(DamagedFile, match=rf"^{metrics_dir / EVAL_RUN} is damaged \(no 'run_id' string"):
        register_export(cfg, "lm", export_dir, metrics_dir, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


# --- 4. the model must have been trained on these shards --------------------------------------------

def test_damaged_model_trained_on_other_shards_is_refused_before_any_work(tmp_path, store):
    """run.json records the md5 of the shards' manifest the model was trained on; evaluate and export
    compare it with the shards they are given (re-prepared with another vocabulary, say) before
    loading anything. A run.json from before the record is not checked."""
    cfg = validate(tiny_raw())
    shards = _fake_shards(tmp_path, vocab=512)
    trained_on = file_md5(_fake_shards(tmp_path / "old", vocab=300) / MANIFEST)
    with mlflow.start_run() as started:
        pass
    run = {"run_id": started.info.run_id, "tracking_uri": store, "data_manifest_md5": trained_on}
    model_dir = _fake_model_dir(tmp_path, run)
    want = (rf"^{model_dir / RUN_FILE}: the model was trained on shards with manifest {trained_on}, these shards "
            rf"\({shards / MANIFEST}\) are {file_md5(shards / MANIFEST)}: rerun the train stage$")
    with pytest.raises(ValueError, match=want):
        evaluate(cfg.task("lm"), model_dir, shards, tmp_path / "metrics", tmp_path / "reports")
    with pytest.raises(ValueError, match=want):
        export(cfg, "lm", model_dir, shards, tmp_path / "out", tmp_path / "metrics")
    assert not any((tmp_path / d).exists() for d in ("metrics", "reports", "out"))
    # the same shards pass the check (and fail later, at the fake weights); no record: no check
    for record in (file_md5(shards / MANIFEST), None):
        _fake_model_dir(tmp_path, {**run, "data_manifest_md5": record} if record else
                        {k: v for k, v in run.items() if k != "data_manifest_md5"})
        with pytest.raises(CheckpointError):
            evaluate(cfg.task("lm"), model_dir, shards, tmp_path / "metrics", tmp_path / "reports")


# --- 5. eval.json and model_info.json that are not what the stages write ----------------------------

@pytest.mark.parametrize("metrics, error, message", [
    ('{"val_loss": null}', ValueError, r"{eval}: val_loss is None, not a number; run the evaluate stage again"),
    ('{"val_loss": "abc"}', ValueError, r"{eval}: val_loss is 'abc', not a number; run the evaluate stage again"),
    ('{"val_loss": true}', ValueError, r"{eval}: val_loss is True, not a number"),
    ("5", DamagedFile, r"{eval} is damaged \(not a JSON object of metrics \(a int\); run the evaluate stage again"),
    ("[1.0]", DamagedFile, r"{eval} is damaged \(not a JSON object of metrics \(a list\)"),
], ids=["null", "text", "bool", "bare-number", "list"])
def test_damaged_eval_json_values_are_named(tmp_path, metrics, error, message):
    export_dir, metrics_dir = _register_inputs(tmp_path, metrics)
    with pytest.raises(error, match="^" + message.replace("{eval}", str(metrics_dir / "eval.json"))):
        register_export(validate(tiny_raw()), "lm", export_dir, metrics_dir, tmp_path / "out.json")


@pytest.mark.parametrize("info, key", [([], "run_id"), ({"model_uri": "runs:/a/model"}, "run_id"),
                                       ({"run_id": 7, "model_uri": "m"}, "run_id"), ({"run_id": "a"}, "model_uri")],
                         ids=["list", "no-run-id", "number", "no-model-uri"])
def test_damaged_model_info_is_named(tmp_path, info, key):
    export_dir, metrics_dir = _register_inputs(tmp_path, {"val_loss": 1.0}, info=info)
    with pytest.raises(DamagedFile, match=rf"^{export_dir / INFO} is damaged \(no '{key}' string in it; run the "
                                          r"export stage again\)$"):
        register_export(validate(tiny_raw()), "lm", export_dir, metrics_dir, tmp_path / "out.json")


# --- 6. registry names MLflow refuses fail at validation -------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("", "must not be empty"), ("  ", "must not be empty"), ("team/lm", "cannot contain '/'"),
    ("lm:v1", "cannot contain ':'"), ("lm%", "cannot contain '%'"), ("..lm", "cannot be '.' or start with '..'"),
])
def test_damaged_registry_name_fails_validation(name, message):
    raw = tiny_raw()
    raw["tasks"]["lm"]["registry"]["name"] = name
    with pytest.raises(ConfigError, match=rf"^tasks\.lm\.registry\.name: .*{message}"):
        validate(raw)


@pytest.mark.parametrize("task, metric", [("lm", "val_los"), ("lm", "val_denoise_loss"),
                                          ("diffusion", "val_loss"), ("diffusion", "sample_accuracy")])
def test_damaged_registry_metric_fails_validation(task, metric):
    """A metric the evaluate stage does not write was found by the register stage, after training,
    evaluation and export had all run; it is one line at validation now, naming those it writes
    (the diffusion classifier's scores only with eval.samples_per_class > 0)."""
    raw = tiny_raw()
    raw["tasks"][task]["registry"]["metric"] = metric
    if metric == "sample_accuracy":
        raw["tasks"][task]["eval"]["samples_per_class"] = 0
    with pytest.raises(ConfigError, match=rf"^tasks\.{task}: registry\.metric: '{metric}' is not a metric the "
                                          r"evaluate stage writes for this task \(it writes .*_loss"):
        validate(raw)
    if metric == "sample_accuracy":  # scored samples: then it is one (better higher)
        raw["tasks"][task]["eval"]["samples_per_class"] = 2
        raw["tasks"][task]["registry"]["greater_is_better"] = True
        assert validate(raw).task(task).registry.metric == metric


@pytest.mark.parametrize("task, metric, higher", [("lm", "val_perplexity", False),
                                                  ("diffusion", "sample_accuracy", True),
                                                  ("diffusion", "classifier_real_accuracy", True),
                                                  ("diffusion", "sample_frechet_distance", False)])
def test_damaged_registry_direction_fails_validation(task, metric, higher):
    """An accuracy ranked with the default greater_is_better: false made the worse model champion,
    silently; a direction against the metric's own is one line naming the right one."""
    raw = tiny_raw()
    raw["tasks"][task]["eval"]["samples_per_class"] = 2
    raw["tasks"][task]["registry"].update(metric=metric, greater_is_better=not higher)
    with pytest.raises(ConfigError, match=rf"^tasks\.{task}: registry\.greater_is_better: {str(not higher).lower()}, "
                                          rf"but {metric} is better {'higher' if higher else 'lower'}; set "
                                          rf"registry\.greater_is_better: {str(higher).lower()}$"):
        validate(raw)
    raw["tasks"][task]["registry"]["greater_is_better"] = higher
    assert validate(raw).task(task).registry.greater_is_better is higher


def test_damaged_registry_name_is_one_line_from_pipeline_validate(tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    raw = tiny_raw()
    raw["tasks"]["lm"]["registry"]["name"] = "team/lm"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: tasks.lm.registry.name: MLflow registered model names cannot contain '/'")


# --- 6. the tracking store a model's run is in: gone, damaged, locked, or without the run -----------

def test_damaged_tracking_store_is_one_line_before_any_work(tmp_path, store):
    """evaluate, export and register continue the run in run.json: a store that is gone (MLflow would
    make an empty one), not a database, locked by another writer, or without the run is one line
    naming run.json, the run and the store, before any work; MLflow creates no file."""
    import shutil
    import sqlite3

    from pipeline.tracking.mlflow_runs import TrackingUnavailable, continue_run, read_run_file

    with mlflow.start_run() as run:
        pass
    run_id = run.info.run_id
    model_dir = _fake_model_dir(tmp_path, {"run_id": run_id, "tracking_uri": store})
    assert continue_run(read_run_file(model_dir), model_dir, "evaluate").info.run_id == run_id
    db = tmp_path / "mlruns.db"
    where = rf"^{model_dir / RUN_FILE} names run {{run}} in the MLflow store sqlite:///{{db}}, (which|where it is) "
    retrain = r"`dvc repro --force train@model` records a new run"

    def refused(path: Path, message: str, run: str = run_id) -> None:
        _fake_model_dir(tmp_path, {"run_id": run, "tracking_uri": f"sqlite:///{path}"})
        with pytest.raises(TrackingUnavailable, match=where.format(run=run, db=path) + message):
            continue_run(read_run_file(model_dir), model_dir, "export")

    refused(tmp_path / "gone.db", r"does not exist \(deleted or moved\?\): the export stage adds to that run; "
                                  rf"restore the file, or {retrain}$")
    assert not (tmp_path / "gone.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    refused(tmp_path / "junk.db", r"cannot be read \(file is not a database\): restore it from a backup")
    refused(db, rf"does not hold that run \(another store\?\): {retrain}$", run="0" * 32)
    mlflow.MlflowClient().delete_run(run_id)  # (MLflow still returns a deleted run, which cannot be logged to)
    refused(db, rf"deleted: restore it \(`mlflow runs restore --run-id {run_id}`\), or {retrain}$")
    mlflow.MlflowClient().restore_run(run_id)
    shutil.copy(db, tmp_path / "locked.db")
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer mid-transaction
    try:
        refused(tmp_path / "locked.db", r"cannot be read \(database is locked\): another process holds a write lock")
    finally:
        holder.close()


def test_damaged_export_folder_without_checksums_is_refused(tmp_path):
    """Every model and export folder the stages write has checksums.json; without it (deleted, or a
    folder assembled by hand) nothing can be verified, so loading refuses instead of trusting it."""
    from pipeline.training.checkpoint import CHECKSUMS, load_model, verify_model_dir, write_model

    write_model(tmp_path / "m", {"w": torch.zeros(2)}, {"task": "lm"})
    assert verify_model_dir(tmp_path / "m")
    (tmp_path / "m" / CHECKSUMS).unlink()
    with pytest.raises(DamagedFile, match=rf"^{tmp_path / 'm' / CHECKSUMS} is damaged \(missing; the folder cannot "
                                          r"be verified"):
        load_model(tmp_path / "m")
    assert verify_model_dir(tmp_path / "m", required=False) is False  # weights a user brings may have none
