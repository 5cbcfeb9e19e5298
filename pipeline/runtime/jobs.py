"""Run stages, or a whole `dvc repro`, on a Ray cluster through the Ray Jobs API.

The job's working directory is this checkout as it is on disk, uncommitted edits included,
uploaded by Ray (`runtime_env.working_dir`) minus what `cluster/runtime_env.yaml` excludes and
what `.gitignore` ignores. `.git` travels with it, so DVC finds its repository and the runs the
job creates record the commit and dirty flag of the tree that was submitted. Inside the job,
Ray sets RAY_ADDRESS, so the train stage joins that cluster instead of starting its own Ray.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError
from pipeline.runtime.connect import ClusterUnavailable  # (the job server did not accept the job in time)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = Path("cluster/runtime_env.yaml")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(RuntimeError):
    """A submitted job ended FAILED or STOPPED; the message carries its log tail."""


class JobNotFound(KeyError):
    """The Jobs API has no job by that id (a KeyError: the CLI reports it in one line)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def jobs_address(address: str | None = None) -> str:
    """The Jobs API (dashboard) address: the argument, else RAY_JOBS_ADDRESS, else (as Ray's own
    client resolves them) RAY_API_SERVER_ADDRESS or RAY_ADDRESS when it is an http(s) address,
    else the local default."""
    if address or os.environ.get("RAY_JOBS_ADDRESS"):
        return address or os.environ["RAY_JOBS_ADDRESS"]
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if (value := os.environ.get(name, "")).startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def auth_token(address: str | None = None) -> str | None:
    """The cluster token, looked up where Ray keeps it: RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (written by `ray start` / `ray get-auth-token --generate`;
    the README's multi-host setup copies the cluster's there). Sent in clear text (plain http to
    `address` off loopback), it is said in one line on stderr: anyone on the path can read it,
    so an untrusted network wants https or a tunnel."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        token, where = token.strip(), "RAY_AUTH_TOKEN"
    else:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if not path.is_file():
            return None
        token, where = path.read_text().strip(), str(path)
    if token and address and not _private_to(address) and (where, address, token) not in _TOLD:
        _TOLD.add((where, address, token))  # (once: a submit waiting for a starting head asks on every try)
        print(f"note: sending the Ray token ({where}) to {address} in clear text (plain http to another host): "
              "use https or a tunnel (ray dashboard, kubectl port-forward, ssh -L) on a network you do not trust",
              file=sys.stderr)
    return token


_TOLD: set[tuple[str, str, str]] = set()  # the clear-text notes said in this process


def _private_to(address: str) -> bool:
    """Whether a request to `address` stays private: https, or plain http to a loopback host."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


GCS_PORTS = ("6379", "10001")  # a GCS (host:6379) or Ray Client (ray://host:10001) port, not the dashboard's
DASHBOARD_PORT = "8265"


def _suggested(address: str) -> str:
    """The Jobs API address a non-http one was probably meant to be: the same host, on the
    dashboard's port unless the port given is neither a GCS nor a Ray Client port."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not host:
        host, port = (target if address != "auto" and target else "127.0.0.1"), DASHBOARD_PORT
    if not port.isdigit() or port in GCS_PORTS:
        port = DASHBOARD_PORT
    return f"http://{host}:{port}"


def check_address(address: str | None = None, job_id: str | None = None) -> None:
    """Refuse, before any connection, a Jobs API address that is not http(s)://. Ray's client
    takes any other address for a GCS (or Ray Client) one and looks the dashboard up there: a
    typo then costs 40-odd seconds and a gRPC traceback ("Timed out while waiting for GCS")."""
    job = f"job '{job_id}': " if job_id else ""
    if address or os.environ.get("RAY_JOBS_ADDRESS"):
        where = "--address" if address else "RAY_JOBS_ADDRESS"
        value = address or os.environ["RAY_JOBS_ADDRESS"]
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{job}{where} is {value!r}, not a Jobs API address: the Jobs API is the Ray "
                             f"dashboard's HTTP port, e.g. {_suggested(value)} (host:6379 and ray://host:10001 "
                             "are the addresses training connects to)")
        return
    value = os.environ.get("RAY_ADDRESS", "")
    if value and not value.startswith(("http://", "https://")) \
            and not os.environ.get("RAY_API_SERVER_ADDRESS", "").startswith(("http://", "https://")):
        raise ValueError(f"{job}RAY_ADDRESS is {value!r}, the cluster address training connects to; job commands "
                         "use the Jobs API, the Ray dashboard's HTTP port: set RAY_JOBS_ADDRESS="
                         f"{_suggested(value)} (it takes precedence) or pass --address {_suggested(value)}")


def client(address: str | None = None, job_id: str | None = None):
    """A Jobs API client. Ray 2.59+ clusters require token authentication, but Ray's client
    only sends the token when RAY_AUTH_MODE=token is set on this side too; the header is sent
    here whenever a token is found (`auth_token`: this machine's own not in clear text to another
    host), so `submit` works against both kinds of cluster. An
    address that is not http(s):// is refused first (`check_address`)."""
    check_address(address, job_id)
    from ray.job_submission import JobSubmissionClient

    resolved = jobs_address(address)
    token = auth_token(resolved)
    headers = {"authorization": f"Bearer {token}"} if token else None
    # Ray's client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given: they
    # are hidden while the client is made, so it goes where `jobs_address` resolved (a stale
    # RAY_ADDRESS cannot beat --address, and the token is judged for the host it is sent to)
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(resolved, headers=headers)
    finally:
        os.environ.update(hidden)


