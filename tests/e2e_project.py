"""A tiny copy of this project for end-to-end tests: the repository's files in a fresh git
repository with the Hydra root config made tiny (so `dvc exp run` composes tiny variants too),
and a runner that fails the test with the command's output tail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, TINY

# Not copied: tests, benchmarks, and anything a pipeline run in this checkout left behind.
OUTPUTS = ("tests/", "benchmarks/", "data/", "models/", "export/", "reports/", "registry/", "metrics/", "runs/",
           "dvc.lock", "mlruns.db", "mlartifacts/", "dvc_plots/")


def run_ok(cmd: list[str], cwd: Path, timeout: int = 900, env: dict[str, str] | None = None) -> str:
    """Run `cmd` in `cwd` (with `env` added to this environment); its output, or the test fails."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd),
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2", **(env or {})}  # tiny runs last seconds; the default 10
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def tiny_project(dest: Path, extra: tuple[str, ...] = ()) -> Path:
    """The copy, its root config made tiny and then set by `extra` ("key=value" items)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(OUTPUTS):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    # Make the Hydra root config itself tiny, so `dvc exp run` composes tiny variants too.
    cfg_path = dest / "configs" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["defaults"] = [{"model@tasks.lm.model": "gpt_tiny"} if "model@tasks.lm.model" in d else
                       {"model@tasks.diffusion.model": "dit_tiny"} if "model@tasks.diffusion.model" in d else d
                       for d in cfg["defaults"]]
    for item in (*TINY, *extra):
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for f in ("dvc.lock",):
        (dest / f).unlink(missing_ok=True)
    run_ok([sys.executable, "-m", "pipeline", "compose"], dest)
    run_ok(["git", "init", "-q"], dest)
    run_ok(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    run_ok(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"], dest)
    return dest


def prepared_project(dest: Path, task: str = "lm") -> Path:
    """A tiny project with `task`'s data prepared and sharded (what several e2e tests start from)."""
    project = tiny_project(dest)
    run_ok([sys.executable, "-m", "stages.prepare", task], project)
    run_ok([sys.executable, "-m", "stages.shard", task], project)
    return project


def mlflow_server(root: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """A real `mlflow server` (SQLite store under `root`) on `host`:`port`, up and answering."""
    import time
    import urllib.request

    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
                               "--host", host, "--port", str(port), "--workers", "1"],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        assert server.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                return server
        except OSError:
            assert time.time() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(0.5)


def moto_server(host: str, port: int) -> subprocess.Popen:
    """A real S3-compatible server (moto's server mode) on `host`:`port`, in its own process
    group, up and answering. Clients reach it through AWS_ENDPOINT_URL, as a real endpoint."""
    import time
    import urllib.request

    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while True:
        assert server.poll() is None, "moto_server exited"
        try:
            urllib.request.urlopen(f"http://{host}:{port}", timeout=1).close()
            return server
        except OSError:
            assert time.time() < deadline, "moto_server did not come up in 60 s"
            time.sleep(0.3)
