"""A sweep's search space, checked before any trial runs: its dimensions, the trials' config (the
values a trial may not search among them), every value and combination as the train stage checks
a config, and the `dvc exp run -S` line of the best trial read back by DVC's Hydra composition."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, validate
from pipeline.flows.sweep_space import (
    SweepConfig,
    check_space,
    dvc_command,
    hydra_value,
    load_sweep,
    trial_config,
)
from tests.conftest import ROOT, tiny_raw

SPACE = {"metric": "val_loss", "num_samples": 3, "max_steps": 12, "eval_every": 3, "grace_period": 3,
         "reduction_factor": 2,
         "space": {"tasks.lm.optim.lr": {"loguniform": [3e-4, 3e-3]},
                   "tasks.lm.trainer.global_batch_size": {"choice": [8, 16]},
                   "tasks.lm.optim.warmup_steps": {"choice": [0, 2]},
                   "tasks.lm.model.d_model": {"choice": [32, 64]}}}


SPACE_LR = {**SPACE, "space": {"tasks.lm.optim.lr": {"loguniform": [3e-4, 3e-3]}}}


@pytest.mark.parametrize("task", ["lm", "diffusion"])
def test_shipped_search_spaces_are_valid(task):
    from pipeline.config import compose

    check_space(compose(ROOT / "configs"), task, load_sweep(ROOT / "configs" / "sweep" / f"{task}.yaml"))


@pytest.mark.parametrize(("key", "dim", "fragment"), [
    ("tasks.lm.optim.lrr", {"choice": [1e-3]}, "space.tasks.lm.optim.lrr=0.001: tasks.lm.optim.lrr: unknown key"),
    ("tasks.lm.model.d_model", {"choice": [64, 30]}, "space.tasks.lm.model.d_model=30"),
    ("tasks.diffusion.optim.lr", {"choice": [1e-3]}, "not a key of task 'lm'"),
])
def test_bad_space_is_named_before_any_trial(key, dim, fragment):
    sweep = SweepConfig.model_validate({**SPACE, "space": {key: dim}})
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(), "lm", sweep)
    assert fragment in str(err.value)


def test_a_trial_batch_that_cannot_split_or_fit_is_named_before_any_trial(built_data):
    """Beyond each key's validation: a drawn accumulation count that does not split the batch on
    the trial's one worker (alone, or in a combination of choices), and a drawn batch larger than
    the train split, are refused up front, naming the space's key."""
    from pipeline.data.shard_verify import ShardError, check_split
    from pipeline.flows.sweep_space import largest_batch

    accum = SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.trainer.grad_accum_steps": {"choice": [1, 3]}}})
    with pytest.raises(ConfigError, match=r"space\.tasks\.lm\.trainer\.grad_accum_steps=3: tasks\.lm\.trainer\.global_"
                                          r"batch_size \(8\) must split evenly over cluster\.num_workers \(1\) x "
                                          r"grad_accum_steps \(3\)"):
        check_space(tiny_raw(), "lm", accum)
    pair = SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.trainer.grad_accum_steps": {"choice": [1, 4]},
                                                          "tasks.lm.trainer.global_batch_size": {"choice": [8, 6]}}})
    with pytest.raises(ConfigError, match=r"combination tasks\.lm\.trainer\.grad_accum_steps=4, "
                                          r"tasks\.lm\.trainer\.global_batch_size=6"):
        check_space(tiny_raw(), "lm", pair)
    shards = built_data[1]["lm"]
    big = SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.trainer.global_batch_size":
                                                         {"randint": [8, 100000]}}})
    assert largest_batch(8, "lm", big) == (100000, "space.tasks.lm.trainer.global_batch_size")
    assert largest_batch(8, "lm", SweepConfig.model_validate(SPACE_LR)) == (8, "tasks.lm.trainer.global_batch_size")
    with pytest.raises(ShardError, match=r"fewer than one global batch \(space\.tasks\.lm\.trainer\."
                                         r"global_batch_size=100000\)"):
        check_split(shards, "train", batch=largest_batch(8, "lm", big))


def test_bad_dimension_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "space": {"tasks.lm.optim.lr": {"loguniform": [0.0, 1e-3]}}}))
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_sweep(path)


