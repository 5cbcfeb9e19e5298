"""MLflow runs: one per trained model, created by the train stage and continued by evaluate
and export (the run id travels in `run.json` beside the model)."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.config.schema import TrackingConfig

RUN_FILE = "run.json"
_SECRET = re.compile(r"(token|secret|password|passwd|api_key|access_key)", re.IGNORECASE)


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used (a server that does not answer; a store that is gone,
    damaged or locked, or lacks the run): what was done is kept and the message says what to do."""


def project_root() -> Path:
    """Where relative store paths live: the DVC workspace. DVC sets DVC_ROOT for every stage, and
    for queued experiments (`dvc queue start`, run in a copy under .dvc/tmp/exps/) it points at
    the original workspace, so all experiments share the workspace's tracking store."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri(cfg: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI in the environment wins over `tracking.uri`, as MLflow users expect
    (and as RAY_ADDRESS wins over `cluster.address`): a job on a cluster is pointed at the team's
    server without editing params.yaml. A relative store path (SQLite file or folder) is made
    absolute against the project root (`resolve_store`)."""
    return resolve_store(os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri)


_SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The file of a SQLite store's URI (relative as written, or absolute; percent-escapes decoded
    as SQLAlchemy decodes them), None for any other store."""
    from urllib.parse import unquote

    if not uri.startswith(_SQLITE) or uri.endswith(":memory:"):
        return None
    return Path(unquote(uri[len(_SQLITE):].partition("?")[0]))


def _with_file(uri: str, file: Path | str) -> str:
    """A SQLite URI with its file replaced (escaped where a URI needs it; its `?...` options kept)."""
    from urllib.parse import quote

    _, sep, options = uri[len(_SQLITE):].partition("?")
    return f"{_SQLITE}{quote(str(file), safe='/')}{sep}{options}"


# scheme-less names MLflow does not take for a folder
_NOT_FOLDERS = ("databricks", "databricks-uc", "uc")


def sqlite_store(file: Path) -> str:
    """The URI of a SQLite store in `file` (escaped where a URI needs it)."""
    return _with_file(_SQLITE, file)


def resolve_store(uri: str) -> str:
    """A relative store path made absolute against the project root: a SQLite file, a folder
    (`mlruns`, `./mlruns`) or a relative `file:` URI (`file:mlruns`). Left relative, each process
    resolves it against its own cwd: a Ray Train worker (cwd: its own folder) or a queued DVC
    experiment (cwd: a temporary copy DVC deletes) would write to another store. Other URIs as
    they are."""
    from urllib.parse import unquote, urlsplit

    file = sqlite_file(uri)
    if file is not None:
        return _with_file(uri, project_root() / file) if not file.is_absolute() else uri
    if "://" not in uri and not uri.startswith("file:"):  # a folder's path
        return str(project_root() / uri) if uri and uri not in _NOT_FOLDERS and not Path(uri).is_absolute() else uri
    parts = urlsplit(uri)
    if parts.scheme == "file" and not parts.netloc and not parts.path.startswith("/"):
        return (project_root() / unquote(parts.path)).as_uri()
    return uri


def portable_store(uri: str) -> str:
    """What `run.json` records: a SQLite store inside the project as a path relative to it, so a
    copied workspace (its `mlruns.db` copied with it) evaluates, exports and registers into its own
    store rather than the original's; any other store as it is."""
    file = sqlite_file(uri)
    if file is None or not file.is_absolute():
        return uri
    try:  # (the folder as the project root is: with links resolved)
        return _with_file(uri, (file.parent.resolve() / file.name).relative_to(project_root()).as_posix())
    except ValueError:  # a store outside the project is shared on purpose
        return uri


def check_reachable(cfg: TrackingConfig, say=print) -> None:
    """For a tracking server (http[s]://), say what is being checked and fail in one line when
    its /health does not answer within `tracking.connect_timeout_s`, instead of MLflow's
    minutes of silent retries. A folder as the store (a path, file:), which MLflow 3 refuses at its
    first call in a message the stage would cut, is named here with what to use instead; SQLite and
    other stores need no check."""
    import urllib.error
    import urllib.request

    from pipeline.waiting import wait_until_answers

    uri = tracking_uri(cfg)
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    # (MLflow takes a scheme-less URI for a folder, bar the Databricks names)
    folder = uri.startswith("file:") or ("://" not in uri and uri not in _NOT_FOLDERS)
    if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingUnavailable(
            f"{where} is {uri!r}: a folder, which this MLflow refuses as a store (its file store is retired; "
            "set MLFLOW_ALLOW_FILE_STORE=true to use it anyway); use sqlite:///path/mlruns.db or a tracking "
            "server's http://host:5000; nothing was trained")
    if not uri.startswith(("http://", "https://")):
        return
    say(f"checking the MLflow tracking server at {uri} ...", flush=True)

    def probe() -> None:
        # an HTTP error is an answer (a proxy or an auth layer may refuse /health itself)
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=min(5.0, cfg.connect_timeout_s)).close()

    wait_until_answers(probe, cfg.connect_timeout_s, lambda e: TrackingUnavailable(
        f"the MLflow tracking server at {uri} does not answer ({getattr(e, 'reason', None) or e}; waited "
        f"{cfg.connect_timeout_s:.0f} s, tracking.connect_timeout_s); nothing was trained"))


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store and make its experiment the active one. Returns its id."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = None
        if not uri.startswith(("http://", "https://", "databricks")):
            location = (project_root() / cfg.artifact_dir).resolve().as_uri()
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def model_label(model_cfg: Any) -> str:
    """What a model is called in run names, tags and registry descriptions: its config preset
    (`gpt_tiny`), or the folder name of the Hugging Face checkpoint it started from."""
    init_from = getattr(model_cfg, "init_from", None)
    return Path(init_from).name if init_from else str(getattr(model_cfg, "preset", "custom"))


