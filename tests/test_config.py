"""Config validation: one clear line naming the key, before any resource is taken."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, compose, flatten, validate
from pipeline.config.loading import apply_overrides, load_config
from tests.conftest import ROOT, tiny_raw


def test_committed_params_match_composed_configs():
    """params.yaml is what `dvc repro` reads: it must equal the Hydra composition of configs/."""
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose(ROOT / "configs")
    validate(committed)


def test_configs_state_every_field():
    """No value may hide in a schema default: DVC tracks params.yaml, so every value must be in it."""
    raw = compose(ROOT / "configs")
    assert flatten(validate(raw).model_dump(mode="json")) == flatten(raw)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("tasks.lm.optim.lrr=0.1", "tasks.lm.optim.lrr: unknown key"),
        ("tasks.lm.optim.lr=-1", "tasks.lm.optim.lr: Input should be greater than 0 (got -1)"),
        ("tasks.lm.data.shard_rows=0", "tasks.lm.data.shard_rows: Input should be greater than 0 (got 0)"),
        ("tasks.lm.model.kind=transformerxl", "tasks.lm.model"),
        ("tasks.lm.data.split.train=0.5", "tasks.lm.data.split: train + val + test must sum to 1"),
        ("tasks.diffusion.model.kind=gpt", "tasks.diffusion.model.patch_size: unknown key"),
        ("precision.dtype=fp4", "precision.dtype"),
        ("tasks.diffusion.export.quantize_int8=true", "tasks.diffusion: export.quantize_int8 is for the language"),
        ("tasks.lm.export.onnx=false", "tasks.lm.export: quantize_int8 quantizes the ONNX graph: it needs onnx"),
        # torch refuses a beta of 1 in every worker; an infinite size and a model.init_from that is not
        # a path were tracebacks; NCCL on CPU workers failed in every worker, retried
        ("tasks.lm.optim.beta1=1.0", "tasks.lm.optim.beta1: Input should be less than 1 (got 1.0)"),
        ("tasks.lm.optim.beta2=1.0", "tasks.lm.optim.beta2: Input should be less than 1 (got 1.0)"),
        ("cluster.device_memory=inf", "cluster.device_memory: a memory size must be a finite number of bytes"),
        ("cluster.device_memory=1e400", "cluster.device_memory: a memory size must be a finite number of bytes"),
        ("tasks.lm.model.init_from=5", "tasks.lm.model.init_from: Input should be a valid string (got 5)"),
        ("strategy.backend=nccl", "strategy.backend=nccl needs cluster.use_gpu=true: NCCL runs between GPUs"),
        # a Hydra group option given where params.yaml is overridden: how to compose it instead
        ("model@tasks.lm.model=gpt_7b", "a group option (model@tasks.lm.model=gpt_1b) is chosen when configs/ is "
                                        "composed: `pipeline plan --compose`"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny_raw(), [override]))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_task_named_like_a_union_tag_keeps_its_name_in_errors():
    """A task called `text` (or `gpt`, `ddp`): its name stayed out of the error's key with the
    discriminated union's tags ("tasks.model.d_model"); only a tag after data, model or strategy goes."""
    raw = tiny_raw()
    raw["tasks"] = {"text": raw["tasks"]["lm"]}
    raw["tasks"]["text"]["model"]["d_model"] = -5
    with pytest.raises(ConfigError, match=r"^tasks\.text\.model\.d_model: Input should be greater than 0 \(got -5\)"):
        validate(raw)


def test_a_check_that_names_its_keys_is_not_prefixed_twice():
    """A section's check whose message already names its key ("precision.fp8_emulate=true ...")
    read "precision: precision.fp8_emulate=true ..."; under a deeper path only the parents are
    added, and a message that names no key keeps its "key: " prefix."""
    from pipeline.config.loading import _keyed

    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny_raw(), ["precision.fp8_emulate=true"]))
    assert str(err.value) == "precision.fp8_emulate=true needs precision.dtype=fp8 (got fp32)"
    assert _keyed(["tasks", "lm", "trainer"], "trainer.ac_every_k=3 needs x") == "tasks.lm.trainer.ac_every_k=3 needs x"
    assert _keyed(["tasks", "lm", "trainer"], "tasks.lm.trainer.x=1 needs y") == "tasks.lm.trainer.x=1 needs y"
    assert _keyed(["tasks", "lm", "model"], "model kind 'gpt' is bad") == "tasks.lm.model: model kind 'gpt' is bad"
    assert _keyed([], "strategy.name=horovod needs x") == "strategy.name=horovod needs x"