@pytest.mark.parametrize("layout", [["cluster.num_workers=2", "cluster.min_workers=1"],
                                    ["cluster.num_workers=2", "parallel.tp=2"],
                                    ["cluster.num_workers=4", "cluster.min_workers=2"]])
def test_trials_run_on_one_worker_whatever_the_layout(layout):
    """An elastic range or a tp/pp mesh in params.yaml is valid for training; a trial runs on one
    worker, so the space is checked (and trials configured) as one worker needs."""
    base = tiny_raw(layout)
    validate(base)
    sweep = SweepConfig.model_validate(SPACE)
    check_space(base, "lm", sweep)
    cfg = validate(trial_config(base, "lm", sweep, {"tasks.lm.optim.lr": 1e-3}))
    assert (cfg.cluster.num_workers, cfg.cluster.min_workers, cfg.parallel.tp, cfg.parallel.pp) == (1, None, 1, 1)


@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
def test_range_on_an_integer_key_is_refused_up_front(kind):
    sweep = SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.optim.warmup_steps": {kind: [1, 5]}}})
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(), "lm", sweep)
    assert str(err.value).startswith(f"space.tasks.lm.optim.warmup_steps: {kind} draws fractional values but "
                                     "tasks.lm.optim.warmup_steps is an integer")
    assert "\n" not in str(err.value)
    check_space(tiny_raw(), "lm", SweepConfig.model_validate(  # a float key keeps its ranges
        {**SPACE, "space": {"tasks.lm.optim.lr": {kind: [1e-4, 1e-3]}}}))


def test_randint_draws_integers_with_both_ends_included():
    """randint is the integer range: accepted on an integer key, both ends validated up front,
    both ends drawn (Tune's own randint excludes its high end), fractional bounds refused."""
    from ray import tune

    dim = {"randint": [2, 4]}
    sweep = SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.optim.warmup_steps": dim}})
    check_space(tiny_raw(), "lm", sweep)
    domain = sweep.space["tasks.lm.optim.warmup_steps"].tune()
    assert isinstance(domain, tune.search.sample.Integer)
    assert {domain.sample() for _ in range(300)} == {2, 3, 4}
    bad = SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.model.d_model": {"randint": [64, 66]}}})
    with pytest.raises(ConfigError, match=r"^space.tasks.lm.model.d_model=66: "):  # 66 over 2 heads x rotary
        check_space(tiny_raw(), "lm", bad)
    for bounds in ([1.5, 4], [4, 2], [True, 3]):
        with pytest.raises(ValueError):
            SweepConfig.model_validate({**SPACE, "space": {"tasks.lm.optim.warmup_steps": {"randint": bounds}}})


def test_invalid_choice_combination_is_named_up_front():
    """72 divides by 2 heads and 64 by 16, so each value passes alone; 72 with 16 heads does not."""
    space = {"tasks.lm.model.d_model": {"choice": [64, 72]}, "tasks.lm.model.n_heads": {"choice": [2, 16]}}
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(), "lm", SweepConfig.model_validate({**SPACE, "space": space}))
    assert str(err.value).startswith("space: the combination tasks.lm.model.d_model=72, tasks.lm.model.n_heads=16: ")
    assert "\n" not in str(err.value)


def test_a_choice_refused_only_by_the_base_config_is_checked_with_the_others():
    """Every combination of d_model {96, 192} and n_heads {3, 6} is a valid model, but each value
    was checked alone against params.yaml's width (64): n_heads=3 was refused, naming a width no
    trial would train. A value no combination of the other choices accepts is still named alone,
    and so is one that only an end of a range would accept (most draws between them fail)."""
    space = {"tasks.lm.model.d_model": {"choice": [96, 192]}, "tasks.lm.model.n_heads": {"choice": [3, 6]}}
    check_space(tiny_raw(), "lm", SweepConfig.model_validate({**SPACE, "space": space}))
    space["tasks.lm.model.n_heads"] = {"choice": [3, 7]}  # 7 divides neither width
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(), "lm", SweepConfig.model_validate({**SPACE, "space": space}))
    assert str(err.value).startswith("space.tasks.lm.model.n_heads=7: "), str(err.value)
    ranged = {"tasks.lm.model.n_heads": {"choice": [2, 5]}, "tasks.lm.model.d_model": {"randint": [60, 70]}}
    with pytest.raises(ConfigError) as err:  # (d_model 60 and 70 divide by 5; 62, 64, 66, 68 do not)
        check_space(tiny_raw(), "lm", SweepConfig.model_validate({**SPACE, "space": ranged}))
    assert str(err.value).startswith("space.tasks.lm.model.n_heads=5: "), str(err.value)


