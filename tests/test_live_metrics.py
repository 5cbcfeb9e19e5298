"""Live metrics against a real `mlflow server` on 127.0.0.1: entries reach the run while
"training" goes on, logging never blocks while the server is down, everything buffered arrives
once it is back, a resumed fit does not log a step twice, and the driver's after-fit fill adds
exactly what is missing."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.runtime.local_group import free_port
from pipeline.tracking.live import LiveMetrics, fill_missing, reachable_from_anywhere
from tests.e2e_project import mlflow_server


def _entry(step: int) -> dict[str, float]:
    return {"step": step, "loss": 5.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5 + step, "tokens_per_s": 100.0 * step}


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _wait_for(predicate, timeout_s: float = 60) -> None:
    """Poll `predicate` until true. A query of the test's own that fails (the server just restarted,
    or a loaded machine answers later than the short timeout these tests set for the live sink)
    counts as "not yet": only the deadline fails the test."""
    import requests
    from mlflow.exceptions import MlflowException

    deadline = time.time() + timeout_s
    while True:
        try:
            if predicate():
                return
        except (MlflowException, requests.exceptions.RequestException):
            pass
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_live_metrics_survive_a_server_outage_without_duplicates(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # (3 s: a loaded machine's fresh server timed out)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    lines: list[str] = []
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("live")).info.run_id
        live = LiveMetrics(run_id, uri, interval_s=0.2, max_pause_s=1.0, say=lambda *a, **k: lines.append(" ".join(a)))
        for step in range(1, 6):
            live.log(_entry(step))
        _wait_for(lambda: len(client.get_metric_history(run_id, "train/loss")) == 5)  # there while "training"

        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        start = time.perf_counter()
        for step in range(6, 16):  # the server is down: logging still returns at once
            live.log(_entry(step))
        live.tag({"impl.strategy": "ddp"})  # (the loop's implementation tags, as training starts)
        assert time.perf_counter() - start < 0.5
        _wait_for(lambda: any("unreachable" in line for line in lines))

        server = mlflow_server(tmp_path, port)  # same store, back after a while
        _wait_for(lambda: len(client.get_metric_history(run_id, "train/loss")) == 15)
        live.close()
        assert client.get_run(run_id).data.tags["impl.strategy"] == "ddp"  # held through the outage, then sent
        # the lines name the cause (a refused connection, not a URL cut before it) and what the
        # outage held back (10 steps of 4 values), not the run's total
        down = next(line for line in lines if "unreachable" in line)
        assert names_a_lost_connection(down) and "\n" not in down, down
        back = next((line for line in lines if "tracking server back" in line), None)
        assert back is not None and "caught up: 40 values sent" in back, lines
        expected = [_entry(s) for s in range(1, 16)]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):  # every step once, with its own value
            assert _history(client, run_id, f"train/{key}") == [(e["step"], pytest.approx(e[key])) for e in expected]

        # A resumed fit recomputes steps 11-15 and goes on to 20: only 16-20 are new.
        resumed = LiveMetrics(run_id, uri, interval_s=0.2)
        for step in range(11, 21):
            resumed.log(_entry(step))
        _wait_for(lambda: len(client.get_metric_history(run_id, "train/loss")) >= 20)
        resumed.close()
        assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 21))

        # The driver's fill after the fit: only what is missing (a key the live logger never sent).
        history = [{**_entry(s), "val_loss": 1.0} if s % 10 == 0 else _entry(s) for s in range(1, 21)]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert fill_missing(run_id, history) == 2  # val_loss at 10 and 20
        assert fill_missing(run_id, history) == 0
        assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 21))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_live_metrics_buffer_is_bounded_and_the_fill_completes_it(tmp_path, monkeypatch):
    """With nothing answering, the buffer keeps only the newest values; what it dropped is what
    the driver's fill writes after the fit (here into a SQLite store)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    dead = f"http://127.0.0.1:{free_port()}"
    live = LiveMetrics("no-such-run", dead, capacity=12, interval_s=0.1, max_pause_s=0.2, say=lambda *a, **k: None)
    for step in range(1, 11):
        live.log(_entry(step))  # 4 metrics each
    live.close(timeout_s=2)
    assert live.sent == 0

    store = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("fill")).info.run_id
    bounded = LiveMetrics(run_id, store, capacity=12, interval_s=60, say=lambda *a, **k: None)
    for step in range(1, 11):
        bounded.log(_entry(step))
    assert len(bounded._buffer) == 12 and bounded.dropped == 28  # the newest 3 steps' 4 metrics stay
    bounded.close(timeout_s=10)
    assert [s for s, _ in _history(client, run_id, "train/loss")] == [8, 9, 10]
    assert fill_missing(run_id, [_entry(s) for s in range(1, 11)]) == 28
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 11))


