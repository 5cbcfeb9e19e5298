"""`tasks.lm.model.init_from`: a Hugging Face checkpoint folder as the GPT's architecture.

The folder's `config.json` decides the architecture (the GPT's own fields for it are then
ignored), so the model that trains is the one the weights were made for. Only what the GPT
computes exactly is accepted: Llama (RoPE, RMSNorm, SwiGLU, no biases, optional GQA and tied
embeddings; attention over the whole context, unquantized weights). Anything else is named
here, at config validation, before prepare tokenizes a document or any Ray resource is taken.

This reads JSON only (config.json, and tokenizer.json for its vocabulary size; no torch, no
`transformers`): the weights themselves are read by `pipeline.models.hf`, one tensor at a
time, by whichever strategy trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HF_CONFIG = "config.json"

# GPTConfig fields a Hugging Face config decides; the rest (dropout, init, norm_impl) stay the user's.
ARCHITECTURE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "norm_eps", "norm", "mlp",
                       "pos_emb", "tie_weights", "rope_theta", "vocab_size")


def read_hf_config(folder: str | Path, key: str = "model.init_from") -> dict[str, Any]:
    """The folder's config.json as a dict; a missing folder or file is an error naming `key`."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{key}: {path} is not a folder (a Hugging Face checkpoint folder with config.json)")
    if not (path / HF_CONFIG).is_file():
        raise ValueError(f"{key}: {path} has no {HF_CONFIG}: is it a Hugging Face checkpoint folder?")
    try:
        config = json.loads((path / HF_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{key}: {path / HF_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{key}: {path / HF_CONFIG} holds a JSON {type(config).__name__}, not an object of "
                         "settings: is it a model's config.json?")
    return config


def _positive_int(hf: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    """`hf[key]` as a count; absent (or null, where there is a default) gives `default`, or a
    KeyError the caller words ("has no ..."); anything but a positive integer names the key."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: {key} is {json.dumps(value)}: expected a positive integer")
    return value


def _number(hf: dict[str, Any], key: str, where: str, default: float) -> float:
    value = hf.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{where}: {key} is {json.dumps(value)}: expected a positive number")
    return float(value)


def rope_theta(hf: dict[str, Any], where: str) -> tuple[float, str, str]:
    """(theta, rope type, the key the type was read from) from either layout: transformers 5's
    `rope_parameters`, or 4's `rope_theta` + `rope_scaling`, in transformers' own order: a
    non-empty `rope_scaling` wins over `rope_parameters` (a file holding both, a v4 scaling beside
    a v5 default, runs scaled there), and the base is that section's `rope_theta`, else the
    top-level one, else 10000. The key is returned so that a refusal names what the file actually
    holds (a v4 file has no `rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key} is {json.dumps(value)}: expected an object")
    name, section = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    theta = _number({"rope_theta": section.get("rope_theta", hf.get("rope_theta"))}, "rope_theta", where, 10000.0)
    for field in ("rope_type", "type"):
        if section.get(field):
            return theta, section[field], f"{name}.{field}"
    return theta, "default", f"{name}.rope_type"


def tokenizer_vocab_size(folder: Path) -> int | None:
    """How many embedding rows the folder's `tokenizer.json` needs (its largest token id + 1,
    added tokens included), read as JSON; None when there is no tokenizer.json or its layout is
    not one this knows (prepare and the train stage's preflight then judge it). Checked here so
    that a config.json `vocab_size` too small for its own tokenizer is named at validation, as
    that file's key, rather than later as `model.vocab_size`, a value the user never set."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = json.loads(path.read_text())
        vocab = tok["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # (Unigram: a list)
        ids += [t["id"] for t in tok.get("added_tokens") or []]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return None  # (not ours to judge here: prepare names a tokenizer it cannot read)
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ids) + 1 if ids else None


def _quant_method(hf: dict[str, Any]) -> str:
    """"quant_method 'fp8'; " for a refusal's message, or nothing when the config does not say."""
    config = hf.get("quantization_config")
    method = config.get("quant_method") if isinstance(config, dict) else None
    return f"quant_method '{method}'; " if method else ""


def gpt_fields_from_llama(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """GPTConfig's architecture fields for a Llama config, or a ValueError naming the first
    config key the GPT cannot reproduce exactly. `where` prefixes the message (the file)."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        archs = ", ".join(hf.get("architectures") or []) or "none named"
        raise ValueError(f"{where}: model_type '{model_type}' ({archs}): only the Llama architecture "
                         "(model_type 'llama') can be loaded into the GPT")
    d_model, n_heads = _positive_int(hf, "hidden_size", where), _positive_int(hf, "num_attention_heads", where)
    n_kv = _positive_int(hf, "num_key_value_heads", where, default=n_heads)
    theta, rope_type, rope_key = rope_theta(hf, where)
    refusals = {
        "head_dim": (hf.get("head_dim") not in (None, d_model // n_heads),
                     f"{hf.get('head_dim')} differs from hidden_size / num_attention_heads ({d_model // n_heads})"),
        "hidden_act": (hf.get("hidden_act", "silu") != "silu",
                       f"'{hf.get('hidden_act')}' (the GPT's SwiGLU uses silu)"),
        "attention_bias": (bool(hf.get("attention_bias")), "true (the GPT's projections have no biases)"),
        "mlp_bias": (bool(hf.get("mlp_bias")), "true (the GPT's MLP has no biases)"),
        rope_key: (rope_type != "default", f"'{rope_type}' (only unscaled RoPE is implemented)"),
        # transformers 5 applies these in attention (and generate's cache): the GPT attends to the whole context
        **{key: (hf.get(key) is not None, f"{json.dumps(hf.get(key))} (the GPT attends to the whole context)")
           for key in ("sliding_window", "attention_chunk_size")},
        # float8/int weights with scales beside them: read as plain floats they would be garbage
        "quantization_config": (hf.get("quantization_config") is not None, f"set ({_quant_method(hf)}quantized "
                                "checkpoints cannot be fine-tuned: dequantize first)"),
    }
    for key, (bad, why) in refusals.items():
        if bad:
            raise ValueError(f"{where}: {key} is {why}")
    if d_model % n_heads or n_heads % n_kv:
        raise ValueError(f"{where}: hidden_size {d_model}, num_attention_heads {n_heads}, num_key_value_heads "
                         f"{n_kv} do not divide evenly")
    return {
        "d_model": d_model, "n_layers": _positive_int(hf, "num_hidden_layers", where), "n_heads": n_heads,
        "n_kv_heads": n_kv if n_kv != n_heads else None, "mlp_hidden": _positive_int(hf, "intermediate_size", where),
        "norm_eps": _number(hf, "rms_norm_eps", where, 1e-6), "norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope",
        "tie_weights": bool(hf.get("tie_word_embeddings", False)), "rope_theta": theta,
        "vocab_size": _positive_int(hf, "vocab_size", where),
    }


# What the same weights compute differently with, beyond what the tensors' names and shapes show
COMPUTE_FIELDS = ("norm", "mlp", "pos_emb", "tie_weights", "rope_theta", "norm_eps", "n_kv_heads")


def architecture_differences(hf: dict[str, Any], model: dict[str, Any], where: str) -> list[tuple[str, Any, Any]]:
    """(field, the checkpoint's value, the model's) for each of COMPUTE_FIELDS where a GPT model
    section (`model`, a GPTConfig dump) would compute another function with the Llama checkpoint's
    weights (`hf`, its config.json): a RoPE base or norm epsilon of another model fine-tunes as
    another network from the first step. Defaults resolved (norm_eps None: 1e-6 for RMSNorm, 1e-5
    for LayerNorm; n_kv_heads None: n_heads). A config the GPT cannot reproduce raises, as for
    `model.init_from`."""
    theirs = gpt_fields_from_llama(hf, where)

    def resolved(fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(fields)
        if out.get("norm_eps") is None:
            out["norm_eps"] = 1e-6 if out.get("norm", "rmsnorm") == "rmsnorm" else 1e-5
        if out.get("n_kv_heads") is None:
            out["n_kv_heads"] = out.get("n_heads")
        return out

    a, b = resolved(theirs), resolved(model)
    out = []
    for name in COMPUTE_FIELDS:
        x, y = a.get(name), b.get(name)
        same = math.isclose(x, y, rel_tol=1e-9) if isinstance(x, float) and isinstance(y, int | float) else x == y
        if not same:
            out.append((name, x, y))
    return out


def resolve_pretrained(raw_model: dict[str, Any], where: str) -> dict[str, Any]:
    """A GPT model section with `init_from` set, its architecture fields replaced by the
    checkpoint's (a plain dict: the caller validates it). Idempotent. `where` is the key path
    (`tasks.lm.model`) errors name."""
    folder = raw_model.get("init_from")
    if not folder or raw_model.get("kind", "gpt") != "gpt" or not isinstance(folder, str):
        return raw_model  # (a number or list is the schema's to refuse, naming the key)
    key = f"{where}.init_from"
    hf = read_hf_config(folder, key)
    where = f"{key}: {Path(folder) / HF_CONFIG}"
    try:
        fields = gpt_fields_from_llama(hf, where)
    except KeyError as e:
        raise ValueError(f"{key}: {Path(folder) / HF_CONFIG} has no {e.args[0]}") from None
    needed = tokenizer_vocab_size(Path(folder))
    if needed is not None and fields["vocab_size"] < needed:
        raise ValueError(f"{where}: vocab_size is {fields['vocab_size']}, smaller than the vocabulary of its "
                         f"tokenizer.json ({needed} tokens): the embedding has no row for its last tokens")
    return {**raw_model, **fields}
