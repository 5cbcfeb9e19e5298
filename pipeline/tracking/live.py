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
each node's local rank 0, under `system/<node>/...`, and on the driver under `system/...`
(`SystemSampler`, used by `mlflow_runs.system_metrics`). MLflow's own monitor stops for good at its
first failed request; `SystemSampler` keeps sampling through an outage and sends what it kept
when the server answers again.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

PREFIX = "train/"
BATCH = 900  # MLflow's log_batch accepts up to 1000 metrics


TIME_KEY = "time"  # a history entry's wall-clock time (seconds since the epoch; entries of older runs have none)


def _metrics(entry: dict[str, Any], timestamp_ms: int, prefix: str = PREFIX) -> list[Any]:
    """The entry's numbers as MLflow metrics at its step. Timestamped with the entry's own
    wall-clock time where it has one (so a fill after the fit lands where the step happened on
    MLflow's wall-time axis), else with `timestamp_ms`."""
    from mlflow.entities import Metric

    step = int(entry["step"])
    when = entry.get(TIME_KEY)
    if isinstance(when, (int, float)) and when > 0:
        timestamp_ms = int(when * 1000)
    return [Metric(f"{prefix}{k}", float(v), timestamp_ms, step) for k, v in entry.items()
            if k not in ("step", TIME_KEY) and isinstance(v, (int, float))]


_POOL = re.compile(r"^\w*HTTP\w*\((host=[^)]*)?\):\s*")  # urllib3's "HTTPConnectionPool(host=.., port=..): "


def outage_cause(error: BaseException) -> str:
    """Why a request to the tracking server failed, in a few words: the innermost cause MLflow and
    requests wrap ("Failed to establish a new connection: [Errno 111] Connection refused", "Read
    timed out. (read timeout=10)"), not the outer message, whose URL and query string push the
    cause past any length a one-line message can show."""
    chain, e = [], error
    while e is not None and len(chain) < 20 and all(e is not c for c in chain):
        chain.append(e)
        reason = getattr(e, "reason", None)  # urllib3's MaxRetryError keeps its cause here
        e = reason if isinstance(reason, BaseException) else (e.__cause__ or e.__context__)
    urllib3 = [c for c in chain if type(c).__module__.startswith("urllib3") and type(c).__name__ != "MaxRetryError"]
    for c in (urllib3[-1:] or chain[::-1]):
        lines = str(c).strip().splitlines()
        if lines and len(lines[0]) > 12:  # ("timed out" alone says less than urllib3's own line)
            return _POOL.sub("", lines[0])[:300]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