def run_name(task: str, model_cfg: Any, strategy: str, when: datetime.datetime | None = None) -> str:
    """A training run's name in the MLflow UI: task, model preset, strategy and local start time
    to the minute, e.g. `lm-tiny-ddp-2026-12-02T2031` or `diffusion-dit_small-fsdp-...` (the LM's
    `gpt_` prefix is dropped: GPT is its only kind)."""
    label = model_label(model_cfg)
    if getattr(model_cfg, "kind", None) == "gpt":
        label = label.removeprefix("gpt_")
    label = re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-") or "model"
    return f"{task}-{label}-{strategy}-{(when or datetime.datetime.now()).strftime('%Y-%m-%dT%H%M')}"


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params minus anything that looks like a secret; values cut to MLflow's length limit."""
    return {k: str(v)[:6000] for k, v in params.items() if not _SECRET.search(k)}


def read_run_file(model_dir: Path) -> dict[str, Any]:
    """The MLflow run the train stage recorded beside its model (missing or damaged, or without
    the run id and tracking URI every reader uses: one line). A relative SQLite store in it is
    resolved against the project root (`portable_store`)."""
    from pipeline.training.checkpoint import read_json, record_string

    path = model_dir / RUN_FILE
    info = read_json(path, "train")
    for key in ("run_id", "tracking_uri"):
        record_string(info, path, key, "train")
    return {**info, "tracking_uri": resolve_store(info["tracking_uri"])}


def continue_run(info: dict[str, Any], model_dir: Path, stage: str) -> Run:
    """The run `run.json` beside a model records (`info`, as `read_run_file` read it), found in its
    store before the `stage` does any work, with MLflow pointed at that store. A store that is gone
    (MLflow would create an empty one and fail at its first call), damaged, locked, or without the
    run (or with it deleted) is one line saying which and what to do, instead of an SQLAlchemy
    traceback after the work is done."""
    import sqlalchemy.exc

    uri, run_id = info["tracking_uri"], info["run_id"]
    where = f"{model_dir / RUN_FILE} names run {run_id} in the MLflow store {uri}"
    # `dvc repro` alone would restore this run.json from DVC's run cache: only --force trains anew
    retrain = f"`dvc repro --force train@{model_dir.name}` records a new run"
    file = sqlite_file(uri)
    if file is not None and not file.is_file():
        raise TrackingUnavailable(f"{where}, which does not exist (deleted or moved?): the {stage} stage adds to "
                                  f"that run; restore the file, or {retrain}")
    locked = "another process holds a write lock on it (a stage or a UI writing?); rerun when it is done"
    mlflow.set_tracking_uri(uri)
    try:
        run = MlflowClient().get_run(run_id)
    except sqlalchemy.exc.DBAPIError as e:  # not a database, malformed, locked
        first = str(e.orig if e.orig is not None else e).splitlines()[0]
        hint = locked if "locked" in first else f"restore it from a backup, or {retrain} in a new store"
        raise TrackingUnavailable(f"{where}, which cannot be read ({first}): {hint}") from e
    except mlflow.exceptions.MlflowException as e:
        first = str(e).splitlines()[0][:200]
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # (a store already open reports a lock this way)
            raise TrackingUnavailable(f"{where}, which fails ({first})" + (f": {locked}" if "locked" in first
                                                                            else "")) from e
        raise TrackingUnavailable(f"{where}, which does not hold that run (another store?): {retrain}") from e
    if run.info.lifecycle_stage == "deleted":
        raise TrackingUnavailable(f"{where}, where it is deleted: restore it (`mlflow runs restore --run-id "
                                  f"{run_id}`), or {retrain}")
    return run


