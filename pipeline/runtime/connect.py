"""Connect to Ray: an existing cluster when RAY_ADDRESS or `cluster.address` names one, else an
in-process local Ray sized to this machine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from pipeline.config.schema import ClusterConfig

# Train V2 on; worker prints go straight to the driver (Ray's print patch would echo each line twice).
WORKER_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_runtime_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env of the Ray jobs this project starts: `WORKER_ENV` (plus `env`) and the setup
    hook that keeps Ray's noise about a dead worker out of the log (pipeline/quiet.py), run in
    every worker process of the job, Ray Train's controller included."""
    from pipeline.quiet import RAY_WORKER_SETUP

    return {"env_vars": {**WORKER_ENV, **(env or {})}, "worker_process_setup_hook": RAY_WORKER_SETUP}


def cluster_address(cfg: ClusterConfig) -> str | None:
    return os.environ.get("RAY_ADDRESS") or cfg.address


class ClusterUnavailable(RuntimeError):
    """The Ray cluster named by the config or the environment does not answer (one line)."""


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail in one line, within `timeout_s` and before any run is opened, when a cluster address
    is malformed or nothing answers there (`host:port` of the GCS, `ray://host:port`, or `auto`:
    the cluster this machine belongs to): `ray.init` itself retries a closed port for ever,
    printing a pair of warnings every 30 s, and names a malformed address only after it."""
    import socket

    from pipeline.waiting import wait_until_answers

    where = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") == address else "cluster.address"
    if address.startswith(("http://", "https://")):
        raise ClusterUnavailable(f"{where} is {address}: a Jobs API (dashboard) address, which `pipeline submit`, "
                                 "`status` and `logs` take; training connects to the cluster's GCS, host:6379 "
                                 "(or ray://host:10001)")
    if address == "auto":
        address = _running_local_cluster(where)
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterUnavailable(f"{where} is {address!r}: expected host:port (e.g. 10.0.0.5:6379), "
                                 "ray://host:port or auto")

    def probe() -> None:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)).close()

    wait_until_answers(probe, timeout_s, lambda e: ClusterUnavailable(
        f"the Ray cluster at {address} does not answer ({e.strerror or e}; waited {timeout_s:.0f} s, "
        "cluster.connect_timeout_s); is it running, and is RAY_ADDRESS / cluster.address right?"))


def _running_local_cluster(where: str) -> str:
    """The GCS address `auto` stands for (the Ray cluster this machine runs a node of, as Ray
    looks it up), or one line saying there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # (a Ray without it: ray.init looks it up itself)
        return "auto"
    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ClusterUnavailable(f"{where} is auto, and no Ray cluster runs on this machine "
                                 f"({str(e).splitlines()[0]}): start one with `ray start --head`, or name its "
                                 "address") from None
    return found or "auto"


