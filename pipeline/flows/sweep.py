"""Hyperparameter search with Ray Tune: Optuna proposes, ASHA stops the weak trials early.

Every trial is `params.yaml` plus the sampled overrides, validated like any config, trained by
the same loop as the train stage (one process per trial, no checkpoints: a stopped trial is
simply dropped) on the same local-or-cluster Ray. Each trial is an MLflow run, nested under
one parent run for the sweep, and the best trial is printed as the `dvc exp run -S ...` line
that trains it for real through the pipeline, with lineage.

Grid sweeps need no code: `dvc exp run --queue -S 'tasks.lm.optim.lr=1e-3,3e-3'` then
`dvc queue start -j 2` (README).
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import PositiveInt, model_validator

from pipeline.config import ConfigError, validate
from pipeline.config.loading import apply_overrides, read_yaml
from pipeline.config.schema import Strict


class Dimension(Strict):
    """One searched key: exactly one of loguniform, uniform (bounds) or choice (values)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of loguniform, uniform, choice")
        bounds = self.loguniform or self.uniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    def corners(self) -> list[Any]:
        """Values that together exercise the whole range, for validating the space up front."""
        return list(self.choice) if self.choice is not None else list(self.loguniform or self.uniform)

    def tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        return tune.loguniform(*self.loguniform) if self.loguniform else tune.uniform(*self.uniform)


class SweepConfig(Strict):
    """A search space file (configs/sweep/<task>.yaml): typed like the pipeline's own config."""

    metric: str = "val_loss"
    num_samples: PositiveInt = 12
    max_steps: PositiveInt = 300
    eval_every: PositiveInt = 50
    grace_period: PositiveInt = 100
    reduction_factor: PositiveInt = 3
    space: dict[str, Dimension]

    @model_validator(mode="after")
    def _rungs(self) -> SweepConfig:
        if self.metric != "val_loss":
            raise ValueError("metric: trials report val_loss (the loop's validation loss)")
        if self.grace_period > self.max_steps or self.eval_every > self.max_steps:
            raise ValueError("grace_period and eval_every must not exceed max_steps")
        return self


def load_sweep(path: Path) -> SweepConfig:
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found (see configs/sweep/)")
    raw = read_yaml(path)
    try:
        return SweepConfig.model_validate(raw)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


def trial_config(base: dict[str, Any], task: str, sweep: SweepConfig, point: dict[str, Any]) -> dict[str, Any]:
    """The raw config of one trial: base + sampled values + the sweep's own trainer settings."""
    raw = copy.deepcopy(base)
    fixed = {f"tasks.{task}.trainer.max_steps": sweep.max_steps, f"tasks.{task}.trainer.eval_every": sweep.eval_every,
             f"tasks.{task}.trainer.ckpt_every": sweep.max_steps, f"tasks.{task}.trainer.early_stop_patience": 0,
             "cluster.num_workers": 1}
    return apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in {**fixed, **point}.items()])


