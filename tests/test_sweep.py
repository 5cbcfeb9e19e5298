"""Running Ray Tune sweeps: a real Tune run (Optuna + ASHA on a local Ray) makes every trial an
MLflow run under one parent; failed, interrupted and concurrent runs; what stops a sweep before
Ray or MLflow is taken. The search space and its checks are `tests/test_sweep_space.py`'s."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, validate
from pipeline.config.loading import apply_overrides
from pipeline.flows.sweep import scored, tune_storage
from tests.conftest import ROOT, tiny_raw
from tests.test_sweep_space import SPACE, SPACE_LR


@pytest.mark.parametrize(("storage", "expected"), [
    ("s3://bucket", "s3://bucket/tune"),  # (was s3://tune: another bucket)
    ("s3://bucket/prefix/", "s3://bucket/prefix/tune"),
    ("gs://b", "gs://b/tune"),
])
def test_tune_storage_stays_under_the_configured_root(storage, expected):
    assert tune_storage(validate(tiny_raw([f"cluster.storage_path={storage}"]))) == expected


def test_tune_storage_of_a_local_path_stays_where_it_was(tmp_path):
    # beside the Ray Train runs, as before, so a local sweep interrupted before this change still resumes
    assert tune_storage(validate(tiny_raw([f"cluster.storage_path={tmp_path / 'runs' / 'ray'}"]))) == \
        str(tmp_path / "runs" / "tune")


def test_unreachable_tracking_server_stops_the_sweep_before_ray(tmp_path, monkeypatch, built_data):
    import socket
    import time

    import ray

    from pipeline.flows.sweep import run_sweep
    from pipeline.tracking.mlflow_runs import TrackingUnavailable

    _, shards = built_data
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(["tracking.connect_timeout_s=2"])))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    was_up = ray.is_initialized()
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}"):
        run_sweep(params, "lm", tmp_path / "space.yaml", shards["lm"], 2, 0)
    assert time.monotonic() - start < 60
    assert ray.is_initialized() == was_up  # Ray was not started for a sweep that could not record anything


def test_trials_ranked_are_those_with_a_finite_validation_loss():
    """A trial that ended with a NaN validation loss was picked as best when it came first (every
    comparison with NaN is false, so min kept it); failed trials and trials without a loss are out."""
    from types import SimpleNamespace

    trials = [SimpleNamespace(error=None, metrics={"val_loss": float("nan")}, name="diverged"),
              SimpleNamespace(error=None, metrics={"val_loss": 2.5}, name="good"),
              SimpleNamespace(error=RuntimeError("x"), metrics={"val_loss": 1.0}, name="failed"),
              SimpleNamespace(error=None, metrics={}, name="none"),
              SimpleNamespace(error=None, metrics={"val_loss": 3.0}, name="worse")]
    assert [t.name for t in scored(trials)] == ["good", "worse"]
    assert min(scored(trials), key=lambda t: t.metrics["val_loss"]).name == "good"


def test_tune_sweep_every_trial_an_mlflow_run(prepared_lm, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    project, env = _sweep_project(prepared_lm, tmp_path, SPACE)
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
            # at the training steps of its validations (3, 6, ...), as a train run's, not 1, 2, 3
            steps = [m.step for m in client.get_metric_history(t.info.run_id, "val_loss")]
            assert steps and all(step % SPACE["eval_every"] == 0 for step in steps), steps
        best = min(t.data.metrics["val_loss"] for t in trials)
        assert parent.data.metrics["best_val_loss"] == pytest.approx(best)
        assert parent.data.tags["best_command"] == command
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def prepared_lm(tmp_path_factory):
    """A tiny project with the lm data prepared and sharded, made once for this module's sweeps;
    each sweep runs in its own copy (its own params, space, Tune state and MLflow store)."""
    from tests.e2e_project import prepared_project

    return prepared_project(tmp_path_factory.mktemp("sweep") / "project")


def _sweep_project(prepared, tmp_path, space: dict):
    import shutil
    from pathlib import Path

    project = Path(shutil.copytree(prepared, tmp_path / "project", symlinks=True))
    (project / "space.yaml").write_text(yaml.safe_dump(space))
    env = {**os.environ, "PYTHONPATH": str(project), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return project, env


def _runs(project):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    try:
        client = MlflowClient()
        exp = client.get_experiment_by_name("pipeline")
        if exp is None:  # (not created yet)
            return [], {}
        parents = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'sweep-lm-%'")
        trials = {p.info.run_id: client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
                  for p in parents}
        return parents, trials
    finally:
        mlflow.set_tracking_uri(None)


# each value valid alone (72 over the base's 2 heads, 16 heads of the base's 64); 72 with 16 heads is
# not. The seed makes the product of the choices larger than the combinations checked up front, so
# the bad ones fail in their trials
HEADS_SPACE = {**SPACE, "max_steps": 6, "eval_every": 3, "grace_period": 3,
               "space": {"tasks.lm.model.d_model": {"choice": [72]}, "tasks.lm.model.n_heads": {"choice": [2, 16]},
                         "seed": {"choice": list(range(33))}}}


@pytest.mark.e2e
def test_failed_trials_are_reported_and_all_failed_is_one_line(prepared_lm, tmp_path):
    project, env = _sweep_project(prepared_lm, tmp_path, HEADS_SPACE)
    some = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "lm", "--space", "space.yaml", "--seed", "1",
                           "--trials", "4"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    out = some.stdout + some.stderr
    assert some.returncode == 0, out[-5000:]
    (line,) = [ln for ln in some.stdout.splitlines() if "trials failed; the first: " in ln]
    failed = int(line.split("] ")[1].split(" of 4")[0])
    assert 0 < failed < 4 and "ConfigError" in line and "n_heads" in line, out[-5000:]
    summary = next(ln for ln in some.stdout.splitlines() if "stopped early by ASHA" in ln)
    stopped = int(summary.split("trials, ")[1].split(" stopped")[0])
    assert stopped <= 4 - failed  # failed trials are not counted as stopped by ASHA
    # the same command again: a finished sweep trains nothing again, its failed trials included
    (parent,), trials = _runs(project)
    again = subprocess.run(some.args, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert "this sweep finished before" in again.stdout and "resuming" not in again.stdout, again.stdout[-3000:]
    assert [ln for ln in again.stdout.splitlines() if "trials failed; the first: " in ln] == [line]
    (same,), after = _runs(project)
    assert same.info.run_id == parent.info.run_id
    assert sorted(t.info.run_id for t in after[parent.info.run_id]) == sorted(t.info.run_id for t in trials[
        parent.info.run_id])

    all_bad = {**HEADS_SPACE, "space": {"tasks.lm.model.d_model": {"choice": [72]},
                                        "tasks.lm.model.n_heads": {"choice": [16]},
                                        "seed": {"choice": list(range(65))}}}
    (project / "space.yaml").write_text(yaml.safe_dump(all_bad))
    none = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "lm", "--space", "space.yaml", "--seed", "0",
                           "--trials", "2"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    lines = none.stderr.strip().splitlines()
    assert none.returncode == 2, (none.stdout + none.stderr)[-5000:]
    assert lines[-1].startswith("error: every trial failed (2 of 2); the first: ConfigError: "), none.stderr[-5000:]
    # (Ray's own log of each trial's error stays above it; no traceback of the sweep itself)
    assert "n_heads" in lines[-1] and "RuntimeError" not in none.stderr, none.stderr[-5000:]
    parents, _ = _runs(project)
    status = {p.data.params.get("num_samples"): p.info.status for p in parents}
    assert status == {"4": "FINISHED", "2": "FAILED"}, status


@pytest.mark.e2e
def test_interrupted_sweep_records_no_best_and_resumes(prepared_lm, tmp_path):
    """Ctrl-C while trials run: exit 130 and one line saying how many finished and how to resume;
    no best on the parent run, which ends KILLED, as do the unfinished trial runs. The same command
    again resumes (same parent run) and finishes the sweep."""
    import signal
    import time

    # 120 steps (about 8 s on 2 cores): a trial reports its first validation at step 3 and is still
    # running when the signal comes half a second later (both unfinished: checked below), and the
    # resumed trials have little left to train
    space = {**SPACE, "num_samples": 2, "max_steps": 120, "eval_every": 3, "grace_period": 120,
             "space": {"tasks.lm.optim.lr": {"loguniform": [3e-4, 3e-3]}}}
    project, env = _sweep_project(prepared_lm, tmp_path, space)
    cmd = [sys.executable, "-m", "pipeline", "sweep", "lm", "--space", "space.yaml", "--seed", "0"]
    log = (project / "sweep.log").open("w")
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if " | val " in (project / "sweep.log").read_text():  # (the log: reading the store races its creation)
                break  # a trial is running and has reported
            time.sleep(0.5)
        assert proc.poll() is None, (project / "sweep.log").read_text()[-5000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (project / "sweep.log").read_text()
    assert rc == 130, out[-5000:]
    (line,) = [ln for ln in out.splitlines() if "] interrupted: " in ln]
    assert "0 of 2 trials finished, no best recorded" in line and "run the same command again to resume" in line
    assert "best val_loss" not in out and "train it through the pipeline" not in out
    (parent,), trials = _runs(project)
    assert parent.info.status == "KILLED" and "best_val_loss" not in parent.data.metrics
    assert "best_command" not in parent.data.tags
    assert trials[parent.info.run_id] and all(t.info.status != "RUNNING" for t in trials[parent.info.run_id])

    again = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert "resuming 2 trials" in again.stdout
    (resumed,), trials = _runs(project)  # no second parent run
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert "best_val_loss" in resumed.data.metrics
    command = again.stdout.split("train it through the pipeline:\n")[1].splitlines()[0]

    third = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)  # finished
    assert third.returncode == 0, (third.stdout + third.stderr)[-5000:]
    assert f"this sweep finished before (MLflow parent run {parent.info.run_id}): reporting its result" in third.stdout
    assert third.stdout.split("train it through the pipeline:\n")[1].splitlines()[0] == command
    (same,), after = _runs(project)  # nothing trained again: no new parent, no new trial runs
    assert same.info.run_id == parent.info.run_id and same.info.status == "FINISHED"
    assert sorted(t.info.run_id for t in after[same.info.run_id]) == sorted(t.info.run_id for t in trials[
        parent.info.run_id])
    assert same.data.metrics["best_val_loss"] == resumed.data.metrics["best_val_loss"]


def test_a_second_run_of_a_running_sweep_is_refused(tmp_path, monkeypatch, built_data):
    """Two runs of one sweep command would resume the same Tune state and MLflow parent, the second
    ending the first's running trials: while one runs (its lock held in this process), the same
    command in another process is one line, before Ray or MLflow; the lock is free once it ends."""
    from pipeline.flows import sweep as sweep_flow

    _, shards = built_data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE_LR))
    (tmp_path / "data" / "lm").mkdir(parents=True)
    (tmp_path / "data" / "lm" / "shards").symlink_to(shards["lm"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/never.db"}
    env.pop("RAY_ADDRESS", None)
    second = {}

    def run_while_holding(cfg, task, sweep, sweep_file, shards, seed, name, path):
        second["proc"] = subprocess.run(
            [sys.executable, "-m", "pipeline", "sweep", "lm", "--space", "space.yaml", "--trials", "2", "--seed", "0"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        second["name"], second["path"] = name, path
        return "ran"

    monkeypatch.setattr(sweep_flow, "_run_locked", run_while_holding)
    assert sweep_flow.run_sweep(tmp_path / "params.yaml", "lm", tmp_path / "space.yaml", tmp_path / "data/lm/shards",
                                2, 0) == "ran"
    proc = second["proc"]
    assert proc.returncode != 0, proc.stdout
    assert f"{second['name']}: this sweep is already running in another process" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout, proc.stderr
    assert not (tmp_path / "never.db").exists()  # no MLflow store touched by the refused run
    with sweep_flow._only_run_of(second["name"], second["path"]):  # released when the first ended
        pass


@pytest.mark.parametrize(("override", "fragment"), [
    ("precision.dtype=fp8", "precision.dtype: fp8 needs a GPU"),  # the config checks (check_task_config)
    ("tasks.lm.optim.impl=apex", "tasks.lm.optim.impl: 'apex' was asked for"),  # this machine's (check_kernels)
])
def test_what_the_train_stage_refuses_stops_the_sweep_before_ray_and_mlflow(tmp_path, monkeypatch, built_data,
                                                                            override, fragment):
    import ray

    from pipeline.flows.sweep import run_sweep
    from pipeline.training import optim

    monkeypatch.setattr(optim, "apex_available", lambda: False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw([override, f"cluster.storage_path={tmp_path / 'runs' / 'ray'}"])))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE_LR))
    was_up = ray.is_initialized()
    with pytest.raises(ConfigError) as err:
        run_sweep(params, "lm", tmp_path / "space.yaml", built_data[1]["lm"], 2, 0)
    assert str(err.value).startswith(fragment) and "\n" not in str(err.value), err.value
    assert ray.is_initialized() == was_up and not (tmp_path / "never.db").exists()
    assert not (tmp_path / "runs").exists()  # no lock, no Tune state


def test_new_shards_are_a_new_sweep(tmp_path, monkeypatch, built_data):
    """The sweep's name (its lock, Tune state and MLflow parent) covers the data, as the train
    stage's run identity does: after new shards with the same params.yaml, the same command is a
    new sweep, not the old data's result reported again or its trials resumed on other data."""
    import json
    import shutil

    from pipeline.flows import sweep as sweep_flow

    names = []
    monkeypatch.setattr(sweep_flow, "_run_locked", lambda *args: names.append(args[-2]))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw([f"cluster.storage_path={tmp_path / 'runs' / 'ray'}"])))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE_LR))
    shards = shutil.copytree(built_data[1]["lm"], tmp_path / "shards")
    for _ in range(2):
        sweep_flow.run_sweep(params, "lm", tmp_path / "space.yaml", shards, 2, 0)
    manifest = shards / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))  # new shards: another manifest
    sweep_flow.run_sweep(params, "lm", tmp_path / "space.yaml", shards, 2, 0)
    assert names[0] == names[1] != names[2], names


