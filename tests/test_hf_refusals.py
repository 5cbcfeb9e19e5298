"""Hugging Face checkpoints the GPT cannot fine-tune exactly are refused in one line naming the
file and the key (or tensor) that decides it, with real `transformers` folders built here:

- attention that does not see the whole context (`sliding_window`, `attention_chunk_size`) and
  quantized checkpoints (`quantization_config`) at config validation;
- float8 or integer weights by the driver's check and by the reader itself (a folder that does
  not say it is quantized);
- a config.json `vocab_size` smaller than its own tokenizer, a transformers-4 `rope_scaling`
  and a `.bin`-only folder, each named as the file has it;
- and the exported config.json never carries those keys set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, validate
from tests.conftest import make_tiny_llama, tiny_raw

KEY = "tasks.lm.model.init_from"


@pytest.fixture(scope="module")
def llama(tmp_path_factory, text_corpus) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("hf_refusals") / "llama", text_corpus)


def _copy(llama: Path, tmp_path: Path, **change) -> Path:
    """A copy of the checkpoint with config.json keys changed (None: removed)."""
    folder = tmp_path / "llama"
    shutil.copytree(llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def _validate(folder: Path, text_corpus: Path):
    return validate(tiny_raw([f"tasks.lm.data.source={text_corpus}", f"{KEY}={folder}"]))


def _spec(folder: Path, text_corpus: Path) -> dict:
    model = _validate(folder, text_corpus).task("lm").model
    return {"task": "lm", "model": model.model_dump(mode="json"), "vocab_size": model.vocab_size, "max_seq_len": 32}


# ----------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("key", ["sliding_window", "attention_chunk_size"])
def test_llama_with_windowed_or_chunked_attention_is_refused_naming_the_key(tmp_path, llama, text_corpus, key):
    """transformers 5 applies either in attention (greedy generation then differs from the GPT's,
    which attends to the whole context): refused at validation, not after training."""
    folder = _copy(llama, tmp_path, **{key: 4})
    with pytest.raises(ConfigError, match=rf"^{KEY}: .*llama/config.json: {key} is 4 \(the GPT attends to the "
                                          r"whole context\)$"):
        _validate(folder, text_corpus)


def test_llama_with_null_sliding_window_is_accepted(tmp_path, llama, text_corpus):
    """Null is how many Llama configs spell "no window": nothing to refuse."""
    folder = tmp_path / "llama"
    shutil.copytree(llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": None, "attention_chunk_size": None}))
    assert _validate(folder, text_corpus).task("lm").model.n_layers == 2


def test_quantized_llama_config_is_refused_at_validation(tmp_path, llama, text_corpus):
    folder = _copy(llama, tmp_path, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]})
    with pytest.raises(ConfigError, match=r"config.json: quantization_config is set \(quant_method 'fp8'; quantized "
                                          r"checkpoints cannot be fine-tuned: dequantize first\)$"):
        _validate(folder, text_corpus)


def test_config_vocab_size_smaller_than_its_tokenizer_is_named_as_the_config_key(tmp_path, llama, text_corpus):
    """Not as `model.vocab_size`, a key the user never set: the checkpoint's config.json is wrong."""
    folder = _copy(llama, tmp_path, vocab_size=250)
    with pytest.raises(ConfigError, match=r"llama/config.json: vocab_size is 250, smaller than the vocabulary of its "
                                          r"tokenizer.json \(300 tokens\)"):
        _validate(folder, text_corpus)


@pytest.mark.parametrize(("scaling", "named"), [
    ({"type": "linear", "factor": 2.0}, "rope_scaling.type is 'linear'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type is 'dynamic'"),
])
def test_transformers_4_rope_scaling_is_named_as_the_key_the_file_has(tmp_path, llama, text_corpus, scaling, named):
    """A transformers-4 config has `rope_theta` + `rope_scaling` and no `rope_parameters`."""
    folder = _copy(llama, tmp_path, rope_parameters=None, rope_theta=50000.0, rope_scaling=scaling)
    with pytest.raises(ConfigError, match=rf"config.json: {named} \(only unscaled RoPE is implemented\)$"):
        _validate(folder, text_corpus)