def runtime_env(project: Path, spec: Path | None = None, env: dict[str, str] | None = None,
                pip: list[str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the YAML file (working_dir made absolute), extra env vars and pip
    requirements. Missing file = working_dir only; `pip: []` in the file means the cluster
    image already has the project installed."""
    path = project / (spec or DEFAULT_RUNTIME_ENV)
    if spec is not None and not path.is_file():
        raise FileNotFoundError(f"runtime env file {path} not found")
    data = _read_runtime_env(path) if path.is_file() else {}
    working_dir = Path(data.get("working_dir", "."))
    data["working_dir"] = str(working_dir if working_dir.is_absolute() else (project / working_dir).resolve())
    data["env_vars"] = {**data.get("env_vars", {}), **(env or {})}
    if pip is not None:
        data["pip"] = pip
    if not data.get("pip"):
        data.pop("pip", None)
    return data


def _read_runtime_env(path: Path) -> dict[str, Any]:
    """The runtime_env file as a mapping (empty or comments only: {}), its keys this module and
    Ray read checked, each problem one line naming the file and the key (ConfigError)."""
    from pipeline.config.loading import read_yaml

    try:
        data = read_yaml(path)
    except ConfigError:
        try:
            empty = yaml.safe_load(path.read_text(encoding="utf-8")) is None
        except (yaml.YAMLError, UnicodeDecodeError):
            empty = False
        if not empty:
            raise
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a runtime_env is a mapping (working_dir, env_vars, pip, excludes, ...), "
                          f"not a {type(data).__name__}")
    if "working_dir" in data and not isinstance(data["working_dir"], str):
        raise ConfigError(f"{path}: working_dir must be a path (a string), got {data['working_dir']!r}")
    env_vars = data.get("env_vars")
    if env_vars is None:
        data.pop("env_vars", None)
    elif not isinstance(env_vars, dict):
        raise ConfigError(f"{path}: env_vars must be a mapping of NAME: value, not a {type(env_vars).__name__}")
    else:
        for key, value in env_vars.items():
            if not isinstance(key, str):
                raise ConfigError(f"{path}: env_vars key {key!r} is not a string; quote it")
            if not isinstance(value, str):
                raise ConfigError(f"{path}: env_vars.{key} is {value!r} ({type(value).__name__}): Ray takes strings "
                                  f"only; quote it, e.g. {key}: \"{value}\"")
    if "excludes" in data and not (isinstance(data["excludes"], list)
                                   and all(isinstance(x, str) for x in data["excludes"])):
        raise ConfigError(f"{path}: excludes must be a list of patterns (strings), got {data['excludes']!r}")
    return data


# What a head that is still starting answers: no dashboard yet, or a dashboard whose job agent
# has not registered ("No available agent to submit job, please try again later", a 500).
_STARTING = ("Failed to connect", "No available agent", "status code 502", "status code 503", "Connection refused")


def submit(entrypoint: str, address: str | None = None, env_spec: dict[str, Any] | None = None,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           wait_s: float | None = None) -> str:
    """Submit the job; returns its id. A head that is still starting (its dashboard or its job
    agent not up yet) is retried with a bounded backoff for `wait_s` seconds (default
    PIPELINE_SUBMIT_WAIT_S, else 120), then ClusterUnavailable names the address in one line.
    The submission id is fixed before the first try, so a retry can never submit twice."""
    import uuid

    # Ray 2.50+ leaves .git out of every working_dir by default; this project needs it (see the
    # module docstring). The runtime_env file's `excludes` still applies, and `.git` can go there.
    os.environ["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"] = "venv,__pycache__"
    if wait_s is None:
        try:
            wait_s = float(os.environ.get("PIPELINE_SUBMIT_WAIT_S", 120))
        except ValueError:
            given = os.environ["PIPELINE_SUBMIT_WAIT_S"]
            raise ValueError(f"PIPELINE_SUBMIT_WAIT_S: expected seconds, got {given!r}") from None
    submission_id = submission_id or f"pipeline-{uuid.uuid4().hex[:12]}"
    deadline, delay, tries = time.monotonic() + wait_s, 0.5, 0
    while True:
        tries += 1
        try:
            return client(address).submit_job(entrypoint=entrypoint, runtime_env=env_spec,
                                              submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus)
        except (ConnectionError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # (Ray's 500 carries the job agent's traceback: "already exists" is on its last lines)
            if "already exists" in str(e) and "submission_id" in str(e):
                if tries > 1:  # an earlier try got through after all
                    return submission_id
                raise ValueError(f"a job '{submission_id}' already exists at {jobs_address(address)}: pick another "
                                 "--id (or none: one is generated)") from None
            if not any(s in reason for s in _STARTING):
                raise
            if time.monotonic() + delay > deadline:
                raise ClusterUnavailable(f"the Ray cluster at {jobs_address(address)} did not accept the job in "
                                         f"{wait_s:.0f} s ({tries} tries; last: {reason[:200]}); is it running? "
                                         "(PIPELINE_SUBMIT_WAIT_S sets the wait)") from None
            if tries == 1:  # (a head still starting is normal; a silent wait of minutes is not)
                print(f"waiting for the Ray Jobs API at {jobs_address(address)} (up to {wait_s:.0f} s; "
                      f"PIPELINE_SUBMIT_WAIT_S sets it): {reason[:120]}", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


@dataclass
class JobState:
    job_id: str
    status: str
    message: str
    seconds: float | None


def _first_line(message: str) -> str:
    """Ray's message for a failed job is one line followed by up to 20,000 characters of its log
    ("..., last available logs (truncated to 20,000 chars):"): the line, without that tail."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return re.sub(r",?\s*last available logs\b.*$", "", line).rstrip(" :")


def _known(job_id: str, address: str | None, call):
    """`call()`, with the Jobs API's 404 for an unknown job id as one line (JobNotFound)."""
    try:
        return call()
    except RuntimeError as e:
        if "status code 404" in (str(e).splitlines() or [""])[0]:
            raise JobNotFound(f"no job '{job_id}' at {jobs_address(address)}") from None
        raise


def _state(c, job_id: str, address: str | None = None) -> JobState:
    info = _known(job_id, address, lambda: c.get_job_info(job_id))
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return JobState(job_id, str(info.status.value if hasattr(info.status, "value") else info.status),
                    _first_line(info.message or ""), seconds)


def status(job_id: str, address: str | None = None) -> JobState:
    return _state(client(address, job_id), job_id, address)


def logs(job_id: str, address: str | None = None) -> str:
    c = client(address, job_id)
    return _known(job_id, address, lambda: c.get_job_logs(job_id))


def stop(job_id: str, address: str | None = None) -> bool:
    c = client(address, job_id)
    return _known(job_id, address, lambda: c.stop_job(job_id))


def follow(job_id: str, address: str | None = None, out=sys.stdout, poll_s: float = 1.0) -> JobState:
    """Stream the job's log to `out` until it ends; raise JobFailed (with the log tail) unless
    it succeeded."""
    c = client(address, job_id)  # one client: each new one costs a version handshake with the head
    _state(c, job_id, address)  # an unknown id: one line (JobNotFound), before any log stream

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop (e.g. head restarting); the status below decides
        print(f"note: log stream ended early ({type(e).__name__}: {e}); polling the status", file=sys.stderr)
    while (state := _state(c, job_id, address)).status not in TERMINAL:
        time.sleep(poll_s)
    if state.status != "SUCCEEDED":
        tail_lines = "\n".join(c.get_job_logs(job_id).splitlines()[-40:])
        raise JobFailed(f"job {job_id} {state.status}: {state.message}\n--- last lines of its log ---\n{tail_lines}")
    return state
