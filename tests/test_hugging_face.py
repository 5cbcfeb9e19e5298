"""Hugging Face import, with real `transformers` models built here (no hub access): `model.init_from`
a Llama checkpoint folder: its config.json becomes the GPT's architecture (mismatches named at
config validation), its weights load by name (each rank only its shard under FSDP2, ZeRO-3 and
tensor parallelism), its tokenizer replaces the one prepare trains, and our logits equal
`transformers`' before any step. (The export back: tests/test_hugging_face_export.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, validate
from tests.conftest import make_tiny_llama, tiny_raw
from tests.hf_llama import llama_cfg, load_weights  # (its fixtures, llama and llama_data: conftest)


# ----------------------------------------------------------------------------- configuration
def test_hugging_face_config_json_sets_the_gpt_architecture(llama, text_corpus):
    model = llama_cfg(llama, text_corpus, "tasks.lm.model.d_model=999").task("lm").model
    hf = json.loads((llama / "config.json").read_text())
    assert (model.d_model, model.n_layers, model.n_heads, model.n_kv_heads) == (64, 2, 4, 2)  # d_model=999 ignored
    assert (model.mlp_width, model.norm_eps, model.rope_theta, model.tie_weights) == (96, 1e-5, 50000.0, False)
    assert model.vocab_size == hf["vocab_size"] == 305
    with pytest.raises(ConfigError, match=r"model.init_from .* and trainer.init_from .* set one"):
        llama_cfg(llama, text_corpus, f"tasks.lm.trainer.init_from={llama}")


@pytest.mark.parametrize(("change", "named"), [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
     r"model_type 'mistral' \(MistralForCausalLM\)"),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type is 'llama3'"),
    ({"head_dim": 32}, "head_dim is 32 differs"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"num_hidden_layers": None}, "has no num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0: expected a positive integer"),
    ({"hidden_size": "64x"}, 'hidden_size is "64x": expected a positive integer'),
    ({"rms_norm_eps": "small"}, 'rms_norm_eps is "small": expected a positive number'),
    ({"rope_scaling": [1, 2]}, r"rope_scaling is \[1, 2\]: expected an object"),
])
def test_hugging_face_architecture_mismatches_are_named_at_validation(tmp_path, llama, text_corpus, change, named):
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"tasks.lm.model.init_from: .*config.json.*{named}"):
        llama_cfg(bad, text_corpus)


def test_hugging_face_config_that_is_not_an_object_is_named(tmp_path, llama, text_corpus):
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"tasks.lm.model.init_from: .*config.json holds a JSON list, not an object"):
        llama_cfg(bad, text_corpus)


def test_hugging_face_missing_folder_or_tokenizer_is_named(tmp_path, llama, text_corpus):
    from pipeline.config.schema import TextDataConfig
    from pipeline.data.build import prepare

    with pytest.raises(ConfigError, match=r"tasks.lm.model.init_from: .*nowhere is not a folder"):
        llama_cfg(tmp_path / "nowhere", text_corpus)
    slow = tmp_path / "slow"
    shutil.copytree(llama, slow)
    (slow / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"init_from: .*slow has no tokenizer.json .*save_pretrained"):
        prepare(TextDataConfig(source=str(text_corpus), vocab_size=300), 0, tmp_path / "p", tokenizer_from=slow)
    assert not (tmp_path / "p").exists()  # nothing half-written


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("tie", [False, True])
def test_hugging_face_llama_logits_equal_ours_before_training(tmp_path, text_corpus, tie):
    """Our GPT built from the checkpoint's config and weights computes transformers' logits (a
    checkpoint sharded into several files with an index reads the same)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from pipeline.models.gpt import GPT

    folder = make_tiny_llama(tmp_path / "llama", text_corpus, tie=tie, n_kv=4 if tie else 1)
    if not tie:  # re-save in 64 KiB files: model-0000k-of-0000n.safetensors + index
        LlamaForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="64KB")
        (folder / "model.safetensors").unlink(missing_ok=True)
        assert (folder / "model.safetensors.index.json").is_file()
    cfg = llama_cfg(folder, text_corpus).task("lm").model
    ours = load_weights(GPT(cfg, cfg.vocab_size, 64), folder)
    if tie:
        assert ours.head.weight is ours.embed.weight
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-5, diff


def _sharded_rank(rank: int, world: int, folder: str, raw: dict) -> dict:
    """DDP, FSDP2, ZeRO-3, tensor and pipeline parallelism each start from the checkpoint."""
    from pipeline.config.loading import apply_overrides
    from pipeline.distributed import LAYOUT_VARIANTS, VARIANTS, StepSettings, build_strategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.training.optim import build_optimizer

    out = {}
    layouts = {**{k: VARIANTS[k] for k in ("ddp", "fsdp", "zero3")}, **{k: LAYOUT_VARIANTS[k] for k in ("tp2", "pp2")}}
    for name, extra in layouts.items():
        cfg = validate(apply_overrides(json.loads(json.dumps(raw)), extra))
        m = cfg.task("lm").model
        with torch.device("meta"):
            model = GPT(m, m.vocab_size, 32)
        device = torch.device("cpu")
        strategy = build_strategy(cfg.strategy, Precision("fp32", device), device, StepSettings(2, 2, 1.0),
                                  cfg.parallel)
        strategy.init_from = Path(folder)
        strategy.setup(model, lambda mm, c=cfg: build_optimizer(mm, c.task("lm").optim))
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                    for p in strategy.model.parameters())
        out[name] = (strategy.consolidated_state_dict(), local)
    return out


