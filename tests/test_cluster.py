"""A real Ray head (`ray start --head` on 127.0.0.1) and the Jobs API: `pipeline submit` runs
`dvc repro` for the LM chain on it, streams its log and its metrics land in MLflow; a failing
job is reported with its log tail and a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.local_head import LocalHead
from tests.e2e_project import tiny_project
from tests.namespace_hosts import covered_across_hosts

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def local_head():
    with LocalHead(num_cpus=2) as head:
        yield head


@pytest.fixture
def ray_head(local_head):
    return local_head.jobs_address


def _pipeline(args: list[str], project: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


@covered_across_hosts("test_multi_host_lm_chain_with_ddp_registers_what_the_embedded_ray_does")
def test_submit_dvc_repro_to_a_cluster(ray_head, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    project = tiny_project(tmp_path / "project")
    store = f"sqlite:///{tmp_path}/jobs.db"
    proc = _pipeline(["submit", "--address", ray_head, "--env", f"MLFLOW_TRACKING_URI={store}", "--id", "lm-repro",
                      "--", "dvc", "repro", "train@lm"], project)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "submitted lm-repro" in out and "lm-repro: SUCCEEDED" in out
    # the log was streamed: DVC ran the chain on the cluster, and training joined that cluster
    assert "Running stage 'prepare@lm'" in out and "[lm] trained 6 steps" in out
    assert "training on Ray cluster at" in out
    status = _pipeline(["status", "lm-repro", "--address", ray_head], project)
    assert status.returncode == 0 and "lm-repro: SUCCEEDED" in status.stdout

    mlflow.set_tracking_uri(store)
    try:
        (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("pipeline").experiment_id])
        assert run.data.tags["cluster.workers"] == "2" and run.data.tags["ray.cluster"].startswith("Ray cluster at")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout
        assert run.data.tags["git.commit"] == head.strip()  # .git travelled with the working_dir
        assert len(MlflowClient().get_metric_history(run.info.run_id, "train/loss")) == 4
    finally:
        mlflow.set_tracking_uri(None)


def test_failed_job_exits_non_zero_with_its_log_tail(ray_head, tmp_path):
    project = tiny_project(tmp_path / "project")
    proc = _pipeline(["submit", "--address", ray_head, "--", "python", "-m", "stages.train", "lm",
                      "tasks.lm.trainer.max_steps=3"], project)
    assert proc.returncode == 1
    # the shards were never built on the cluster: the stage's own one-line error comes back in the tail
    assert "FAILED" in proc.stderr and "last lines of its log" in proc.stderr
    assert "error [train lm]" in proc.stderr and "shards" in proc.stderr, proc.stderr[-3000:]


def test_loopback_only_local_head_after_a_job(local_head):
    """The head `LocalHead` starts (for tests and for trying `pipeline submit`): every socket its
    processes listen on, after a job ran there (the failed job above; this module's tests run in
    file order), is on 127.0.0.1. The raylet and the GCS are waited for: on a busy machine the
    head answers before every service has bound its port."""
    import time

    import psutil

    from tests.test_loopback import is_loopback, listening

    root = psutil.Process(local_head.pid)
    deadline = time.time() + 60
    while True:
        sockets = listening({root.pid} | {p.pid for p in root.children(recursive=True)})
        if {"gcs_server", "raylet"} <= {name for _, _, name in sockets} or time.time() > deadline:
            break
        time.sleep(1)
    assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sockets
    assert not [s for s in sockets if not is_loopback(s[0])], sockets


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    project = tiny_project(tmp_path / "project")
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 1337", "seed: -1"))
    proc = _pipeline(["submit", "--address", "http://127.0.0.1:9", "--no-wait"], project, timeout=120)
    assert proc.returncode == 2 and "seed" in proc.stderr and "submitted" not in proc.stdout


def test_submit_waits_for_a_head_that_is_still_starting(tmp_path):
    """`pipeline submit` issued before the head is up (no dashboard yet, then no job agent yet:
    Ray's "No available agent to submit job" 500) retries with a bounded backoff and gets
    through once the head accepts jobs: the race that failed CI on a busy machine."""
    import time

    from pipeline.runtime.local_group import free_port

    project = tiny_project(tmp_path / "project")
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project),
           "PIPELINE_SUBMIT_WAIT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    early = subprocess.Popen([sys.executable, "-m", "pipeline", "submit", "--address", f"http://127.0.0.1:{port}",
                              "--id", "early", "--", "python", "-c", "print('job ran')"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)  # the first tries find nothing listening
        assert early.poll() is None, early.stdout.read()
        with LocalHead(num_cpus=1, dashboard_port=port):
            out, _ = early.communicate(timeout=600)
    finally:
        if early.poll() is None:
            early.kill()
    assert early.returncode == 0, out[-3000:]
    assert "submitted early" in out and "job ran" in out and "early: SUCCEEDED" in out, out[-3000:]


def test_submit_names_a_wait_setting_that_is_not_seconds(monkeypatch):
    """PIPELINE_SUBMIT_WAIT_S=2min ended `pipeline submit` in "could not convert string to float",
    naming no variable; now the variable and its value, before anything is sent."""
    from pipeline.runtime import jobs

    monkeypatch.setenv("PIPELINE_SUBMIT_WAIT_S", "2min")
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "venv,__pycache__")  # (submit sets it: restored)
    with pytest.raises(ValueError, match=r"^PIPELINE_SUBMIT_WAIT_S: expected seconds, got '2min'$"):
        jobs.submit("true", address="http://127.0.0.1:9")


def test_submit_to_a_cluster_that_never_comes_gives_up_in_one_line(tmp_path):
    from pipeline.runtime.local_group import free_port

    project = tiny_project(tmp_path / "project")
    address = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project),
           "PIPELINE_SUBMIT_WAIT_S": "4"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", address, "--no-wait"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "submitted" not in proc.stdout
    lines = proc.stderr.strip().splitlines()  # what it waits for (a silent wait of minutes), then why it gave up
    assert len(lines) == 2 and lines[0].startswith(f"waiting for the Ray Jobs API at {address} (up to 4 s;"), lines
    assert f"the Ray cluster at {address} did not accept the job in 4 s" in lines[1], proc.stderr


def test_submit_address_option_beats_ray_address(monkeypatch):
    """`--address` names the Jobs API to use: Ray's client would take RAY_ADDRESS over it (a stale
    or GCS-style one then won), so it is hidden while the client is made, and restored."""
    from pipeline.runtime import jobs
    from pipeline.runtime.local_group import free_port

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:7")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=re.escape(dead)):
        jobs.client(dead)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:7"


def test_a_head_whose_ray_start_exited_reports_why(tmp_path):
    """`ray start --head --block` that exits at once (a port taken, say): `_wait_up`'s error carries
    the head's log tail; stopping the head then killed a process group that was already gone, and
    its ProcessLookupError replaced that error."""
    head = LocalHead(log=tmp_path / "head.log", start_timeout_s=5)
    head._proc = subprocess.Popen(["sh", "-c", "echo 'ray start failed: port in use'; exit 1"],
                                  stdout=head.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    head._proc.wait()
    with pytest.raises(Exception) as err:
        try:
            head._wait_up()
        except BaseException:
            head.__exit__(None, None, None)  # as __enter__ does
            raise
    assert not isinstance(err.value, ProcessLookupError) and "port in use" in str(err.value)


def test_submit_keeps_the_commands_own_double_dashes():
    """`pipeline submit -- python tool.py -- --flag`: only the separator before the command goes (every
    `--` was dropped, so `--flag` reached the tool as one of its options); nothing given is dvc repro."""
    import argparse

    from pipeline.cli import job_entrypoint

    parser = argparse.ArgumentParser()
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER)
    given = parser.parse_args(["--", "python", "tool.py", "--", "--flag"]).entrypoint  # as `submit` parses it
    assert job_entrypoint(given) == ["python", "tool.py", "--", "--flag"]
    assert job_entrypoint(["python", "-m", "stages.train", "lm"]) == ["python", "-m", "stages.train", "lm"]
    assert job_entrypoint([]) == job_entrypoint(["--"]) == ["dvc", "repro"]


# --- job commands: an ordinary mistake is one line naming the job and the address (exit 2) ---

_NO_JOB = "Request failed with status code 404: Job nope does not exist."
# What Ray 2.60's head answers to a second submission with the same id (a 500 carrying the job
# agent's traceback; "already exists" only on its last lines).
_DUPLICATE = ("Request failed with status code 500: Traceback (most recent call last):\n  File \"job_head.py\", "
              "line 419, in submit_job\nRuntimeError: Request failed with status code 400: Traceback (most recent "
              "call last):\n  File \"job_manager.py\", line 553, in submit_job\n    raise ValueError(\nValueError: "
              "Job with submission_id dup already exists. Please use a different submission_id.\n.\n.")
_FAILED_MESSAGE = ("Job entrypoint command failed with exit code 3, last available logs (truncated to 20,000 chars):\n"
                   "Running entrypoint for job bad: python -c ...\nthe-log-body\n")


class _FakeJobs:
    """Answers like Ray's JobSubmissionClient, without a cluster."""

    def __init__(self, submit_errors=(), info=None, log=""):
        self.submit_errors, self.info, self.log, self.submitted = list(submit_errors), info, log, []

    def _known(self, job_id):
        if self.info is None or job_id == "nope":
            raise RuntimeError(_NO_JOB)

    def get_job_info(self, job_id):
        self._known(job_id)
        return self.info

    def get_job_logs(self, job_id):
        self._known(job_id)
        return self.log

    def stop_job(self, job_id):
        self._known(job_id)
        return True

    async def tail_job_logs(self, job_id):
        yield self.log

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs["submission_id"])
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        return kwargs["submission_id"]


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from pipeline.cli import main

    with pytest.raises(SystemExit) as done:
        main(args)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_job_commands_refuse_an_address_that_is_not_http_before_connecting(monkeypatch, capsys):
    """`stop abc --address 127.0.0.1:1` (or a GCS-style RAY_ADDRESS) made Ray look a dashboard up
    over gRPC: 43 s, then a 32-line "Timed out while waiting for GCS" traceback."""
    import time

    from pipeline.runtime import jobs

    monkeypatch.delenv("RAY_JOBS_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start = time.monotonic()
    code, out, err = _cli(["stop", "abc", "--address", "127.0.0.1:1"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "job 'abc'" in err and "--address is '127.0.0.1:1'" in err and "http://127.0.0.1:1" in err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    code, out, err = _cli(["status", "abc"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "RAY_ADDRESS is '127.0.0.1:1'" in err and "RAY_JOBS_ADDRESS=http://127.0.0.1:1" in err
    assert time.monotonic() - start < 10
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ValueError, match=re.escape("set RAY_JOBS_ADDRESS=http://head:8265")):
        jobs.logs("abc")
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "head:6379")
    with pytest.raises(ValueError, match=re.escape("RAY_JOBS_ADDRESS is 'head:6379'") + ".*http://head:8265"):
        jobs.client()
    with pytest.raises(ValueError, match=re.escape("--address is 'auto'") + ".*http://127.0.0.1:8265"):
        jobs.submit("true", "auto", wait_s=0)


def test_unknown_job_id_is_one_line_naming_job_and_address(monkeypatch, capsys):
    """`status/logs/stop nope` printed Ray's 21-line RuntimeError (404: Job nope does not exist)."""
    from pipeline.runtime import jobs

    monkeypatch.setattr(jobs, "client", lambda *a, **k: _FakeJobs())
    address = "http://127.0.0.1:8265"
    for args in (["status", "nope"], ["logs", "nope"], ["stop", "nope"], ["logs", "nope", "--follow"]):
        code, out, err = _cli([*args, "--address", address], capsys)
        assert code == 2 and out == "" and err == f"error: no job 'nope' at {address}\n", (args, err)


def test_submit_with_an_existing_id_is_one_line(monkeypatch):
    from pipeline.runtime import jobs

    fake = _FakeJobs([RuntimeError(_DUPLICATE)])
    monkeypatch.setattr(jobs, "client", lambda *a, **k: fake)
    with pytest.raises(ValueError) as e:
        jobs.submit("true", "http://127.0.0.1:8265", submission_id="dup", wait_s=5)
    assert str(e.value) == ("a job 'dup' already exists at http://127.0.0.1:8265: pick another --id (or none: "
                            "one is generated)")
    # a retry whose earlier try got through after all is that same job, not an error
    fake = _FakeJobs([RuntimeError("Failed to connect to Ray"), RuntimeError(_DUPLICATE)])
    monkeypatch.setattr(jobs, "client", lambda *a, **k: fake)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    assert jobs.submit("true", "http://127.0.0.1:8265", submission_id="dup", wait_s=60) == "dup"
    assert fake.submitted == ["dup", "dup"]


@pytest.mark.parametrize(("text", "expected"), [
    ("env_vars: [unclosed\n", "not valid YAML"),
    ("- working_dir: .\n", "a runtime_env is a mapping (working_dir, env_vars, pip, excludes, ...), not a list"),
    ("env_vars: {A: 1}\n", "env_vars.A is 1 (int): Ray takes strings only"),
    ("env_vars: [A=1]\n", "env_vars must be a mapping of NAME: value, not a list"),
    ("working_dir: 3\n", "working_dir must be a path"),
    ("excludes: /data\n", "excludes must be a list of patterns"),
])
def test_a_bad_runtime_env_file_is_one_line_naming_file_and_key(tmp_path, text, expected):
    """A --runtime-env file with bad YAML, a list, or a non-string env var gave a 14- to 53-line
    AttributeError/TypeError traceback."""
    from pipeline.config import ConfigError
    from pipeline.runtime import jobs

    (tmp_path / "env.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        jobs.runtime_env(tmp_path, Path("env.yaml"))
    assert str(e.value).startswith(str(tmp_path / "env.yaml")) and expected in str(e.value), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_runtime_env_files_that_were_fine_still_are(tmp_path):
    from pipeline.runtime import jobs

    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    assert jobs.runtime_env(tmp_path, Path("empty.yaml"), {"A": "1"}) == {
        "working_dir": str(tmp_path.resolve()), "env_vars": {"A": "1"}}
    root = Path(__file__).resolve().parents[1]
    spec = jobs.runtime_env(root, None, {"B": "2"}, [])
    assert spec["env_vars"] == {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "B": "2"}
    assert "/.venv" in spec["excludes"] and "pip" not in spec


def test_a_failed_job_prints_the_first_line_of_rays_message_and_its_log_tail_once(monkeypatch, capsys):
    """Ray's message for a failed job carries up to 20,000 characters of its log: the log was
    printed three times (streamed, in the message, in the tail), and `status` printed all of it."""
    from types import SimpleNamespace

    from pipeline.runtime import jobs

    info = SimpleNamespace(status="FAILED", message=_FAILED_MESSAGE, start_time=1000, end_time=4000)
    monkeypatch.setattr(jobs, "client", lambda *a, **k: _FakeJobs(info=info, log="the-log-body\n"))
    monkeypatch.setattr(jobs.follow, "__defaults__", (None, sys.stdout, 0.01))  # (stdout: capsys's)
    address = "http://127.0.0.1:8265"
    code, out, err = _cli(["logs", "bad", "--follow", "--address", address], capsys)
    assert code == 1 and (out + err).count("the-log-body") == 2, out + err  # streamed, then the tail once
    assert err.startswith("error: job bad FAILED: Job entrypoint command failed with exit code 3\n--- last lines")
    from pipeline.cli import main

    main(["status", "bad", "--address", address])
    assert capsys.readouterr().out == "bad: FAILED after 3 s (Job entrypoint command failed with exit code 3)\n"


def test_job_mistakes_against_a_real_head(ray_head, capsys):
    """The messages above are Ray's own: an unknown id, a reused id, a failed job's status."""
    import time

    from pipeline.runtime import jobs

    code, _, err = _cli(["stop", "nope", "--address", ray_head], capsys)
    assert code == 2 and err == f"error: no job 'nope' at {ray_head}\n"
    job_id = f"fails-{os.getpid()}"
    jobs.submit("python -c \"import sys; print('boom-line'); sys.exit(3)\"", ray_head, submission_id=job_id)
    with pytest.raises(ValueError, match=f"a job '{job_id}' already exists at {re.escape(ray_head)}"):
        jobs.submit("true", ray_head, submission_id=job_id, wait_s=5)
    deadline = time.monotonic() + 120
    while (state := jobs.status(job_id, ray_head)).status not in jobs.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state.status == "FAILED" and state.message == "Job entrypoint command failed with exit code 3", state


def test_the_ray_token_sent_in_clear_text_to_another_host_is_said(tmp_path, monkeypatch, capsys):
    """The job commands send the Ray token they find (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token) as a Bearer header: the multi-host setup copies the cluster's token there.
    Over plain http to another host anyone on the path can read it, which was silent: now one line
    on stderr says so (https and loopback, a tunnel's end, say nothing). A real Jobs API stand-in on
    127.0.0.1 receives the token; the address judged is the one Ray's client goes to."""
    import http.server
    import json
    import threading

    from pipeline.runtime import jobs

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("LOCAL-TOKEN\n")
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_JOBS_ADDRESS", "RAY_ADDRESS",
                 "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    remote = "http://10.20.30.40:8265"
    capsys.readouterr()
    assert jobs.auth_token(remote) == "LOCAL-TOKEN"
    assert capsys.readouterr().err.startswith(f"note: sending the Ray token ({home / '.ray' / 'auth_token'}) to "
                                              f"{remote} in clear text")
    for private in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://10.20.30.40"):
        assert jobs.auth_token(private) == "LOCAL-TOKEN", private
    assert capsys.readouterr().err == ""
    (tmp_path / "named").write_text("NAMED\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "named"))
    assert jobs.auth_token(remote) == "NAMED" and "(" + str(tmp_path / "named") + ")" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "GIVEN")
    assert jobs.auth_token(remote) == "GIVEN" and "(RAY_AUTH_TOKEN)" in capsys.readouterr().err
    assert jobs.auth_token(remote) == "GIVEN" and capsys.readouterr().err == ""  # said once (a submit retries)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")

    seen: list[str | None] = []

    class Head(http.server.BaseHTTPRequestHandler):  # the Jobs API's version answer, as a Ray head gives it
        def do_GET(self) -> None:
            seen.append(self.headers.get("authorization"))
            body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x",
                               "session_name": "s"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        jobs.client(f"http://127.0.0.1:{server.server_address[1]}")
        assert seen and set(seen) == {"Bearer LOCAL-TOKEN"}
        assert capsys.readouterr().err == ""  # (loopback: nothing to say)
        # Ray's client goes to RAY_API_SERVER_ADDRESS over RAY_ADDRESS: the token is judged for that host
        monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", remote)
        assert jobs.jobs_address() == remote
        seen.clear()
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{server.server_address[1]}")
        jobs.client()  # (the address both the client and the token check take)
        assert seen and set(seen) == {"Bearer LOCAL-TOKEN"}
    finally:
        server.shutdown()
