"""A sweep's search space and the checks it gets before any trial runs.

The sweep file (`configs/sweep/<task>.yaml`): its dimensions (loguniform, uniform, randint,
choice), the trial's config (params.yaml, the sampled values, the settings the sweep fixes),
every value checked as the train stage checks a config, and the `dvc exp run -S ...` line that
trains a trial's values through the pipeline. Running the sweep is `sweep.py`'s.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from pydantic import PositiveInt, StrictInt, ValidationError, model_validator

from pipeline.config import ConfigError, validate
from pipeline.config.loading import _format_validation_error, apply_overrides, read_yaml
from pipeline.config.presets import CUSTOM, preset_differences
from pipeline.config.schema import Strict

# up to this many combinations of the `choice` dimensions, every combination is validated up front
MAX_CHECKED_COMBINATIONS = 64
# what a trial needs to run on one worker whatever params.yaml says (elastic range, tp/pp mesh)
ONE_WORKER = {"cluster.num_workers": 1, "cluster.min_workers": None, "parallel.tp": 1, "parallel.pp": 1}


class Dimension(Strict):
    """One searched key: exactly one of loguniform, uniform (bounds), randint (integer bounds, both
    included) or choice (values)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[StrictInt, StrictInt] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of loguniform, uniform, randint, choice")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    def corners(self) -> list[Any]:
        """Values that together exercise the whole range, for validating the space up front."""
        return list(self.choice) if self.choice is not None else list(self.loguniform or self.uniform or self.randint)

    def tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.randint is not None:
            return tune.randint(self.randint[0], self.randint[1] + 1)  # (Tune's high is excluded)
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
        if self.max_steps % self.eval_every:
            # a trial reports at its validations: the last steps of every trial would go unvalidated,
            # each trial ranked (and counted as stopped by ASHA) at an earlier step than it trained to
            raise ValueError(f"max_steps ({self.max_steps}) must be a multiple of eval_every ({self.eval_every}): "
                             "trials report at their validations, so each would be ranked before its last "
                             f"{self.max_steps % self.eval_every} steps")
        if not self.space:
            raise ValueError("space: is empty; give at least one key to search, e.g. "
                             "tasks.lm.optim.lr: {loguniform: [0.0003, 0.003]}")
        return self