class LiveMetrics:
    """A bounded buffer of metrics and the thread that sends it to one MLflow run."""

    def __init__(self, run_id: str, tracking_uri: str, *, capacity: int = 200_000, interval_s: float = 2.0,
                 max_pause_s: float = 30.0, say: Any = print) -> None:
        from mlflow.tracking import MlflowClient

        # This process talks to MLflow only from this thread: fail fast and retry here, with our
        # own pause, instead of MLflow's minutes of HTTP retries.
        bound_requests_here()
        self.run_id, self.capacity, self.interval_s, self.max_pause_s = run_id, capacity, interval_s, max_pause_s
        self._client = MlflowClient(tracking_uri)
        self._say = say
        self._buffer: deque[Any] = deque()
        self._tags: dict[str, str] = {}  # waiting to be sent (a few: the implementation's)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._known_steps: set[int] | None = None  # steps of `train/loss` the run held at the start
        self.sent = self.dropped = 0
        self._down_since: float | None = None  # the first failed attempt of an outage
        self._last_failure = 0.0  # the last failed attempt (the server came back after it)
        self._sent_before_outage = 0
        self._thread = threading.Thread(target=self._run, name="live-metrics", daemon=True)
        self._thread.start()

    def log(self, entry: dict[str, Any]) -> None:
        """Queue one history entry (called on the training thread; never blocks on the network)."""
        metrics = _metrics(entry, int(time.time() * 1000))  # (the entry's own time, if it has one)
        with self._lock:
            self._buffer.extend(metrics)
            while len(self._buffer) > self.capacity:  # the oldest go; the driver writes them after the fit
                self._buffer.popleft()
                self.dropped += 1

    def tag(self, tags: dict[str, str]) -> None:
        """Queue run tags (sent by the thread before the next metrics; never blocks)."""
        with self._lock:
            self._tags.update(tags)

    def _send_tags(self) -> None:
        from mlflow.entities import RunTag

        with self._lock:
            tags = dict(self._tags)
        if tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            with self._lock:  # what was sent, unless queued again meanwhile with another value
                for k, v in tags.items():
                    if self._tags.get(k) == v:
                        del self._tags[k]

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
        self._send_tags()
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
                    # down for at least the span of the failed attempts, at most until now (the pause between
                    # attempts hides when exactly it came back); what was sent since the outage began
                    down, upper = self._last_failure - self._down_since, time.time() - self._down_since
                    self._say(f"live metrics: tracking server back (unreachable for {down:.0f}-{upper:.0f} s); "
                              f"caught up: {self.sent - self._sent_before_outage} values sent", flush=True)
                    self._down_since = None
                pause = self.interval_s
            except Exception as e:  # the server is down or refusing: keep buffering, try again later
                self._last_failure = time.time()
                if self._down_since is None:
                    self._down_since, self._sent_before_outage = self._last_failure, self.sent
                    self._say(f"live metrics: tracking server unreachable ({outage_cause(e)}); "
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
    now = int(time.time() * 1000)  # for entries without their own time (`_metrics`)
    wanted = [m for entry in history for m in _metrics(entry, now, prefix)]
    held: dict[str, set[int]] = {}
    for key in {m.key for m in wanted}:
        held[key] = {m.step for m in client.get_metric_history(run_id, key)}
    missing = [m for m in wanted if m.step not in held[m.key]]
    for i in range(0, len(missing), BATCH):
        client.log_batch(run_id, metrics=missing[i:i + BATCH])
    return len(missing)


def bound_requests_here() -> None:
    """Make this process's MLflow requests fail fast (one try, 10 s), unless the environment says
    otherwise: for a worker process, whose only MLflow traffic is the live logger's and the system
    sampler's threads, which retry with their own pause instead of MLflow's minutes per request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class SystemSampler:
    """This node's CPU, memory, disk, network (and GPU) metrics, sampled by MLflow's own monitors
    into `system/[<node>/]...` of one run, by a thread that outlives an outage.

    MLflow's `SystemMetricsMonitor.monitor` returns for good at its first failed request (and logs a
    multi-line warning), so one blip of the tracking server ended a run's system metrics. Here a
    failed send keeps the samples (the newest `capacity`), says so in one line, and is tried again
    each interval; steps continue from the run's last `system/` step, read once the server answers.
    """

    def __init__(self, run_id: str, tracking_uri: str, node_id: str | None = None, *, sampling_interval: float = 10,
                 capacity: int = 2_000, say: Any = print) -> None:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per process
        # MLflow's monitor for its samplers and settings (MLFLOW_SYSTEM_METRICS_* win); its thread is never
        # started, and resume_logging=False: the run's last step is read by our thread, never here
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, samples_before_logging=1,
                                             resume_logging=False, node_id=node_id, tracking_uri=tracking_uri)
        self.run_id, self.tracking_uri, self._say = run_id, tracking_uri, say
        self.interval_s = float(self._monitor.sampling_interval)
        self._prefix = "system/" + (f"{self._monitor.node_id}/" if self._monitor.node_id else "")
        self._pending: deque[tuple[int, dict[str, float]]] = deque(maxlen=capacity)
        self._next_step: int | None = None
        self._stop = threading.Event()
        self.sent = 0
        self.down = False
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)

    def start(self) -> SystemSampler:
        self._thread.start()
        return self

    def _sample(self) -> None:
        for m in self._monitor.monitors:
            m.collect_metrics()
        values: dict[str, float] = {}
        for m in self._monitor.monitors:
            values.update(m.aggregate_metrics())
            m.clear_metrics()
        self._pending.append((int(time.time() * 1000), values))

    def _send(self, client: Any) -> None:
        from mlflow.entities import Metric

        if self._next_step is None:  # continue after the run's last system step (a resumed run)
            # (the driver's own `system/<metric>`, not the nodes' `system/node-<id>/<metric>`)
            held = [m.step for m in client.get_run(self.run_id).data._metric_objs if m.key.startswith(self._prefix)
                    and "/" not in m.key[len(self._prefix):]]
            self._next_step = max(held) + 1 if held else 0
        while self._pending:
            # as many kept samples as one request takes (after an outage: the backlog in a few requests,
            # not one per sample); a failed request pops none, so no step is lost or sent twice
            batch: list[Any] = []
            taken = 0
            for when, values in self._pending:
                if batch and len(batch) + len(values) > BATCH:
                    break
                batch += [Metric(self._prefix + k, float(v), when, self._next_step + taken) for k, v in values.items()]
                taken += 1
            client.log_batch(self.run_id, metrics=batch)
            for _ in range(taken):
                self._pending.popleft()
            self._next_step += taken
            self.sent += taken

    def _attempt(self, client: Any) -> None:
        try:
            self._send(client)
            if self.down:
                self._say(f"system metrics ({self._prefix}): tracking server back, samples sent", flush=True)
                self.down = False
        except Exception as e:  # down, hung or refusing: keep the samples, try again next interval
            if not self.down:
                self._say(f"system metrics ({self._prefix}): tracking server unreachable ({outage_cause(e)}); "
                          "sampling goes on", flush=True)
                self.down = True

    def _run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        failed = False
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as e:  # a sampler of MLflow's failing (a GPU gone) costs this sample only
                if not failed:  # (said once: an MLflow whose monitors changed would fail every time)
                    self._say(f"system metrics ({self._prefix}): sampling failed ({type(e).__name__}: "
                              f"{outage_cause(e)}); trying again each interval", flush=True)
                failed = True
                continue
            self._attempt(client)
        self._attempt(client)  # one last send of what is kept (bounded by the HTTP timeout)

    def finish(self, timeout_s: float = 5.0) -> bool:
        """Stop sampling; wait up to `timeout_s` for the last send. False when it is still waiting
        on the server (the thread is a daemon: it never keeps the process alive)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()


def node_metrics(live: dict[str, str] | None, local_rank: int) -> contextlib.AbstractContextManager[None]:
    """What a training worker wraps its training in, under Ray Train or Horovod alike: on each
    node's local rank 0 of a run with live metrics (`live`: run id and tracking URI), the node's
    system metrics (`node_monitor`, as `system/node-<id>/...`); elsewhere nothing."""
    if not live or local_rank != 0:
        return contextlib.nullcontext()
    import ray

    return node_monitor(live["run_id"], live["tracking_uri"], f"node-{ray.get_runtime_context().get_node_id()[:8]}")


@contextlib.contextmanager
def node_monitor(run_id: str, tracking_uri: str, node: str) -> Iterator[None]:
    """Sample this node's CPU, memory, disk, network (and GPUs) into the run as
    `system/<node>/...` while the body runs. Best effort: a tracking server that is down costs
    samples, never the training, and the sampling goes on after it (`SystemSampler`)."""
    bound_requests_here()  # a node without rank 0 has no live logger to set this
    try:
        sampler = SystemSampler(run_id, tracking_uri, node, sampling_interval=5).start()
    except Exception:
        yield
        return
    try:
        yield
    finally:
        sampler.finish()
