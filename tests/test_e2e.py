"""The whole pipeline for real: `dvc repro` in a fresh git copy of this project, with tiny
settings, through Ray Train with 2 workers, into an MLflow SQLite store; serving both champions,
reproducing the LM from its commit, a second `dvc repro` that does nothing, and a queued grid of
`dvc exp run -S` variants."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.build import file_md5
from tests.e2e_project import run_ok, tiny_project

pytestmark = pytest.mark.e2e


def test_dvc_repro_end_to_end(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    project = tiny_project(tmp_path / "project")
    out = run_ok(["dvc", "repro"], project)
    for task in ("lm", "diffusion"):
        assert f"[{task}] trained 6 steps" in out
    assert "now champion" in out

    lm = json.loads((project / "metrics/lm/eval.json").read_text())
    diff = json.loads((project / "metrics/diffusion/eval.json").read_text())
    assert 1 < lm["val_perplexity"] < 400 and diff["test_denoise_loss"] > 0
    from pipeline.config import load_config
    from pipeline.config.schema import eval_metrics

    params = load_config(project / "params.yaml")  # what registry.metric may name is what evaluate wrote
    for task, written in (("lm", lm), ("diffusion", diff)):
        tcfg = params.task(task)
        assert sorted(written) == sorted(eval_metrics(tcfg.data.kind, tcfg.eval.samples_per_class)), task
    png = project / "reports/diffusion/samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task in ("lm", "diffusion"):  # the train stage's loss curves
        assert (project / f"reports/{task}/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "export/lm/model.onnx").stat().st_size > 0
    assert (project / "export/lm/model.safetensors").is_file()
    # run.json names the workspace's store relative to it (a copied workspace uses its own); the export's
    # record covers every file it holds; the served LM stops at the manifest's end-of-document token
    assert json.loads((project / "models/lm/run.json").read_text())["tracking_uri"] == "sqlite:///mlruns.db"
    for task in ("lm", "diffusion"):
        held = {p.relative_to(project / f"export/{task}").as_posix() for p in (project / f"export/{task}").rglob("*")
                if p.is_file() and p.name != "checksums.json"}
        assert set(json.loads((project / f"export/{task}/checksums.json").read_text())["files"]) == held
        # and of what the logged model ships beside it (checked by the register stage): the pickle, the code
        shipped = json.loads((project / f"export/{task}/model_info.json").read_text())["shipped_files"]
        assert {"python_model.pkl", "code/pipeline/models/gpt.py"} <= shipped.keys()
    assert json.loads((project / "export/lm/generation.json").read_text()) == {"eos_token": "<|endoftext|>"}

    head = run_ok(["git", "rev-parse", "HEAD"], project).strip()
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
        assert "eval/" + ("val_loss" if task == "lm" else "val_denoise_loss") in run.data.metrics
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
        # the version carries its own lineage only (commit, config digest, this task's data hashes; the
        # run keeps the rest) and a description: what was trained on what, metrics, how to load it
        eval_metrics = json.loads((project / f"metrics/{task}/eval.json").read_text())
        assert mv.tags["git.commit"] == head and mv.tags["git.dirty"] == "false" and mv.tags["config.digest"]
        assert mv.tags[f"dvc.shard:{task}.data/{task}/shards"] == shard_md5
        assert mv.tags["data.raw_sha256"] == data_stats["raw_sha256"]
        assert all(f":{task}." in k for k in mv.tags if k.startswith("dvc.")) and "env.torch" not in mv.tags
        assert all(f"| {k} |" in mv.description or f"| **{k}** (registry metric" in mv.description
                   for k in eval_metrics)
        assert f'mlflow.pyfunc.load_model("models:/{name}@champion")' in mv.description
        assert mv.description.startswith(f"{task} · {'gpt_tiny' if task == 'lm' else 'dit_tiny'} (")
        assert run.info.run_name.startswith(f"{task}-{'tiny' if task == 'lm' else 'dit_tiny'}-ddp-20")
        assert [f.path for f in client.list_artifacts(run.info.run_id, "training")] == ["training/loss.png"]
    exported = json.loads((project / "metrics/lm/export.json").read_text())
    assert exported["int8_size_ratio"] < 0.7 and abs(exported["int8_val_perplexity_change"]) < 0.1
    assert exported["hf_max_abs_logit_diff"] <= 1e-4 and exported["hf_greedy_tokens_equal"] == 1.0
    assert "export/lm/hf (LlamaForCausalLM, float32)" in out
    lm_run = client.get_model_version_by_alias("pipeline-lm", "champion").run_id
    assert [f.path for f in client.list_artifacts(lm_run, "onnx_int8")] == ["onnx_int8/model.int8.onnx"]
    _registered_onnx_runs(client, project)
    mlflow.set_tracking_uri(None)
    shown = run_ok([sys.executable, "-m", "pipeline", "lineage", "pipeline-lm@champion",
                 "--tracking-uri", f"sqlite:///{project}/mlruns.db"], project)
    assert "input      lm-raw:" in shown and "matches this workspace" in shown

    _serve_and_predict(project)

    # Re-run the champion LM's commit in a fresh worktree: same seed, config and data, same metrics.
    shown = run_ok([sys.executable, "-m", "pipeline", "reproduce", "pipeline-lm@champion", "--tolerance", "1e-6",
                 "--workdir", str(tmp_path / "again"), "--tracking-uri", f"sqlite:///{project}/mlruns.db"], project)
    assert "reproduced within tolerance" in shown and "val_perplexity" in shown, shown[-3000:]
    refused = subprocess.run([sys.executable, "-m", "pipeline", "reproduce", "pipeline-lm@champion", "--workdir",
                              str(tmp_path / "again"), "--tracking-uri", f"sqlite:///{project}/mlruns.db"],
                             cwd=project, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(project)})
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --workdir {tmp_path / 'again'}: exists and is not an empty folder (the commit is checked out "
        "there)"], refused.stderr[-3000:]

    again = run_ok(["dvc", "repro"], project)  # only the source stages run (always): nothing else changed
    assert sorted(re.findall(r"Running stage '([^']+)'", again)) == ["source@diffusion", "source@lm"], again[-3000:]
    forced = run_ok(["dvc", "repro", "--force", "--single-item", "register@lm"], project)  # idempotent
    assert "[lm] already registered as pipeline-lm v1 " in forced and "; champion\n" in forced, forced[-2000:]

    shown = run_ok(["dvc", "metrics", "show"], project)
    assert "val_perplexity" in shown and "test_denoise_loss" in shown

    # The LM's sampler keys (diffusion-only, unused by the LM) key no LM export: changing one reran
    # export@lm and registered the same weights again. (Its evaluate reruns: the eval section keys it.)
    params = project / "params.yaml"
    kept = params.read_text()
    edited = yaml.safe_load(kept)
    edited["tasks"]["lm"]["eval"]["sample_steps"] += 1
    params.write_text(yaml.safe_dump(edited))
    status = run_ok(["dvc", "status"], project)
    params.write_text(kept)
    assert "evaluate@lm:" in status and "export@lm:" not in status and "export@diffusion:" not in status, status

    # A grid through DVC's queue: each variant runs in a copy under .dvc/tmp/exps/ (unchanged
    # stages restored from the run cache) and still logs into the workspace's tracking store.
    # (`dvc exp run -S` on its own runs in tests/test_e2e_variants.py.)
    run_ok(["dvc", "exp", "run", "--queue", "-S", "tasks.lm.eval.max_batches=3,4"], project)
    run_ok(["dvc", "queue", "start", "-j", "2"], project)
    import time

    deadline = time.time() + 600
    while any(w in (status := run_ok(["dvc", "queue", "status"], project)) for w in ("Queued", "Running")):
        assert time.time() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status + run_ok(["dvc", "queue", "logs", status.split()[5]], project)[-3000:]
    shown = run_ok(["dvc", "exp", "show", "--no-pager", "--md"], project)
    assert "max_batches" in shown
    # only what the changed key feeds ran again: evaluate (and after it export, register), not train
    for name in [line.split()[0] for line in status.splitlines()[1:] if "Success" in line]:
        log = run_ok(["dvc", "queue", "logs", name], project)
        assert "Running stage 'evaluate@lm'" in log and "Running stage 'train@lm'" not in log, log[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    versions = MlflowClient().search_model_versions("name = 'pipeline-lm'")
    mlflow.set_tracking_uri(None)
    assert len(versions) == 3  # dvc repro and the two queued variants

    # After a commit, a setting that never changes the weights: train reruns (a param changed), resumes
    # the finished run and trains nothing, and writes the same model folder, so nothing after it runs
    # again (run.json named the new commit: evaluate, export and register reran, a fourth version)
    run_ok(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "later"],
           project)
    later = run_ok(["dvc", "exp", "run", "-S", "tasks.lm.trainer.log_every=3", "register@lm"], project)
    assert "Running stage 'train@lm'" in later and "[lm] trained 6 steps" in later, later[-3000:]
    assert not re.findall(r"Running stage '(evaluate|export|register)@lm'", later), later[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    assert len(MlflowClient().search_model_versions("name = 'pipeline-lm'")) == 3
    mlflow.set_tracking_uri(None)


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
    # the same champion from the command line, greedy as the server was: the same completion
    out = run_ok([sys.executable, "-m", "pipeline", "generate", "The for statement", "--model",
                  "models:/pipeline-lm@champion", "--max-new-tokens", "8"], project)
    assert f"The for statement{predictions[0]['completion']}\n" in out, out[-500:]

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


