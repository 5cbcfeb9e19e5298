"""A real Ray head (`ray start --head` on 127.0.0.1) and the Jobs API: `pipeline submit` runs
`dvc repro` for the LM chain on it, streams its log and its metrics land in MLflow; a failing
job is reported with its log tail and a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.local_head import LocalHead
from tests.e2e_project import tiny_project
from tests.namespace_hosts import covered_across_hosts

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def local_head():
    with LocalHead(num_cpus=2) as head:
        yield head


@pytest.fixture
def ray_head(local_head):
    return local_head.jobs_address


def _pipeline(args: list[str], project: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


@covered_across_hosts("test_multi_host_lm_chain_with_ddp_registers_what_the_embedded_ray_does")
def test_submit_dvc_repro_to_a_cluster(ray_head, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    project = tiny_project(tmp_path / "project")
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
    project = tiny_project(tmp_path / "project")
    proc = _pipeline(["submit", "--address", ray_head, "--", "python", "-m", "stages.train", "lm",
                      "tasks.lm.trainer.max_steps=3"], project)
    assert proc.returncode == 1
    # the shards were never built on the cluster: the stage's own one-line error comes back in the tail
    assert "FAILED" in proc.stderr and "last lines of its log" in proc.stderr
    assert "error [train lm]" in proc.stderr and "shards" in proc.stderr, proc.stderr[-3000:]


def test_loopback_only_local_head_after_a_job(local_head):
    """The head `LocalHead` starts (for tests and for trying `pipeline submit`): every socket its
    processes listen on, after a job ran there (the failed job above; this module's tests run in
    file order), is on 127.0.0.1. The raylet and the GCS are waited for: on a busy machine the
    head answers before every service has bound its port."""
    import time

    import psutil

    from tests.test_loopback import is_loopback, listening

    root = psutil.Process(local_head.pid)
    deadline = time.time() + 60
    while True:
        sockets = listening({root.pid} | {p.pid for p in root.children(recursive=True)})
        if {"gcs_server", "raylet"} <= {name for _, _, name in sockets} or time.time() > deadline:
            break
        time.sleep(1)
    assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sockets
    assert not [s for s in sockets if not is_loopback(s[0])], sockets


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    project = tiny_project(tmp_path / "project")
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 1337", "seed: -1"))
    proc = _pipeline(["submit", "--address", "http://127.0.0.1:9", "--no-wait"], project, timeout=120)
    assert proc.returncode == 2 and "seed" in proc.stderr and "submitted" not in proc.stdout


def test_submit_waits_for_a_head_that_is_still_starting(tmp_path):
    """`pipeline submit` issued before the head is up (no dashboard yet, then no job agent yet:
    Ray's "No available agent to submit job" 500) retries with a bounded backoff and gets
    through once the head accepts jobs: the race that failed CI on a busy machine."""
    import time

    from pipeline.runtime.local_group import free_port

    project = tiny_project(tmp_path / "project")
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project),
           "PIPELINE_SUBMIT_WAIT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    early = subprocess.Popen([sys.executable, "-m", "pipeline", "submit", "--address", f"http://127.0.0.1:{port}",
                              "--id", "early", "--", "python", "-c", "print('job ran')"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)  # the first tries find nothing listening
        assert early.poll() is None, early.stdout.read()
        with LocalHead(num_cpus=1, dashboard_port=port):
            out, _ = early.communicate(timeout=600)
    finally:
        if early.poll() is None:
            early.kill()
    assert early.returncode == 0, out[-3000:]
    assert "submitted early" in out and "job ran" in out and "early: SUCCEEDED" in out, out[-3000:]


def test_submit_to_a_cluster_that_never_comes_gives_up_in_one_line(tmp_path):
    from pipeline.runtime.local_group import free_port

    project = tiny_project(tmp_path / "project")
    address = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project),
           "PIPELINE_SUBMIT_WAIT_S": "4"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", address, "--no-wait"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "submitted" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the Ray cluster at {address} did not accept the job in 4 s" in lines[0], proc.stderr


def test_submit_address_option_beats_ray_address(monkeypatch):
    """`--address` names the Jobs API to use: Ray's client would take RAY_ADDRESS over it (a stale
    or GCS-style one then won), so it is hidden while the client is made, and restored."""
    from pipeline.runtime import jobs
    from pipeline.runtime.local_group import free_port

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:7")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=re.escape(dead)):
        jobs.client(dead)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:7"