def test_horovod_refuses_object_store_storage_at_validation():
    """Horovod's ranks write checkpoint files themselves (no Ray Train upload): an s3:// storage
    path stops at validation in one line naming both keys; DDP takes the same path."""
    s3 = ["cluster.storage_path=s3://runs/ray"]
    from pipeline.distributed import VARIANTS

    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny_raw(), [*s3, *VARIANTS["horovod"]]))
    msg = str(err.value)
    assert "cluster.storage_path=s3://runs/ray" in msg and "strategy.name=horovod" in msg and "\n" not in msg
    assert validate(apply_overrides(tiny_raw(), s3)).cluster.storage_path == "s3://runs/ray"
    assert validate(apply_overrides(tiny_raw(), VARIANTS["horovod"])).strategy.name == "horovod"


def test_model_family_must_fit_the_data():
    raw = compose(ROOT / "configs", ["model@tasks.diffusion.model=gpt_tiny"])
    with pytest.raises(ConfigError, match=r"tasks.diffusion: model kind 'gpt' cannot train on images data"):
        validate(raw)


def test_unknown_section_in_override():
    with pytest.raises(ConfigError, match=r"tasks\.nope\.x: unknown key"):
        apply_overrides(tiny_raw(), ["tasks.nope.x=1"])


def test_unknown_model_preset_is_a_hydra_error():
    with pytest.raises(Exception, match="gpt_huge"):
        compose(ROOT / "configs", ["model@tasks.lm.model=gpt_huge"])


def test_a_model_labelled_with_a_preset_it_is_not_is_named(capsys, monkeypatch):
    """`-S tasks.lm.model.preset=gpt_1b` relabels the tiny model, it does not pick the 1B (the group
    override `model@tasks.lm.model=gpt_1b` does): the train stage's config check says so in one
    warning line, with the values the 1B sets and how to pick it. The picked preset, a preset whose
    base values (not its own) changed, `custom` and a name of the user's own say nothing."""
    from pipeline.config.presets import preset_differences
    from pipeline.flows.train import check_task_config

    monkeypatch.chdir(ROOT)  # (configs/ of the working directory, as dvc runs the stages)
    check_task_config(validate(tiny_raw(["tasks.lm.model.preset=gpt_1b"])), "lm")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "warning: tasks.lm.model.preset says gpt_1b, but the model is not that preset: d_model 64 (gpt_1b: 2048), "
        "n_layers 2 (gpt_1b: 24), n_heads 2 (gpt_1b: 16), vocab_multiple 1 (gpt_1b: 64); "), err
    assert "dvc exp run -S 'model@tasks.lm.model=gpt_1b'" in err[0] and "tasks.lm.model.preset=custom" in err[0]
    check_task_config(validate(tiny_raw(["tasks.diffusion.model.depth=3"])), "diffusion")  # dit_tiny's own value
    assert capsys.readouterr().err.strip().startswith(
        "warning: tasks.diffusion.model.preset says dit_tiny, but the model is not that preset: depth 3 (dit_tiny: 2);")
    for overrides in ([], ["tasks.lm.model.tie_weights=false", "tasks.lm.model.dropout=0.1"],
                      ["tasks.lm.model.preset=custom", "tasks.lm.model.d_model=96"], ["tasks.lm.model.preset=mine"]):
        check_task_config(validate(tiny_raw(overrides)), "lm")
        assert capsys.readouterr().err == "", overrides
    one_b = validate(compose(ROOT / "configs", ["model@tasks.lm.model=gpt_1b"])).task("lm").model
    assert preset_differences(one_b, ROOT / "configs") == []
    assert preset_differences(one_b, ROOT / "nowhere") == []  # no configs/: nothing to compare with


def test_stage_exits_2_with_one_line(tmp_path):
    raw = tiny_raw()
    raw["tasks"]["lm"]["optim"]["lr"] = -0.5
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.train", "lm", "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error [train lm]: tasks.lm.optim.lr: Input should be greater than 0 (got -0.5)"]


def test_stage_usage_error_names_only_the_task(capsys):
    """Overrides are optional: a stage run without its task names the task alone."""
    from pipeline.cli import stage_main

    with pytest.raises(SystemExit) as e:
        stage_main("train", lambda cfg, task: None, [])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: the following arguments are required: task")


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_task_is_named(tiny_cfg):
    with pytest.raises(KeyError, match="unknown task 'vision'"):
        tiny_cfg.task("vision")