def test_a_searched_model_is_labelled_custom_only_where_it_leaves_its_preset(tmp_path, capsys):
    """The shipped LM space searches the width of params.yaml's gpt_small: each trial config and
    the best trial's `dvc exp run` kept the label, so the check of the space warned that the
    model is not gpt_small (advising the preset's group file, which undoes the search) and the
    command trained a model run names and the registry called gpt_small. A drawn model that is not
    its preset is `custom`; one drawn equal to it (d_model 192) keeps the preset's name."""
    import shlex

    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import compose, load_config

    base = compose(ROOT / "configs")
    sweep = load_sweep(ROOT / "configs" / "sweep" / "lm.yaml")
    check_space(base, "lm", sweep)
    assert "is not that preset" not in capsys.readouterr().err

    def preset(point: dict) -> str:
        return validate(trial_config(base, "lm", sweep, point)).task("lm").model.preset

    point = {"tasks.lm.model.d_model": 128, "tasks.lm.optim.lr": 1e-3}
    assert preset(point) == "custom" and preset({**point, "tasks.lm.model.d_model": 192}) == "gpt_small"
    assert preset({"tasks.lm.optim.lr": 1e-3}) == "gpt_small"
    cmd = dvc_command(point, base)
    assert "-S tasks.lm.model.preset=custom" in cmd
    assert "preset" not in dvc_command({**point, "tasks.lm.model.d_model": 192}, base)
    overrides = [part for part in shlex.split(cmd)[3:] if part != "-S"]
    compose_and_dump(tmp_path / "params.yaml", str(ROOT / "configs"), None, "config", str(tmp_path), overrides)
    model = load_config(tmp_path / "params.yaml").task("lm").model
    assert (model.preset, model.d_model) == ("custom", 128)


@pytest.mark.parametrize(("space", "fragment"), [
    ({}, "space: is empty; give at least one key to search"),
    ({"tasks.lm.optim.lr": {"loguniform": 0.001}}, "space.tasks.lm.optim.lr.loguniform: "),
    ({"tasks.lm.optim.lr": {"choise": [1e-3]}}, "space.tasks.lm.optim.lr.choise: unknown key"),
])
def test_sweep_file_problems_are_one_line(tmp_path, space, fragment):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "space": space}))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and fragment in msg, msg
    assert "\n" not in msg and "errors.pydantic.dev" not in msg, msg


def test_dvc_command_composes_into_the_trials_config(tmp_path):
    """The command the sweep prints for its best trial, composed as `dvc exp run -S` composes it
    (DVC's Hydra composition of configs/ into params.yaml): the config trains the trial's values
    exactly. Floats were printed to 4 digits (0.99953217 trained as 0.9995) and None as the
    string 'None' (which failed validation)."""
    import shlex

    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import load_config

    point = {"tasks.lm.optim.lr": 0.0012345678, "tasks.lm.trainer.global_batch_size": 16,
             "tasks.diffusion.trainer.ema_decay": 0.99953217, "tasks.lm.model.n_kv_heads": None,
             "tasks.lm.optim.schedule": "cosine", "tasks.lm.optim.weight_decay": 1e-05}
    cmd = dvc_command(point)
    assert "-S tasks.lm.optim.lr=0.0012345678 " in cmd and "-S tasks.lm.model.n_kv_heads=null " in cmd
    overrides = [part for part in shlex.split(cmd)[3:] if part != "-S"]
    compose_and_dump(tmp_path / "params.yaml", str(ROOT / "configs"), None, "config", str(tmp_path), overrides)
    cfg = load_config(tmp_path / "params.yaml")
    lm, diffusion = cfg.task("lm"), cfg.task("diffusion")
    got = {"tasks.lm.optim.lr": lm.optim.lr, "tasks.lm.trainer.global_batch_size": lm.trainer.global_batch_size,
           "tasks.diffusion.trainer.ema_decay": diffusion.trainer.ema_decay,
           "tasks.lm.model.n_kv_heads": lm.model.n_kv_heads, "tasks.lm.optim.schedule": lm.optim.schedule,
           "tasks.lm.optim.weight_decay": lm.optim.weight_decay}
    assert got == point
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()  # values a space may hold, read back by Hydra as they were
    for value in (True, False, None, 3, 2.5e-07, "1.5", "null", "true", "it's", "a b", "back\\slash",
                  "end\\", "x\\'y", [1, 2], ["x", None]):
        assert parser.parse_override(f"k={hydra_value(value)}").value() == value, value


