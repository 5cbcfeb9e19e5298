"""Elastic training: a worker range is checked before any worker starts, and a run resumes at
another worker count with the same global batch and the same samples, so its per-step losses
equal an uninterrupted run's (within 1e-5 relative: a mean over another number of ranks is not
bitwise the same sum). `pytest -k elastic` selects these.

What CI proves here: a 2-worker FSDP2 checkpoint (DCP) resumed on 1 worker and on 4 (real gloo
ranks), against the uninterrupted 2-worker run; a DeepSpeed checkpoint refused at another count
in one line; the range checked at validation; a 4-node `ray.cluster_utils.Cluster` run that
loses a node, goes on with 3 workers, and grows back to 4 when a node returns.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import validate
from tests.conftest import tiny_raw

STEPS = ["tasks.lm.trainer.max_steps=8", "tasks.lm.trainer.ckpt_every=4", "tasks.lm.trainer.log_every=1",
         "tasks.lm.trainer.keep_last_k=4", "tasks.lm.trainer.eval_every=0"]


def test_elastic_range_is_checked_before_any_worker():
    from pipeline.config.elastic import check_task_elastic

    ok = validate(tiny_raw(["cluster.num_workers=4", "cluster.min_workers=2", "tasks.lm.trainer.global_batch_size=24"]))
    assert ok.cluster.min_workers == 2
    check_task_elastic(ok, "lm")
    # the train stage checks its own task's batch (the diffusion chain's 16 does not split at 3)
    with pytest.raises(ValueError, match=r"^tasks.diffusion.trainer.global_batch_size \(16\) must split evenly "
                                         r"at every worker count .* \(2..4\) .* at 3 worker\(s\); for example "
                                         r"global_batch_size=24$"):
        check_task_elastic(ok, "diffusion")
    cases = {
        ("cluster.num_workers=2", "cluster.min_workers=3"): r"^cluster.min_workers \(3\) must not exceed",
        ("cluster.num_workers=4", "cluster.min_workers=2", "strategy.name=deepspeed"):
            r"strategy.name=deepspeed: DeepSpeed cannot resume .* issue 7628",
        ("cluster.num_workers=4", "cluster.min_workers=2", "strategy=horovod"): r"strategy.name=horovod: horovod.ray",
        ("cluster.num_workers=4", "cluster.min_workers=2", "parallel.tp=2"): r"parallel.tp/parallel.pp > 1",
    }
    for overrides, message in cases.items():
        raw = tiny_raw([o for o in overrides if o != "strategy=horovod"])  # (a config group: set below)
        if "strategy=horovod" in overrides:
            raw["strategy"] = {"name": "horovod", "backend": "gloo"}
        with pytest.raises(Exception, match=message) as err:
            validate(raw)
        assert "\n" not in str(err.value).split("Value error, ")[-1].strip().split("\n")[0]
    # min_workers == num_workers is a fixed count: nothing to check
    assert validate(tiny_raw(["cluster.num_workers=3", "cluster.min_workers=3"])).cluster.min_workers == 3


def test_elastic_deepspeed_checkpoint_at_another_count_is_one_line(tmp_path):
    """The loop's check before loading: a backend that cannot redistribute its state stops the
    run with one line naming both counts and the way out; the others load."""
    from pipeline.distributed.ddp import DDPStrategy
    from pipeline.distributed.deepspeed import DeepSpeedStrategy
    from pipeline.distributed.fsdp import FSDPStrategy
    from pipeline.training.checkpoint import CannotReshard, CheckpointError
    from pipeline.training.loop import _check_world

    with pytest.raises(CannotReshard) as err:
        _check_world(2, 1, DeepSpeedStrategy.__new__(DeepSpeedStrategy), tmp_path / "checkpoint_4", "lm")
    msg = str(err.value)
    assert isinstance(err.value, CheckpointError)  # the driver reports it in one line and does not retry
    assert msg.startswith("[lm] the checkpoint ") and "written by 2 workers and this run has 1" in msg
    assert "issue 7628" in msg and "cluster.num_workers=2" in msg and "\n" not in msg
    _check_world(2, 2, DeepSpeedStrategy.__new__(DeepSpeedStrategy), tmp_path, "lm")  # same count: fine
    for cls in (DDPStrategy, FSDPStrategy):
        _check_world(2, 4, cls.__new__(cls), tmp_path, "lm")


def _elastic_rank(rank: int, world: int, raw: dict, shards: str, root: str, name: str) -> list[dict]:
    """Train `raw` in `root/name` (resuming from whatever checkpoint is there); rank 0's history."""
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    session = LocalSession(Path(root) / name, rank=rank, world=world)
    state = train(validate(raw), "lm", Path(shards), session)
    return [{k: v for k, v in h.items() if k in ("step", "loss", "grad_norm", "epoch", "workers")}
            for h in state.history]


