"""The train stage's driver refuses, in one line and before any worker or MLflow run, what would
only fail later in every Ray worker (and be retried): a relative `init_from` (the workers run in
another folder), initial weights of another shape than the model, `cluster.use_gpu` on a local
Ray without CUDA. A worker's config or input error that does get through is not retried, and
reaches the stage's one-line report as the worker raised it."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, validate
from tests.conftest import ROOT, make_tiny_llama, tiny_raw

MANIFEST = {"vocab_size": 300, "seq_len": 32}  # what the tiny LM's spec takes from the shards


def _spec(*overrides: str) -> dict:
    from pipeline.tasks import task_named

    return task_named("lm").model_spec(validate(tiny_raw(list(overrides))).task("lm"), MANIFEST)


def _save_weights(spec: dict, file: Path) -> Path:
    """The model `spec` builds, saved under the names the loader reads."""
    from safetensors.torch import save_file

    from pipeline.distributed.sharded_init import parameter_names
    from pipeline.tasks import task_for_spec

    model = task_for_spec(spec).build(spec)
    names = parameter_names(model)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({names[id(p)]: p.detach().contiguous() for p in model.parameters()}, str(file))
    return file


def _llama_config(folder: Path) -> Path:
    """A Llama config.json (no weights): enough for the config's own validation."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 128}))
    return folder


# ----------------------------------------------------------------------------- 1. relative init_from
def test_relative_init_from_reaches_the_workers_as_an_absolute_path(tmp_path, monkeypatch):
    """Both init_from keys are resolved against the folder the stage runs in before the config is
    handed to the workers, whose own `validate` (and weights lookup) then works in any folder."""
    from pipeline.runtime.trainer import absolute_init_paths, worker_config
    from pipeline.training.loop import weights_file

    project, elsewhere = tmp_path / "project", tmp_path / "ray-session"
    elsewhere.mkdir()
    _llama_config(project / "hfinit")
    _save_weights(_spec(), project / "export" / "lm" / "model.safetensors")
    monkeypatch.chdir(project)
    for key, value in (("tasks.lm.model.init_from", "hfinit"), ("tasks.lm.trainer.init_from", "export/lm")):
        cfg = validate(tiny_raw([f"{key}={value}"]))
        sent = worker_config(cfg)
        task = sent["tasks"]["lm"]
        path = task["model"]["init_from"] if key.endswith("model.init_from") else task["trainer"]["init_from"]
        assert Path(path).is_absolute() and Path(path) == project / value and Path(path).exists(), path
        monkeypatch.chdir(elsewhere)  # where a Ray worker runs
        worker_cfg = validate(sent)  # what `_worker` does first: refused before the fix ("hfinit is not a folder")
        if key.endswith("trainer.init_from"):
            assert weights_file(worker_cfg.task("lm").trainer.init_from).is_file()
        monkeypatch.chdir(project)
        assert absolute_init_paths(absolute_init_paths(cfg)) == absolute_init_paths(cfg)  # idempotent
    # a URL or an absolute path is left as it is (and nothing else of the config changes)
    for value in ("s3://bucket/lm/model.safetensors", str(project / "export" / "lm")):
        cfg = validate(tiny_raw([f"tasks.lm.trainer.init_from={value}"]))
        assert absolute_init_paths(cfg) is cfg and worker_config(cfg) == cfg.model_dump(mode="json")