@pytest.mark.e2e
def test_a_space_whose_trials_would_end_unvalidated_is_refused():
    """max_steps 300 with eval_every 40: every trial's last 20 steps went unvalidated, each ranked on
    its step-280 validation and counted as stopped by ASHA though it trained to the end."""
    with pytest.raises(ValueError, match=r"max_steps \(300\) must be a multiple of eval_every \(40\): .* "
                                              r"before its last 20 steps"):
        SweepConfig.model_validate({**SPACE, "max_steps": 300, "eval_every": 40, "grace_period": 40})


def test_the_train_stage_config_checks_run_on_the_trials_and_every_value():
    """fp8 on CPUs is valid key by key but untrainable (the train stage refuses it): in params.yaml
    it is named as it is, before any trial; drawn by the space, as the value that brings it."""
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(["precision.dtype=fp8"]), "lm", SweepConfig.model_validate(SPACE_LR))
    assert str(err.value).startswith("precision.dtype: fp8 needs a GPU"), err.value
    drawn = SweepConfig.model_validate({**SPACE, "space": {"precision.dtype": {"choice": ["bf16", "fp8"]}}})
    with pytest.raises(ConfigError, match=r"^space\.precision\.dtype=fp8: precision\.dtype: fp8 needs a GPU"):
        check_space(tiny_raw(), "lm", drawn)


@pytest.mark.parametrize(("key", "dim", "fragment"), [
    ("tasks.lm.trainer.max_steps", {"choice": [6, 24]}, "from the sweep file's own max_steps (12)"),
    ("tasks.lm.trainer.eval_every", {"randint": [2, 4]}, "from the sweep file's own eval_every (3)"),
    ("tasks.lm.trainer.ckpt_every", {"choice": [3]}, "to max_steps: trials keep no checkpoints"),
    ("tasks.lm.trainer.early_stop_patience", {"choice": [2]}, "to 0: ASHA stops the weak trials"),
    ("cluster.num_workers", {"choice": [1, 2]}, "every trial runs on one worker"),
    ("cluster.min_workers", {"choice": [1]}, "every trial runs on one worker"),
    ("parallel.tp", {"choice": [2]}, "every trial runs on one worker"),
    ("parallel.pp", {"choice": [2]}, "every trial runs on one worker"),
    ("parallel", {"choice": [{"tp": 2, "pp": 1}]}, "sets parallel.tp in every trial"),  # a mapping holding one
])
def test_the_space_may_not_search_what_the_sweep_fixes(key, dim, fragment):
    """Each trial's length and rungs (ASHA's), no checkpoints or early stopping, one worker: set
    by the sweep whatever params.yaml says. A space naming them is refused, naming the key (the
    space won before: trials ran past max_steps, off the rungs, on several workers)."""
    sweep = SweepConfig.model_validate({**SPACE, "space": {key: dim}})
    with pytest.raises(ConfigError) as err:
        check_space(tiny_raw(), "lm", sweep)
    assert str(err.value).startswith(f"space.{key}: the sweep sets ") and fragment in str(err.value), err.value
    assert "\n" not in str(err.value)
    point = {key: dim["choice"][-1] if "choice" in dim else dim["randint"][1]}
    cfg = validate(trial_config(tiny_raw(), "lm", sweep, point))  # and a trial could not undo them
    tr = cfg.task("lm").trainer
    assert (tr.max_steps, tr.eval_every, tr.ckpt_every, tr.early_stop_patience) == (12, 3, 12, 0)
    assert (cfg.cluster.num_workers, cfg.cluster.min_workers, cfg.parallel.tp, cfg.parallel.pp) == (1, None, 1, 1)
