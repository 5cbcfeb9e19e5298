"""Connect to Ray: an existing cluster when RAY_ADDRESS or `cluster.address` names one, else an
in-process local Ray sized to this machine."""

from __future__ import annotations

import os

from pipeline.config.schema import ClusterConfig

# Train V2 on; worker prints go straight to the driver (Ray's print patch would echo each line twice).
WORKER_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def cluster_address(cfg: ClusterConfig) -> str | None:
    return os.environ.get("RAY_ADDRESS") or cfg.address


class ClusterUnavailable(RuntimeError):
    """The Ray cluster named by the config or the environment does not answer (one line)."""


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail in one line, within `timeout_s`, when nothing answers at a cluster address
    (`host:port` of the GCS, or `ray://host:port`): `ray.init` itself retries a closed port
    for ever, printing a pair of warnings every 30 s. `auto` (the cluster this machine belongs
    to) is left to Ray."""
    import socket

    from pipeline.waiting import wait_until_answers

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return

    def probe() -> None:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)).close()

    wait_until_answers(probe, timeout_s, lambda e: ClusterUnavailable(
        f"the Ray cluster at {address} does not answer ({e.strerror or e}; waited {timeout_s:.0f} s, "
        "cluster.connect_timeout_s); is it running, and is RAY_ADDRESS / cluster.address right?"))


def connect(cfg: ClusterConfig) -> str:
    """Initialise Ray once per process. Returns a description of where it runs."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return "already connected"
    address = cluster_address(cfg)
    if address:
        check_reachable(address, cfg.connect_timeout_s)
        # Inside a submitted job the job's runtime_env (working_dir, env vars) is already set; Ray
        # refuses a second one naming the same env vars unless told to combine them.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
        return f"Ray cluster at {address}"
    need = cfg.num_workers * cfg.cpus_per_worker
    # address="local": a fresh instance even when a `ray start` cluster is running on this machine
    # (a bare ray.init() would join that one). The dashboard serves Ray's State API, which Ray
    # Train's placement-group cleaner polls; it binds to 127.0.0.1 only.
    ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": WORKER_ENV},
             log_to_driver=True, configure_logging=False)
    return f"local Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"