@pytest.mark.parametrize("group", ["ddp", "fsdp", "deepspeed", "horovod"])
def test_every_strategy_group_composes_and_states_every_field(group):
    """`dvc exp run -S strategy=<group>` composes a complete, valid strategy section."""
    raw = compose(ROOT / "configs", [f"strategy={group}"])
    cfg = validate(raw)
    assert cfg.strategy.name == group
    assert raw["strategy"] == cfg.strategy.model_dump(mode="json")


@pytest.mark.parametrize("override", ["tasks.lm.optim.lr=true", "tasks.lm.trainer.max_steps=true",
                                      "cluster.num_workers=true", "seed=false", "tasks.lm.model.n_kv_heads=true",
                                      "tasks.lm.optim.gamma=false"])
def test_a_boolean_where_a_number_belongs_is_refused(override):
    """pydantic's lax mode turned `lr=true` (DVC's `-S` values reach Hydra as Python booleans)
    into 1.0 and `seed=false` into 0, silently; now one line names the key."""
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny_raw(), [override]))
    assert str(err.value) == f"{key}: expected a number, not a boolean (got {value.title()})"
    with pytest.raises(ConfigError, match=rf"^{key}: expected a number, not a boolean"):  # as Hydra composes it
        validate(compose(ROOT / "configs", [override]))


@pytest.mark.parametrize("override", ["tasks.lm.optim.nesterov=1", "tasks.lm.export.onnx=0",
                                      "tasks.lm.trainer.compile_loss='false'", "cluster.use_gpu=2"])
def test_a_number_or_word_where_a_boolean_belongs_is_refused(override):
    """pydantic's lax mode took `nesterov=1` as true and `onnx=0` or the string "off" as false:
    a typo silently flipped a switch. Now one line names the key and the value."""
    key, value = override.split("=")
    got = {"'false'": "'false'"}.get(value, value)
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny_raw(), [override]))
    assert str(err.value) == f"{key}: expected true or false (got {got})"
    with pytest.raises(ConfigError) as err:  # as Hydra composes it
        validate(compose(ROOT / "configs", [override]))
    assert str(err.value) == f"{key}: expected true or false (got {got})"


def test_every_boolean_field_refuses_anything_but_a_boolean():
    """Every boolean field of every config model takes true and false and refuses 1, 0 and words."""
    from pydantic import ValidationError

    import pipeline.config.schema as schema
    from pipeline.config.schema.fields import _typed_fields

    models = [m for m in vars(schema).values() if isinstance(m, type) and issubclass(m, schema.Strict)]
    checked = 0
    for model in models:
        for name in _typed_fields(model)[2]:
            for value in (1, 0, "true", "off"):
                with pytest.raises(ValidationError) as err:
                    model.model_validate({name: value})
                assert [(e["loc"], e["type"]) for e in err.value.errors()] == [((name,), "number_for_bool")]
            checked += 1
    assert checked > 12 and {"nesterov", "compile_loss"} <= _typed_fields(schema.TrainerConfig)[2] | \
        _typed_fields(schema.OptimConfig)[2]


def test_every_number_field_refuses_a_boolean_and_keeps_its_numbers():
    """Generally, not per field: every number field of every config model (lists of numbers
    included) refuses true and false, boolean fields still take them, and numbers still pass."""
    from pydantic import ValidationError

    import pipeline.config.schema as schema
    from pipeline.config.schema.fields import _typed_fields

    models = [m for m in vars(schema).values() if isinstance(m, type) and issubclass(m, schema.Strict)]
    checked = 0
    for model in models:
        numbers, lists, _ = _typed_fields(model)
        for name in numbers:
            with pytest.raises(ValidationError) as err:
                model.model_validate({name: True})
            assert [(e["loc"], e["type"]) for e in err.value.errors()] == [((name,), "bool_for_number")]
            checked += 1
        for name in lists:
            with pytest.raises(ValidationError) as err:
                model.model_validate({name: [2, False]})
            assert [(e["loc"], e["type"]) for e in err.value.errors()] == [((name, 1), "bool_for_number")]
    assert checked > 80 and "lr" in _typed_fields(schema.OptimConfig)[0]
    assert "channel_mults" in _typed_fields(schema.UNetConfig)[1]
    assert "nesterov" not in _typed_fields(schema.OptimConfig)[0]
    legit = ["tasks.lm.optim.lr=1", "tasks.lm.optim.name=sgd", "tasks.lm.optim.nesterov=true", "seed=0",
             "cluster.device_memory=8GiB"]
    cfg = validate(apply_overrides(tiny_raw(), legit))
    assert (cfg.tasks["lm"].optim.lr, cfg.tasks["lm"].optim.nesterov, cfg.seed) == (1.0, True, 0)


