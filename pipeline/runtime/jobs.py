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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.runtime.connect import ClusterUnavailable  # (the job server did not accept the job in time)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = Path("cluster/runtime_env.yaml")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(RuntimeError):
    """A submitted job ended FAILED or STOPPED; the message carries its log tail."""


def jobs_address(address: str | None = None) -> str:
    """The Jobs API (dashboard) address: the argument, else RAY_JOBS_ADDRESS, else RAY_ADDRESS
    when it is an http(s) address, else the local default."""
    env = os.environ.get("RAY_JOBS_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    return address or (env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS)


def auth_token() -> str | None:
    """The cluster token, looked up where Ray keeps it: RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (written by `ray start` / `ray get-auth-token --generate`)."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def client(address: str | None = None):
    """A Jobs API client. Ray 2.59+ clusters require token authentication, but Ray's client
    only sends the token when RAY_AUTH_MODE=token is set on this side too; the header is sent
    here whenever a token is found, so `submit` works against both kinds of cluster."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"authorization": f"Bearer {token}"} if token else None
    resolved = jobs_address(address)
    # Ray's client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given: where
    # one was chosen (--address, RAY_JOBS_ADDRESS), those are hidden while the client is made, so a
    # stale RAY_ADDRESS cannot beat it; otherwise Ray resolves them as it always did (a GCS-style
    # RAY_ADDRESS finds its cluster's dashboard).
    chosen = address or os.environ.get("RAY_JOBS_ADDRESS")
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
              if chosen and k in os.environ}
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
    data: dict[str, Any] = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    working_dir = Path(data.get("working_dir", "."))
    data["working_dir"] = str(working_dir if working_dir.is_absolute() else (project / working_dir).resolve())
    data["env_vars"] = {**data.get("env_vars", {}), **(env or {})}
    if pip is not None:
        data["pip"] = pip
    if not data.get("pip"):
        data.pop("pip", None)
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
    wait_s = float(os.environ.get("PIPELINE_SUBMIT_WAIT_S", 120)) if wait_s is None else wait_s
    submission_id = submission_id or f"pipeline-{uuid.uuid4().hex[:12]}"
    deadline, delay, tries = time.monotonic() + wait_s, 0.5, 0
    while True:
        tries += 1
        try:
            return client(address).submit_job(entrypoint=entrypoint, runtime_env=env_spec,
                                              submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus)
        except (ConnectionError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if tries > 1 and "already exists" in reason:  # an earlier try got through after all
                return submission_id
            if not any(s in reason for s in _STARTING):
                raise
            if time.monotonic() + delay > deadline:
                raise ClusterUnavailable(f"the Ray cluster at {jobs_address(address)} did not accept the job in "
                                         f"{wait_s:.0f} s ({tries} tries; last: {reason[:200]}); is it running? "
                                         "(PIPELINE_SUBMIT_WAIT_S sets the wait)") from None
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


@dataclass
class JobState:
    job_id: str
    status: str
    message: str
    seconds: float | None


def _state(c, job_id: str) -> JobState:
    info = c.get_job_info(job_id)
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return JobState(job_id, str(info.status.value if hasattr(info.status, "value") else info.status),
                    info.message or "", seconds)


def status(job_id: str, address: str | None = None) -> JobState:
    return _state(client(address), job_id)


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return client(address).stop_job(job_id)


def follow(job_id: str, address: str | None = None, out=sys.stdout, poll_s: float = 1.0) -> JobState:
    """Stream the job's log to `out` until it ends; raise JobFailed (with the log tail) unless
    it succeeded."""
    c = client(address)  # one client: each new one costs a version handshake with the head

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop (e.g. head restarting); the status below decides
        print(f"note: log stream ended early ({type(e).__name__}: {e}); polling the status", file=sys.stderr)
    while (state := _state(c, job_id)).status not in TERMINAL:
        time.sleep(poll_s)
    if state.status != "SUCCEEDED":
        tail_lines = "\n".join(c.get_job_logs(job_id).splitlines()[-40:])
        raise JobFailed(f"job {job_id} {state.status}: {state.message}\n--- last lines of its log ---\n{tail_lines}")
    return state
