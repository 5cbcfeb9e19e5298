"""A real Ray head on this machine, bound to 127.0.0.1, for tests, benchmarks and trying
`pipeline submit` without a cluster:

    with LocalHead(num_cpus=2) as head:
        print(head.jobs_address)   # http://127.0.0.1:<port>, token-authenticated (Ray 2.59+)

It runs `ray start --head --block` in its own process group and kills only that group on exit;
`ray stop` would stop every Ray on the machine, including other users' and other tests'.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.runtime.local_group import free_port

# Ray gives its dashboard (about ten Python processes) 60 s to come up and fails `ray start` /
# `ray.init` otherwise, which a busy 2-core machine exceeded (CI, two test processes beside a
# 5-node test cluster). A slow start is not a failure here; a user's RAY_DASHBOARD_STARTUP_TIMEOUT_S wins.
DASHBOARD_STARTUP_TIMEOUT_S = "300"

class LocalHead:
    def __init__(self, num_cpus: int = 2, log: Path | None = None, start_timeout_s: float = 180,
                 dashboard_port: int | None = None) -> None:
        self.num_cpus, self.start_timeout_s = num_cpus, start_timeout_s
        self.log = log or Path(tempfile.mkdtemp(prefix="ray-head-")) / "head.log"
        self.port, self.dashboard_port = free_port(), dashboard_port or free_port()
        self.jobs_address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalHead:
        bin_dir = Path(sys.executable).parent
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a one-node cluster, whose GCS, raylet and agents then
        # bind 127.0.0.1 instead of every interface (Ray otherwise swaps 127.0.0.1 for the host's
        # external address so that other nodes could join); pipeline/runtime/connect.py says more.
        env = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": DASHBOARD_STARTUP_TIMEOUT_S,
               **os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
        env.pop("RAY_ADDRESS", None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             # every other service on a free port too: Ray's defaults (10001, 52365, ...) collide with
             # another head on this machine, whose job agent then never comes up
             *(arg for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                                "--node-manager-port", "--object-manager-port")
               for arg in (flag, str(free_port()))),
             "--num-cpus", str(self.num_cpus), "--include-dashboard", "true", "--disable-usage-stats"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def pid(self) -> int:
        """The `ray start --block` process, parent of every process of this head."""
        assert self._proc is not None, "the head is not running"
        return self._proc.pid

    def _wait_up(self) -> None:
        deadline = time.time() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self._proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.jobs_address}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and asking for its token (Ray 2.59+ token authentication)
                    return
                raise
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"the Ray head's job server did not answer in {self.start_timeout_s:.0f} s:\n"
                                       + self.log.read_text()[-3000:]) from None
                time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        # (a head whose `ray start` already exited has no group left: its error, not this, is the news)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)  # `ray start --block` can take 30 s to stop cleanly; it is our own group
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        # `ray start --block` returns before its GCS has finished shutting down; wait for the port
        # to close so that nothing started next finds a half-dead cluster.
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.5)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc = None