def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(tmp_path, llama, text_corpus):
    """A file holding both layouts (a v4 `rope_scaling` beside a v5 default `rope_parameters`):
    transformers uses the scaling and the top-level base; the GPT took the default type and
    `rope_parameters`' base (50000), so it trained unscaled at another base (max logit difference
    0.005 on a random 2-layer model). Now it is refused as scaled; a default-type scaling gives
    transformers' base."""
    from transformers import AutoConfig

    params = {"rope_theta": 50000.0, "rope_type": "default"}
    folder = _copy(llama, tmp_path, rope_parameters=params, rope_theta=None,
                   rope_scaling={"rope_type": "linear", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"config.json: rope_scaling.rope_type is 'linear' \(only unscaled"):
        _validate(folder, text_corpus)
    shutil.rmtree(folder)
    folder = _copy(llama, tmp_path, rope_parameters=params, rope_theta=None, rope_scaling={"rope_type": "default"})
    theirs = AutoConfig.from_pretrained(folder).rope_parameters["rope_theta"]
    assert _validate(folder, text_corpus).task("lm").model.rope_theta == theirs == 10000.0


def test_a_tied_config_over_a_checkpoint_with_its_own_head_is_refused(tmp_path, llama, text_corpus):
    """`tie_word_embeddings: true` while model.safetensors also holds an `lm_head.weight` of other
    values: transformers unties them and computes with the stored head; the GPT read the embedding
    for its head (max logit difference 1.5), silently. The driver check refuses it, naming both; a
    stored head equal to the embedding (a torch .bin converted as it was) is fine."""
    from safetensors.torch import load_file, save_file

    from pipeline.training.init_weights import check_init_weights

    folder = _copy(llama, tmp_path, tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" in tensors  # (the fixture's checkpoint is untied: its head is its own)
    spec = _spec(folder, text_corpus)
    with pytest.raises(ValueError, match=rf"^{KEY}: .*llama/config.json has tie_word_embeddings true, but .*"
                                         r"llama/model.safetensors holds an 'lm_head.weight' that differs from "
                                         r"'model.embed_tokens.weight' .*set tie_word_embeddings to false"):
        check_init_weights(folder, KEY, spec)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    check_init_weights(folder, KEY, spec)


# ----------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_quantized_weights_are_refused_by_the_driver_check_and_the_reader(tmp_path, llama, text_corpus, dtype):
    """A folder whose config does not say it is quantized, but whose q_proj weights are float8
    (or int8): cast to fp32 they would load as garbage (their scales ignored)."""
    from safetensors.torch import load_file, save_file

    from pipeline.distributed.sharded_init import parameter_names
    from pipeline.models.gpt import GPT
    from pipeline.models.hf import HFCheckpoint
    from pipeline.training.init_weights import check_init_weights

    folder = _copy(llama, tmp_path)
    spec = _spec(folder, text_corpus)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = tensors[name].clamp(-1, 1).to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    stored = {torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8"}[dtype]
    refused = rf": .*llama/model.safetensors: '{name}' \(the model's 'blocks.1.attn.wq.weight'\) is stored as " \
              rf"{stored}, not as a float: quantized checkpoints cannot be fine-tuned: dequantize first$"
    with pytest.raises(ValueError, match=f"^{KEY}{refused}"):
        check_init_weights(folder, KEY, spec)
    cfg = _validate(folder, text_corpus).task("lm").model
    model = GPT(cfg, cfg.vocab_size, 32)
    names = parameter_names(model)
    with pytest.raises(ValueError, match=f"^model.init_from{refused}"), torch.no_grad():
        HFCheckpoint(folder).copy_into({names[id(p)]: p for p in model.parameters()})


def test_bin_only_folder_gets_the_conversion_hint_from_the_driver_check(tmp_path, llama, text_corpus):
    """The driver's check runs first: it gives the reader's hint (convert once with
    save_pretrained), not "model.safetensors is missing"."""
    from transformers import LlamaForCausalLM

    from pipeline.training.init_weights import check_init_weights

    folder = _copy(llama, tmp_path)
    spec = _spec(folder, text_corpus)
    torch.save(LlamaForCausalLM.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{KEY}: .*llama has neither model.safetensors nor "
                                                r"model.safetensors.index.json \(it holds pytorch_model.bin\): PyTorch "
                                                r".bin checkpoints are not read; load and save_pretrained them once"):
        check_init_weights(folder, KEY, spec)


# ----------------------------------------------------------------------------- the export
def test_llama_weights_under_trainer_init_from_need_the_checkpoints_architecture(tmp_path, llama, text_corpus):
    """`trainer.init_from` gives a Llama folder's weights to the model the config describes; the
    tensors' names and shapes were all the driver checked, so a checkpoint with another RoPE base or
    norm epsilon fine-tuned as another network from the first step. Each such field must now agree
    with its config.json (one line naming it and both values); the config `model.init_from` makes
    (the checkpoint's own architecture) passes, and so does a config set to match by hand."""
    from pipeline.training.init_weights import check_init_weights

    config = json.loads((llama / "config.json").read_text())
    folder = _copy(llama, tmp_path, rope_theta=None, rms_norm_eps=1e-5,  # (transformers 5 keeps theta in here:)
                   rope_parameters={**(config.get("rope_parameters") or {}), "rope_theta": 500000.0})
    spec = _spec(folder, text_corpus)  # model.init_from: the architecture read from config.json
    assert (spec["model"]["rope_theta"], spec["model"]["norm_eps"]) == (500000.0, 1e-5)
    check_init_weights(folder, "tasks.lm.trainer.init_from", spec)
    for field, ours, message in [("rope_theta", 10000.0, r"rope_theta is 500000\.0, the model's is 10000\.0"),
                                 ("norm_eps", None, r"norm_eps is 1e-05, the model's is 1e-06"),
                                 ("norm_eps", 1e-6, r"norm_eps is 1e-05, the model's is 1e-06")]:
        other = {**spec, "model": {**spec["model"], field: ours}}
        with pytest.raises(ValueError, match=rf"^tasks\.lm\.trainer\.init_from: {folder}/config\.json: {message}: "
                                             r"its weights would compute another function\. Point model\.init_from"):
            check_init_weights(folder, "tasks.lm.trainer.init_from", other)
    by_hand = {**spec, "model": {**spec["model"], "init_from": None}}  # the same fields, set in the config
    check_init_weights(folder, "tasks.lm.trainer.init_from", by_hand)


def test_exported_config_never_carries_quantization_or_a_window(llama, text_corpus):
    """A source config's quantization_config and a set window are not written back (the exported
    weights are plain floats, and the GPT attended to the whole context); a null window is kept,
    so an unchanged checkpoint still round-trips byte for byte."""
    from pipeline.models.hf import hf_config

    model = _validate(llama, text_corpus).task("lm").model
    source = {**json.loads((llama / "config.json").read_text()), "sliding_window": 4096, "attention_chunk_size": None,
              "quantization_config": {"quant_method": "fp8"}}
    fields = hf_config(model, "llama", 305, 32, {"eos_token_id": 2}, "float32", source)
    assert "quantization_config" not in fields and "sliding_window" not in fields
    assert "attention_chunk_size" in fields and fields["attention_chunk_size"] is None


# ----------------------------------------------------------------------------- which files are read
@pytest.mark.parametrize("sharded_first", [True, False])
def test_a_folder_holding_both_layouts_is_read_as_from_pretrained_reads_it(tmp_path, llama, text_corpus, sharded_first):
    """save_pretrained, sharded then single-file (or the other way round), leaves the older layout
    beside the newer: transformers reads model.safetensors whenever it is there, the index never.
    The driver's check and the reader follow that order, so the run starts from the weights
    from_pretrained gives, and a stale index whose shards are gone is no error."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from pipeline.models.hf import HFCheckpoint
    from pipeline.training.init_weights import check_init_weights

    folder = _copy(llama, tmp_path)
    spec = _spec(folder, text_corpus)
    original, other = LlamaForCausalLM.from_pretrained(llama), LlamaForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    (folder / "model.safetensors").unlink()
    (other if sharded_first else original).save_pretrained(folder, **({"max_shard_size": "64KB"} if sharded_first
                                                                        else {}))
    (original if sharded_first else other).save_pretrained(folder, **({} if sharded_first
                                                                      else {"max_shard_size": "64KB"}))
    assert (folder / "model.safetensors").is_file() and (folder / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    read = dict(HFCheckpoint(folder, KEY).tensors())
    assert read.keys() <= loaded.keys() and all(torch.equal(read[k], loaded[k]) for k in read)
    check_init_weights(folder, KEY, spec)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):  # the index's files: nothing reads them
        (folder / shard).unlink(missing_ok=True)  # (save_pretrained may have removed them already)
    check_init_weights(folder, KEY, spec)


@pytest.mark.parametrize(("value", "named"), [
    (1, r"weight_map\['model.embed_tokens.weight'\] is 1, not a file name"),
    ("../elsewhere.safetensors", r"weight_map\['model.embed_tokens.weight'\] is '../elsewhere.safetensors', a file "
                                 r"outside the checkpoint's folder"),
    ("/tmp/elsewhere.safetensors", r"weight_map\['model.embed_tokens.weight'\] is '/tmp/elsewhere.safetensors', a "
                                   r"file outside the checkpoint's folder"),
])
def test_an_index_mapping_a_tensor_to_no_file_of_its_folder_is_named(tmp_path, llama, text_corpus, value, named):
    """A weight_map value that is not a string was a raw TypeError in every reader; an absolute or
    `..` one read a file outside the checkpoint. Either is the index's damage, named by the driver's
    check and by the reader."""
    from transformers import LlamaForCausalLM

    from pipeline.models.hf import HFCheckpoint
    from pipeline.training.checkpoint import DamagedFile
    from pipeline.training.init_weights import check_init_weights

    folder = _copy(llama, tmp_path)
    (folder / "model.safetensors").unlink()
    LlamaForCausalLM.from_pretrained(llama).save_pretrained(folder, max_shard_size="64KB")
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["model.embed_tokens.weight"] = value
    index.write_text(json.dumps(content))
    damaged = rf"^{index} is damaged \(not a safetensors index \((TypeError|ValueError): {named}\)\)$"
    with pytest.raises(DamagedFile, match=damaged):
        check_init_weights(folder, KEY)
    with pytest.raises(DamagedFile, match=damaged):
        HFCheckpoint(folder, KEY)


# ----------------------------------------------------------------------------- which key is named
def test_the_worker_reader_names_the_key_that_gave_the_llama_folder(llama):
    """A Llama folder may be `trainer.init_from` as well as `model.init_from`: the workers' loader
    passes the key it was given to the reader, whose errors named `model.init_from` whatever the
    config said."""
    from pipeline.distributed.sharded_init import copy_from_safetensors

    misfit = {"embed.weight": torch.empty(3, 3)}
    shape = r": .*llama/model.safetensors: 'model.embed_tokens.weight' has shape \(300, 64\), the GPT's"
    with pytest.raises(ValueError, match=rf"^trainer\.init_from{shape}"):
        copy_from_safetensors(llama, misfit)
    with pytest.raises(ValueError, match=rf"^tasks\.lm\.trainer\.init_from{shape}"):
        copy_from_safetensors(llama, misfit, "tasks.lm.trainer.init_from")


def test_the_sweep_names_damaged_init_weights_before_tune_ray_or_mlflow(tmp_path, monkeypatch, llama, text_corpus,
                                                                        built_data):
    """The sweep runs the train stage's driver-side check of its init_from weights before Tune
    starts: a truncated download is one DamagedFile naming the file, not an unnamed
    SafetensorError failing every trial; no Ray, Tune folder or MLflow run is created for it."""
    import ray
    import yaml

    from pipeline.flows.sweep import run_sweep
    from pipeline.training.checkpoint import DamagedFile

    folder = _copy(llama, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    store, db = tmp_path / "store", tmp_path / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw([f"tasks.lm.data.source={text_corpus}", f"cluster.storage_path={store}",
                                               f"tasks.lm.trainer.init_from={folder}", f"tracking.uri=sqlite:///{db}"])))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"num_samples": 2, "max_steps": 12, "eval_every": 3, "grace_period": 3,
                                     "space": {"tasks.lm.optim.lr": {"loguniform": [3e-4, 3e-3]}}}))
    was_up = ray.is_initialized()
    with pytest.raises(DamagedFile, match=rf"^{weights} is damaged \(not a readable safetensors file"):
        run_sweep(params, "lm", space, built_data[1]["lm"], 2, 0)
    assert ray.is_initialized() == was_up and not store.exists() and not db.exists()