def test_live_metrics_go_live_only_where_workers_reach_the_store():
    assert reachable_from_anywhere("http://10.0.0.5:5000") and reachable_from_anywhere("postgresql://db/mlflow")
    assert not reachable_from_anywhere("sqlite:////tmp/m.db") and not reachable_from_anywhere("/tmp/mlruns")


def names_a_lost_connection(line: str) -> bool:
    """Whether an outage line names the socket-level cause, whichever one the kill produced: a
    refused connection, or (when the server died mid-request, as happens on a busy machine) an
    aborted or reset one; not the request's URL, which would push the cause out of sight."""
    causes = ("Connection refused", "Connection aborted", "Connection reset", "RemoteDisconnected")
    return any(c in line for c in causes) and "/api/" not in line


def test_system_sampler_survives_a_server_outage(tmp_path, monkeypatch):
    """MLflow's own monitor stops for good at its first failed request; the sampler keeps
    sampling through an outage (one short line), and once the server is back its samples arrive
    with the steps going on where they stopped: no gap, no step twice."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.live import SystemSampler

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # a worker's bound (`bound_requests_here`): the outage is a refused connection, seen at once; with 3 s
    # a loaded machine's restarted server stored each batch but answered late, so "back" was never said
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    lines: list[str] = []
    key = "system/node-test/cpu_utilization_percentage"
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("system")).info.run_id
        sampler = SystemSampler(run_id, uri, "node-test", sampling_interval=0.3,
                                say=lambda *a, **k: lines.append(" ".join(a))).start()
        _wait_for(lambda: len(client.get_metric_history(run_id, key)) >= 2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        _wait_for(lambda: any("unreachable" in line for line in lines))
        time.sleep(1.0)  # samples taken while the server is down
        server = mlflow_server(tmp_path, port)
        before = len(client.get_metric_history(run_id, key))
        _wait_for(lambda: len(client.get_metric_history(run_id, key)) >= before + 3)  # sampling went on
        assert sampler.finish(timeout_s=60)  # (a bound, not a timing: a loaded machine)
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(len(steps)))
        assert len([line for line in lines if "unreachable" in line]) == 1, lines
        down = next(line for line in lines if "unreachable" in line)
        assert names_a_lost_connection(down) and "\n" not in down, down
        assert any("back" in line for line in lines), lines

        resumed = SystemSampler(run_id, uri, "node-test", sampling_interval=0.3, say=lambda *a, **k: None).start()
        _wait_for(lambda: len(client.get_metric_history(run_id, key)) >= len(steps) + 1)
        assert resumed.finish(timeout_s=60)
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(len(steps)))  # a second sampler of the run goes on after the first's steps
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_system_sampler_sends_a_backlog_in_few_requests(tmp_path):
    """After an outage the kept samples (up to 2,000) went one request each, behind the new ones;
    now as many as one `log_batch` takes (BATCH metrics), steps in order, and a failed request
    keeps its samples for the next try (no step lost or sent twice)."""
    from pipeline.tracking.live import BATCH, SystemSampler

    class Store:  # records the requests (the real server's side is the outage test above)
        def __init__(self, fail_at: int | None = None) -> None:
            self.batches: list[list] = []
            self.fail_at = fail_at

        def log_batch(self, run_id: str, metrics: list) -> None:
            if len(self.batches) == self.fail_at:
                self.fail_at = None
                raise ConnectionError("down")
            self.batches.append(metrics)

    sampler = SystemSampler("run", f"sqlite:///{tmp_path}/m.db", "node-x", sampling_interval=1)
    values = {f"metric_{i}": float(i) for i in range(10)}
    sampler._pending.extend((1000 + i, values) for i in range(300))
    sampler._next_step = 5
    store = Store(fail_at=1)
    with pytest.raises(ConnectionError):
        sampler._send(store)
    assert len(sampler._pending) == 300 - BATCH // 10 and sampler._next_step == 5 + BATCH // 10
    sampler._send(store)
    assert len(store.batches) == -(-3000 // BATCH) and not sampler._pending and sampler.sent == 300
    steps = [m.step for batch in store.batches for m in batch[::10]]
    assert steps == list(range(5, 305)) and all(len(b) <= BATCH for b in store.batches)


def test_driver_run_ends_in_seconds_when_the_server_hangs(tmp_path, monkeypatch):
    """A tracking server that stops answering (SIGSTOP: connections accepted, never answered) after
    the fit: with MLflow's defaults the driver sat minutes in `end_run` and the fill, silent. Now
    each request is bounded, one line says what is awaited, and the failure names its cause."""
    import threading

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_runs import bounded_requests, system_metrics

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)  # MLflow's defaults, as a user has them
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    lines: list[str] = []
    outcome: dict[str, object] = {}
    try:
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("hang")).info.run_id

        def driver() -> None:
            with system_metrics(run_id, say=lambda *a, **k: lines.append(" ".join(a))):
                _wait_for(lambda: "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics)
                os.killpg(server.pid, signal.SIGSTOP)  # "training" is over; the server hangs
            outcome["ended"] = time.time()
            try:
                with bounded_requests():
                    fill_missing(run_id, [_entry(1)])
            except Exception as e:
                outcome["error"] = e
            outcome["filled"] = time.time()

        thread = threading.Thread(target=driver, daemon=True)
        start = time.time()
        thread.start()
        thread.join(180)  # MLflow's defaults: 120 s a request, 7 retries (many minutes)
        assert not thread.is_alive(), f"the driver still waits on a hung server: {lines}"
        assert outcome["ended"] - start < 90 and outcome["filled"] - outcome["ended"] < 60  # seconds, not minutes
        assert any(line.startswith(f"waiting for the tracking server at {uri} (ending run {run_id} as FINISHED")
                   for line in lines), lines
        assert any(f"could not mark MLflow run {run_id} FINISHED" in line and "Read timed out" in line
                   for line in lines), lines
        from pipeline.tracking.live import outage_cause

        assert "Read timed out" in outage_cause(outcome["error"])
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        mlflow.set_tracking_uri(None)


def test_ctrl_c_ends_the_run_killed_with_one_line(tmp_path, capsys):
    """KeyboardInterrupt in the body: MLflow's convention for a run stopped by its user is KILLED
    (not FAILED), and one line says that rerunning resumes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_runs import system_metrics

    store = f"sqlite:///{tmp_path}/m.db"
    mlflow.set_tracking_uri(store)
    try:
        client = MlflowClient(store)
        run_id = client.create_run(client.create_experiment("ctrl-c")).info.run_id
        with pytest.raises(KeyboardInterrupt), system_metrics(run_id):
            raise KeyboardInterrupt
        assert client.get_run(run_id).info.status == "KILLED"
        out = [line for line in capsys.readouterr().out.splitlines() if "interrupted" in line]
        assert len(out) == 1 and "KILLED" in out[0] and "resume" in out[0], out
        with pytest.raises(RuntimeError), system_metrics(run_id):
            raise RuntimeError("a failed fit")
        assert client.get_run(run_id).info.status == "FAILED"
    finally:
        mlflow.set_tracking_uri(None)


