"""Hugging Face export, checked with real `transformers`: `export/<task>/hf/` loads with
`AutoModelForCausalLM` and `AutoTokenizer` and no custom code (Llama or GPT-2, sharded safetensors
above a size), checked on logits and greedy tokens; an unchanged checkpoint round-trips to a
byte-identical folder (a sharded one to the same tensors and config, regrouped). The exported
tokenizer's eos is the one the shards were packed with and config.json's; the greedy check stays
within a short context; a 16-bit folder is checked without a second copy of our model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.config import validate
from tests.hf_llama import llama_cfg, load_weights  # (its fixtures, llama and llama_data: conftest)


# ----------------------------------------------------------------------------- export
def test_hugging_face_export_round_trips_an_unchanged_checkpoint(llama_data, llama, tmp_path):
    """No step taken: the export writes back the very folder the model came from, byte for byte
    (config.json, generation_config.json, safetensors, tokenizer files)."""
    from pipeline.data.shard_format import load_manifest
    from pipeline.export.hf_export import export_hf
    from pipeline.tasks import task_named

    cfg, _, shards = llama_data
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(shards))
    model = load_weights(task.build(spec), llama)
    out = export_hf(model, spec, shards, tmp_path / "hf", cfg.task("lm").export)
    assert out["hf_max_abs_logit_diff"] == 0.0 and out["hf_greedy_tokens_equal"] == 1.0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(p.name for p in llama.iterdir())
    for f in llama.iterdir():
        assert (tmp_path / "hf" / f.name).read_bytes() == f.read_bytes(), f.name


CASES = {  # GPT configs -> the stock architecture that must compute them exactly
    "llama": (["tasks.lm.model.n_kv_heads=2"], "LlamaForCausalLM", None),
    "llama_tied_sharded_files": (["model@tasks.lm.model=gpt_small", "tasks.lm.model.tie_weights=true",
                                  "tasks.lm.export.hf_shard_mb=1"], "LlamaForCausalLM", None),
    "gpt2": (["tasks.lm.model.pos_emb=learned", "tasks.lm.model.norm=layernorm", "tasks.lm.model.mlp=gelu",
              "tasks.lm.model.tie_weights=false"], "GPT2LMHeadModel", None),
    "gpt2_tied": (["tasks.lm.model.pos_emb=learned", "tasks.lm.model.norm=layernorm", "tasks.lm.model.mlp=gelu",
                   "tasks.lm.model.tie_weights=true", "tasks.lm.export.hf_dtype=bfloat16"], "GPT2LMHeadModel", None),
    "unmatched": (["tasks.lm.model.norm=layernorm"], None, "rope positions + layernorm + swiglu: no stock"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hugging_face_export_of_a_trained_gpt_loads_in_transformers(built_data, tmp_path, case):
    """A GPT trained here (random weights stand in) exported as a transformers folder: loads
    with AutoModelForCausalLM / AutoTokenizer and no custom code, logits within 1e-4, same
    greedy tokens. A config no stock architecture computes is reported in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.shard_format import load_manifest
    from pipeline.export.hf_export import export_hf
    from pipeline.tasks import task_named
    from tests.test_sharded import _raw

    overrides, arch, skipped = CASES[case]
    _, shards = built_data
    cfg = validate(_raw([o for o in overrides if "@" in o] + [o for o in overrides if "@" not in o]))
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(shards["lm"]))
    torch.manual_seed(1)
    model = task.build(spec).eval()
    out = export_hf(model, spec, shards["lm"], tmp_path / "hf", cfg.task("lm").export)
    if arch is None:
        assert out["hf_architecture"] is None and skipped in out["hf_skipped"]
        assert not (tmp_path / "hf").exists()
        return
    assert out["hf_architecture"] == arch and out["hf_max_abs_logit_diff"] <= 1e-4, out
    assert out["hf_greedy_tokens_equal"] == 1.0 and out["hf_tokenizer_equal"] == 1.0
    if "sharded" in case:
        assert "model.safetensors.index.json" in out["hf_files"] and len(out["hf_files"]) > 2
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(theirs).__name__ == arch
    assert theirs.config.dtype == (torch.bfloat16 if "bfloat16" in str(overrides) else torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("The for statement", return_tensors="pt").input_ids
    text = tok.decode(theirs.generate(ids, max_new_tokens=5, do_sample=False)[0])
    assert text.startswith("The for statement")
    assert tok.eos_token == "<|endoftext|>" and theirs.config.eos_token_id == tok.eos_token_id


def _folder_with_config(built_data, tmp_path, **changed):
    """The tiny lm model written as a transformers folder whose config.json then gets `changed`:
    (model, config before the change, the check's rows)."""
    from pipeline.data.shard_format import load_manifest
    from pipeline.data.shard_store import read_split
    from pipeline.export.hf_export import write_hf_folder
    from pipeline.tasks import task_named

    cfg, shards = built_data
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(shards["lm"]))
    model = task.build(spec).eval()
    write_hf_folder(model, spec, shards["lm"], tmp_path / "hf", cfg.task("lm").export)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    new = {k: v(config) if callable(v) else v for k, v in changed.items()}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **new}))
    return model, {**config, **new}, read_split(shards["lm"], "val", max_rows=4)["tokens"]


