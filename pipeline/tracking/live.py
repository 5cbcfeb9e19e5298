"""The per-step history on the MLflow run while training runs, not only after it.

Ray Train V2 has no MLflow callback, so rank 0 of the fit logs its own history: the loop hands
each history entry (loss, lr, grad norm, throughput, MFU, data wait, validation loss, skipped
steps) to `LiveMetrics.log`, which only appends it to a bounded buffer; a daemon thread sends the
buffer in batches every few seconds. A step never waits on the network.

When the tracking server is down, sending fails fast (no HTTP retries in this thread), the
buffer keeps the newest `capacity` values and the thread tries again with a growing pause; when
the server is back, everything buffered is sent. Whatever never made it (the buffer overflowed,
or the fit ended while the server was still down) is written by the driver after the fit from the
final checkpoint's history, which holds every step: `fill_missing` sends only the (key, step)
pairs the run does not have yet. A resumed or rerun fit skips steps the run already holds, so no
step's metric is ever logged twice.

System metrics (CPU, memory, network, GPU) are sampled per training node by `node_monitor`, in
each node's local rank 0, under `system/<node>/...`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

PREFIX = "train/"
BATCH = 900  # MLflow's log_batch accepts up to 1000 metrics


def _metrics(entry: dict[str, Any], timestamp_ms: int, prefix: str = PREFIX) -> list[Any]:
    from mlflow.entities import Metric

    step = int(entry["step"])
    return [Metric(f"{prefix}{k}", float(v), timestamp_ms, step) for k, v in entry.items()
            if k != "step" and isinstance(v, (int, float))]


class LiveMetrics:
    """A bounded buffer of metrics and the thread that sends it to one MLflow run."""

    def __init__(self, run_id: str, tracking_uri: str, *, capacity: int = 200_000, interval_s: float = 2.0,
                 max_pause_s: float = 30.0, say: Any = print) -> None:
        from mlflow.tracking import MlflowClient

        # This process talks to MLflow only from this thread: fail fast and retry here, with our
        # own pause, instead of MLflow's minutes of HTTP retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.capacity, self.interval_s, self.max_pause_s = run_id, capacity, interval_s, max_pause_s
        self._client = MlflowClient(tracking_uri)
        self._say = say
        self._buffer: deque[Any] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._known_steps: set[int] | None = None  # steps of `train/loss` the run held at the start
        self.sent = self.dropped = 0
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="live-metrics", daemon=True)
        self._thread.start()

    def log(self, entry: dict[str, Any]) -> None:
        """Queue one history entry (called on the training thread; never blocks on the network)."""
        metrics = _metrics(entry, int(time.time() * 1000))
        with self._lock:
            self._buffer.extend(metrics)
            while len(self._buffer) > self.capacity:  # the oldest go; the driver writes them after the fit
                self._buffer.popleft()
                self.dropped += 1

    def _read_known_steps(self) -> None:
        self._known_steps = {m.step for m in self._client.get_metric_history(self.run_id, f"{PREFIX}loss")}

    def _send_some(self) -> bool:
        """Send up to one batch; True when something was taken and more may be waiting. Steps the
        run already held when this logger started (a resumed fit recomputing them) are not sent."""
        with self._lock:
            batch = [self._buffer[i] for i in range(min(BATCH, len(self._buffer)))]
            dropped_before = self.dropped
        if not batch:
            return False
        new = [m for m in batch if m.step not in self._known_steps]
        if new:
            self._client.log_batch(self.run_id, metrics=new)
        with self._lock:  # remove what was sent, less what log() trimmed from the left meanwhile
            for _ in range(max(0, len(batch) - (self.dropped - dropped_before))):
                self._buffer.popleft()
        self.sent += len(new)
        return True

    def _step(self) -> None:
        if self._known_steps is None:
            self._read_known_steps()
        while self._send_some():
            pass

    def _run(self) -> None:
        pause = self.interval_s
        while True:
            stopping = self._stop.wait(pause)
            try:
                self._step()
                if self._down_since is not None:
                    self._say(f"tracking server back after {time.time() - self._down_since:.0f} s; "
                              f"live metrics caught up ({self.sent} sent)", flush=True)
                    self._down_since = None
                pause = self.interval_s
            except Exception as e:  # the server is down or refusing: keep buffering, try again later
                if self._down_since is None:
                    self._down_since = time.time()
                    self._say(f"live metrics: tracking server unreachable ({str(e).splitlines()[0][:120]}); "
                              "training goes on, metrics are buffered", flush=True)
                pause = min(self.max_pause_s, pause * 2)
            if stopping:
                return

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop the thread after one last attempt to send (bounded by `timeout_s`)."""
        self._stop.set()
        self._thread.join(timeout_s)


def reachable_from_anywhere(tracking_uri: str) -> bool:
    """Whether workers on other machines reach this store (a server or a database), unlike a
    SQLite or file store, which is a file on this machine."""
    scheme = tracking_uri.split("://", 1)[0] if "://" in tracking_uri else "file"
    return scheme not in ("file", "sqlite")


def fill_missing(run_id: str, history: Iterable[dict[str, Any]], prefix: str = PREFIX) -> int:
    """Log the history's (key, step) pairs the run does not hold yet; returns how many. Called by
    the driver after the fit, so that a live logger's gaps (server down, buffer overflow, a
    crash) are filled and nothing is logged twice."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = list(history)
    now = int(time.time() * 1000)
    wanted = [m for entry in history for m in _metrics(entry, now, prefix)]
    held: dict[str, set[int]] = {}
    for key in {m.key for m in wanted}:
        held[key] = {m.step for m in client.get_metric_history(run_id, key)}
    missing = [m for m in wanted if m.step not in held[m.key]]
    for i in range(0, len(missing), BATCH):
        client.log_batch(run_id, metrics=missing[i:i + BATCH])
    return len(missing)


@contextlib.contextmanager
def node_monitor(run_id: str, tracking_uri: str, node: str) -> Iterator[None]:
    """Sample this node's CPU, memory, disk, network (and GPUs) into the run as
    `system/<node>/...` while the body runs. Best effort: a tracking server that is down costs
    samples, never the training."""
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per worker

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1, resume_logging=True,
                                       node_id=node, tracking_uri=tracking_uri)
        monitor.start()
    except Exception:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            monitor.finish()
