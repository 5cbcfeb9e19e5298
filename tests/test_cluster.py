"""A real Ray head (`ray start --head` on 127.0.0.1) and the Jobs API: `pipeline submit` runs
`dvc repro` for the LM chain on it, streams its log and its metrics land in MLflow; a failing
job is reported with its log tail and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.local_head import LocalHead
from tests.test_e2e import _tiny_project

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    with LocalHead(num_cpus=2) as head:
        yield head.jobs_address


def _pipeline(args: list[str], project: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_dvc_repro_to_a_cluster(ray_head, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    project = _tiny_project(tmp_path / "project")
    store = f"sqlite:///{tmp_path}/jobs.db"
    proc = _pipeline(["submit", "--address", ray_head, "--env", f"MLFLOW_TRACKING_URI={store}", "--id", "lm-repro",
                      "--", "dvc", "repro", "train@lm"], project)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "submitted lm-repro" in out and "lm-repro: SUCCEEDED" in out
    # the log was streamed: DVC ran the chain on the cluster, and training joined that cluster
    assert "Running stage 'prepare@lm'" in out and "[lm] trained 6 steps" in out
    assert "training on Ray cluster at" in out
    status = _pipeline(["status", "lm-repro", "--address", ray_head], project)
    assert status.returncode == 0 and "lm-repro: SUCCEEDED" in status.stdout

    mlflow.set_tracking_uri(store)
    try:
        (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("pipeline").experiment_id])
        assert run.data.tags["cluster.workers"] == "2" and run.data.tags["ray.cluster"].startswith("Ray cluster at")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout
        assert run.data.tags["git.commit"] == head.strip()  # .git travelled with the working_dir
        assert len(MlflowClient().get_metric_history(run.info.run_id, "train/loss")) == 4
    finally:
        mlflow.set_tracking_uri(None)


def test_failed_job_exits_non_zero_with_its_log_tail(ray_head, tmp_path):
    project = _tiny_project(tmp_path / "project")
    proc = _pipeline(["submit", "--address", ray_head, "--", "python", "-m", "stages.train", "lm",
                      "tasks.lm.trainer.max_steps=3"], project)
    assert proc.returncode == 1
    # the shards were never built on the cluster: the stage's own one-line error comes back in the tail
    assert "FAILED" in proc.stderr and "last lines of its log" in proc.stderr
    assert "error [train lm]" in proc.stderr and "shards" in proc.stderr, proc.stderr[-3000:]


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    project = _tiny_project(tmp_path / "project")
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 1337", "seed: -1"))
    proc = _pipeline(["submit", "--address", "http://127.0.0.1:9", "--no-wait"], project, timeout=120)
    assert proc.returncode == 2 and "seed" in proc.stderr and "submitted" not in proc.stdout