def test_fill_missing_keeps_each_entrys_own_time(tmp_path, monkeypatch):
    """Back-filled values land where their step happened on MLflow's wall-time axis when the
    history records a time ("time", seconds since the epoch), and that time is no metric itself;
    entries without one get the time of the fill."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("times")).info.run_id
    t0 = 1_700_000_000.0
    before = time.time()
    assert fill_missing(run_id, [{**_entry(s), "time": t0 + 60 * s} for s in (1, 2, 3)] + [_entry(4)]) == 16
    logged = {m.step: m.timestamp for m in client.get_metric_history(run_id, "train/loss")}
    assert [logged[s] for s in (1, 2, 3)] == [int((t0 + 60 * s) * 1000) for s in (1, 2, 3)]
    assert logged[4] >= int(before * 1000)
    assert "train/time" not in client.get_run(run_id).data.metrics


def test_a_terminated_training_ends_its_run_killed(tmp_path):
    """SIGTERM (`pipeline stop`, a scheduler's pre-emption, `kill`) ended the process before any
    `finally`, leaving the MLflow run RUNNING for ever; only Ctrl-C ended it KILLED. A real process
    holding a run open as the train stage does, terminated: KILLED, exit status 128 + 15, one line."""
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient

    from tests.conftest import ROOT

    store = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("term")).info.run_id
    child = ("import sys, time, mlflow\n"
             f"mlflow.set_tracking_uri({store!r})\n"
             "from pipeline.tracking.mlflow_runs import system_metrics\n"
             f"with system_metrics({run_id!r}):\n"
             "    print('training', flush=True)\n"
             "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while (line := proc.stdout.readline()) and line.strip() != "training":
            lines.append(line)
        assert line.strip() == "training", "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert client.get_run(run_id).info.status == "KILLED"
    assert len([line for line in out.splitlines() if "ends KILLED" in line]) == 1, out[-3000:]
    mlflow.set_tracking_uri(None)


def test_a_rerun_continues_its_mlflow_run_only_while_it_is_there(tmp_path, capsys, monkeypatch):
    """The train stage continues the MLflow run an interrupted Ray run logged to (its id kept beside
    the checkpoints). Resumed with other code, the run is tagged with the commit run.json records
    (it kept the first attempt's, which `pipeline reproduce` then checked out), the earlier one kept
    in `git.resumed_from`; a run deleted in the UI made every rerun fail, and now starts a new one
    with one line; a store that answers an error for the run (a 503) stops the stage instead of
    starting a second run that splits the training's metrics."""
    import http.server
    import threading

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate
    from pipeline.flows.train import _mlflow_run, _run_to_continue
    from pipeline.tracking.mlflow_runs import TrackingUnavailable
    from tests.conftest import tiny_raw

    store = f"sqlite:///{tmp_path}/m.db"
    cfg = validate(tiny_raw([f"tracking.uri={store}", f"tracking.artifact_dir={tmp_path / 'artifacts'}"]))
    run_dir = str(tmp_path / "runs" / "lm-abc")
    try:
        first = _mlflow_run(cfg, "lm", run_dir, {"git.commit": "a" * 40, "git.dirty": "true", "env.torch": "1"})
        again = _mlflow_run(cfg, "lm", run_dir, {"git.commit": "b" * 40, "git.dirty": "false", "env.torch": "1"})
        client = MlflowClient(store)
        tags = client.get_run(first).data.tags
        assert again == first and tags["git.commit"] == "b" * 40 and tags["git.dirty"] == "false"
        assert tags["git.resumed_from"] == "a" * 40
        client.delete_run(first)
        capsys.readouterr()
        fresh = _mlflow_run(cfg, "lm", run_dir, {"git.commit": "b" * 40})
        assert fresh != first and client.get_run(fresh).info.lifecycle_stage == "active"
        out = capsys.readouterr().out
        assert f"MLflow run {first}, which this training logged to, was deleted: starting a new run" in out
        # another tracking.experiment (dvc exp run -S tracking.experiment=...): a new run in that one, not
        # the old run continued in the old experiment with the new one left empty
        other = validate(tiny_raw([f"tracking.uri={store}", f"tracking.artifact_dir={tmp_path / 'artifacts'}",
                                   "tracking.experiment=other"]))
        moved = _mlflow_run(other, "lm", run_dir, {"git.commit": "b" * 40})
        assert moved != fresh
        assert client.get_run(moved).info.experiment_id == client.get_experiment_by_name("other").experiment_id
        assert (f"MLflow run {fresh}, which this training logged to, is in experiment 'pipeline', not in "
                "tracking.experiment's: starting a new run there") in capsys.readouterr().out
        assert _mlflow_run(other, "lm", run_dir, {"git.commit": "b" * 40}) == moved  # (and continued there)
        fresh = moved

        class Unavailable(http.server.BaseHTTPRequestHandler):  # a tracking server that is overloaded
            def do_GET(self) -> None:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mlflow.set_tracking_uri(f"http://127.0.0.1:{server.server_address[1]}")
        try:
            with pytest.raises(TrackingUnavailable, match=rf"^cannot read MLflow run {fresh}, which this training "
                                                          r"logs to \(.*503.*\); nothing was trained"):
                _run_to_continue(fresh, "lm", "0")
        finally:
            server.shutdown()
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("written", ["mlruns", "./mlruns", "file:mlruns"])
def test_a_relative_folder_store_is_one_store_whatever_the_cwd(tmp_path, monkeypatch, written):
    """A relative folder store (MLFLOW_ALLOW_FILE_STORE=true) is made absolute against the project
    root, as a relative SQLite path is: left relative, a Ray Train worker (cwd: its own folder)
    logged its live metrics to a store of its own, and a queued DVC experiment (cwd: a copy under
    .dvc/tmp/exps/ that DVC deletes) wrote its runs into that copy."""
    from mlflow.tracking import MlflowClient

    from pipeline.config.schema import TrackingConfig
    from pipeline.tracking import mlflow_runs

    root = tmp_path / "ws"
    queued = root / ".dvc" / "tmp" / "exps" / "tmpabc"
    queued.mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", written)
    monkeypatch.setenv("DVC_ROOT", str(root))  # as DVC sets it for a queued experiment
    monkeypatch.chdir(queued)
    uri = mlflow_runs.tracking_uri(TrackingConfig())
    assert uri == (str(root / "mlruns") if written != "file:mlruns" else (root / "mlruns").as_uri())
    for other in ("sqlite:///m.db", "sqlite:////abs/m.db", "/abs/mlruns", "file:///abs/mlruns", "http://h:5000",
                  "databricks"):
        assert mlflow_runs.resolve_store(other) == (f"sqlite:///{root}/m.db" if other == "sqlite:///m.db" else other)

    # the driver's run, and a worker's live logger in another cwd given the URI the driver hands it
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("cwd")).info.run_id
    worker = tmp_path / "ray_worker_cwd"
    worker.mkdir()
    monkeypatch.chdir(worker)
    live = LiveMetrics(run_id, uri, interval_s=0.1, say=lambda *a, **k: None)
    live.log(_entry(1))
    live.close(timeout_s=10)
    assert _history(client, run_id, "train/loss") == [(1, 5.0)]
    assert (root / "mlruns").is_dir() and not (worker / "mlruns").exists() and not (queued / "mlruns").exists()
