"""Cluster latencies in units of the training step they delay, measured in one run:

1. submit -> first step: `pipeline.runtime.jobs.submit` of the train stage to a real local head
   (`ray start --head`, 127.0.0.1) until the job's log shows its first step line, divided by
   the step time read from the same log;
2. node loss -> back on track: a 2-worker run on a ray.cluster_utils.Cluster (three 1-CPU
   worker nodes) loses a training worker's node right after a registered checkpoint; the
   recovery time is the wall time from the kill to the next registered checkpoint minus the
   time those `ckpt_every` steps take when nothing fails, divided by the step time.

    python benchmarks/cluster.py [--steps 240] [--ckpt-every 20]

Tiny GPT on the bundled text (CPU); both latencies are mostly fixed costs (job runtime env,
Ray Train controller, worker start, process group, failure detection), so the ratios shrink
as steps get longer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model@tasks.lm.model=gpt_tiny", "tasks.lm.data.vocab_size=300", "tasks.lm.data.seq_len=32",
        "tasks.lm.data.shard_rows=64", "tasks.lm.trainer.global_batch_size=8"]
STEP = re.compile(r"\[lm\] step (\d+)/")


def _project(dest: Path, steps: int, every: int) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not f.startswith(("tests/", "benchmarks/")) and (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    overrides = [*TINY, f"tasks.lm.trainer.max_steps={steps}", f"tasks.lm.trainer.ckpt_every={every}",
                 f"tasks.lm.trainer.log_every={every}"]
    for cmd in (["pipeline", "compose", *overrides], ["stages.prepare", "lm"], ["stages.shard", "lm"]):
        subprocess.run([sys.executable, "-m", *cmd], cwd=dest, check=True, capture_output=True)
    # the shards travel with the job here (the default runtime_env leaves data/ behind)
    env = yaml.safe_load((dest / "cluster/runtime_env.yaml").read_text())
    env["excludes"] = [e for e in env["excludes"] if e != "/data"]
    (dest / "bench_env.yaml").write_text(yaml.safe_dump(env))
    return dest


def submit_to_first_step(project: Path, store: str) -> dict[str, float]:
    from pipeline.runtime import jobs
    from pipeline.runtime.local_head import LocalHead

    with LocalHead(num_cpus=2) as head:
        spec = jobs.runtime_env(project, Path("bench_env.yaml"), {"MLFLOW_TRACKING_URI": store})
        start = time.perf_counter()
        job_id = jobs.submit("python -m stages.train lm", head.jobs_address, spec)
        seen: list[tuple[float, int]] = []

        async def tail() -> None:
            async for chunk in jobs.client(head.jobs_address).tail_job_logs(job_id):
                now = time.perf_counter() - start
                seen.extend((now, int(m.group(1))) for m in STEP.finditer(chunk))

        asyncio.run(tail())
        state = jobs.status(job_id, head.jobs_address)
        if state.status != "SUCCEEDED" or len(seen) < 3:
            raise RuntimeError(f"job {state.status}: {jobs.logs(job_id, head.jobs_address)[-3000:]}")
    # step time from the log's own rhythm, leaving out the first window (warm-up)
    (t1, s1), (tn, sn) = seen[1], seen[-1]
    step_s = (tn - t1) / (sn - s1)
    first = seen[0][0] - seen[0][1] * step_s  # when step 1 began, extrapolated back from the first line
    return {"submit_to_first_step_s": first, "step_s": step_s, "ratio": first / step_s}


def node_loss_recovery(shards: Path, out: Path, steps: int, every: int) -> dict[str, float]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.runtime.connect import worker_runtime_env
    from pipeline.runtime.recovery import registered_step
    from pipeline.runtime.trainer import fit

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=worker_runtime_env())
    raw = compose(ROOT / "configs", [TINY[0]])
    cfg = validate(apply_overrides(raw, [*TINY[1:], f"tasks.lm.trainer.max_steps={steps}",
                                         f"tasks.lm.trainer.ckpt_every={every}", f"tasks.lm.trainer.log_every={every}",
                                         f"cluster.storage_path={out}", "cluster.max_failures=2"]))

    def watch(run: Path, stop: threading.Event, log: list[tuple[int, float]]) -> None:
        last = 0
        while not stop.is_set():
            step = registered_step(run)
            if step != last:
                log.append((step, time.perf_counter()))
                last = step
            time.sleep(0.02)

    try:
        # undisturbed run: the time `every` steps take, checkpoint included
        log: list[tuple[int, float]] = []
        stop = threading.Event()
        w = threading.Thread(target=watch, args=(out / "plain", stop, log))
        w.start()
        fit(cfg, "lm", str(shards.resolve()), "plain")
        stop.set()
        w.join()
        intervals = [b[1] - a[1] for a, b in itertools.pairwise(log[1:])]
        interval = sorted(intervals)[len(intervals) // 2]

        log, stop = [], threading.Event()
        w = threading.Thread(target=watch, args=(out / "killed", stop, log))
        w.start()
        t = threading.Thread(target=fit, args=(cfg, "lm", str(shards.resolve()), "killed"))
        t.start()
        while not log or log[-1][0] < 2 * every:
            time.sleep(0.02)
        killed_at, _ = log[-1]
        victim = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0].node_id
        kill_t = time.perf_counter()
        cluster.remove_node(next(n for n in nodes if n.node_id == victim), allow_graceful=False)
        while not any(s > killed_at for s, _ in log):
            time.sleep(0.02)
        back = next(t_ for s, t_ in log if s > killed_at)
        t.join()
        stop.set()
        w.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    step_s = interval / every
    recovery = back - kill_t - interval
    return {"recovery_s": recovery, "step_s": step_s, "ratio": recovery / step_s, "killed_after_step": killed_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--ckpt-every", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        project = _project(Path(tmp) / "project", args.steps, args.ckpt_every)
        sub = submit_to_first_step(project, f"sqlite:///{tmp}/bench.db")
        print(f"submit -> first step: {sub['submit_to_first_step_s']:.1f} s = {sub['ratio']:.0f} steps "
              f"(step {sub['step_s'] * 1000:.1f} ms)", flush=True)
        rec = node_loss_recovery(project / "data/lm/shards", Path(tmp) / "runs", args.steps, args.ckpt_every)
        print(f"node loss -> back on track: {rec['recovery_s']:.1f} s = {rec['ratio']:.0f} steps "
              f"(step {rec['step_s'] * 1000:.1f} ms; node killed after the step-{rec['killed_after_step']} checkpoint)")


if __name__ == "__main__":
    main()
