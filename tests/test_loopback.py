"""The embedded local Ray listens on loopback only, and two of them on one host do not meet.

Two train flows (the real `train_task`, Ray Train with 2 workers, a tiny GPT) run at once in two
processes, as two users or `dvc queue start -j 2` would. While each fits, a thread samples every
listening socket of its process and all its descendants (GCS, raylet, dashboard and its agents,
the Prometheus endpoints, Ray workers, the Train controller and the gloo rendezvous) with psutil.
Both fits must finish, neither may see the other's Ray, and no socket may listen on anything but
127.0.0.1 / ::1. Each then leaves a placement group behind, as a controller that died would, and
the embedded trainer's cleanup frees it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_loopback_helper_tells_loopback_from_the_rest():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "10.0.0.1"]))


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    import psutil

    found = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            found.add((conn.laddr.ip, conn.laddr.port, name))
    return found


def _fit_and_sample(project: Path) -> None:
    """In a subprocess: the train flow for the LM, sampling this process tree's listening sockets
    every half second until it returns; a report lands in `project/report.json`."""
    import psutil

    from pipeline.config import validate
    from pipeline.flows.train import train_task
    from tests.conftest import tiny_raw

    os.chdir(project)
    me = psutil.Process()
    seen: set[tuple[str, int, str]] = set()
    titles: set[str] = set()  # Ray's actor processes by their titles (ray::TrainController, ...)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                children = me.children(recursive=True)
                seen.update(listening({me.pid} | {p.pid for p in children}))
                for child in children:
                    with contextlib.suppress(psutil.Error, IndexError):
                        if (title := child.cmdline()[0]).startswith("ray::"):  # ray::Class[.method()]
                            titles.add(title.split()[0].split(".")[0].split("(")[0])
            except psutil.Error:
                pass
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = validate(tiny_raw())
    outcome = train_task(cfg, "lm", Path("data/lm/shards"), Path("models/lm"), Path("metrics/lm"))
    import ray
    from ray.util.placement_group import placement_group

    from pipeline.runtime.embedded_trainer import remove_leftover_placement_groups

    gcs = ray.get_runtime_context().gcs_address
    done.set()
    sampler.join()
    # what a controller that died mid-fit leaves behind: its workers' reservation, every CPU
    cpus = int(ray.cluster_resources()["CPU"])
    ray.get(placement_group([{"CPU": 1}] * cpus).ready(), timeout=120)
    held = ray.available_resources().get("CPU", 0)
    removed = remove_leftover_placement_groups()
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    (project / "report.json").write_text(json.dumps({
        "steps": outcome.steps, "gcs": gcs, "sockets": sorted(seen), "titles": sorted(titles),
        "leftover": {"held_free_cpus": held, "removed": removed,
                     "freed": ray.available_resources().get("CPU", 0) == cpus}}))


def test_loopback_only_two_local_rays_fit_at_once(built_data, tmp_path):
    _, shards = built_data
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    projects, procs = [], []
    for name in ("alice", "bob"):
        project = tmp_path / name
        shutil.copytree(shards["lm"], project / "data" / "lm" / "shards")
        projects.append(project)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_loopback", str(project)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-6000:]
        assert "Found multiple active Ray instances" not in out, out[-6000:]
    reports = [json.loads((p / "report.json").read_text()) for p in projects]
    assert reports[0]["gcs"] != reports[1]["gcs"]  # each its own Ray
    for report in reports:
        assert report["steps"] == 6
        sockets = [tuple(s) for s in report["sockets"]]
        names = {name for _, _, name in sockets}
        # the sampler saw the Ray processes themselves, not just the driver
        assert {"gcs_server", "raylet"} <= names, sockets
        wide = [s for s in sockets if not is_loopback(s[0])]
        assert not wide, f"listening beyond loopback: {wide}"
        # the embedded Ray's lean Ray Train (pipeline/runtime/embedded_trainer.py): a controller and
        # workers, but no Ray Data DatasetManager, autoscaling coordinator or placement-group cleaner
        titles = report["titles"]
        assert "ray::TrainController" in titles and "ray::RayTrainWorker" in titles, titles
        assert not [t for t in titles if any(
            name in t for name in ("DatasetManager", "AutoscalingCoordinator", "PlacementGroupCleaner"))], titles
        # without the cleaner, a reservation left on the embedded Ray is freed before the next fit
        assert report["leftover"] == {"held_free_cpus": 0, "removed": 1, "freed": True}, report["leftover"]


if __name__ == "__main__":
    _fit_and_sample(Path(sys.argv[1]))