def test_every_number_field_refuses_infinity_and_nan():
    """`lr: .inf` passed every bound (NaN failed only the bounds) and diverged after Ray started;
    `mlp_ratio: .inf` was an OverflowError in the workers, `rope_theta: .inf` trained with one
    rotating frequency. Every number field of every config model refuses both, naming the key."""
    from pydantic import ValidationError

    import pipeline.config.schema as schema
    from pipeline.config.schema.fields import _typed_fields

    checked = 0
    for model in [m for m in vars(schema).values() if isinstance(m, type) and issubclass(m, schema.Strict)]:
        for name in _typed_fields(model)[0]:
            for value in (float("inf"), float("-inf"), float("nan")):
                with pytest.raises(ValidationError) as err:
                    model.model_validate({name: value})
                assert name in [e["loc"][0] for e in err.value.errors()], (model.__name__, name, value)
            checked += 1
    assert checked > 80
    for override in ["tasks.lm.optim.lr=.inf", "tasks.lm.model.rope_theta=.inf", "tracking.connect_timeout_s=.inf",
                     "tasks.diffusion.data.augment.rotate_deg=.nan"]:
        with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: Input should be a finite number"):
            validate(apply_overrides(tiny_raw(), [override]))


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_experiment_name_is_refused(name):
    """MLflow refuses it only when the run starts, after Ray is up, in words that blame the store."""
    with pytest.raises(ConfigError, match=r"^tracking.experiment: .*must not be empty"):
        validate(apply_overrides(tiny_raw(), [f"tracking.experiment='{name}'"]))


@pytest.mark.parametrize(("overrides", "message"), [
    (["tasks.diffusion.model.diffusion.schedule=linear", "tasks.diffusion.model.diffusion.timesteps=20"],
     "tasks.diffusion.model.diffusion: timesteps: the linear schedule needs more than 20"),
    (["tasks.diffusion.model.diffusion.cond_drop_prob=0.0", "tasks.diffusion.eval.guidance_scale=3.0"],
     "tasks.diffusion: eval.guidance_scale: classifier-free guidance mixes in the unconditional"),
    (["+tasks.diffusion.model.diffusion.sample_steps=10"],
     "tasks.diffusion.model.diffusion: sample_steps: the sampler's settings moved to the task's eval section "
     r"\(eval.sample_steps\)"),
    (["tasks.diffusion.model.d_model=33", "tasks.diffusion.model.n_heads=3"],
     r"tasks.diffusion.model.*: d_model \(33\) must be even"),
    (["tasks.diffusion.data.image_size=10", "tasks.diffusion.model.patch_size=4"],
     "tasks.diffusion: data.image_size 10 is not divisible by model.patch_size 4"),
    (["model@tasks.diffusion.model=unet_tiny", "tasks.diffusion.model.base_channels=4"],
     r"base_channels \(4\) must be a multiple of 8"),
    (["model@tasks.diffusion.model=unet_tiny", "tasks.diffusion.model.channel_mults=[1,2,2,2,2]"],
     r"tasks.diffusion: data.image_size 8 is not divisible by 2\^4 \(the U-Net halves it"),
    (["tasks.diffusion.trainer.activation_checkpointing=selective", "tasks.diffusion.trainer.ac_selective=attention"],
     r"tasks.diffusion: trainer.ac_selective: 'attention' checkpoints the blocks' `attn` module, which only the "
     r"GPT's blocks have \(not the dit's\)"),
    (["model@tasks.diffusion.model=unet_tiny", "tasks.diffusion.trainer.activation_checkpointing=selective",
      "tasks.diffusion.trainer.ac_selective=attention"], r"only the GPT's blocks have \(not the unet's\)"),
])
def test_diffusion_configs_that_cannot_train_are_refused_before_any_worker(overrides, message):
    """Each of these validated and then failed in the workers (a matmul shape, GroupNorm's groups,
    the patch grid) or trained on nothing (a linear schedule whose last beta reaches 1 makes every
    step non-finite; guidance without label dropout mixes in an untrained unconditional branch)."""
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose(ROOT / "configs", ["model@tasks.diffusion.model=dit_tiny", *overrides]))
    assert "\n" not in str(err.value)


def test_diffusion_configs_at_the_edges_still_validate():
    ok = [["tasks.diffusion.model.diffusion.schedule=linear", "tasks.diffusion.model.diffusion.timesteps=21"],
          ["tasks.diffusion.model.diffusion.cond_drop_prob=0.0", "tasks.diffusion.eval.guidance_scale=0"],
          ["tasks.diffusion.data.image_size=12", "tasks.diffusion.model.patch_size=4"],
          ["model@tasks.diffusion.model=unet_tiny", "tasks.diffusion.model.base_channels=16",
           "tasks.diffusion.model.channel_mults=[1,2,2,2]"]]
    for overrides in ok:
        validate(compose(ROOT / "configs", ["model@tasks.diffusion.model=dit_tiny", *overrides]))