def connect(cfg: ClusterConfig) -> str:
    """Initialise Ray once per process. Returns a description of where it runs."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return "already connected"
    address = cluster_address(cfg)
    if address:
        if _own_api_address[0] is not None and os.environ.get("RAY_API_SERVER_ADDRESS") == _own_api_address[0]:
            del os.environ["RAY_API_SERVER_ADDRESS"]  # an earlier local Ray's, in this process
        check_reachable(address, cfg.connect_timeout_s)
        # Inside a submitted job the job's runtime_env (working_dir, env vars) is already set; Ray
        # refuses a second one naming the same env vars unless told to combine them.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=worker_runtime_env(), log_to_driver=True)
        return f"Ray cluster at {address}"
    need = cfg.num_workers * cfg.cpus_per_worker
    with _loopback_only() as ports, _named_start_failure():
        # address="local": a fresh instance even when a `ray start` cluster is running on this machine
        # (a bare ray.init() would join that one). The dashboard (its process and nine module
        # processes: about 2 s and 3 CPU-s of every start on 2 cores) serves Ray's State API, which
        # only Ray Train's placement-group cleaner reads here, and the lean trainer has no cleaner:
        # it starts only where that trainer does not apply. Token authentication stays on (Ray 2.59+).
        from pipeline.runtime.embedded_trainer import lean_trainer_applies

        ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                 include_dashboard=not lean_trainer_applies(),
                 dashboard_host=LOOPBACK, dashboard_port=ports["dashboard"], _node_ip_address=LOOPBACK,
                 _metrics_export_port=ports["metrics_export"],
                 runtime_env=worker_runtime_env({**_own_address_env(ports), **ONE_NODE_ENV}),
                 log_to_driver=True, configure_logging=False, _system_config=NO_PRESTART)
    # This process's own State API calls go to its own Ray too (the variable is replaced by the
    # next local Ray, and dropped when a cluster is joined).
    os.environ.update(_own_address_env(ports))
    _own_api_address[0] = os.environ["RAY_API_SERVER_ADDRESS"]
    _embedded_gcs[0] = ray.get_runtime_context().gcs_address
    return f"local Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"


@contextlib.contextmanager
def _named_start_failure() -> Iterator[None]:
    """A local Ray that cannot write its files (its auth token under ~/.ray, its session under the
    temp folder) fails with a bare errno naming neither: one line saying where and what to set."""
    import errno
    import tempfile

    try:
        yield
    except OSError as e:
        home = os.environ.get("HOME", "")
        token = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
        named = str(e.filename or "")
        if e.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS) or not named or not any(
                root and named.startswith(root) for root in (home, token, os.path.dirname(token))):
            raise  # another failure (a full disk, a port): Ray's own message says more than a guess
        raise ClusterUnavailable(
            f"cannot start the local Ray ({e.strerror or e}: {named}): it writes its auth token under ~/.ray "
            f"(HOME is {home or 'unset'}) and its session under {tempfile.gettempdir()}; set HOME to a writable "
            "folder (or RAY_AUTH_TOKEN_PATH to a file in one)") from None


LOOPBACK = "127.0.0.1"
# One node cannot be drained or preempted: Ray Train's preemption watcher (one more actor process
# per fit, polling every 5 s) has nothing to watch on the embedded Ray. Its controller polls the
# workers every 2 s by default, so a fit ends up to 2 s after its workers; on one node a poll is a
# local call, so every 0.5 s costs nothing. (pipeline/runtime/embedded_trainer.py drops the rest.)
ONE_NODE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Ray starts one Python worker per CPU for the first driver, ahead of any task. A fit needs
# actors (controller, synchronisation actor, workers), which start processes as they are created
# anyway; measured on the embedded Ray with 2 CPUs, one prestarted worker was never used and cost
# 2 s of CPU at every start, with no fit any slower without them.
NO_PRESTART = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
_own_api_address: list[str | None] = [None]  # the State API address this process set for its local Ray
_embedded_gcs: list[str | None] = [None]  # the GCS of the local Ray this process started


def embedded() -> bool:
    """Whether this process is connected to the single-node local Ray that `connect` started
    (not to a cluster, nor to a `ray.cluster_utils.Cluster` a test built)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_gcs[0]


def _own_address_env(ports: dict[str, int]) -> dict[str, str]:
    """Where every process of this Ray finds its own cluster's State API. Without it Ray Train's
    placement-group cleaner (an actor) auto-discovers "the" Ray on the machine and, beside a second
    pipeline's Ray, fails with "Found multiple active Ray instances" or talks to the wrong one."""
    return {"RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{ports['dashboard']}"}


@contextlib.contextmanager
def _loopback_only() -> Iterator[dict[str, int]]:
    """Start the embedded Ray on 127.0.0.1 only, on ports nobody else holds.

    Ray 2.60 turns a node IP of 127.0.0.1 into the host's external address (so that other nodes
    could join) unless clusters are switched off, as on macOS and Windows by default: with
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` its GCS, raylet, workers, agents and metrics endpoints all
    bind loopback (checked with psutil in tests/test_cluster.py::test_loopback_*). The variable is
    read by each process Ray starts now (they inherit it) and by this process's `ray_constants`;
    both are restored afterwards, so a later `ray.cluster_utils.Cluster` or `ray start` in the same
    process is unaffected. Fixed default ports (dashboard 8265, dashboard agent 52365, Prometheus
    endpoints 44217/44227) would collide with a second pipeline's Ray on the same host: every one
    is a free port here, the agent's chosen by the OS (0)."""
    import ray._private.parameter as parameter
    import ray._private.ray_constants as ray_constants

    from pipeline.runtime.local_group import free_port

    ports = {"dashboard": free_port(), "metrics_export": free_port()}
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **_own_address_env(ports),
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_cluster, saved_params = ray_constants.ENABLE_RAY_CLUSTER, parameter.RayParams

    class LoopbackParams(saved_params):  # ray.init offers no dashboard_agent_listen_port
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    from pipeline.runtime.local_head import DASHBOARD_STARTUP_TIMEOUT_S

    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    saved_timeout = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S  # read once, at Ray's import
    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = int(DASHBOARD_STARTUP_TIMEOUT_S)
    parameter.RayParams = LoopbackParams
    try:
        yield ports
    finally:
        parameter.RayParams = saved_params
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = saved_timeout
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