def test_hugging_face_check_fails_on_a_folder_that_computes_otherwise(built_data, tmp_path):
    """The check can fail: a folder whose config.json no longer matches the weights' model
    (another norm epsilon) is caught by the logits bound."""
    from pipeline.export.hf_export import check_hf_folder

    cfg, shards = built_data
    model, _, rows = _folder_with_config(built_data, tmp_path, rms_norm_eps=0.5)
    figures = check_hf_folder(tmp_path / "hf", model, rows, shards["lm"] / "tokenizer.json", "float32")
    assert figures["hf_max_abs_logit_diff"] > cfg.task("lm").export.hf_max_abs_diff


def test_hugging_face_export_of_a_sharded_checkpoint_keeps_its_tensors_and_config(llama_data, llama, text_corpus,
                                                                                  tmp_path):
    """From a sharded source (several files + index), no step taken: the same tensors,
    config.json and tokenizer come back, the weights regrouped by export.hf_shard_mb (here into
    one file), as the README says; only a single-file source comes back byte for byte."""
    from transformers import LlamaForCausalLM

    from pipeline.data.shard_format import load_manifest
    from pipeline.export.hf_export import export_hf
    from pipeline.models.hf import HFCheckpoint
    from pipeline.tasks import task_named

    sharded = tmp_path / "sharded"
    shutil.copytree(llama, sharded)
    LlamaForCausalLM.from_pretrained(sharded).save_pretrained(sharded, max_shard_size="64KB")
    (sharded / "model.safetensors").unlink()
    cfg = llama_cfg(sharded, text_corpus)
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(llama_data[2]))
    out = export_hf(load_weights(task.build(spec), sharded), spec, llama_data[2], tmp_path / "hf",
                    cfg.task("lm").export)
    assert out["hf_max_abs_logit_diff"] == 0.0 and out["hf_files"] == ["model.safetensors"]
    theirs, ours = dict(HFCheckpoint(sharded).tensors()), dict(HFCheckpoint(tmp_path / "hf").tensors())
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (sharded / name).read_bytes(), name


def _prepared_and_exported(source, text_corpus, tmp_path) -> dict:
    """Prepare and shard the corpus with `source`'s tokenizer (the manifest's eos must be its
    `</s>`), then export the model loaded from `source`, untrained, to tmp_path/hf."""
    from pipeline.data.build import prepare, shard
    from pipeline.data.shard_format import load_manifest
    from pipeline.export.hf_export import export_hf
    from pipeline.tasks import task_named

    cfg = llama_cfg(source, text_corpus)
    prepare(cfg.task("lm").data, cfg.seed, tmp_path / "prepared", tokenizer_from=source)
    shard(cfg.task("lm").data, tmp_path / "prepared", tmp_path / "shards")
    assert load_manifest(tmp_path / "shards")["eos_token"] == "</s>"
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(tmp_path / "shards"))
    return export_hf(load_weights(task.build(spec), source), spec, tmp_path / "shards", tmp_path / "hf",
                     cfg.task("lm").export)