def test_settings_that_do_nothing_are_warned_of_by_the_train_stage():
    """A warmup as long as the run, the plateau schedule or early stopping with a validation
    interval no step reaches, and label smoothing on the diffusion loss validated and then did
    nothing: the train stage says so, one line each (warnings: a config that trained before must
    still evaluate and export)."""
    from pipeline.flows.train import schedule_warnings
    from tests.conftest import tiny_raw

    cfg = validate(tiny_raw(["tasks.lm.optim.warmup_steps=12", "tasks.lm.trainer.eval_every=50",
                             "tasks.lm.trainer.early_stop_patience=2", "tasks.diffusion.trainer.label_smoothing=0.2"]))
    assert schedule_warnings(cfg, "lm") == [
        "tasks.lm.optim.warmup_steps (12) >= trainer.max_steps (6): the learning rate reaches 50% of optim.lr at the "
        "last step, and the cosine schedule never starts",
        "tasks.lm: trainer.early_stop_patience acts on the validation loss, which trainer.eval_every (50) never "
        "computes within trainer.max_steps (6): lower eval_every"]
    assert schedule_warnings(cfg, "diffusion") == [
        "tasks.diffusion.trainer.label_smoothing smooths the language model's cross-entropy; the diffusion loss "
        "(noise regression) has nothing to smooth: it does nothing here"]
    plateau = validate(tiny_raw(["tasks.lm.trainer.eval_every=50", "tasks.lm.optim.schedule=plateau"]))
    assert "optim.schedule 'plateau' acts on the validation loss" in schedule_warnings(plateau, "lm")[0]
    assert schedule_warnings(validate(tiny_raw([])), "lm") == []


def test_a_mapping_override_merges_into_its_section_as_hydra_does():
    """`trainer={max_steps: 5}` replaced the whole section where params.yaml is overridden (a stage,
    `pipeline plan`): every other key fell back to the schema's default, validation off among them,
    while Hydra (`dvc exp run -S`, `pipeline compose`) merges it. Both give one config now."""
    override = ["tasks.lm.trainer={max_steps: 5}"]
    overridden = load_config(ROOT / "params.yaml", override).task("lm")
    composed = validate(compose(ROOT / "configs", override)).task("lm")
    committed = load_config(ROOT / "params.yaml").task("lm")
    assert overridden.trainer.max_steps == 5 and overridden.trainer == composed.trainer
    assert overridden.trainer.eval_every == committed.trainer.eval_every > 0
    nested = load_config(ROOT / "params.yaml", ["tasks.lm={optim: {lr: 0.01}}"]).task("lm")
    assert nested.optim.lr == 0.01 and nested.optim.warmup_steps == committed.optim.warmup_steps
    assert nested.model == committed.model


@pytest.mark.parametrize("value", ["off", "yes", "12:30"])
def test_override_values_are_read_as_hydra_reads_them(value):
    """PyYAML's YAML 1.1 made `off` False, `yes` True and `12:30` the number 750 (refused for a name,
    or a source path read as a boolean); Hydra keeps them strings, and now so do overrides of
    params.yaml. Numbers such as 1e-3 are numbers both ways."""
    assert validate(apply_overrides(tiny_raw(), [f"tracking.experiment={value}"])).tracking.experiment == value
    assert validate(compose(ROOT / "configs", [f"tracking.experiment={value}"])).tracking.experiment == value
    assert apply_overrides(tiny_raw(), ["tasks.lm.optim.lr=1e-3"])["tasks"]["lm"]["optim"]["lr"] == 0.001


def test_a_check_that_names_the_input_names_it_once():
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(tiny_raw(), ["cluster.device_memory=lots"]))
    assert str(err.value).count("(got 'lots')") == 1, str(err.value)


@pytest.mark.parametrize("name", ["horovod", "fsdp"])
def test_a_strategy_switched_by_name_is_told_to_pick_the_group(name):
    """`strategy.name=horovod` keeps DDP's `backend: auto`, which Horovod refuses; the error says to
    choose the group (`strategy=horovod`), whose keys fit the strategy."""
    with pytest.raises(ConfigError, match=rf"choose its config group instead .*`dvc exp run -S strategy={name}`"):
        validate(compose(ROOT / "configs", ["strategy=deepspeed", f"strategy.name={name}"]))
    validate(compose(ROOT / "configs", [f"strategy={name}"]))