def test_relative_init_from_trains_through_the_stage(tmp_path, built_data):
    """A real tiny run of the train stage (its own process, the embedded Ray) with
    `tasks.lm.trainer.init_from` relative to the folder the stage runs in."""
    from pipeline.data.shard_format import load_manifest
    from pipeline.tasks import task_named

    _, shards = built_data
    project = tmp_path / "project"
    shutil.copytree(shards["lm"], project / "data/lm/shards")
    cfg = validate(tiny_raw([f"tasks.lm.data.source={shards['lm']}"]))
    spec = task_named("lm").model_spec(cfg.task("lm"), load_manifest(shards["lm"]))
    _save_weights(spec, project / "init" / "model.safetensors")
    raw = tiny_raw(["tasks.lm.trainer.init_from=init", "tasks.lm.trainer.max_steps=2", "tasks.lm.trainer.ckpt_every=2",
                    "tasks.lm.trainer.log_every=1", "tasks.lm.trainer.eval_every=0", "cluster.num_workers=1",
                    "cluster.max_failures=0", "cluster.storage_path=runs", "tracking.uri=sqlite:///mlruns.db"])
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"PYTHONPATH": str(ROOT), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"})
    proc = subprocess.run([sys.executable, "-m", "stages.train", "lm"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "trained 2 steps" in proc.stdout and (project / "models/lm/model.safetensors").is_file()
    assert "does not exist" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- 2a. shapes on the driver
def test_init_weights_of_another_size_are_named_on_the_driver(tmp_path):
    """Our own weights (a model or export folder, a file) against the model the config builds:
    one line naming the file, the tensor and both shapes."""
    from safetensors.torch import load_file

    from pipeline.training.checkpoint import WEIGHTS, write_model
    from pipeline.training.init_weights import check_init_weights

    small, big = _spec(), _spec("tasks.lm.model.d_model=128")
    file = _save_weights(big, tmp_path / "big.safetensors")
    folder = tmp_path / "export"
    write_model(folder, load_file(str(file)), big)
    check_init_weights(folder, "tasks.lm.trainer.init_from", big)  # the same model: fine
    check_init_weights(file, "tasks.lm.trainer.init_from", big)
    for where in (folder, file):
        named = folder / WEIGHTS if where == folder else file
        with pytest.raises(ValueError) as err:
            check_init_weights(where, "tasks.lm.trainer.init_from", small)
        message = str(err.value)
        assert message.startswith(f"tasks.lm.trainer.init_from: {named}: '") and "\n" not in message
        assert "has shape (300, 128), the model needs (300, 64)" in message, message
    # a tensor the model has and the file does not
    other = _save_weights(_spec("tasks.lm.model.n_layers=1"), tmp_path / "one_layer.safetensors")
    with pytest.raises(ValueError, match=r"^tasks.lm.trainer.init_from: .*one_layer.safetensors has no tensor "
                                         r"'blocks\.1\."):
        check_init_weights(other, "tasks.lm.trainer.init_from", small)


def test_init_weights_of_a_fused_layout_pass_the_shape_check(tmp_path):
    """Weights saved before q/k/v and SwiGLU were split: the loader cuts each split weight's rows
    out of the fused tensor, and the check takes them the same way."""
    from safetensors.torch import load_file, save_file

    from pipeline.training.init_weights import check_init_weights

    spec = _spec()
    state = load_file(str(_save_weights(spec, tmp_path / "split.safetensors")))
    fused = {}
    for name, t in state.items():
        if ".attn.wq." in name:
            prefix = name.split(".attn.wq.")[0]
            fused[f"{prefix}.attn.qkv.weight"] = torch.cat([t, state[name.replace("wq", "wk")],
                                                            state[name.replace("wq", "wv")]])
        elif ".attn.wk." in name or ".attn.wv." in name:
            continue
        else:
            fused[name] = t
    save_file(fused, str(tmp_path / "fused.safetensors"))
    check_init_weights(tmp_path / "fused.safetensors", "tasks.lm.trainer.init_from", spec)
    # more rows than q, k and v take (another model's heads): the rows cut by position would be wrong ones
    qkv = next(n for n in fused if n.endswith(".attn.qkv.weight"))
    fused[qkv] = torch.cat([fused[qkv], fused[qkv][:4]])
    save_file(fused, str(tmp_path / "fused.safetensors"))
    rows = fused[qkv].shape[0]
    with pytest.raises(ValueError, match=rf"^tasks.lm.trainer.init_from: .*fused.safetensors: '{qkv}' has {rows} "
                                         rf"rows, the model's '.*wq.weight', '.*wk.weight', '.*wv.weight' take "
                                         rf"{rows - 4} \(another model's fused layout\)$"):
        check_init_weights(tmp_path / "fused.safetensors", "tasks.lm.trainer.init_from", spec)


def test_init_hf_checkpoint_shapes_are_checked_by_its_own_names(tmp_path):
    """A Hugging Face Llama folder is read by its names (the loader's mapping); a tensor of
    another shape is named by both names."""
    from pipeline.training.init_weights import check_init_weights

    llama = make_tiny_llama(tmp_path / "llama")
    spec = _spec(f"tasks.lm.model.init_from={llama}")
    check_init_weights(llama, "tasks.lm.model.init_from", spec)
    wider = {**spec, "model": {**spec["model"], "mlp_hidden": 128}}
    with pytest.raises(ValueError, match=r"^tasks.lm.trainer.init_from: .*model.safetensors: "
                                         r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\), the model's "
                                         r"'blocks.0.mlp.w1.weight' needs \(128, 64\)$"):
        check_init_weights(llama, "tasks.lm.trainer.init_from", wider)
    gpt2_like = _spec("tasks.lm.model.pos_emb=learned")  # learned positions: no Llama name for them
    with pytest.raises(ValueError, match=r"^tasks.lm.trainer.init_from: .*llama is a Llama checkpoint, and the "
                                         r"model does not have its layout"):
        check_init_weights(llama, "tasks.lm.trainer.init_from", gpt2_like)


def test_train_stage_refuses_init_weights_of_another_size_before_any_run(tmp_path, built_data):
    from pipeline.data.shard_format import load_manifest
    from pipeline.flows.train import train_task
    from pipeline.tasks import task_named

    _, shards = built_data
    cfg = validate(tiny_raw(["tasks.lm.model.d_model=128"]))
    other = _save_weights(task_named("lm").model_spec(cfg.task("lm"), load_manifest(shards["lm"])),
                          tmp_path / "big" / "model.safetensors")
    store = tmp_path / "store"
    cfg = validate(tiny_raw([f"tasks.lm.trainer.init_from={other.parent}", f"cluster.storage_path={store}",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
    with pytest.raises(ValueError, match=r"^tasks.lm.trainer.init_from: .*big/model.safetensors: 'embed.weight' has "
                                         r"shape \(\d+, 128\), the model needs \(\d+, 64\)$"):
        train_task(cfg, "lm", shards["lm"], tmp_path / "out", tmp_path / "metrics")
    assert not store.exists() and not (tmp_path / "mlruns.db").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 2b. no retries, one line
class _Dead(Exception):
    """Stands for Ray's error for a worker that died (its module is Ray's)."""


_Dead.__module__ = "ray.exceptions"


def _fake_trainer(failures: list[dict[int, BaseException]], calls: list[dict]):
    """A trainer class whose fit() raises Ray Train's WorkerGroupError with the next failures."""
    from ray.train import WorkerGroupError

    class Fake:
        def __init__(self, train_loop_per_worker, train_loop_config, **kwargs):
            calls.append(train_loop_config)

        def fit(self):
            failed = failures[min(len(calls), len(failures)) - 1]
            raise WorkerGroupError("worker errors", failed)

    return Fake


def _fit_with(monkeypatch, tmp_path, failures, *extra: str):
    import pipeline.runtime.embedded_trainer as embedded_trainer
    from pipeline.runtime.trainer import fit

    connect = importlib.import_module("pipeline.runtime.connect")  # (the package exports a function of that name)

    calls: list[dict] = []
    monkeypatch.setattr(embedded_trainer, "embedded_trainer_class", lambda: _fake_trainer(failures, calls))
    monkeypatch.setattr(embedded_trainer, "remove_leftover_placement_groups", lambda: 0)
    monkeypatch.setattr(connect, "embedded", lambda: True)
    cfg = validate(tiny_raw([f"cluster.storage_path={tmp_path / 'runs'}", "cluster.max_failures=2", *extra]))
    return cfg, calls, lambda: fit(cfg, "lm", str(tmp_path / "shards"), "run")


@pytest.mark.parametrize("error", [ConfigError("tasks.lm.model.init_from: hfinit is not a folder"),
                                   ValueError("tasks.lm.trainer.init_from: x: 'embed.weight' has shape (2, 3)"),
                                   KeyError("no Llama name for the GPT parameter 'pos.weight'")])
def test_a_workers_config_error_is_not_retried_and_is_raised_as_it_was(monkeypatch, tmp_path, capsys, error):
    _, calls, run = _fit_with(monkeypatch, tmp_path, [{0: error, 1: type(error)(*error.args)}])
    with pytest.raises(type(error)) as err:
        run()
    assert len(calls) == 1, "retried"
    assert err.value is error and "restarting" not in capsys.readouterr().out


@pytest.mark.parametrize("failed", [
    {0: ValueError("bad"), 1: _Dead("The actor died unexpectedly")},  # a killed worker among them
    {0: FileNotFoundError(errno.ENOENT, "No such file or directory", "/mnt/shared/x")},  # the OS's: a lost mount
    {0: FileNotFoundError("trainer.init_from: /mnt/shared/w does not exist")},  # a node without the mount yet
    {0: OSError(errno.EIO, "Input/output error")},
    {0: RuntimeError("Connection closed by peer")},
])
def test_transient_failures_are_still_retried(monkeypatch, tmp_path, capsys, failed):
    """Retried 1 + cluster.max_failures times; then the fit returns the error (it raised Ray Train's
    WorkerGroupError, which ended the stage in Ray's traceback, exit 1), and the train flow names the
    worker's failure in the one line of `TrainingFailed` (exit 2), as it does for Horovod."""
    from ray.train import WorkerGroupError

    from pipeline.flows.train import _innermost

    _, calls, run = _fit_with(monkeypatch, tmp_path, [failed])
    result = run()
    assert isinstance(result.error, WorkerGroupError) and result.checkpoint is None
    assert len(calls) == 3  # 1 + cluster.max_failures
    assert capsys.readouterr().out.count("restarting from the last checkpoint") == 2
    said = _innermost(result.error, "lm")
    first = failed[min(failed)]
    expected = f"{type(first).__name__}: {str(first).splitlines()[0]}"  # (the first rank's error)
    assert expected in said and "\n" not in said, said


def test_a_workers_config_error_reaches_the_stage_as_one_line(monkeypatch, tmp_path, capsys):
    """What `python -m stages.train` prints: the worker's own message, one line, exit code 2."""
    from pipeline.cli import stage_main

    error = ConfigError("tasks.lm.model.init_from: hfinit is not a folder (a Hugging Face checkpoint folder with "
                        "config.json)")
    cfg, calls, run = _fit_with(monkeypatch, tmp_path, [{0: error, 1: error}])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        stage_main("train", lambda c, t: run(), ["lm", "--params", str(tmp_path / "params.yaml")])
    assert exit_.value.code == 2 and len(calls) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error [train lm]: {error}"]


def test_the_worker_log_filter_keeps_tracebacks_of_other_errors(monkeypatch):
    """Ray logs each failed training function with its traceback; a config or input check's is
    reported by the driver in one line instead (unless PIPELINE_DEBUG), anything else is kept."""
    import logging

    from pipeline.runtime.failures import _QuietKnownErrors

    def kept(last_line: str) -> bool:
        record = logging.LogRecord("ray", logging.ERROR, "", 0, f"Error in training function:\nTraceback\n"
                                                               f"  ...\n{last_line}", None, None)
        return _QuietKnownErrors().filter(record)

    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    assert not kept("pipeline.config.loading.ConfigError: tasks.lm.model.init_from: hfinit is not a folder")
    assert not kept("ValueError: trainer.init_from: x: 'embed.weight' has shape (2, 3), the model needs (2, 4)")
    assert kept("FileNotFoundError: trainer.init_from: export/lm does not exist")  # retried: its traceback stays
    assert kept("FileNotFoundError: [Errno 2] No such file or directory: '/mnt/x'")
    assert kept("RuntimeError: Connection closed by peer")
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    assert kept("ValueError: something")


def test_a_train_split_smaller_than_one_global_batch_is_named_on_the_driver(built_data):
    """The reader refuses a split of fewer rows than one global batch, but only inside a worker,
    after Ray and the MLflow run started; the driver's shard check names it first, with the key."""
    from pipeline.data.shard_format import ShardError, load_manifest
    from pipeline.data.shard_verify import check_split

    shards = built_data[1]["lm"]
    rows = sum(e["rows"] for e in load_manifest(shards)["splits"]["train"]["shards"])
    key = "tasks.lm.trainer.global_batch_size"
    check_split(shards, "train", batch=(rows, key))  # exactly one batch: enough
    with pytest.raises(ShardError) as e:
        check_split(shards, "train", batch=(rows + 1, key))
    assert str(e.value) == (f"{shards}: split 'train' has {rows} rows, fewer than one global batch "
                            f"({key}={rows + 1}): lower it, or add data")


def test_the_controllers_shutdown_traceback_of_a_dead_worker_is_dropped(monkeypatch):
    """Ray Train's controller logs its failed backend shutdown, with the dead actor's 23-line RPC
    traceback, whenever a worker is gone; the driver's retry line names that worker. The hook every
    process of the job runs (`worker_runtime_env`) drops that record, and only that one."""
    import logging

    from ray.exceptions import ActorUnavailableError

    from pipeline.quiet import RAY_WORKER_SETUP, quiet_ray_worker
    from pipeline.runtime.connect import worker_runtime_env

    def record(msg: str, error: BaseException | None) -> logging.LogRecord:
        info = (type(error), error, None) if error else None
        return logging.LogRecord("ray.train.v2._internal.callbacks.backend_setup", logging.WARNING, "", 0, msg,
                                 None, info)

    assert worker_runtime_env({"X": "1"})["worker_process_setup_hook"] == RAY_WORKER_SETUP
    assert worker_runtime_env({"X": "1"})["env_vars"]["X"] == "1"
    logger = logging.getLogger("ray.train.v2._internal.callbacks.backend_setup")
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    quiet_ray_worker()
    quiet_ray_worker()  # idempotent
    assert len(logger.filters) == 1
    shutdown = "Graceful shutdown of backend failed. This is expected if one of the workers has crashed."
    assert not logger.filter(record(shutdown, ActorUnavailableError("rpc", None)))
    assert logger.filter(record(shutdown, RuntimeError("a worker's own shutdown hook failed")))
    assert logger.filter(record("another warning", ActorUnavailableError("rpc", None)))
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    quiet_ray_worker()
    assert not logger.filters


# ----------------------------------------------------------------------------- 3. use_gpu without CUDA
GPU_LINE = (r"^cluster.use_gpu=true, but this machine has no CUDA device \(torch .*\) and training would run on the "
            r"local Ray; set cluster.use_gpu=false or point RAY_ADDRESS at a GPU cluster$")


@pytest.fixture
def no_cuda(monkeypatch):
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # not connected yet: the address decides
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_use_gpu_on_a_local_ray_without_cuda_is_refused(no_cuda, monkeypatch):
    from pipeline.distributed import check_gpu_host

    with pytest.raises(ValueError, match=GPU_LINE):
        check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true"])))
    check_gpu_host(validate(tiny_raw()))  # no GPU asked for
    check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true", "cluster.address=10.0.0.5:6379"])))  # a cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true"])))