def test_hugging_face_sharded_strategies_read_their_shards_of_the_checkpoint(llama, text_corpus):
    """FSDP2, ZeRO-3, tensor and pipeline parallelism read the checkpoint one unit at a time
    into their shards or stages (each rank holds less than the model) and end with exactly its
    weights, as DDP."""
    from transformers import AutoModelForCausalLM

    from pipeline.models.hf import to_hf_state
    from pipeline.runtime.local_group import run_group

    raw = tiny_raw([f"tasks.lm.data.source={text_corpus}", f"tasks.lm.model.init_from={llama}"])
    ranks = run_group(_sharded_rank, 2, str(llama), raw)
    cfg = llama_cfg(llama, text_corpus).task("lm").model
    theirs = AutoModelForCausalLM.from_pretrained(llama).state_dict()
    total = sum(v.numel() for v in theirs.values())
    for name, (state, local) in ranks[0].items():
        hf = to_hf_state(state, cfg, "llama")
        assert hf.keys() == theirs.keys(), name
        for k, v in theirs.items():
            assert torch.equal(hf[k], v), f"{name}: {k}"
        if name != "ddp":
            assert local < total, f"{name} holds {local} of {total} parameters on rank 0"


# ----------------------------------------------------------------------------- data
def test_hugging_face_tokenizer_replaces_the_trained_one(llama_data, llama):
    from tokenizers import Tokenizer

    from pipeline.data.shard_format import load_manifest
    from pipeline.data.shard_store import read_split

    _, stats, shards = llama_data
    assert stats["tokenizer_source"] == str(llama) and stats["eos_token"] == "</s>"
    assert (shards / "tokenizer.json").read_bytes() == (llama / "tokenizer.json").read_bytes()
    assert (shards / "tokenizer_config.json").is_file()
    manifest = load_manifest(shards)
    assert manifest["vocab_size"] == Tokenizer.from_file(str(llama / "tokenizer.json")).get_vocab_size()
    tokens = read_split(shards, "train")["tokens"]
    assert (tokens == 2).any() and (tokens == 1).any()  # documents end with </s>, start with <s> (post-processor)


def test_hugging_face_train_preflight_names_a_stale_tokenizer_or_a_long_context(llama_data, tmp_path, llama):
    from pipeline.data.shard_format import load_manifest
    from pipeline.tasks import task_named

    cfg, _, shards = llama_data
    manifest = load_manifest(shards)
    task = task_named("lm")
    task.model_spec(cfg.task("lm"), manifest)  # the data fits
    with pytest.raises(ValueError, match="shards were tokenized with another tokenizer"):
        task.model_spec(cfg.task("lm"), {**manifest, "tokenizer_sha256": "0" * 64})
    with pytest.raises(ValueError, match=r"data.seq_len \(512\) exceeds .*max_position_embeddings 128"):
        task.model_spec(cfg.task("lm"), {**manifest, "seq_len": 512})
    with pytest.raises(ValueError, match=r"model.vocab_size \(305\) is smaller than the tokenizer's vocabulary"):
        task.model_spec(cfg.task("lm"), {**manifest, "vocab_size": 400})


# ----------------------------------------------------------------------------- import noise
def test_hugging_face_import_leaves_torchao_import_warnings_out_of_the_output(monkeypatch):
    """`transformers` imports torchao whenever a model loads (the export's check does): on a CPU
    torch that logged a "Failed to load .../torchao/_C*.so" line per CUDA kernel library, and
    torch's pytree a deprecation per torchao Enum, into every export's output. Those records
    are dropped; another torchao warning is not, nor (on a CUDA build) a kernel library that
    fails to load."""
    import logging
    import subprocess
    import sys

    from pipeline.quiet import _TorchaoKernelLibraries
    from tests.conftest import ROOT

    pytest.importorskip("torchao")
    code = ("import logging, sys; import pipeline.export.hf_export; from transformers import LlamaForCausalLM; "
            "assert 'torchao' in sys.modules; logging.getLogger('torchao').warning('another torchao warning')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "Failed to load" not in out.stderr and "is an Enum subclass" not in out.stderr, out.stderr[-1500:]
    assert "another torchao warning" in out.stderr

    failed = logging.LogRecord("torchao", logging.WARNING, __file__, 1,
                               "Failed to load /x/site-packages/torchao/_C_mxfp8.abi3.so: cannot open", None, None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert _TorchaoKernelLibraries().filter(failed)  # a CUDA build: a real problem, still reported
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not _TorchaoKernelLibraries().filter(failed)
