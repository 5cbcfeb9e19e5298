"""Variants of the LM chain through `dvc exp run` or single stages on one shared tiny project:
Horovod, the diffusion chain under ZeRO-3 (optimizer offloaded) with sharded EMA,
tensor and pipeline parallelism, and fine-tuning a Hugging Face Llama under FSDP2."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e_project import prepared_project, run_ok
from tests.namespace_hosts import covered_across_hosts

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lm_project(tmp_path_factory) -> Path:
    """A tiny project with the lm data prepared and sharded, shared by the strategy runs."""
    return prepared_project(tmp_path_factory.mktemp("strategies") / "project")


def test_sharded_ema_diffusion_chain_under_zero3(lm_project):
    """The default diffusion config (EMA on) under DeepSpeed ZeRO-3 with the optimizer offloaded,
    through the train stage on Ray Train's 2 workers: each rank keeps the EMA of its own
    partition, the final checkpoint gathers it, and evaluate and export run on it. (Every
    strategy's losses equal DDP's step by step in tests/test_strategies.py; this is the stages'
    path for DeepSpeed, as the tests below are for Horovod, FSDP2 and tp/pp.)"""
    zero3 = ["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true"]
    for stage in ("prepare", "shard"):
        run_ok([sys.executable, "-m", f"stages.{stage}", "diffusion"], lm_project)
    out = run_ok([sys.executable, "-m", "stages.train", "diffusion", *zero3], lm_project)
    assert "[diffusion] trained 6 steps" in out and "strategy: deepspeed ZeRO-3" in out
    run_ok([sys.executable, "-m", "stages.evaluate", "diffusion", *zero3], lm_project)
    metrics = json.loads((lm_project / "metrics/diffusion/eval.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    run_ok([sys.executable, "-m", "stages.export", "diffusion", *zero3], lm_project)
    assert (lm_project / "export/diffusion/model.safetensors").is_file()


@covered_across_hosts("test_multi_host_fsdp2_zero3_and_horovod_train_on_two_hosts")
def test_dvc_exp_run_with_horovod(lm_project):
    """`dvc exp run -S strategy=horovod register@lm`: DVC composes the group, the train stage launches
    Horovod through horovod.ray.RayExecutor, and the rest of the pipeline runs on its model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    out = run_ok(["dvc", "exp", "run", "-S", "strategy=horovod", "register@lm"], lm_project, timeout=1500)
    assert "strategy: horovod" in out and "[lm] trained 6 steps" in out
    assert yaml.safe_load((lm_project / "params.yaml").read_text())["strategy"] == {"name": "horovod",
                                                                                     "backend": "gloo"}
    mlflow.set_tracking_uri(f"sqlite:///{lm_project}/mlruns.db")
    mv = MlflowClient().get_model_version_by_alias("pipeline-lm", "challenger")
    assert MlflowClient().get_run(mv.run_id).data.tags["strategy"] == "horovod"
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "tasks.lm.trainer.eval_every=2", "tasks.lm.trainer.export_weights=best"],
    ["parallel.pp=2", "tasks.lm.trainer.grad_accum_steps=2"]], ids=["tensor_parallel", "pipeline_parallel"])
def test_dvc_exp_run_lm_chain_with_model_parallel(lm_project, overrides):
    """`dvc exp run -S parallel.tp=2` / `-S parallel.pp=2` up to `register@lm`: Ray Train runs
    the layout on its 2 workers, and evaluate, ONNX export, the registry and lineage work on
    the consolidated weights unchanged. The tp run hands on its best validation's weights
    (`trainer.export_weights=best`: every rank joins the gathers of the kept weights, and Ray
    Train persists the checkpoints that carry them)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    args = [a for o in [*overrides, "tasks.lm.export.quantize_int8=false"] for a in ("-S", o)]
    out = run_ok(["dvc", "exp", "run", *args, "register@lm"], lm_project, timeout=1200)
    key = overrides[0].removeprefix("parallel.")
    assert "[lm] trained 6 steps" in out and key in out, out[-3000:]
    assert yaml.safe_load((lm_project / "params.yaml").read_text())["parallel"][key.split("=")[0]] == 2
    if "tasks.lm.trainer.export_weights=best" in overrides:
        rows = [r for r in csv.DictReader(io.StringIO((lm_project / "metrics/lm/train_history.csv").read_text()))
                if r.get("val_loss")]
        best = min(rows, key=lambda r: float(r["val_loss"]))["step"]  # the first of equals, as the loop keeps
        assert [r["step"] for r in rows] == ["2", "4", "6"] and f"[lm] hands on the weights of step {best} " in out
        summary = json.loads((lm_project / "metrics/lm/train.json").read_text())
        run = json.loads((lm_project / "models/lm/run.json").read_text())
        assert summary.get("weights_step", 6) == run.get("weights_step", 6) == int(best)
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
    out = run_ok(["dvc", "exp", "run", *args, "register@lm"], lm_project, timeout=1200)
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
        lineage = json.loads(run_ok([sys.executable, "-m", "pipeline", "lineage", "pipeline-lm@challenger", "--json"],
                                 lm_project))
        assert lineage["init_from"]["path"] == str(llama.resolve()) and lineage["hf_export"] == "LlamaForCausalLM"
        assert lineage["data"]["manifest_md5"] and lineage["code"]["git_commit"]
    finally:
        mlflow.set_tracking_uri(None)

    # The checkpoint's weights replaced in place (same path, same tokenizer): DVC tracked the folder by
    # its path only and kept the old model; the source stage's record of them is now a train dependency
    from safetensors.torch import load_file, save_file

    tensors = load_file(llama / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, llama / "model.safetensors", metadata={"format": "pt"})
    run_ok(["dvc", "repro", "--single-item", "source@lm"], lm_project)
    status = run_ok(["dvc", "status", "prepare@lm", "train@lm"], lm_project)
    assert "train@lm:" in status and "modified:" in status and "data/lm/init_from.json" in status, status
    assert "prepare@lm" not in status, status  # (the tokenizer is the same: the data is)