def test_more_gpu_workers_than_the_machine_has_gpus_is_refused_on_the_local_ray(no_cuda, monkeypatch):
    """One GPU a worker: 4 workers on a local Ray with 2 GPUs waited for ever (Ray has no autoscaler
    there, and a startup timeout is retried). Refused naming the key and the count; an elastic run
    needs GPUs for its fewest workers; a cluster is the cluster's business."""
    from pipeline.distributed import check_gpu_host

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^cluster\.num_workers=4 with cluster\.use_gpu=true needs a GPU per worker, "
                                         r"and this machine has 2; .*set cluster\.num_workers to at most 2"):
        check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true", "cluster.num_workers=4"])))
    with pytest.raises(ValueError, match=r"^cluster\.min_workers=3 with cluster\.use_gpu=true"):
        check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true", "cluster.num_workers=4", "cluster.min_workers=3"])))
    check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true", "cluster.num_workers=4", "cluster.min_workers=2"])))
    check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true", "cluster.num_workers=2"])))
    check_gpu_host(validate(tiny_raw(["cluster.use_gpu=true", "cluster.num_workers=4",
                                      "cluster.address=10.0.0.5:6379"])))


def test_train_stage_refuses_use_gpu_without_cuda_before_any_run(no_cuda, tmp_path, built_data):
    from pipeline.flows.train import train_task

    _, shards = built_data
    store = tmp_path / "store"
    cfg = validate(tiny_raw(["cluster.use_gpu=true", f"cluster.storage_path={store}",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
    with pytest.raises(ValueError, match=GPU_LINE):
        train_task(cfg, "lm", shards["lm"], tmp_path / "out", tmp_path / "metrics")
    assert not store.exists() and not (tmp_path / "mlruns.db").exists()


def test_pipeline_validate_warns_of_use_gpu_without_cuda(no_cuda, tmp_path, capsys):
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(["cluster.use_gpu=true"]), sort_keys=False))
    main(["validate", "--params", str(params)])  # exit 0, a warning: the config may be meant for a GPU cluster
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: cluster.use_gpu=true, but this machine has no CUDA device")
    assert "(the train stage refuses it on this machine" in err[0] and out.out.strip().endswith(": ok")


def test_pipeline_validate_warns_of_what_this_machine_lacks(tmp_path, capsys):
    """`pipeline validate` said ok to a config the train stage then refused on the same machine for
    what the machine lacks (Apex, DeepSpeed's CPU fp16, ...): it now runs those checks too, as a
    warning (a cluster that has them runs the config), while a config it can train says nothing."""
    from pipeline.cli import main
    from pipeline.training.optim import apex_available

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(["tasks.lm.optim.impl=apex"]), sort_keys=False))
    main(["validate", "--params", str(params)])
    out = capsys.readouterr()
    if not apex_available():
        assert out.err.strip().splitlines() == [
            "warning: tasks.lm.optim.impl: 'apex' was asked for, but NVIDIA Apex is not installed here; install it, "
            "or use auto/torch (the train stage refuses it on this machine; `pipeline submit` to a cluster that has "
            "it is fine)"]
    assert out.out.strip().endswith(": ok")
    params.write_text(yaml.safe_dump(tiny_raw(), sort_keys=False))
    main(["validate", "--params", str(params)])
    assert capsys.readouterr().err == ""


def test_use_gpu_on_a_cluster_without_gpus_is_a_warning(monkeypatch):
    import ray

    from pipeline.distributed import gpu_cluster_warning

    connect = importlib.import_module("pipeline.runtime.connect")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(connect, "embedded", lambda: False)  # connected to a cluster
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    cfg = validate(tiny_raw(["cluster.use_gpu=true"]))
    assert "the Ray cluster has no GPU now" in gpu_cluster_warning(cfg)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert gpu_cluster_warning(cfg) is None
    assert gpu_cluster_warning(validate(tiny_raw())) is None
