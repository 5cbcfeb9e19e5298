"""Hyperparameter search with Ray Tune: Optuna proposes, ASHA stops the weak trials early.

Every trial is `params.yaml` plus the sampled overrides, validated like any config, trained by
the same loop as the train stage (one process per trial, no checkpoints: a stopped trial is
simply dropped) on the same local-or-cluster Ray. Each trial is an MLflow run, nested under
one parent run for the sweep, and the best trial is printed as the `dvc exp run -S ...` line
that trains it for real through the pipeline, with lineage. The space and its checks are
`sweep_space.py`'s.

Grid sweeps need no code: `dvc exp run --queue -S 'tasks.lm.optim.lr=1e-3,3e-3'` then
`dvc queue start -j 2` (README).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, validate
from pipeline.config.loading import read_yaml
from pipeline.config.storage import is_url
from pipeline.flows.sweep_space import (
    SweepConfig,
    check_driver,
    check_space,
    dvc_command,
    largest_batch,
    load_sweep,
    trial_config,
)


def trial_resources(cfg: Any) -> dict[str, float]:
    """What Tune reserves for a trial (one worker): its CPUs, and its GPU when the config trains on
    GPUs (without one Ray hides every GPU from the trial)."""
    return {"cpu": cfg.cluster.cpus_per_worker, **({"gpu": 1} if cfg.cluster.use_gpu else {})}


def tune_storage(cfg: Any) -> str:
    """Where Tune keeps a sweep's experiment state: under `cluster.storage_path` for a URL
    (s3://bucket -> s3://bucket/tune; the old rule gave s3://tune, another bucket), and for a
    local path beside it as before (runs/ray -> runs/tune), so existing local sweeps still resume."""
    from pipeline.runtime.recovery import storage_root

    root = storage_root(cfg).rstrip("/")
    return f"{root}/tune" if is_url(root) else str(Path(root).parent / "tune")


def _trial(point: dict[str, Any], *, base: dict[str, Any], task: str, sweep: dict[str, Any], shards: str) -> None:
    """One Tune trial: the training loop in this process, val_loss reported to Tune."""
    import torch
    from ray import tune

    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    class TuneSession(LocalSession):
        def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            if "val_loss" in metrics:
                # timesteps_total: the step MLflow's callback logs each trial's metrics at (else its
                # count of reports: 1, 2, 3 where the runs of the train stage show 50, 100, 150)
                tune.report({**{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "time"},
                             "timesteps_total": int(metrics["step"])})

    torch.set_num_threads(1)
    cfg = validate(trial_config(base, task, SweepConfig.model_validate(sweep), point))
    # on the GPU Tune reserved for it (`trial_resources`; Ray makes it the trial's cuda:0)
    train(cfg, task, Path(shards), TuneSession(device=torch.device("cuda", 0) if cfg.cluster.use_gpu else None))


@dataclass
class SweepResult:
    best_point: dict[str, Any]
    best_metric: float
    trials: int
    stopped_early: int  # stopped by ASHA at a rung (finished, short of max_steps); failed trials not counted
    parent_run_id: str
    command: str
    failed: int = 0
    first_error: str | None = None


def _error_line(err: BaseException | None) -> str:
    """A trial's error in one line: the exception raised in the trial (not Ray's wrapper and
    its traceback), `Type: first line of the message`."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip()
    if text.startswith("Traceback") or "\nTraceback" in text:  # a wrapper's text: its last line is the error
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1].strip() if lines else type(cause).__name__
    first = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


