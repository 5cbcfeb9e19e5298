"""The whole pipeline for real: `dvc repro` in a fresh git copy of this project, with tiny
settings, through Ray Train with 2 workers, into an MLflow SQLite store. Then a second
`dvc repro` that does nothing, and a `dvc exp run -S` variant."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.build import file_md5
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.e2e
# Not copied: tests, benchmarks, and anything a pipeline run in this checkout left behind.
OUTPUTS = ("tests/", "benchmarks/", "data/", "models/", "export/", "reports/", "registry/", "metrics/", "runs/",
           "dvc.lock", "mlruns.db", "mlartifacts/", "dvc_plots/")


def _sh(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd),
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}  # tiny runs last seconds; the default samples every 10
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _tiny_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(OUTPUTS):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    # Make the Hydra root config itself tiny, so `dvc exp run` composes tiny variants too.
    cfg_path = dest / "configs" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["defaults"] = [{"model@tasks.lm.model": "gpt_tiny"} if "model@tasks.lm.model" in d else
                       {"model@tasks.diffusion.model": "dit_tiny"} if "model@tasks.diffusion.model" in d else d
                       for d in cfg["defaults"]]
    for item in TINY:
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for f in ("dvc.lock",):
        (dest / f).unlink(missing_ok=True)
    _sh([sys.executable, "-m", "pipeline", "compose"], dest)
    _sh(["git", "init", "-q"], dest)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"], dest)
    return dest


def test_dvc_repro_end_to_end(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    project = _tiny_project(tmp_path / "project")
    out = _sh(["dvc", "repro"], project)
    for task in ("lm", "diffusion"):
        assert f"[{task}] trained 6 steps" in out
    assert "now champion" in out

    lm = json.loads((project / "metrics/lm/eval.json").read_text())
    diff = json.loads((project / "metrics/diffusion/eval.json").read_text())
    assert 1 < lm["val_perplexity"] < 400 and diff["test_denoise_loss"] > 0
    png = project / "reports/diffusion/samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "export/lm/model.onnx").stat().st_size > 0
    assert (project / "export/lm/model.safetensors").is_file()

    head = _sh(["git", "rev-parse", "HEAD"], project).strip()
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    client = MlflowClient()
    for task, name in (("lm", "pipeline-lm"), ("diffusion", "pipeline-diffusion")):
        mv = client.get_model_version_by_alias(name, "champion")
        run = client.get_run(mv.run_id)
        assert run.data.tags["git.commit"] == head
        assert run.data.tags["data.manifest_md5"] == file_md5(project / f"data/{task}/shards/manifest.json")
        assert run.data.tags["cluster.workers"] == "2"
        assert any(k.startswith(f"dvc.shard:{task}.") for k in run.data.tags)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [2, 3, 4, 6]  # log_every 2, ckpt_every 3, last step 6
        assert client.get_experiment(run.info.experiment_id).name == "pipeline"
        assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
        assert "eval/" + ("val_loss" if task == "lm" else "test_denoise_loss") in run.data.metrics
        assert "system/cpu_utilization_percentage" in run.data.metrics  # sampled while Ray trained
        # dataset inputs: raw source, prepared data and shards, with DVC's own hashes
        inputs = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags})
                  for i in run.inputs.dataset_inputs}
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        shard_md5 = next(o["md5"] for o in lock[f"shard@{task}"]["outs"] if o["path"] == f"data/{task}/shards")
        prepared_md5 = next(o["md5"] for o in lock[f"prepare@{task}"]["outs"] if o["path"] == f"data/{task}/prepared")
        assert inputs[f"{task}-shard"][0] == shard_md5 and inputs[f"{task}-prepare"][0] == prepared_md5
        data_stats = json.loads((project / f"metrics/{task}/data.json").read_text())
        assert inputs[f"{task}-raw"][1]["digest_full"] == data_stats["raw_sha256"]
        if task == "lm":  # what prepare read and dropped is on the run too
            assert run.data.params["prepared.documents_raw"] == str(data_stats["documents_raw"])
        # the version carries the lineage itself: commit, data and DVC hashes, environment, eval metrics
        eval_metrics = json.loads((project / f"metrics/{task}/eval.json").read_text())
        assert mv.tags["git.commit"] == head and mv.tags["git.dirty"] == "false"
        assert mv.tags[f"dvc.shard:{task}.data/{task}/shards"] == shard_md5 and "env.torch" in mv.tags
        assert {f"eval.{k}": str(v) for k, v in eval_metrics.items()}.items() <= mv.tags.items()
    exported = json.loads((project / "metrics/lm/export.json").read_text())
    assert exported["int8_size_ratio"] < 0.7 and abs(exported["int8_val_perplexity_change"]) < 0.1
    assert exported["hf_max_abs_logit_diff"] <= 1e-4 and exported["hf_greedy_tokens_equal"] == 1.0
    assert "export/lm/hf (LlamaForCausalLM, float32)" in out
    lm_run = client.get_model_version_by_alias("pipeline-lm", "champion").run_id
    assert [f.path for f in client.list_artifacts(lm_run, "onnx_int8")] == ["onnx_int8/model.int8.onnx"]
    _registered_onnx_runs(client, project)
    mlflow.set_tracking_uri(None)
    shown = _sh([sys.executable, "-m", "pipeline", "lineage", "pipeline-lm@champion",
                 "--tracking-uri", f"sqlite:///{project}/mlruns.db"], project)
    assert "input      lm-raw:" in shown and "matches this workspace" in shown

    _serve_and_predict(project)

    # Re-run the champion LM's commit in a fresh worktree: same seed, config and data, same metrics.
    shown = _sh([sys.executable, "-m", "pipeline", "reproduce", "pipeline-lm@champion", "--tolerance", "1e-6",
                 "--workdir", str(tmp_path / "again"), "--tracking-uri", f"sqlite:///{project}/mlruns.db"], project)
    assert "reproduced within tolerance" in shown and "val_perplexity" in shown, shown[-3000:]

    again = _sh(["dvc", "repro"], project)
    assert "Data and pipelines are up to date." in again

    shown = _sh(["dvc", "metrics", "show"], project)
    assert "val_perplexity" in shown and "test_denoise_loss" in shown

    variant = _sh(["dvc", "exp", "run", "-S", "tasks.lm.eval.max_batches=1"], project)
    assert "Running stage 'evaluate@lm'" in variant and "Running stage 'train@lm'" not in variant
    assert "max_batches" in _sh(["dvc", "exp", "show", "--no-pager", "--md"], project)

    # A grid through DVC's queue: each variant runs in a copy under .dvc/tmp/exps/ (unchanged
    # stages restored from the run cache) and still logs into the workspace's tracking store.
    _sh(["dvc", "exp", "run", "--queue", "-S", "tasks.lm.eval.max_batches=3,4"], project)
    _sh(["dvc", "queue", "start", "-j", "2"], project)
    import time

    deadline = time.time() + 600
    while any(w in (status := _sh(["dvc", "queue", "status"], project)) for w in ("Queued", "Running")):
        assert time.time() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status + _sh(["dvc", "queue", "logs", status.split()[5]], project)[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    versions = MlflowClient().search_model_versions("name = 'pipeline-lm'")
    mlflow.set_tracking_uri(None)
    assert len(versions) == 4  # dvc repro, the -S variant, and the two queued ones


def _registered_onnx_runs(client, project: Path) -> None:
    """The ONNX file logged with the champion LM's run runs in onnxruntime and matches PyTorch."""
    import mlflow
    import numpy as np
    import onnxruntime as ort
    import torch
    from mlflow.artifacts import download_artifacts

    from pipeline.training.checkpoint import load_model

    mv = client.get_model_version_by_alias("pipeline-lm", "champion")
    folder = download_artifacts(run_id=mv.run_id, artifact_path="onnx", tracking_uri=mlflow.get_tracking_uri())
    session = ort.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.arange(1, 17, dtype=np.int64)[None, :]
    (logits,) = session.run(None, {session.get_inputs()[0].name: tokens})
    model, _ = load_model(project / "export/lm")
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).numpy()
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-3