def log_datasets(run_id: str, task: str, source: str, raw_sha256: str | None, shards_dir: Path,
                 manifest_md5: str, dvc_hashes: dict[str, str]) -> list[str]:
    """The run's data lineage as MLflow dataset inputs: the raw source (sha256 of its examples as
    read), the prepared data and the shards, each with DVC's own hash where dvc.lock has one (so
    `dvc` and MLflow name the same bytes). Returns the names logged."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    def source_of(uri: str):
        if "://" not in uri and not uri.startswith("builtin:"):
            uri = str(Path(uri).resolve())
        try:
            with warnings.catch_warnings():  # local paths match two equivalent resolvers
                warnings.simplefilter("ignore")
                return resolve_dataset_source(uri)
        except MlflowException:  # builtin:... data that ships with the code
            return CodeDatasetSource({"source": uri})

    def dataset(name: str, uri: str, digest: str, kind: str):
        ds = MetaDataset(source=source_of(uri), name=name, digest=digest[:36])
        return ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "training"),
                                        InputTag("digest_kind", kind), InputTag("digest_full", digest)]

    entries = []
    if raw_sha256:
        entries.append(dataset(f"{task}-raw", source, raw_sha256, "sha256 of the raw examples as read"))
    for stage, path in (("prepare", f"data/{task}/prepared"), ("shard", f"data/{task}/shards")):
        dvc_md5 = dvc_hashes.get(f"dvc.{stage}:{task}.{path}")
        if dvc_md5:
            entries.append(dataset(f"{task}-{stage}", path, dvc_md5, "dvc md5 (dvc.lock)"))
    if not any(name == f"{task}-shard" for name in (e[0].name for e in entries)):
        entries.append(dataset(f"{task}-shard", str(shards_dir), manifest_md5, "md5 of manifest.json"))
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(ds, tags) for ds, tags in entries])
    return [e[0].name for e in entries]


# The driver's own requests to a tracking server, unless MLFLOW_HTTP_REQUEST_* say otherwise: MLflow's
# defaults (120 s a request, 7 retries with backoff) kept a stage silent for minutes on a hung server.
REQUEST_TIMEOUT_S, REQUEST_RETRIES = 10, 1
_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(REQUEST_RETRIES), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@contextlib.contextmanager
def bounded_requests() -> Iterator[None]:
    """MLflow's HTTP requests in the body give up after `REQUEST_TIMEOUT_S` and `REQUEST_RETRIES`
    (MLflow reads these variables at each request); values the environment already sets win. The
    driver's calls around the fit, where a hung server would otherwise hold a finished training
    for many minutes before the one-line error."""
    added = {k: v for k, v in _BOUNDS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def request_bound() -> str:
    """How long one MLflow request may take here, in words (for the lines that say what is awaited)."""
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    return f"{os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s a request, {retries} retr" + \
        ("y" if retries == "1" else "ies")


@contextlib.contextmanager
def waiting(what: str, say=print, after_s: float = 3.0) -> Iterator[None]:
    """Say in one line what the body waits for, if it takes longer than `after_s` (a tracking
    server that hangs); nothing when it answers at once."""
    import threading

    uri = mlflow.get_tracking_uri()
    timer = threading.Timer(after_s, lambda: say(f"waiting for the tracking server at {uri} ({what}; "
                                                 f"{request_bound()})", flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (`pipeline stop`, a scheduler's pre-emption, `kill`) raised as SystemExit while the
    body runs, as Ctrl-C is: Python's default ends the process at once, before any `finally`, and
    left the run RUNNING for ever. (Signal handlers belong to the main thread: elsewhere, nothing
    changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def system_metrics(run_id: str, say=print) -> Iterator[None]:
    """Keep the run active while the body runs, sampling CPU, memory, disk and network (and GPU
    where present) of this node as `system/*` metrics. Best effort: an unreachable server costs
    the samples, never the training. The run ends FINISHED, FAILED on an error, KILLED on Ctrl-C
    or an exit asked for (MLflow's convention for a run its user stopped). Each request is
    bounded (`bounded_requests`): a hung server delays the end by seconds, and the sampler
    (`live.SystemSampler`) is not waited for beyond a few."""
    from pipeline.tracking.live import SystemSampler, outage_cause

    with bounded_requests():
        try:
            with waiting(f"reopening run {run_id}", say):
                mlflow.start_run(run_id=run_id, log_system_metrics=False)  # (our sampler outlives an outage)
        except mlflow.exceptions.MlflowException as e:
            say(f"note: no system metrics for run {run_id} ({outage_cause(e)})", flush=True)
            yield
            return
        try:
            sampler = SystemSampler(run_id, mlflow.get_tracking_uri(), say=say).start()
        except Exception as e:  # no sampler on this platform: the run goes on without system metrics
            say(f"note: no system metrics for run {run_id} ({type(e).__name__}: {e})", flush=True)
            sampler = None
        status = "FAILED"
        try:
            with _terminate_as_exit():
                yield
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train's own SIGINT handler turns it into SystemExit
            status = "KILLED"
            say(f"interrupted: MLflow run {run_id} ends KILLED; rerun the stage to resume from its last "
                "checkpoint", flush=True)
            raise
        finally:
            with waiting(f"ending run {run_id} as {status}", say):
                if sampler is not None:
                    sampler.finish(timeout_s=5.0)
                try:
                    mlflow.end_run(status=status)
                except mlflow.exceptions.MlflowException as e:  # the logging after the fit says what to do
                    say(f"note: could not mark MLflow run {run_id} {status} ({outage_cause(e)})", flush=True)