@contextlib.contextmanager
def _only_run_of(name: str, tune_path: str):
    """Hold the lock of one sweep (one name: one base config, space, seed and data) while it runs. A
    second run of the same command would otherwise resume the same Tune state and MLflow parent,
    end the first's RUNNING trial runs as KILLED and race it for the results. The lock is beside
    Tune's state for a local path (a temp folder for a URL: it guards this machine only); flock
    ends with its process, so a sweep killed by SIGKILL does not leave it held."""
    folder = Path(tempfile.gettempdir()) / "pipeline-sweeps" if is_url(tune_path) else Path(tune_path).parent
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f"{name}.lock"
    with open(lock, "a") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{name}: this sweep is already running in another process (it holds {lock}); "
                              f"wait for it to end, or change --seed, --trials or the space for another "
                              f"sweep") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _parent_to_resume(client: Any, exp_id: str, name: str) -> Any | None:
    """The parent run of an earlier try of this very sweep (same name: same base config, space,
    seed and data), None if there is none."""
    runs = client.search_runs([exp_id], f"attributes.run_name = '{name}' AND tags.sweep = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def scored(results: list[Any]) -> list[Any]:
    """The trials that can be ranked: ended without an error, with a finite validation loss (a trial
    whose validation diverged to NaN is none: `min` kept a NaN that came first, as every comparison
    with it is false)."""
    return [r for r in results if r.error is None and math.isfinite((r.metrics or {}).get("val_loss", math.nan))]


def _end_unfinished_trials(client: Any, exp_id: str, parent_id: str) -> int:
    """Trial runs left RUNNING under the parent (interrupted: Tune never ended them) -> KILLED."""
    runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' AND attributes.status = 'RUNNING'")
    for r in runs:
        client.set_terminated(r.info.run_id, status="KILLED")
    return len(runs)


def _check_init_weights(cfg: Any, task: str, sweep: SweepConfig, shards: Path) -> None:
    """The weights every trial starts from (`model.init_from`, `trainer.init_from`), checked as the
    train stage checks them, before Tune, Ray or an MLflow run exists: damage is one line naming
    the file, not an unnamed SafetensorError failing every trial. Each tensor's shape is checked
    against the base config's model unless the space searches the model's keys (a trial's model
    may then differ: the files are still checked)."""
    from pipeline.data.shard_format import load_manifest
    from pipeline.tasks import task_for_data
    from pipeline.training.init_weights import check_task_init_weights

    tcfg = cfg.task(task)
    if not (getattr(tcfg.model, "init_from", None) or tcfg.trainer.init_from):
        return
    searched = any(key.startswith(f"tasks.{task}.model.") for key in sweep.space)
    spec = None if searched else task_for_data(tcfg.data.kind).model_spec(tcfg, load_manifest(shards))
    check_task_init_weights(tcfg, task, spec)


def run_sweep(params: Path, task: str, sweep_file: Path, shards: Path, num_samples: int | None = None,
              seed: int | None = None) -> SweepResult:
    """Run (or resume) a sweep. An interrupted sweep (Ctrl-C) records no best, ends its unfinished
    trial runs and the parent run as KILLED, says how to resume and exits 130; running the same
    command again resumes it from Tune's saved state, under the same parent run. The same command
    while it runs is refused (one line): a lock per sweep, held until it ends."""
    from pipeline.config import config_digest
    from pipeline.data.build import file_md5
    from pipeline.data.shard_format import MANIFEST
    from pipeline.data.shard_verify import check_split

    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--trials: must be at least 1 (got {num_samples})")
    base = read_yaml(params, "run `pipeline compose` to write a full config")
    cfg = validate(base)
    cfg.task(task)
    if not 0 <= (seed if seed is not None else cfg.seed) < 2**32:  # Optuna's range, refused only after Ray started
        raise ConfigError(f"--seed: must be from 0 to 2**32 - 1 (got {seed})" if seed is not None else
                          f"seed: Optuna takes seeds from 0 to 2**32 - 1 (the config's is {cfg.seed}); pass --seed")
    sweep = load_sweep(sweep_file)
    if num_samples is not None:
        sweep = sweep.model_copy(update={"num_samples": num_samples})
    check_space(base, task, sweep)
    check_driver(validate(trial_config(base, task, sweep, {})))
    batch = largest_batch(cfg.task(task).trainer.global_batch_size, task, sweep)
    check_split(shards, "train", batch=batch)  # manifest, sizes, the largest batch a trial draws; workers hash
    check_split(shards, "val")
    _check_init_weights(cfg, task, sweep, shards)
    # the data too, as the train stage's run identity has it: new shards are a new sweep, not the old
    # one's result reported again (finished) or resumed on other data (interrupted)
    digest = config_digest({"base": base, "sweep": sweep.model_dump(), "seed": seed,
                            "data": file_md5(shards / MANIFEST)})
    name = f"sweep-{task}-{digest}"
    path = f"{tune_storage(cfg)}/{name}"
    with _only_run_of(name, path):
        return _run_locked(cfg, task, sweep, sweep_file, shards, seed, name, path)


def _run_locked(cfg: Any, task: str, sweep: SweepConfig, sweep_file: Path, shards: Path, seed: int | None,
                name: str, path: str) -> SweepResult:
    """`run_sweep` once its inputs are checked and this sweep's lock is held."""
    import mlflow
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.runtime import connect
    from pipeline.runtime.trainer import worker_config
    from pipeline.tracking import mlflow_runs

    # a tracking server that does not answer: one line now, not minutes of MLflow retries after Ray started
    mlflow_runs.check_reachable(cfg.tracking, lambda *a, **k: print(f"[sweep {task}]", *a, **k))
    exp_id = mlflow_runs.setup(cfg.tracking)
    client = mlflow.MlflowClient()
    earlier = _parent_to_resume(client, exp_id, name) if tune.Tuner.can_restore(path) else None
    resume_id = earlier.info.run_id if earlier is not None else None
    if resume_id is not None:
        parent = mlflow.start_run(run_id=resume_id)
    else:
        parent = mlflow.start_run(run_name=name, tags={"sweep": name, "task": task})
        mlflow.log_params(mlflow_runs.safe_params({"sweep_file": str(sweep_file), "num_samples": sweep.num_samples,
                                                   "max_steps": sweep.max_steps,
                                                   "scheduler": "ASHA", "search": "Optuna TPE"}))
    parent_id = parent.info.run_id
    status = "FAILED"
    try:
        where = connect(cfg.cluster)
        finished = earlier is not None and earlier.info.status == "FINISHED"
        if finished:  # Tune runs nothing again (its failed trials included): its stored results
            print(f"[sweep {task}] this sweep finished before (MLflow parent run {resume_id}): reporting its result "
                  f"from {path}; change --seed, --trials or the space for a new one", flush=True)
        else:
            print(f"[sweep {task}] {'resuming ' if resume_id else ''}{sweep.num_samples} trials on {where}, one "
                  f"worker each; Optuna TPE + ASHA (grace {sweep.grace_period}, factor {sweep.reduction_factor}, max "
                  f"{sweep.max_steps} steps); MLflow parent run {parent_id}", flush=True)
        # the trials run in folders of their own: local init_from paths go to them absolute, as the shards do
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=worker_config(cfg), task=task, sweep=sweep.model_dump(),
                                 shards=str(shards.resolve())),
            trial_resources(cfg))
        if resume_id is not None:
            # an unfinished sweep retries its failed trials; a finished one reruns nothing. Trial runs a
            # hard kill (SIGKILL, a lost machine) left RUNNING are ended first: Tune starts new ones
            if not finished:
                _end_unfinished_trials(client, exp_id, parent_id)
            tuner = tune.Tuner.restore(path, trainable, resume_errored=not finished)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: d.tune() for k, d in sweep.space.items()},
                tune_config=tune.TuneConfig(
                    metric="val_loss", mode="min", num_samples=sweep.num_samples,
                    search_alg=OptunaSearch(seed=seed if seed is not None else cfg.seed),
                    scheduler=ASHAScheduler(time_attr="step", max_t=sweep.max_steps, grace_period=sweep.grace_period,
                                            reduction_factor=sweep.reduction_factor)),
                run_config=tune.RunConfig(
                    name=name, storage_path=tune_storage(cfg), verbose=1,
                    callbacks=[MLflowLoggerCallback(
                        tracking_uri=mlflow_runs.tracking_uri(cfg.tracking),
                        experiment_name=mlflow.get_experiment(exp_id).name, save_artifact=False,
                        tags={"mlflow.parentRunId": parent_id, "sweep": name})]),
            )
        try:
            results = list(tuner.fit())  # one Result per trial: its last metrics, config and error
        except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's own handler was in place
            results = []
        # after a Ctrl-C Tune returns with the running trials stopped (no error, but without the
        # `done` that a trial's end or ASHA's stop decision marks its last result with)
        failed = [r for r in results if r.error is not None]
        finished = failed + [r for r in results if r.error is None and (r.metrics or {}).get("done")]
        if len(finished) < sweep.num_samples:
            status = "KILLED"
            killed = _end_unfinished_trials(client, exp_id, parent_id)
            print(f"[sweep {task}] interrupted: {len(finished)} of {sweep.num_samples} trials finished, no best "
                  f"recorded ({killed} unfinished trial runs ended as KILLED); run the same command again to "
                  f"resume from {path}", file=sys.stderr, flush=True)
            raise SystemExit(130)
        first_error = _error_line(failed[0].error) if failed else None
        done = scored(finished)
        if not done:
            raise ConfigError(f"every trial failed ({len(failed)} of {len(results)}); the first: {first_error}")
        if failed:
            mlflow.set_tag("failed_trials", f"{len(failed)}; the first: {first_error}"[:5000])
            print(f"[sweep {task}] {len(failed)} of {len(results)} trials failed; the first: {first_error}",
                  flush=True)
        best = min(done, key=lambda r: r.metrics["val_loss"])
        point = {k: best.config[k] for k in sweep.space}
        stopped = sum(1 for r in done if r.metrics.get("step", sweep.max_steps) < sweep.max_steps)
        command = dvc_command(point, cfg.model_dump(mode="json"))
        best_loss = float(best.metrics["val_loss"])
        mlflow.log_metric("best_val_loss", best_loss)
        mlflow.set_tag("best_command", command)
        status = "FINISHED"
        return SweepResult(point, best_loss, len(results), stopped, parent_id, command, len(failed), first_error)
    except KeyboardInterrupt:
        status = "KILLED"
        _end_unfinished_trials(client, exp_id, parent_id)
        raise
    finally:
        mlflow.end_run(status=status)