@pytest.mark.parametrize(("use_gpu", "expected"), [(False, {"cpu": 3}), (True, {"cpu": 3, "gpu": 1})])
def test_a_trial_reserves_a_gpu_when_the_config_trains_on_gpus(use_gpu, expected):
    """Tune gives a trial only what it asks for: without "gpu" Ray hides every GPU from it."""
    from pipeline.flows.sweep import trial_resources

    cfg = validate(tiny_raw(["cluster.cpus_per_worker=3", f"cluster.use_gpu={str(use_gpu).lower()}"]))
    assert trial_resources(cfg) == expected


@pytest.mark.parametrize(("seed", "params_seed", "message"), [
    (-5, 1337, r"^--seed: must be from 0 to 2\*\*32 - 1 \(got -5\)$"),
    (2**32, 1337, r"^--seed: must be from 0 to 2\*\*32 - 1"),
    (None, 2**40, r"^seed: Optuna takes seeds from 0 to 2\*\*32 - 1 \(the config's is 1099511627776\); pass --seed$")])
def test_a_seed_optuna_refuses_is_named_before_ray(tmp_path, built_data, seed, params_seed, message):
    """Optuna refused it after Ray had started and the MLflow parent run was open (a FAILED parent
    left behind, and Tune state the same command then tried to resume), without naming --seed."""
    import ray

    from pipeline.flows.sweep import run_sweep

    _, shards = built_data
    raw = tiny_raw()
    raw["seed"] = params_seed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE_LR))
    was_up = ray.is_initialized()
    with pytest.raises(ConfigError, match=message):
        run_sweep(tmp_path / "params.yaml", "lm", tmp_path / "space.yaml", shards["lm"], 2, seed)
    assert ray.is_initialized() == was_up
