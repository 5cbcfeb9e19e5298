"""Interrupted runs lose nothing: the train stage killed with SIGKILL resumes to the weights of
an uninterrupted run, and a real `mlflow server` going down mid-training loses no metric."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e_project import mlflow_server, prepared_project, run_ok

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prepared_lm(tmp_path_factory) -> Path:
    """A tiny project with the lm data prepared and sharded; each test trains in its own copy."""
    return prepared_project(tmp_path_factory.mktemp("recovery") / "project")


def _copy(prepared: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(prepared, dest, symlinks=True))


def test_killed_training_resumes_when_rerun(prepared_lm, tmp_path):
    """SIGKILL the train stage (driver, Ray and workers) after its first checkpoint; the rerun
    resumes, and its final weights are exactly those of an uninterrupted run."""
    import signal
    import time

    project = _copy(prepared_lm, tmp_path / "project")
    args = [sys.executable, "-m", "stages.train", "lm", "tasks.lm.trainer.max_steps=24",
            "tasks.lm.trainer.ckpt_every=4", "tasks.lm.trainer.log_every=4"]
    env = {**os.environ, "PYTHONPATH": str(project)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((project / "runs/ray").glob("*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models/lm").exists()  # nothing half-written for later stages to trust

    out = run_ok(args, project)
    resumed = [line for line in out.splitlines() if "resumed from step" in line]
    assert resumed, out[-3000:]
    step = int(resumed[0].split("resumed from step ")[1].split()[0])
    assert 4 <= step < 24 and step % 4 == 0
    assert "[lm] trained 24 steps" in out
    from safetensors.torch import load_file

    resumed_weights = load_file(str(project / "models/lm/model.safetensors"))
    run_ok([*args, "cluster.storage_path=runs/uninterrupted"], project)  # the same run, from step 0, in one go
    whole = load_file(str(project / "models/lm/model.safetensors"))
    assert resumed_weights.keys() == whole.keys()
    assert all(np.array_equal(resumed_weights[k].numpy(), whole[k].numpy()) for k in whole), "resume changed weights"



def test_tracking_server_down_during_training_loses_nothing(prepared_lm, tmp_path):
    """A real `mlflow server` (SQLite store) on 127.0.0.1 goes down while the train stage runs,
    at a random step after the first metrics arrived live: training finishes, the stage stops
    with one line naming the server, the final checkpoint is kept and no model is written; with
    the server back, the rerun resumes the finished run (no retraining) and fills in the rest of
    the history, so the run holds every step once, equal to the steps the training computed.
    Then evaluate, export and register run against the server, and the registered model loads
    from it."""
    import signal
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.runtime.local_group import free_port

    project = _copy(prepared_lm, tmp_path / "project")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    args = [sys.executable, "-m", "stages.train", "lm", f"tracking.uri={uri}", "tasks.lm.trainer.max_steps=30",
            "tasks.lm.trainer.ckpt_every=10", "tasks.lm.trainer.log_every=5"]
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    live_before_kill = random.randint(1, 3)  # the server goes down after this many logged steps
    client = MlflowClient(uri)
    try:
        deadline = time.time() + 300
        while True:  # the metrics arrive while the stage trains (live), not after the fit
            assert proc.poll() is None and time.time() < deadline, "training ended before the server went down"
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and len(seen := client.get_metric_history(runs[0].info.run_id, "train/loss")) >= live_before_kill:
                assert runs[0].info.status == "RUNNING"
                break
            time.sleep(0.3)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    live_steps = {m.step: m.value for m in seen}
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("error [train lm]")]
    assert error and "training finished, but logging run" in error[0] and uri in error[0], out[-3000:]
    assert not (project / "models/lm").exists()  # nothing for later stages to trust
    run_dirs = [d for d in (project / "runs/ray").iterdir() if (d / "mlflow_run_id").is_file()]
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("checkpoint_*"))  # the checkpoints are kept
    first_run_id = (run_dirs[0] / "mlflow_run_id").read_text().strip()

    server = mlflow_server(tmp_path, port)
    try:
        out = run_ok(args, project)
        assert "[lm] resumed from step 30" in out and "[lm] trained 30 steps" in out
        mlflow.set_tracking_uri(uri)
        info = json.loads((project / "models/lm/run.json").read_text())
        assert info["run_id"] == first_run_id
        # The run's whole history, step for step and key for key, is the checkpoint's (the steps
        # the training computed), each step once: the part sent live before the outage, the rest
        # filled in after it.
        import csv

        computed = list(csv.DictReader((project / "metrics/lm/train_history.csv").open()))
        assert [int(r["step"]) for r in computed] == [5, 10, 15, 20, 25, 30]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            logged = sorted((m.step, m.value) for m in MlflowClient().get_metric_history(first_run_id, f"train/{key}"))
            assert logged == [(int(r["step"]), pytest.approx(float(r[key]))) for r in computed], key
        assert all(v == pytest.approx(float(next(r["loss"] for r in computed if int(r["step"]) == s)))
                   for s, v in live_steps.items())
        _registry_through_server(project, uri, tmp_path / "artifacts", first_run_id)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        mlflow.set_tracking_uri(None)  # (set_tracking_uri also sets the environment: not for the next test)


def _registry_through_server(project: Path, uri: str, artifacts: Path, run_id: str) -> None:
    """evaluate, export and register (twice) against a real tracking server: the logged model's files
    are listed in the server's artifact store before a version exists; the second register finds the
    version it made (no copy); the champion loads and predicts through the server, its files live in
    the server's artifact store, and lineage reads it."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    for stage in ("evaluate", "export", "register"):
        out = run_ok([sys.executable, "-m", f"stages.{stage}", "lm", f"tracking.uri={uri}"], project)
    assert "now champion" in out
    out = run_ok([sys.executable, "-m", "stages.register", "lm", f"tracking.uri={uri}"], project)
    assert "already registered as pipeline-lm v1" in out and "alias challenger; champion\n" in out
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='pipeline-lm'")] == ["1"]
    client = MlflowClient()
    assert client.get_model_version_by_alias("pipeline-lm", "champion").version in (1, "1")
    assert client.get_model_version_by_alias("pipeline-lm", "challenger").version in (1, "1")
    champion = client.get_model_version_by_alias("pipeline-lm", "champion")
    assert champion.run_id == run_id and champion.tags["metric_name"] == "val_loss"
    assert "val_loss" in champion.description  # the version says what it scored
    assert "eval/val_perplexity" in client.get_run(run_id).data.metrics
    model = mlflow.pyfunc.load_model("models:/pipeline-lm@champion")
    completion = model.predict(pd.DataFrame({"prompt": ["The for statement"]}), params={"max_new_tokens": 4})
    # some text (a tiny model trained on indented docs may well continue with blanks: cleaning keeps indentation)
    assert len(completion) == 1 and completion["completion"][0], completion
    assert list(artifacts.rglob("model.int8.onnx")) and list(artifacts.rglob("MLmodel"))  # proxied to the server
    shown = run_ok([sys.executable, "-m", "pipeline", "lineage", "pipeline-lm@champion", "--tracking-uri", uri],
                   project)
    assert run_id in shown and "input      lm-raw:" in shown