def load_sweep(path: Path) -> SweepConfig:
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found (see configs/sweep/)")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping (metric, num_samples, ..., space)")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:  # one line, as params.yaml's errors are
        raise ConfigError(f"{path}: {_format_validation_error(e)}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def fixed_settings(task: str, sweep: SweepConfig) -> dict[str, Any]:
    """What the sweep sets in every trial whatever params.yaml (or the space) says: its own length
    and validation interval (ASHA's rungs are counted in them), no checkpoints and no early stopping
    (a stopped trial is dropped; ASHA does the stopping), one worker."""
    tr = f"tasks.{task}.trainer"
    return {f"{tr}.max_steps": sweep.max_steps, f"{tr}.eval_every": sweep.eval_every,
            f"{tr}.ckpt_every": sweep.max_steps, f"{tr}.early_stop_patience": 0, **ONE_WORKER}


def custom_labels(drawn: dict[str, Any], point: dict[str, Any]) -> dict[str, str]:
    """`preset: custom` for each model the point takes away (in `drawn`, the config holding it) from the preset named (a
    searched width that is not gpt_small's): labelled gpt_small, every trial config, and the best
    trial's `dvc exp run`, drew the train stage's warning that the model is not its preset, with
    advice (pick the preset's group file) that undoes the search; and runs and the registry called
    it gpt_small. A drawn value equal to the preset's keeps the preset's name. (Read against
    configs/ of the working directory: a Ray worker without it labels nothing, which changes
    nothing a trial trains or reports.)"""
    models = {".".join(k.split(".")[:3]) for k in point if k.startswith("tasks.") and k.split(".")[2:3] == ["model"]}
    models = sorted(m for m in models if f"{m}.preset" not in point)
    return {f"{m}.preset": CUSTOM for m in models
            if isinstance(model := _lookup(drawn, m), dict) and preset_differences(model)}


def _with(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    return apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def trial_config(base: dict[str, Any], task: str, sweep: SweepConfig, point: dict[str, Any]) -> dict[str, Any]:
    """The raw config of one trial: base + sampled values (a model they change labelled `custom`)
    + the sweep's fixed settings (applied last: a space naming them is refused by `check_space`,
    and could not undo them anyway)."""
    drawn = _with(copy.deepcopy(base), point)  # (`drawn`: the config with the point, which the labels read)
    return _with(drawn, {**custom_labels(drawn, point), **fixed_settings(task, sweep)})


def _fixed_key_error(key: str, task: str, sweep: SweepConfig) -> str | None:
    """Why the space may not search `key`: it is (or holds) a setting the sweep fixes per trial."""
    for fixed in fixed_settings(task, sweep):
        if fixed != key and not fixed.startswith(f"{key}."):
            continue
        leaf = fixed.rsplit(".", 1)[1]
        if leaf in ("max_steps", "eval_every"):
            why = (f"from the sweep file's own {leaf} ({getattr(sweep, leaf)}), which ASHA's rungs are counted in; "
                   f"change {leaf} there")
        elif leaf == "ckpt_every":
            why = "to max_steps: trials keep no checkpoints (a trial ASHA stops is dropped)"
        elif leaf == "early_stop_patience":
            why = "to 0: ASHA stops the weak trials"
        else:
            why = "as every trial runs on one worker (cluster.num_workers=1, no min_workers, parallel.tp=pp=1)"
        return f"space.{key}: the sweep sets {fixed} in every trial, {why}"
    return None


@contextlib.contextmanager
def _each_warning_once():
    """The train stage's config check prints its warnings; checking the space runs it on many
    configs, most with the same warning: each distinct line is printed once, at the end."""
    lines = io.StringIO()
    try:
        with contextlib.redirect_stderr(lines):
            yield
    finally:
        for line in dict.fromkeys(lines.getvalue().splitlines()):
            print(line, file=sys.stderr, flush=True)


def check_space(base: dict[str, Any], task: str, sweep: SweepConfig) -> None:
    """Validate the trials' config (params.yaml with the sweep's fixed settings), every choice value
    and both ends of every range before any trial starts, each as the train stage checks its config
    (layout, batch split, fp8 on CPUs...), so a typo in a key or an impossible value (say a width
    the head count does not divide) fails here, naming it, instead of in trial 7 an hour later."""
    with _each_warning_once():
        _check_space(base, task, sweep)


def _check_space(base: dict[str, Any], task: str, sweep: SweepConfig) -> None:
    for key in sweep.space:
        if why := _fixed_key_error(key, task, sweep):
            raise ConfigError(why)
        if not key.startswith(f"tasks.{task}.") and key.split(".")[0] == "tasks":
            raise ConfigError(f"space.{key}: not a key of task '{task}'")
    try:  # what no drawn value changes is named as it is, not as the fault of the first value checked
        _check_trial(validate(trial_config(base, task, sweep, {})), task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, dim in sweep.space.items():
        for value in dim.corners():
            try:
                cfg = validate(trial_config(base, task, sweep, {key: value}))
                _check_trial(cfg, task)
            except (ConfigError, ValueError) as e:
                # a value the base config's other values refuse (a width its head count does not divide)
                # may be right with the values the space draws with it: then it is no fault of its own
                if (cfg := _valid_with_the_others(base, task, sweep, key, value)) is None:
                    raise ConfigError(f"space.{key}={value}: {e}") from e
            if dim.choice is None and dim.randint is None and _is_int(_lookup(cfg.model_dump(), key)):
                kind = "uniform" if dim.uniform else "loguniform"
                raise ConfigError(f"space.{key}: {kind} draws fractional values but {key} is an integer; "
                                  f"use randint: [low, high] or list the values, e.g. choice: [{int(value)}, ...]")
    choices = {k: d.choice for k, d in sweep.space.items() if d.choice is not None}
    if len(choices) > 1 and math.prod(len(v) for v in choices.values()) <= MAX_CHECKED_COMBINATIONS:
        for combo in itertools.product(*choices.values()):
            point = dict(zip(choices, combo, strict=True))
            try:
                _check_trial(validate(trial_config(base, task, sweep, point)), task)
            except (ConfigError, ValueError) as e:
                named = ", ".join(f"{k}={v}" for k, v in point.items())
                raise ConfigError(f"space: the combination {named}: {e}") from e


def _valid_with_the_others(base: dict[str, Any], task: str, sweep: SweepConfig, key: str, value: Any) -> Any:
    """The config of a trial drawing the choice `key=value` with some values of the other choices
    (at most MAX_CHECKED_COMBINATIONS tried) that passes the train stage's checks, or None. Only
    choices: their combinations are then checked one by one; a range is drawn anywhere between
    its ends, so a value that one end happens to accept would fail most draws."""
    if sweep.space[key].choice is None:
        return None
    others = {k: d.choice for k, d in sweep.space.items() if k != key and d.choice is not None}
    if not others:
        return None
    for combo in itertools.islice(itertools.product(*others.values()), MAX_CHECKED_COMBINATIONS):
        try:
            cfg = validate(trial_config(base, task, sweep, {key: value, **dict(zip(others, combo, strict=True))}))
            _check_trial(cfg, task)
        except (ConfigError, ValueError):
            continue
        return cfg
    return None


def _check_trial(cfg: Any, task: str) -> None:
    """What a trial's config must hold beyond its keys' validation: what the train stage checks of
    a config (fp8's strategy and devices, the tp/pp layout, the global batch split into its
    accumulation steps on the trial's one worker...). Touches no Ray resource."""
    from pipeline.flows.train import check_task_config

    check_task_config(cfg, task)


def check_driver(trial: Any) -> None:
    """The train stage's checks of this machine, on the trials' config, before the lock, Ray or an
    MLflow run: use_gpu on a local Ray without CUDA (a trial would wait for a GPU for ever), the
    strategy's package (deepspeed, horovod), fp8's torchao and hardware, the compiler, Apex."""
    from pipeline.distributed import check_gpu_host, preflight
    from pipeline.training.optim import check_kernels

    try:
        check_gpu_host(trial)
        preflight(trial, trial.cluster.use_gpu)
        check_kernels(trial)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def largest_batch(base_batch: int, task: str, sweep: SweepConfig) -> tuple[int, str]:
    """The largest global batch a trial may draw (the space's where it searches the batch, else the
    base config's), and the key that sets it: the train split must hold one such batch, checked
    before any trial starts."""
    key = f"tasks.{task}.trainer.global_batch_size"
    dim = sweep.space.get(key)
    if dim is None:
        return base_batch, key
    return max(int(v) for v in dim.corners()), f"space.{key}"


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dvc_command(point: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """The `dvc exp run` that trains the pipeline with a trial's values: each written as Hydra reads
    an override (DVC composes them with Hydra), exactly (a float to its last digit: `.4g` trained
    0.99953217 as 0.9995), None as null (`None` was the string 'None'); with the sweep's `base`
    config, a model the values take away from its preset labelled `custom` (`custom_labels`)."""
    values = {**point, **(custom_labels(_with(copy.deepcopy(base), point), point) if base is not None else {})}
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={hydra_value(v)}')}" for k, v in sorted(values.items()))


_BARE = re.compile(r"[A-Za-z_][\w\-./]*")  # what Hydra reads as that same string unquoted
_HYDRA_WORDS = {"null", "true", "false", "inf", "nan"}


def hydra_value(v: Any) -> str:
    """`v` in Hydra's override grammar, read back as the same value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(float(v)) if isinstance(v, float) else str(int(v))
    if isinstance(v, list | tuple):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    text = str(v)
    if _BARE.fullmatch(text) and text.lower() not in _HYDRA_WORDS:
        return text
    # quoted: Hydra unescapes a backslash only before a quote (or the closing one)
    return "'" + re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'") + "'"