@pytest.fixture(scope="module")
def fsdp_straight(built_data, tmp_path_factory):
    """An uninterrupted 2-worker FSDP2 run of 8 steps (checkpoints at 4 and 8)."""
    from pipeline.runtime.local_group import run_group

    _, shards = built_data
    root = tmp_path_factory.mktemp("elastic")
    raw = tiny_raw([*STEPS, "strategy.name=fsdp"])
    history = run_group(_elastic_rank, 2, raw, str(shards["lm"]), str(root), "straight")[0]
    return raw, str(shards["lm"]), root, history


@pytest.mark.parametrize("workers", [1, 4])
def test_elastic_fsdp2_checkpoint_resumes_at_another_worker_count(fsdp_straight, workers, capfd):
    """The step-4 checkpoint of the 2-worker run, resumed on 1 and on 4 workers: DCP reshards
    the model and optimizer, the reader goes on from the same global position with the same
    global batch (micro-batch 8, 4 or 2), and steps 5-8 lose what the uninterrupted run lost."""
    from pipeline.runtime.local_group import run_group

    raw, shards, root, straight = fsdp_straight
    run = f"resumed-on-{workers}"
    shutil.copytree(root / "straight" / "checkpoint_00000004", root / run / "checkpoint_00000004")
    resumed = run_group(_elastic_rank, workers, raw, shards, str(root), run)[0]
    assert [h["step"] for h in resumed] == list(range(1, 9))  # the first four come from the checkpoint
    assert [h["workers"] for h in resumed] == [2] * 4 + [workers] * 4  # the history says when it resized
    for before, after in zip(straight[4:], resumed[4:], strict=True):
        assert after["epoch"] == before["epoch"]  # the same samples: the reader's global position
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5), (workers, before["step"])
        assert after["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-4), (workers, before["step"])
    out = capfd.readouterr().out
    assert f"[lm] resized: 2 -> {workers} workers; micro-batch {8 // workers} x 1 accumulation step(s)" in out


@pytest.mark.e2e
def test_elastic_node_lost_run_shrinks_and_grows_back_with_the_same_losses(built_data, tmp_path):
    """A 4-node `ray.cluster_utils.Cluster` (one CPU each) trains on 4 workers with
    cluster.min_workers=2. One node goes after the first checkpoint: the run restarts from that
    checkpoint on the 3 workers left. A node comes back after a checkpoint written by those 3:
    the run grows back to 4 workers from a later checkpoint and finishes. Step for step it reads
    the same global batches (the reader's position) and its losses equal the uninterrupted
    4-worker run's within 1e-5 relative; the history says how many workers made each step."""
    import json
    import os
    import re
    import subprocess
    import sys

    from pipeline.runtime.local_group import run_group
    from tests.conftest import ROOT

    shards = built_data[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cluster = subprocess.Popen([sys.executable, "-m", "tests.test_elastic", str(shards["lm"]), str(tmp_path)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the reference while the cluster starts: the same config uninterrupted on 4 gloo ranks
    straight = run_group(_elastic_rank, 4, _cluster_raw(tmp_path / "straight"), str(shards["lm"]),
                         str(tmp_path), "straight")[0]
    try:
        stdout = cluster.communicate(timeout=1200)[0]
    finally:
        cluster.kill()
    (tmp_path / "cluster.log").write_text(stdout)
    assert cluster.returncode == 0, stdout[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    killed = report["killed"]
    assert [h["step"] for h in killed] == [h["step"] for h in straight] == list(range(1, MAX_STEPS + 1))
    assert {h["workers"] for h in straight} == {4}
    workers = [h["workers"] for h in killed]
    shrunk_at = workers.index(3)  # steps 1..shrunk_at on 4 workers, then 3, then 4 again
    grown_at = shrunk_at + workers[shrunk_at:].index(4)
    assert workers == [4] * shrunk_at + [3] * (grown_at - shrunk_at) + [4] * (MAX_STEPS - grown_at), workers
    assert report["lost_at"] <= shrunk_at and shrunk_at % 10 == 0, (report["lost_at"], shrunk_at)
    assert report["back_at"] <= grown_at and grown_at % 10 == 0, (report["back_at"], grown_at)
    assert "resized: 4 -> 3 workers; micro-batch 4 x 1" in stdout, stdout[-3000:]
    assert "resized: 3 -> 4 workers; micro-batch 3 x 1" in stdout, stdout[-3000:]
    assert "Graceful shutdown of backend failed" not in stdout, stdout[-3000:]  # (pipeline/quiet.py)
    for a, b in zip(killed, straight, strict=True):
        assert a["epoch"] == b["epoch"], a["step"]  # the same samples, in the same order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    # Resize latency in steps: how far each group had got (its last progress line) before the
    # run went on from an earlier checkpoint at the new count; those steps are trained again.
    lines = stdout.splitlines()

    def reached(first: str, last: str) -> int:
        start = next(i for i, line in enumerate(lines) if first in line) + 1
        end = next(i for i, line in enumerate(lines) if last in line and i > start)
        return max(int(m.group(1)) for line in lines[start:end] if (m := re.search(r"\[lm\] step (\d+)/", line)))

    redone_lost = reached("[lm] strategy: ddp", "training attempt 1 of") - shrunk_at
    redone_grow = reached("resized: 4 -> 3", "resized: 3 -> 4") - grown_at
    print(f"elastic: node lost at about step {shrunk_at + redone_lost}, 3 workers went on from step {shrunk_at} "
          f"({redone_lost} steps trained again), their first checkpoint {report['shrink_s']:.0f} s after the loss; "
          f"node back at step {grown_at + redone_grow}, 4 workers went on from step {grown_at} ({redone_grow} steps "
          f"trained again), their first checkpoint {report['grow_s']:.0f} s after the return")


MAX_STEPS = 60


def _registered(run_dir: Path) -> tuple[int, int]:
    """(step, workers) of the newest checkpoint Ray Train's controller has registered."""
    from pipeline.runtime.recovery import registered_metrics

    metrics = registered_metrics(run_dir)
    return int(metrics.get("step", 0)), int(metrics.get("workers", 0))


def _cluster_raw(storage: Path) -> dict:
    """The elastic run: 4 workers (at least 2), global batch 12 (micro-batch 3 on 4, 4 on 3)."""
    return tiny_raw([*STEPS, f"tasks.lm.trainer.max_steps={MAX_STEPS}", "tasks.lm.trainer.ckpt_every=10",
                     "tasks.lm.trainer.global_batch_size=12", "cluster.num_workers=4", "cluster.min_workers=2",
                     "cluster.resize_check_s=1", f"cluster.storage_path={storage}", "cluster.max_failures=2"])


def _cluster_run(shards: Path, out: Path) -> None:
    """The cluster side of the test above, in a process of its own (its own Ray)."""
    import contextlib
    import json
    import os
    import signal

    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # a busy machine starts it slowly
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.runtime.connect import WORKER_ENV, worker_runtime_env
    from pipeline.runtime.local_group import free_port
    from pipeline.runtime.trainer import fit
    from pipeline.training.checkpoint import read_meta

    os.environ.update(WORKER_ENV)
    # A lost node is noticed in about 3 s (Ray's default is about 15: 5 missed health checks 3 s
    # apart) and the Train controller polls its workers every 0.5 s (2 s by default): the
    # figures in benchmarks/RESULTS.md say so. The frozen workers (below) cannot answer the
    # process-group shutdown before the group grows: 2 s for it, not Ray's 30, which a group
    # that runs would not spend.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(4)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address,
             runtime_env=worker_runtime_env({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                             "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "2"}))
    cfg = validate(_cluster_raw(out / "runs"))
    run_dir = out / "runs" / "killed"

    def history(result) -> list[dict]:
        assert result.error is None, result.error
        with result.checkpoint.as_directory() as d:
            return [{k: h[k] for k in ("step", "loss", "epoch", "workers")} for h in read_meta(Path(d))["history"]]

    def wait_for(done, what: str) -> None:
        while not done():
            assert thread.is_alive(), f"training ended before {what}"
            time.sleep(0.05)

    report: dict = {}
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fit(cfg, "lm", str(shards), "killed")))
    thread.start()
    wait_for(lambda: _registered(run_dir)[0] >= 10, "a node could be removed")
    report["lost_at"] = _registered(run_dir)[0]
    victim_id = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0].node_id
    cluster.remove_node(next(n for n in nodes if n.node_id == victim_id), allow_graceful=False)
    lost = time.time()
    wait_for(lambda: _registered(run_dir)[1] == 3, "3 workers wrote a checkpoint")
    report["shrink_s"] = time.time() - lost
    report["back_at"] = _registered(run_dir)[0]
    # This run lasts seconds, not hours: the 3 workers are frozen (SIGSTOP) so that it is still
    # mid-way when the node is back. Ray Train counts a frozen worker's unanswered poll as a missed
    # health check (an error only after 10 minutes), decides to grow, and replaces the group.
    frozen = [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        cluster.add_node(num_cpus=1)
        back = time.time()
        deadline = back + 300
        while _registered(run_dir)[1] != 4:
            assert thread.is_alive() and time.time() < deadline, "the run did not grow back to 4 workers"
            time.sleep(0.05)
        report["grow_s"] = time.time() - back
    finally:
        for pid in frozen:  # normally gone already: the old group was stopped to grow
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    thread.join()
    report["killed"] = history(box["result"])
    (out / "report.json").write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    import sys

    _cluster_run(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))


def test_elastic_validation_loss_is_the_same_at_any_rank_count_and_accumulation():
    """The diffusion validation loss drew its timesteps and noise from a generator seeded by the
    rank, for the rank's slice: the same weights on the same rows gave 1.058 on one rank and 1.152
    on two, so an elastic resize moved the loss the best weights and early stopping compare. Now
    each row's draws are fixed by its position (`Task.fix_draws`): the ranks' mean at 1, 2 or 4
    replicas, and under accumulation, is one number. (The ranks here are the slices
    `validation_loss` reads for a strategy's dp_rank and dp_size; the averaging over real ranks is
    the loop's.)"""
    from functools import partial
    from types import SimpleNamespace

    import numpy as np
    import torch

    from pipeline.distributed.base import StepSettings, Strategy
    from pipeline.distributed.precision import Precision
    from pipeline.tasks import task_named
    from pipeline.training.validation import validation_loss

    task = task_named("diffusion")
    cfg = validate(tiny_raw(["tasks.diffusion.model.kind=dit"]))
    torch.manual_seed(0)
    model = task.build(task.model_spec(cfg.task("diffusion"), {"image_shape": [1, 8, 8], "num_classes": 10}))
    with torch.no_grad():  # off adaLN-Zero's zero output, so the prediction depends on the draws
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    val = {"image": rng.uniform(-1, 1, (48, 1, 8, 8)).astype(np.float32), "label": rng.integers(0, 10, 48)}

    def rank_view(rank: int, size: int, accum: int) -> SimpleNamespace:  # one rank's view of a strategy
        view = SimpleNamespace(model=model, dp_rank=rank, dp_size=size, settings=StepSettings(accum, 1, 1.0),
                               precision=Precision("fp32", torch.device("cpu")))
        view.eval_loss = partial(Strategy.eval_loss, view)  # the base class's: micro-batches as the step cuts them
        return view

    def mean(size: int, accum: int = 1) -> float:
        return float(np.mean([validation_loss(task, rank_view(rank, size, accum), val, 16, 3, torch.device("cpu"), 7)
                              for rank in range(size)]))

    one = mean(1)
    for size, accum in ((2, 1), (4, 1), (1, 4), (2, 2)):
        assert mean(size, accum) == pytest.approx(one, rel=1e-6), (size, accum)
    assert mean(1) == one and validation_loss(task, rank_view(0, 1, 1), val, 16, 3, torch.device("cpu"), 8) != one
