"""An unreachable tracking server or Ray cluster stops the train stage in one line within its
configured wait, before an MLflow run is opened (not after minutes of silent retries)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.local_group import free_port
from tests.e2e_project import tiny_project


@pytest.fixture(scope="module")
def sharded_project(tmp_path_factory, built_data) -> Path:
    """A tiny project whose LM shards exist (copied from the session's built data)."""
    _, shards = built_data
    project = tiny_project(tmp_path_factory.mktemp("failfast") / "project")
    shutil.copytree(shards["lm"], project / "data/lm/shards")
    return project


def _train(project: Path, env: dict[str, str], *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(project),
            **env}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        if key not in env:
            full.pop(key, None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stages.train", "lm", *overrides], cwd=project, env=full,
                          capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


def test_damaged_tracking_uri_fails_fast_in_one_line(sharded_project):
    uri = f"http://127.0.0.1:{free_port()}"
    proc, _ = _train(sharded_project, {"MLFLOW_TRACKING_URI": uri}, "tracking.connect_timeout_s=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"checking the MLflow tracking server at {uri}" in proc.stdout
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and f"the MLflow tracking server at {uri} does not answer" in errors[0], proc.stderr
    assert "waited 3 s" in errors[0] and "nothing was trained" in errors[0]
    assert not (sharded_project / "models/lm").exists()


def test_damaged_ray_address_fails_fast_before_any_mlflow_run(sharded_project):
    address = f"127.0.0.1:{free_port()}"
    proc, _ = _train(sharded_project, {"RAY_ADDRESS": address}, "cluster.connect_timeout_s=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and f"the Ray cluster at {address} does not answer" in errors[0], proc.stderr
    assert not (sharded_project / "mlruns.db").exists()  # no MLflow run was opened for a cluster that is not there


@pytest.mark.parametrize(("address", "expected"), [
    ("http://127.0.0.1:8265", "RAY_ADDRESS is http://127.0.0.1:8265: a Jobs API (dashboard) address"),
    ("garbage", "RAY_ADDRESS is 'garbage': expected host:port"),
    ("127.0.0.1:6379x", "RAY_ADDRESS is '127.0.0.1:6379x': expected host:port"),
])
def test_damaged_ray_address_form_is_named_before_any_mlflow_run(sharded_project, address, expected):
    """A cluster address of the wrong form (the Jobs API's http address that Ray's job docs have
    users export, a typo) is one line at once: it waited 30 s and blamed DNS, or opened an MLflow
    run before Ray refused it."""
    proc, _ = _train(sharded_project, {"RAY_ADDRESS": address})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert not (sharded_project / "mlruns.db").exists()


@pytest.mark.parametrize("uri", ["garbage", "file:///tmp/mlruns", "./mlruns"])
def test_damaged_tracking_uri_form_is_named_in_one_line(monkeypatch, uri):
    """A folder as the tracking store (MLflow 3 refuses its retired file store at the first call,
    in a message the stage had to cut) is named with what to use instead, before any run."""
    from pipeline.config.schema import TrackingConfig
    from pipeline.tracking.mlflow_runs import TrackingUnavailable, check_reachable

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingUnavailable, match=r"^MLFLOW_TRACKING_URI is .*: a folder, which this MLflow refuses "
                                                  r"as a store .*use sqlite:///path/mlruns.db"):
        check_reachable(TrackingConfig())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's way to keep it
    check_reachable(TrackingConfig())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    for other in ("databricks", "sqlite:///x/mlruns.db"):  # scheme-less or not, not a folder
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
        check_reachable(TrackingConfig())


def test_damaged_home_stops_the_local_ray_in_one_line_before_any_mlflow_run(sharded_project):
    """A local Ray that cannot write its auth token (HOME missing or read-only, as in some batch
    and container setups) names where and what to set, and no MLflow run is opened first."""
    proc, _ = _train(sharded_project, {"HOME": "/proc/no-such-home"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cannot start the local Ray" in errors[0] and "set HOME to a writable folder" \
        in errors[0], proc.stderr[-3000:]
    assert not (sharded_project / "mlruns.db").exists()


def test_non_finite_stop_is_not_retried_and_ends_in_one_line(sharded_project):
    """Non-finite losses in a row stop the loop (`NonFiniteError`); resume is exact, so every retry
    would replay the same steps into the same divergence: one attempt, one line, exit 2 (it was
    retried `cluster.max_failures` times and ended in Ray's 80-line traceback, exit 1)."""
    proc, _ = _train(sharded_project, {}, "tasks.lm.optim.lr=1e5", "tasks.lm.trainer.grad_clip=0",
                     "tasks.lm.optim.warmup_steps=0", "tasks.lm.trainer.max_nonfinite_in_a_row=2",
                     "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.ckpt_every=2", "cluster.max_failures=2",
                     "cluster.storage_path=runs/nonfinite")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "training attempt" not in proc.stdout and proc.stdout.count("worker(s) on") == 1, proc.stdout[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error [train lm]: [lm] 2 steps in a row had a non-finite loss"), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "WorkerGroupError" not in proc.stderr, proc.stderr[-3000:]
    assert not (sharded_project / "models/lm").exists()
    # the failed run, which never reached a checkpoint, still says what ran (tagged live by rank 0)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sharded_project / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"], runs
    assert runs[0].data.tags.get("impl.strategy", "").startswith("ddp"), runs[0].data.tags