def _stage_env(project: Path) -> dict[str, str]:
    """The environment `run_ok` gives a stage, for a stage expected to fail."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(project),
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}
    env.pop("RAY_ADDRESS", None)
    return env


def _only_run(project: Path):
    """The MLflow run (in the project's SQLite store) of the one Ray run under runs/ray."""
    from mlflow.tracking import MlflowClient

    run_dirs = [d for d in (project / "runs/ray").iterdir() if (d / "mlflow_run_id").is_file()]
    assert len(run_dirs) == 1, run_dirs
    run_id = (run_dirs[0] / "mlflow_run_id").read_text().strip()
    return MlflowClient(f"sqlite:///{project / 'mlruns.db'}").get_run(run_id)


def test_failed_horovod_training_ends_its_run_failed_in_one_line(prepared_lm, tmp_path):
    """A Horovod training that fails (here: it diverges, and stops on non-finite losses) ended its
    MLflow run FINISHED, the error raised only after the run was closed, as an 85-line traceback.
    Now the run ends FAILED, the stage says why in one line, and the run carries what was known
    before training (model.parameters), though no checkpoint was written. The training node's
    system metrics reach the run as under Ray Train (Horovod's workers sampled none), and half a
    CPU per worker is reserved as configured (it asked Ray for a whole one each)."""
    project = _copy(prepared_lm, tmp_path / "project")
    args = [sys.executable, "-m", "stages.train", "lm", "strategy.name=horovod", "strategy.backend=gloo",
            "cluster.max_failures=0", "tasks.lm.optim.lr=1e5", "tasks.lm.trainer.grad_clip=0",
            "tasks.lm.optim.warmup_steps=0", "tasks.lm.trainer.max_nonfinite_in_a_row=2",
            "tasks.lm.trainer.log_every=1", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5"]
    env = {**_stage_env(project), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}  # (the run lasts seconds)
    proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error [train lm]")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "non-finite loss" in errors[0], errors[0]
    run = _only_run(project)
    assert run.info.status == "FAILED"
    assert int(run.data.tags["model.parameters"]) > 0
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/node-")}
    assert len(nodes) == 1, sorted(run.data.metrics)  # (one node's local rank 0)


def test_ctrl_c_during_training_ends_the_run_killed(prepared_lm, tmp_path):
    """Ctrl-C (SIGINT to the stage's whole process group, as a terminal sends it) while it trains:
    the MLflow run ends KILLED, MLflow's convention for a run its user stopped (it was FAILED, and
    the stage said nothing), one line says that rerunning resumes, and the checkpoints stay."""
    import signal
    import time

    project = _copy(prepared_lm, tmp_path / "project")
    args = [sys.executable, "-m", "stages.train", "lm", "tasks.lm.trainer.max_steps=100000",
            "tasks.lm.trainer.ckpt_every=4", "tasks.lm.trainer.log_every=4"]
    proc = subprocess.Popen(args, cwd=project, env=_stage_env(project), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not list((project / "runs/ray").glob("*/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)  # (not minutes: the run's end is bounded)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, out[-3000:]
    interrupted = [line for line in out.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1 and "KILLED" in interrupted[0] and "resume" in interrupted[0], out[-3000:]
    run = _only_run(project)
    assert run.info.status == "KILLED"
    assert list(next((project / "runs/ray").iterdir()).glob("checkpoint_*"))