def check_space(base: dict[str, Any], task: str, sweep: SweepConfig) -> None:
    """Validate every choice value and both ends of every range before any trial starts, so a
    typo in a key or an impossible value (say a width the head count does not divide) fails
    here, naming it, instead of in trial 7 an hour later."""
    for key, dim in sweep.space.items():
        if not key.startswith(f"tasks.{task}.") and key.split(".")[0] == "tasks":
            raise ConfigError(f"space.{key}: not a key of task '{task}'")
        for value in dim.corners():
            try:
                validate(trial_config(base, task, sweep, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"space.{key}={value}: {e}") from e


def dvc_command(point: dict[str, Any]) -> str:
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={_fmt(v)}')}" for k, v in sorted(point.items()))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _trial(point: dict[str, Any], *, base: dict[str, Any], task: str, sweep: dict[str, Any], shards: str) -> None:
    """One Tune trial: the training loop in this process, val_loss reported to Tune."""
    import torch
    from ray import tune

    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    class TuneSession(LocalSession):
        def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            if "val_loss" in metrics:
                tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    torch.set_num_threads(1)
    cfg = validate(trial_config(base, task, SweepConfig.model_validate(sweep), point))
    train(cfg, task, Path(shards), TuneSession())


@dataclass
class SweepResult:
    best_point: dict[str, Any]
    best_metric: float
    trials: int
    stopped_early: int
    parent_run_id: str
    command: str


def run_sweep(params: Path, task: str, sweep_file: Path, shards: Path, num_samples: int | None = None,
              seed: int | None = None) -> SweepResult:
    import mlflow
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.config import config_digest
    from pipeline.data.shard_verify import check_split
    from pipeline.runtime import connect
    from pipeline.runtime.trainer import storage_root, worker_config
    from pipeline.tracking import mlflow_runs

    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--trials: must be at least 1 (got {num_samples})")
    base = read_yaml(params, "run `pipeline compose` to write a full config")
    cfg = validate(base)
    cfg.task(task)
    sweep = load_sweep(sweep_file)
    if num_samples is not None:
        sweep = sweep.model_copy(update={"num_samples": num_samples})
    check_space(base, task, sweep)
    check_split(shards, "train")  # manifest and sizes; the trials' workers hash, once per node
    check_split(shards, "val")
    exp_id = mlflow_runs.setup(cfg.tracking)
    name = f"sweep-{task}-{config_digest({'base': base, 'sweep': sweep.model_dump(), 'seed': seed})}"
    with mlflow.start_run(run_name=name, tags={"sweep": name, "task": task}) as parent:
        mlflow.log_params(mlflow_runs.safe_params({"sweep_file": str(sweep_file), "num_samples": sweep.num_samples,
                                                   "max_steps": sweep.max_steps,
                                                   "scheduler": "ASHA", "search": "Optuna TPE"}))
    where = connect(cfg.cluster)
    print(f"[sweep {task}] {sweep.num_samples} trials on {where}; Optuna TPE + ASHA (grace {sweep.grace_period}, "
          f"factor {sweep.reduction_factor}, max {sweep.max_steps} steps); MLflow parent run {parent.info.run_id}",
          flush=True)
    # the trials run in folders of their own: local init_from paths go to them absolute, as the shards do
    trainable = tune.with_parameters(_trial, base=worker_config(cfg), task=task, sweep=sweep.model_dump(),
                                     shards=str(shards.resolve()))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.cluster.cpus_per_worker}),
        param_space={k: d.tune() for k, d in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=sweep.num_samples,
            search_alg=OptunaSearch(seed=seed if seed is not None else cfg.seed),
            scheduler=ASHAScheduler(time_attr="step", max_t=sweep.max_steps, grace_period=sweep.grace_period,
                                    reduction_factor=sweep.reduction_factor)),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_root(cfg).rstrip("/").rsplit("/", 1)[0] + "/tune", verbose=1,
            callbacks=[MLflowLoggerCallback(tracking_uri=mlflow_runs.tracking_uri(cfg.tracking),
                                            experiment_name=mlflow.get_experiment(exp_id).name, save_artifact=False,
                                            tags={"mlflow.parentRunId": parent.info.run_id, "sweep": name})]),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if len(errors) == len(results):
        raise RuntimeError(f"every trial failed; the first: {errors[0]}")
    best = results.get_best_result(metric="val_loss", mode="min", scope="last")
    point = {k: best.config[k] for k in sweep.space}
    stopped = sum(1 for r in results if r.metrics and r.metrics.get("step", 0) < sweep.max_steps)
    command = dvc_command(point)
    mlflow.MlflowClient().log_metric(parent.info.run_id, "best_val_loss", best.metrics["val_loss"])
    mlflow.MlflowClient().set_tag(parent.info.run_id, "best_command", command)
    return SweepResult(point, best.metrics["val_loss"], len(results), stopped, parent.info.run_id, command)