def _serve_and_predict(project: Path) -> None:
    """`mlflow models serve` each champion on 127.0.0.1 and ask it over HTTP: the LM for a
    completion, the diffusion model for samples of given digits."""
    body = {"dataframe_split": {"columns": ["prompt"], "data": [["The for statement"]]},
            "params": {"max_new_tokens": 8}}
    predictions = _serve("pipeline-lm", project, body)
    assert len(predictions) == 1 and predictions[0]["completion"].strip()

    body = {"dataframe_split": {"columns": ["label"], "data": [[3], [7]]}, "params": {"steps": 4, "seed": 1}}
    samples = np.asarray(_serve("pipeline-diffusion", project, body), dtype=np.float32)
    assert samples.shape == (2, 64) and np.isfinite(samples).all() and np.abs(samples).max() <= 1.0 + 1e-5
    assert not np.allclose(samples[0], samples[1])  # different labels (and noise), different digits


def _serve(model: str, project: Path, body: dict) -> list:
    import time
    import urllib.request

    from pipeline.runtime.local_group import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlruns.db",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(project)}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               f"models:/{model}@champion", "--env-manager", "local", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, "mlflow models serve did not come up in 180 s"
                time.sleep(1)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["predictions"]
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def test_killed_training_resumes_when_rerun(tmp_path):
    """SIGKILL the train stage (driver, Ray and workers) after its first checkpoint; the rerun
    resumes, and its final weights are exactly those of an uninterrupted run."""
    import signal
    import time

    project = _tiny_project(tmp_path / "project")
    _sh([sys.executable, "-m", "stages.prepare", "lm"], project)
    _sh([sys.executable, "-m", "stages.shard", "lm"], project)
    args = [sys.executable, "-m", "stages.train", "lm", "tasks.lm.trainer.max_steps=40",
            "tasks.lm.trainer.ckpt_every=4", "tasks.lm.trainer.log_every=4"]
    env = {**os.environ, "PYTHONPATH": str(project)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((project / "runs/ray").glob("*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models/lm").exists()  # nothing half-written for later stages to trust

    out = _sh(args, project)
    resumed = [line for line in out.splitlines() if "resumed from step" in line]
    assert resumed, out[-3000:]
    step = int(resumed[0].split("resumed from step ")[1].split()[0])
    assert 4 <= step < 40 and step % 4 == 0
    assert "[lm] trained 40 steps" in out
    from safetensors.torch import load_file

    resumed_weights = load_file(str(project / "models/lm/model.safetensors"))
    _sh([*args, "cluster.storage_path=runs/uninterrupted"], project)  # the same run, from step 0, in one go
    whole = load_file(str(project / "models/lm/model.safetensors"))
    assert resumed_weights.keys() == whole.keys()
    assert all(np.array_equal(resumed_weights[k].numpy(), whole[k].numpy()) for k in whole), "resume changed weights"


@pytest.fixture(scope="module")
def lm_project(tmp_path_factory) -> Path:
    """A tiny project with the lm data prepared and sharded, shared by the strategy runs."""
    project = _tiny_project(tmp_path_factory.mktemp("strategies") / "project")
    _sh([sys.executable, "-m", "stages.prepare", "lm"], project)
    _sh([sys.executable, "-m", "stages.shard", "lm"], project)
    return project


@pytest.mark.parametrize("overrides", [["strategy.name=deepspeed", "strategy.zero_stage=3",
                                        "strategy.offload_optimizer=true"]],
                         ids=["deepspeed-zero3-offload"])
def test_train_and_evaluate_stages_with_strategy(lm_project, overrides):
    """The train stage with a strategy override, through Ray Train with 2 workers, then evaluate.
    (FSDP2's stages run in `test_dvc_exp_run_fine_tunes_a_hugging_face_llama`.)"""
    out = _sh([sys.executable, "-m", "stages.train", "lm", *overrides], lm_project)
    assert "[lm] trained 6 steps" in out
    name = overrides[0].split("=")[1]
    assert f"strategy: {name}" in out
    out = _sh([sys.executable, "-m", "stages.evaluate", "lm", *overrides], lm_project)
    metrics = json.loads((lm_project / "metrics/lm/eval.json").read_text())
    assert 1 < metrics["val_perplexity"] < 400


def test_sharded_ema_diffusion_chain_under_zero3(lm_project):
    """The default diffusion config (EMA on) under DeepSpeed ZeRO-3: each rank keeps the EMA of
    its own partition, the final checkpoint gathers it, and evaluate and export run on it."""
    zero3 = ["strategy.name=deepspeed", "strategy.zero_stage=3"]
    for stage in ("prepare", "shard"):
        _sh([sys.executable, "-m", f"stages.{stage}", "diffusion"], lm_project)
    out = _sh([sys.executable, "-m", "stages.train", "diffusion", *zero3], lm_project)
    assert "[diffusion] trained 6 steps" in out and "strategy: deepspeed ZeRO-3" in out
    _sh([sys.executable, "-m", "stages.evaluate", "diffusion", *zero3], lm_project)
    metrics = json.loads((lm_project / "metrics/diffusion/eval.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    _sh([sys.executable, "-m", "stages.export", "diffusion", *zero3], lm_project)
    assert (lm_project / "export/diffusion/model.safetensors").is_file()


def test_dvc_exp_run_with_horovod(lm_project):
    """`dvc exp run -S strategy=horovod register@lm`: DVC composes the group, the train stage launches
    Horovod through horovod.ray.RayExecutor, and the rest of the pipeline runs on its model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    out = _sh(["dvc", "exp", "run", "-S", "strategy=horovod", "register@lm"], lm_project, timeout=1500)
    assert "strategy: horovod" in out and "[lm] trained 6 steps" in out
    assert yaml.safe_load((lm_project / "params.yaml").read_text())["strategy"] == {"name": "horovod",
                                                                                     "backend": "gloo"}
    mlflow.set_tracking_uri(f"sqlite:///{lm_project}/mlruns.db")
    mv = MlflowClient().get_model_version_by_alias("pipeline-lm", "challenger")
    assert MlflowClient().get_run(mv.run_id).data.tags["strategy"] == "horovod"
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("overrides", [["parallel.tp=2"], ["parallel.pp=2", "tasks.lm.trainer.grad_accum_steps=2"]],
                         ids=["tensor_parallel", "pipeline_parallel"])
def test_dvc_exp_run_lm_chain_with_model_parallel(lm_project, overrides):
    """`dvc exp run -S parallel.tp=2` / `-S parallel.pp=2` up to `register@lm`: Ray Train runs
    the layout on its 2 workers, and evaluate, ONNX export, the registry and lineage work on
    the consolidated weights unchanged."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    args = [a for o in [*overrides, "tasks.lm.export.quantize_int8=false"] for a in ("-S", o)]
    out = _sh(["dvc", "exp", "run", *args, "register@lm"], lm_project, timeout=1200)
    key = overrides[0].removeprefix("parallel.")
    assert "[lm] trained 6 steps" in out and key in out, out[-3000:]
    assert yaml.safe_load((lm_project / "params.yaml").read_text())["parallel"][key.split("=")[0]] == 2
    metrics = json.loads((lm_project / "metrics/lm/eval.json").read_text())
    assert 1 < metrics["val_perplexity"] < 400
    exported = load_file(str(lm_project / "export/lm/model.safetensors"))
    assert exported.keys() == load_file(str(lm_project / "models/lm/model.safetensors")).keys()
    assert {"embed.weight", "head.weight", "blocks.1.attn.wq.weight"} <= exported.keys()
    # the transformers folder is written from the consolidated weights too, and checked
    hf = json.loads((lm_project / "metrics/lm/export.json").read_text())
    assert hf["hf_max_abs_logit_diff"] <= 1e-4 and hf["hf_greedy_tokens_equal"] == 1.0
    assert (lm_project / "export/lm/hf/config.json").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{lm_project}/mlruns.db")
    try:
        mv = MlflowClient().get_model_version_by_alias("pipeline-lm", "challenger")
        assert MlflowClient().get_run(mv.run_id).data.tags["parallel"] == f"tp={2 if 'tp' in key else 1}," \
                                                                           f"pp={2 if 'pp' in key else 1}"
    finally:
        mlflow.set_tracking_uri(None)


def test_dvc_exp_run_fine_tunes_a_hugging_face_llama(lm_project, tmp_path, text_corpus):
    """`dvc exp run -S tasks.lm.model.init_from=<a Llama folder> -S strategy.name=fsdp register@lm`:
    prepare uses the checkpoint's tokenizer, FSDP2 ranks load their shards of its weights on
    Ray Train's 2 workers and fine-tune, and export writes export/lm/hf, which transformers
    loads with no custom code. The registered version carries that folder, and its lineage
    names the checkpoint."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import make_tiny_llama

    llama = make_tiny_llama(tmp_path / "llama", text_corpus, pad_vocab=3)
    args = ["-S", f"tasks.lm.model.init_from={llama}", "-S", "strategy.name=fsdp",
            "-S", "tasks.lm.export.quantize_int8=false"]
    out = _sh(["dvc", "exp", "run", *args, "register@lm"], lm_project, timeout=1200)
    assert "[lm] trained 6 steps" in out and "strategy: fsdp" in out, out[-3000:]
    assert "transformers folder export/lm/hf (LlamaForCausalLM, float32)" in out, out[-3000:]
    stats = json.loads((lm_project / "metrics/lm/data.json").read_text())
    assert stats["tokenizer_source"] == str(llama) and stats["eos_token"] == "</s>"
    exported = json.loads((lm_project / "metrics/lm/export.json").read_text())
    assert exported["hf_max_abs_logit_diff"] <= 1e-4 and exported["hf_greedy_tokens_equal"] == 1.0
    hf = lm_project / "export/lm/hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    source = AutoModelForCausalLM.from_pretrained(llama)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == source.config.vocab_size
    moved = [k for k, v in source.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert moved, "six fine-tuning steps changed no weight"
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token == "</s>" and (hf / "tokenizer.json").read_bytes() == (llama / "tokenizer.json").read_bytes()

    mlflow.set_tracking_uri(f"sqlite:///{lm_project}/mlruns.db")
    try:
        mv = MlflowClient().get_model_version_by_alias("pipeline-lm", "challenger")
        assert mv.tags["init_from.path"] == str(llama.resolve()) and len(mv.tags["init_from.fingerprint"]) == 64
        assert MlflowClient().get_run(mv.run_id).data.tags["export.hf_architecture"] == "LlamaForCausalLM"
        local = Path(mlflow.artifacts.download_artifacts(f"models:/pipeline-lm/{mv.version}",
                                                         dst_path=str(tmp_path / "registered")))
        registered = next(local.rglob("hf/config.json")).parent
        assert AutoModelForCausalLM.from_pretrained(registered).config.num_hidden_layers == 2
        lineage = json.loads(_sh([sys.executable, "-m", "pipeline", "lineage", "pipeline-lm@challenger", "--json"],
                                 lm_project))
        assert lineage["init_from"]["path"] == str(llama.resolve()) and lineage["hf_export"] == "LlamaForCausalLM"
        assert lineage["data"]["manifest_md5"] and lineage["code"]["git_commit"]
    finally:
        mlflow.set_tracking_uri(None)


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    import time
    import urllib.request

    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        assert server.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert time.time() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(0.5)


def test_tracking_server_down_during_training_loses_nothing(tmp_path):
    """A real `mlflow server` (SQLite store) on 127.0.0.1 goes down while the train stage runs:
    training finishes, the stage stops with one line naming the server, the final checkpoint is
    kept and no model is written; with the server back, the rerun resumes the finished run (no
    retraining) and logs it into the same MLflow run. Then evaluate, export and register run
    against the server, and the registered model loads from it."""
    import signal
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.runtime.local_group import free_port

    project = _tiny_project(tmp_path / "project")
    _sh([sys.executable, "-m", "stages.prepare", "lm"], project)
    _sh([sys.executable, "-m", "stages.shard", "lm"], project)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    args = [sys.executable, "-m", "stages.train", "lm", f"tracking.uri={uri}", "tasks.lm.trainer.max_steps=30",
            "tasks.lm.trainer.ckpt_every=10", "tasks.lm.trainer.log_every=5"]
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not list((project / "runs/ray").glob("*/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None and time.time() < deadline, "training ended before the server went down"
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("error [train lm]")]
    assert error and "training finished, but logging run" in error[0] and uri in error[0], out[-3000:]
    assert not (project / "models/lm").exists()  # nothing for later stages to trust
    run_dirs = [d for d in (project / "runs/ray").iterdir() if (d / "mlflow_run_id").is_file()]
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("checkpoint_*"))  # the checkpoints are kept
    first_run_id = (run_dirs[0] / "mlflow_run_id").read_text().strip()

    server = _mlflow_server(tmp_path, port)
    try:
        out = _sh(args, project)
        assert "[lm] resumed from step 30" in out and "[lm] trained 30 steps" in out
        mlflow.set_tracking_uri(uri)
        info = json.loads((project / "models/lm/run.json").read_text())
        assert info["run_id"] == first_run_id
        history = MlflowClient().get_metric_history(first_run_id, "train/loss")
        assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]
        _registry_through_server(project, uri, tmp_path / "artifacts", first_run_id)
        mlflow.set_tracking_uri(None)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _registry_through_server(project: Path, uri: str, artifacts: Path, run_id: str) -> None:
    """evaluate, export and register (twice) against a real tracking server: the second version
    has the same metric, so it becomes challenger and the champion stays; the champion loads and
    predicts through the server, its files live in the server's artifact store, and lineage reads it."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    for stage in ("evaluate", "export", "register"):
        out = _sh([sys.executable, "-m", f"stages.{stage}", "lm", f"tracking.uri={uri}"], project)
    assert "now champion" in out
    out = _sh([sys.executable, "-m", "stages.register", "lm", f"tracking.uri={uri}"], project)
    assert "registered pipeline-lm v2" in out and "champion stays v1" in out
    client = MlflowClient()
    assert client.get_model_version_by_alias("pipeline-lm", "champion").version in (1, "1")
    assert client.get_model_version_by_alias("pipeline-lm", "challenger").version in (2, "2")
    champion = client.get_model_version_by_alias("pipeline-lm", "champion")
    assert champion.run_id == run_id and "eval.val_loss" in champion.tags
    assert "eval/val_perplexity" in client.get_run(run_id).data.metrics
    model = mlflow.pyfunc.load_model("models:/pipeline-lm@champion")
    completion = model.predict(pd.DataFrame({"prompt": ["The for statement"]}), params={"max_new_tokens": 4})
    assert completion["completion"][0].strip()
    assert list(artifacts.rglob("model.int8.onnx")) and list(artifacts.rglob("MLmodel"))  # proxied to the server
    shown = _sh([sys.executable, "-m", "pipeline", "lineage", "pipeline-lm@champion", "--tracking-uri", uri], project)
    assert run_id in shown and "input      lm-raw:" in shown
