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
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
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
        assert time.perf_counter() - start < 0.5
        _wait_for(lambda: any("unreachable" in line for line in lines))

        server = mlflow_server(tmp_path, port)  # same store, back after a while
        _wait_for(lambda: len(client.get_metric_history(run_id, "train/loss")) == 15)
        live.close()
        assert any("tracking server back" in line for line in lines), lines
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
