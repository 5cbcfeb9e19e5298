"""Node loss on a multi-node Ray cluster (ray.cluster_utils.Cluster: a head and three 1-CPU
worker nodes on this machine). Training on 2 workers loses a worker's whole node at a random
moment after its first checkpoint; Ray Train's FailureConfig restarts the group on the nodes
left, the loop resumes from the last checkpoint (model, optimizer, scheduler, RNG and reader
position), and the final weights equal an uninterrupted run's bit for bit.

The cluster runs in a subprocess (this file as a script) so the test process's own Ray, if
other tests started one, is left alone."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.namespace_hosts import covered_across_hosts

pytestmark = pytest.mark.e2e


@covered_across_hosts("test_multi_host_worker_host_killed_mid_run_resumes_from_s3_with_the_same_weights")
def test_node_killed_mid_training_resumes_exactly(built_data, tmp_path):
    shards = built_data[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.test_fault_tolerance", str(shards["lm"]), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert 10 <= report["killed_after_step"] < 120  # after the first checkpoint, before the end
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in proc.stdout.splitlines()
               if "resumed from step" in line]
    assert resumed, "the restarted workers did not resume from a checkpoint:\n" + proc.stdout[-3000:]
    assert report["killed_after_step"] <= resumed[0] < 120 and resumed[0] % 10 == 0
    # the one-line summary blames the worker that died, not the survivor's collective cut short;
    # the survivor's gloo traceback is left out of the log
    failed = [line for line in proc.stdout.splitlines() if "training attempt 1 of 3 failed" in line]
    assert failed and ("died" in failed[0] or "became unreachable" in failed[0]) \
        and "RuntimeError" not in failed[0], proc.stdout[-3000:]
    assert "gloo/transport" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    # nor Ray Train's controller's traceback of its failed shutdown of the group (pipeline/quiet.py)
    assert "Graceful shutdown of backend failed" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert report["steps"] == [120, 120]
    assert report["equal"], f"weights differ from the uninterrupted run: max |diff| {report['max_diff']}"


def _run(shards: Path, out: Path) -> None:
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # a busy machine starts it slowly
    import ray
    import torch
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
    from safetensors.torch import load_file

    from pipeline.config import validate
    from pipeline.runtime.connect import WORKER_ENV, worker_runtime_env
    from pipeline.runtime.recovery import registered_step
    from pipeline.runtime.trainer import fit
    from pipeline.training.checkpoint import WEIGHTS, read_meta
    from tests.conftest import tiny_raw

    os.environ.update(WORKER_ENV)
    from pipeline.runtime.local_group import free_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": free_port()})  # not a fixed 8265
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]  # 2 for training, 1 to restart on
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=worker_runtime_env())
    cfg = validate(tiny_raw(["tasks.lm.trainer.max_steps=120", "tasks.lm.trainer.ckpt_every=10",
                             "tasks.lm.trainer.log_every=10", f"cluster.storage_path={out / 'runs'}",
                             "cluster.max_failures=2"]))

    def weights(result) -> tuple[dict, int]:
        assert result.error is None, result.error
        with result.checkpoint.as_directory() as d:
            return load_file(str(Path(d) / WEIGHTS)), read_meta(Path(d))["step"]

    report: dict = {}
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fit(cfg, "lm", str(shards), "killed")))
    thread.start()
    run_dir = out / "runs" / "killed"
    # A checkpoint counts once Ray Train's controller has registered it (its snapshot file lists
    # it); a directory on disk that the controller never took in is not one to resume from.
    after = 10 * random.randint(1, 4)  # the node goes at a random step after the first checkpoint
    while (registered := registered_step(run_dir)) < after:
        assert thread.is_alive(), "training ended before a node could be killed"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.3))
    report["killed_after_step"] = registered
    victim_id = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0].node_id
    victim = next(n for n in nodes if n.node_id == victim_id)
    cluster.remove_node(victim, allow_graceful=False)
    started = time.time()
    thread.join()
    report["recovery_and_rest_s"] = time.time() - started
    killed, steps_killed = weights(box["result"])
    straight, steps_straight = weights(fit(cfg, "lm", str(shards), "straight"))
    report["steps"] = [steps_killed, steps_straight]
    report["equal"] = all(torch.equal(killed[k], straight[k]) for k in straight)
    report["max_diff"] = max(float((killed[k] - straight[k]).abs().max()) for k in straight)
    (out / "report.json").write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


def test_workers_that_cannot_start_end_the_run_in_one_line(built_data, tmp_path):
    """A node where every worker dies as it starts (here its processes' setup hook raises, as a
    node that cannot import the code does): Ray Train's default retried the start for ever inside
    one `fit` (67 starts in two minutes, never returning). With `cluster.start_attempts=3` the run
    ends after three starts with one line naming the cause."""
    _, shards = built_data
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.test_fault_tolerance", "cannot-start", str(shards["lm"]),
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["error"].startswith("ClusterUnavailable: [lm] the workers could not be started (3 attempts, "
                                      "cluster.start_attempts): WorkerGroupStartupFailedError"), report
    assert "\n" not in report["error"]
    assert report["starts"] == 3, report  # each attempt started one worker on the broken node, then gave up


def _cannot_start(shards: Path, out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import validate
    from pipeline.runtime.connect import WORKER_ENV, worker_runtime_env
    from pipeline.runtime.trainer import fit
    from tests.conftest import tiny_raw

    os.environ.update(WORKER_ENV)
    starts = out / "starts.log"
    starts.touch()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=1, env_vars={"PIPELINE_TEST_STARTS": str(starts)})
    cluster.wait_for_nodes()
    # every process of the job runs the hook: those on the broken node (the only one with CPUs) fail
    hook = "tests.test_fault_tolerance.maybe_fail"
    ray.init(address=cluster.address, runtime_env={**worker_runtime_env(), "worker_process_setup_hook": hook})
    cfg = validate(tiny_raw([f"cluster.storage_path={out / 'runs'}", "cluster.num_workers=1",
                             "cluster.start_attempts=3"]))
    try:
        fit(cfg, "lm", str(shards), "cannot-start")
        error = "none"
    except Exception as e:  # (the report says what it was)
        error = f"{type(e).__name__}: {e}"
    (out / "report.json").write_text(json.dumps({"error": error, "starts": len(starts.read_text().split())}))
    ray.shutdown()
    cluster.shutdown()


def test_only_start_failures_are_reported_as_workers_that_could_not_start():
    """Ray retries two controller errors (a worker group that failed to start, or found no room in
    time) `cluster.start_attempts` times; any other controller error (the controller's checkpoint
    list on a full disk) is raised at its first occurrence and keeps its own message, not the
    start-attempts line."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    from pipeline.runtime.trainer import _startup_failure

    assert _startup_failure(ControllerError(WorkerGroupStartupFailedError("a worker died starting")))
    assert _startup_failure(ControllerError(WorkerGroupStartupTimeoutError(2)))
    assert not _startup_failure(ControllerError(OSError(28, "No space left on device")))
    assert not _startup_failure(OSError(28, "No space left on device"))


def maybe_fail() -> None:
    """The job's setup hook: the project's own; on the broken node, a start counted and failed."""
    from pipeline.quiet import quiet_ray_worker

    quiet_ray_worker()
    if os.environ.get("PIPELINE_TEST_STARTS"):
        with open(os.environ["PIPELINE_TEST_STARTS"], "a") as f:
            f.write("start\n")
        raise RuntimeError("this node cannot set up a worker")


if __name__ == "__main__":
    if sys.argv[1] == "cannot-start":
        _cannot_start(Path(sys.argv[2]).resolve(), Path(sys.argv[3]))
    else:
        _run(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