def test_hugging_face_export_of_a_checkpoint_without_tokenizer_config_keeps_its_eos(tmp_path, llama, text_corpus):
    """A checkpoint whose tokenizer has no tokenizer_config.json (prepare took its eos from
    config.json) is exported with its own eos and bos, not wrapped as our BPE with a new
    `<|endoftext|>` beyond its vocabulary: tokenizer, config.json and the data agree on id 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(llama, bare)
    (bare / "tokenizer_config.json").unlink()
    out = _prepared_and_exported(bare, text_corpus, tmp_path)
    assert out["hf_tokenizer_equal"] == 1.0
    tok, hf = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.bos_token_id) == ("</s>", 2, "<s>", 1)
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == 2 and len(tok) <= hf.config.vocab_size
    with torch.no_grad():  # text ending in the tokenizer's own eos runs (a token beyond the embedding would not)
        assert hf(tok("The for statement" + tok.eos_token, return_tensors="pt").input_ids).logits.isfinite().all()


def test_hugging_face_export_keeps_a_source_eos_beside_the_tokenizers(tmp_path, llama, text_corpus):
    """A chat checkpoint's tokenizer may end documents with another token than config.json's
    eos_token_id (Llama-3-Instruct's `<|eot_id|>` beside `<|end_of_text|>`): prepare packs with
    the tokenizer's, and the export lists both as eos (transformers stops at either) instead of
    refusing the folder after training. generation_config.json lists both too: generate() and vLLM
    read their stop tokens there, so a copy of the source's would never stop at the separator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = tmp_path / "chat"
    shutil.copytree(llama, chat)
    for name in ("config.json", "generation_config.json"):  # eos 1: not the tokenizer's </s> (2)
        config = json.loads((chat / name).read_text())
        (chat / name).write_text(json.dumps({**config, "eos_token_id": 1}))
    _prepared_and_exported(chat, text_corpus, tmp_path)
    tok, hf = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert tok.eos_token_id == 2 and hf.config.eos_token_id == [1, 2]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    assert hf.generation_config.eos_token_id == [1, 2]


def test_hugging_face_check_refuses_a_tokenizer_whose_eos_is_not_config_eos(built_data, tmp_path):
    from pipeline.export.hf_export import check_hf_folder

    shards = built_data[1]
    # (a token of the vocabulary, not the separator)
    model, config, rows = _folder_with_config(built_data, tmp_path, eos_token_id=lambda c: c["eos_token_id"] + 7)
    other = config["eos_token_id"]
    with pytest.raises(ValueError, match=rf"^export: .*hf: the tokenizer's eos_token '<\|endoftext\|>' \(id \d+\) is "
                                         rf"not config.json's eos_token_id {other}$"):
        check_hf_folder(tmp_path / "hf", model, rows, shards["lm"] / "tokenizer.json", "float32")


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_hugging_face_greedy_check_stays_within_a_short_context(built_data, tmp_path, case):
    """data.seq_len 16 (under the check's 8 + 20 tokens): GPT-2's positions end at 16 and our
    GPT crops its context there, so the check generates only as far as the context reaches."""
    from pipeline.data.shard_format import load_manifest
    from pipeline.data.shard_store import read_split
    from pipeline.export.hf_export import check_hf_folder, write_hf_folder
    from pipeline.tasks import task_named
    from tests.test_sharded import _raw

    overrides, _, _ = CASES[case]
    cfg = validate(_raw(overrides))
    task = task_named("lm")
    spec = {**task.model_spec(cfg.task("lm"), load_manifest(built_data[1]["lm"])), "max_seq_len": 16}
    torch.manual_seed(1)
    model = task.build(spec).eval()
    write_hf_folder(model, spec, built_data[1]["lm"], tmp_path / "hf", cfg.task("lm").export)
    rows = read_split(built_data[1]["lm"], "val", max_rows=4)["tokens"][:, :17]
    figures = check_hf_folder(tmp_path / "hf", model, rows, built_data[1]["lm"] / "tokenizer.json", "float32")
    assert figures["hf_max_abs_logit_diff"] <= 1e-4 and figures["hf_greedy_tokens_equal"] == 1.0


def test_hugging_face_16_bit_check_compares_the_folder_weights_without_rounding_ours(built_data, tmp_path):
    """A bfloat16 folder is checked against our model holding the same rounded weights without a
    second copy of our model: ours runs on transformers' tensors, after each was checked to be
    ours rounded (a weight that is not is named), and is left as it was, unrounded."""
    from safetensors.torch import load_file, save_file

    from pipeline.data.shard_format import load_manifest
    from pipeline.data.shard_store import read_split
    from pipeline.export.hf_export import check_hf_folder, write_hf_folder
    from pipeline.tasks import task_named
    from tests.test_sharded import _raw

    _, shards = built_data
    cfg = validate(_raw(["tasks.lm.export.hf_dtype=bfloat16"]))
    task = task_named("lm")
    spec = task.model_spec(cfg.task("lm"), load_manifest(shards["lm"]))
    torch.manual_seed(1)
    model = task.build(spec).eval()
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.named_parameters()}
    assert write_hf_folder(model, spec, shards["lm"], tmp_path / "hf", cfg.task("lm").export)["hf_dtype"] == "bfloat16"
    rows = read_split(shards["lm"], "val", max_rows=4)["tokens"]
    figures = check_hf_folder(tmp_path / "hf", model, rows, shards["lm"] / "tokenizer.json", "bfloat16")
    assert figures["hf_max_abs_logit_diff"] <= 1e-4 and figures["hf_greedy_tokens_equal"] == 1.0
    for k, p in model.named_parameters():  # the same storage, the same unrounded values
        assert p.data_ptr() == before[k][1] and torch.equal(p, before[k][0]), k
    assert not torch.equal(model.blocks[0].mlp.w2.weight, model.blocks[0].mlp.w2.weight.bfloat16().float())

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^export: .*hf: the weight written for our 'blocks.0.mlp.w2.weight' is not "
                                         r"ours rounded to bfloat16$"):
        check_hf_folder(tmp_path / "hf", model, rows, shards["lm"] / "tokenizer.json", "bfloat16")
    assert all(torch.equal(p, before[k][0]) for k, p in model.named_parameters())
