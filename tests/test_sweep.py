"""Ray Tune sweeps: the search space is checked before any trial runs; a real Tune run (Optuna
+ ASHA on a local Ray) makes every trial an MLflow run under one parent and prints the best
trial as a `dvc exp run -S` line that composes into a valid config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, validate
from pipeline.config.loading import apply_overrides
from pipeline.flows.sweep import SweepConfig, check_space, dvc_command, load_sweep
from tests.conftest import ROOT, tiny_raw

SPACE = {"metric": "val_loss", "num_samples": 3, "max_steps": 12, "eval_every": 3, "grace_period": 3,
         "reduction_factor": 2,
         "space": {"tasks.lm.optim.lr": {"loguniform": [3e-4, 3e-3]},
                   "tasks.lm.trainer.global_batch_size": {"choice": [8, 16]},
                   "tasks.lm.optim.warmup_steps": {"choice": [0, 2]},
                   "tasks.lm.model.d_model": {"choice": [32, 64]}}}


@pytest.mark.parametrize("task", ["lm", "diffusion"])
def test_shipped_search_spaces_are_valid(task):
    from pipeline.config import compose

    check_space(compose(ROOT / "configs"), task, load_sweep(ROOT / "configs" / "sweep" / f"{task}.yaml"))


@pytest.mark.parametrize(("key", "dim", "fragment"), [
    ("tasks.lm.optim.lrr", {"choice": [1e-3]}, "space.tasks.lm.optim.lrr=0.001: tasks.lm.optim.lrr: unknown key"),
    ("tasks.lm.model.d_model", {"choice": [64, 30]}, "space.tasks.lm.model.d_model=30"),
    ("tasks.diffusion.optim.lr", {"choice": [1e-3]}, "not a key of task 'lm'"),
])
def test_bad_space_is_named_before_any_trial(key, dim, fragment):
    sweep = SweepConfig.model_validate({**SPACE, "space": {key: dim}})
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(), "lm", sweep)
    assert fragment in str(err.value)


def test_bad_dimension_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "space": {"tasks.lm.optim.lr": {"loguniform": [0.0, 1e-3]}}}))
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_sweep(path)


def test_dvc_command_composes_into_a_valid_config():
    cmd = dvc_command({"tasks.lm.optim.lr": 0.0012345678, "tasks.lm.trainer.global_batch_size": 16})
    assert cmd == "dvc exp run -S tasks.lm.optim.lr=0.001235 -S tasks.lm.trainer.global_batch_size=16"
    overrides = [part for part in cmd.split() if "=" in part]
    cfg = validate(apply_overrides(tiny_raw(), overrides))
    assert cfg.task("lm").trainer.global_batch_size == 16 and cfg.task("lm").optim.lr == pytest.approx(0.001235)


@pytest.mark.e2e
def test_tune_sweep_every_trial_an_mlflow_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tests.e2e_project import run_ok, tiny_project

    project = tiny_project(tmp_path / "project")
    run_ok([sys.executable, "-m", "stages.prepare", "lm"], project)
    run_ok([sys.executable, "-m", "stages.shard", "lm"], project)
    (project / "space.yaml").write_text(yaml.safe_dump(SPACE))
    env = {**os.environ, "PYTHONPATH": str(project), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "lm", "--space", "space.yaml", "--seed", "0",
                           "--trials", "4"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    command = out.split("train it through the pipeline:\n")[1].splitlines()[0]
    assert command.startswith("dvc exp run -S ")
    validate(apply_overrides(yaml.safe_load((project / "params.yaml").read_text()),
                             [p for p in command.split() if "=" in p]))
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    try:
        client = MlflowClient()
        exp = client.get_experiment_by_name("pipeline")
        (parent,) = client.search_runs([exp.experiment_id], "tags.sweep LIKE 'sweep-lm-%' AND attributes.run_name "
                                                            "LIKE 'sweep-lm-%'")
        trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(trials) == 4
        for t in trials:
            assert {"tasks.lm.optim.lr", "tasks.lm.model.d_model"} <= set(t.data.params)
            assert "val_loss" in t.data.metrics
        best = min(t.data.metrics["val_loss"] for t in trials)
        assert parent.data.metrics["best_val_loss"] == pytest.approx(best)
        assert parent.data.tags["best_command"] == command
    finally:
        mlflow.set_tracking_uri(None)
