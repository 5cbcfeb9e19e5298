"""The GPT and Hugging Face `transformers` checkpoints: parameter names, tensor layouts and
`config.json`, both ways.

Which stock architecture computes exactly what a GPT config computes:
- RoPE + RMSNorm + SwiGLU (no biases, any GQA, tied or not) is `LlamaForCausalLM`: the same
  parameters under other names. (Our RoPE rotates the two halves of each head, as
  `transformers`' `rotate_half` does, so q/k need no permutation.)
- learned positions + LayerNorm + GELU with one key/value head per query head is
  `GPT2LMHeadModel`: its `Conv1D` weights are ours transposed, q/k/v are one `c_attn`, and its
  biases (which we do not have) are written as zeros; the activation is exact GELU (`gelu`).
- anything else (RoPE with LayerNorm, GQA without RoPE, ...) has no stock match: `architecture`
  says why in one line and the export writes everything but the Hugging Face folder.

Reading (`HFCheckpoint`) serves `model.init_from` and `trainer.init_from`: a strategy asks for
the tensors of one unit at a time by our names; they are read from whichever safetensors file
of a sharded checkpoint holds them, so no rank reads more than it keeps. Only the Llama layout
is read (the issue's fine-tuning source); GPT-2 is written only.

No `transformers` import here: safetensors and JSON are enough. `pipeline.export.hf_export`
writes the folder and checks it with `transformers` itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.config.pretrained import HF_CONFIG, read_hf_config
from pipeline.config.schema import GPTConfig
from pipeline.models.gpt import norm_eps

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
# safetensors dtypes a weight may be read from: a cast to the model's dtype keeps their values. float8 and
# integer tensors are quantized (their scales are other tensors): cast, they would load as garbage.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# config.json keys a Llama folder may carry that change what transformers computes, and that the GPT
# refuses at validation (pipeline.config.pretrained): an exported folder must never carry them set.
_NOT_EXPORTED = ("sliding_window", "attention_chunk_size", "quantization_config")

_LLAMA_BLOCK = {"norm1.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
                "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
                "attn.wo.weight": "self_attn.o_proj.weight", "norm2.weight": "post_attention_layernorm.weight",
                "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
                "mlp.w2.weight": "mlp.down_proj.weight"}
_LLAMA_ROOT = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "head.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")


def architecture(cfg: GPTConfig) -> tuple[str | None, str]:
    """("llama" | "gpt2", description) for a config a stock architecture computes exactly, else
    (None, the reason in one line)."""
    shape = f"{cfg.pos_emb} positions + {cfg.norm} + {cfg.mlp}"
    if (cfg.pos_emb, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "llama", "LlamaForCausalLM"
    if (cfg.pos_emb, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            return None, f"{shape} with grouped-query attention: GPT-2 has one key/value head per query head"
        return "gpt2", "GPT2LMHeadModel"
    return None, (f"{shape}: no stock transformers architecture computes this exactly "
                  "(Llama is rope + rmsnorm + swiglu, GPT-2 is learned + layernorm + gelu)")


# ----------------------------------------------------------------------------- names and layouts
def llama_name(name: str) -> str:
    """Our parameter name as a Llama checkpoint's."""
    if name in _LLAMA_ROOT:
        return _LLAMA_ROOT[name]
    m = _BLOCK.match(name)
    if m and m[2] in _LLAMA_BLOCK:
        return f"model.layers.{m[1]}.{_LLAMA_BLOCK[m[2]]}"
    raise KeyError(f"no Llama name for the GPT parameter '{name}'")


def to_hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig, arch: str) -> dict[str, torch.Tensor]:
    """Our (consolidated) state dict in the Hugging Face architecture's names and layouts. Tied
    embeddings are written once (the head is not), as `save_pretrained` writes them."""
    if arch == "llama":
        return {llama_name(k): v for k, v in state.items() if not (k == "head.weight" and cfg.tie_weights)}
    if arch == "gpt2":
        return _gpt2_state(state, cfg)
    raise ValueError(f"unknown architecture '{arch}'")


def _gpt2_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["embed.weight"], "transformer.wpe.weight": state["pos.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    if not cfg.tie_weights:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        wq, wk, wv = (state[f"{ours}attn.w{x}.weight"] for x in "qkv")
        conv = {  # Conv1D keeps (in, out): our Linear weights transposed, and zero biases
            "attn.c_attn": torch.cat([wq, wk, wv]), "attn.c_proj": state[f"{ours}attn.wo.weight"],
            "mlp.c_fc": state[f"{ours}mlp.w1.weight"], "mlp.c_proj": state[f"{ours}mlp.w2.weight"],
        }
        for name, w in conv.items():
            out[f"{hf}{name}.weight"] = w.t().contiguous()
            out[f"{hf}{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        for norm, hf_norm in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{hf}{hf_norm}.weight"] = state[f"{ours}{norm}.weight"]
            out[f"{hf}{hf_norm}.bias"] = state[f"{ours}{norm}.bias"]
    return out


def merged_eos(eos: int | list[int] | None, ours: int | None) -> int | list[int] | None:
    """A source's `eos_token_id` (config.json's or generation_config.json's) with the tokenizer's
    eos, `ours`, added. The shards' separator (the tokenizer's eos) may not be the source's eos (a
    chat model's `<|eot_id|>` beside `eos_token_id: <|end_of_text|>`): both must stop generation, as
    transformers reads a list there. A source's null (or none) means the tokenizer's eos is the one to
    stop at; a source that already lists it is returned unchanged (the round trip stays byte for byte)."""
    if eos is None:
        return ours
    listed = eos if isinstance(eos, list) else [eos]
    return [*listed, ours] if ours is not None and ours not in listed else eos


def hf_config(cfg: GPTConfig, arch: str, vocab_size: int, max_seq_len: int, tokens: dict[str, int | None],
              dtype: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` fields of the exported folder. A model that came from a Hugging Face
    checkpoint starts from that checkpoint's config (so its other fields, token ids and context
    length survive the round trip); `tokens` (bos/eos/pad ids) fill what it does not set."""
    base = dict(source or {})
    for key in _NOT_EXPORTED:  # (a null one is harmless, and kept: the unchanged round trip stays byte for byte)
        if base.get(key) is not None or key == "quantization_config":
            base.pop(key, None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        base.setdefault(key, tokens.get(key))
    base["eos_token_id"] = merged_eos(base["eos_token_id"], tokens.get("eos_token_id"))
    base["dtype"] = dtype
    n_kv = cfg.n_kv_heads or cfg.n_heads
    if arch == "llama":
        base.update({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": n_kv, "head_dim": cfg.d_model // cfg.n_heads,
            "hidden_act": "silu", "rms_norm_eps": norm_eps("rmsnorm", cfg.norm_eps),
            "tie_word_embeddings": cfg.tie_weights, "attention_bias": False, "mlp_bias": False,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        })
        base.pop("rope_theta", None)
        base.pop("rope_scaling", None)
        base.setdefault("max_position_embeddings", max_seq_len)
        return base
    base.update({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.mlp_width, "activation_function": "gelu",
        "layer_norm_epsilon": norm_eps("layernorm", cfg.norm_eps),
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
    })
    return base


def from_hf_views(hf_state: dict[str, torch.Tensor], model_type: str, shapes: dict[str, tuple[int, ...]],
                  where: Path) -> dict[str, torch.Tensor]:
    """`to_hf_state` backwards, without copying: each of our parameters (name -> shape in
    `shapes`) as a view of a transformers model's tensor, in our layout (GPT-2's Conv1D weights
    transposed, its `c_attn` cut into q/k/v). The export's check runs our model on these, so it
    needs no second copy of our model to hold the folder's rounded weights."""
    if model_type == "llama":
        found = {ours: hf_state.get(llama_name(ours)) for ours in shapes}
    elif model_type == "gpt2":
        found = _gpt2_views(hf_state, shapes)
    else:
        raise ValueError(f"export: {where}: model_type '{model_type}' is not one the export writes")
    for ours, shape in shapes.items():
        got = found.get(ours)
        if got is None or tuple(got.shape) != shape:
            held = "nothing" if got is None else f"shape {tuple(got.shape)}"
            raise ValueError(f"export: {where}: transformers holds {held} for our '{ours}' {shape}")
    return found


_GPT2_ROOT = {"embed.weight": "transformer.wte.weight", "pos.weight": "transformer.wpe.weight",
              "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
              "head.weight": "lm_head.weight"}
# our block parameter -> (GPT-2's, transposed: a Conv1D weight)
_GPT2_BLOCK = {"attn.wo.weight": ("attn.c_proj.weight", True), "mlp.w1.weight": ("mlp.c_fc.weight", True),
               "mlp.w2.weight": ("mlp.c_proj.weight", True), "norm1.weight": ("ln_1.weight", False),
               "norm1.bias": ("ln_1.bias", False), "norm2.weight": ("ln_2.weight", False),
               "norm2.bias": ("ln_2.bias", False)}


def _gpt2_views(hf_state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """`from_hf_views` for GPT-2 (what it does not hold is left out: the caller names it)."""
    out = {k: hf_state[v] for k, v in _GPT2_ROOT.items() if k in shapes and v in hf_state}
    for ours in shapes:
        m = _BLOCK.match(ours)
        if not m:
            continue
        hf = f"transformer.h.{m[1]}."
        if m[2] in _GPT2_BLOCK and hf + _GPT2_BLOCK[m[2]][0] in hf_state:
            name, conv = _GPT2_BLOCK[m[2]]
            out[ours] = hf_state[hf + name].t() if conv else hf_state[hf + name]
        elif m[2] == "attn.wq.weight" and f"{hf}attn.c_attn.weight" in hf_state:  # q, k, v: rows of one c_attn
            fused, at = hf_state[f"{hf}attn.c_attn.weight"].t(), 0
            for x in "qkv":
                rows = shapes.get(f"blocks.{m[1]}.attn.w{x}.weight", (0,))[0]
                out[f"blocks.{m[1]}.attn.w{x}.weight"] = fused[at:at + rows]
                at += rows
    return out


# ----------------------------------------------------------------------------- writing
def shard_plan(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_bytes` (a larger tensor gets a file of
    its own), in name order, as `save_pretrained` shards."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` files and their index when
    the weights exceed `max_bytes` (the names and index format `from_pretrained` reads).
    Returns the file names written."""
    from safetensors.torch import save_file

    from pipeline.atomic import as_open_creates

    groups = shard_plan(tensors, max_bytes)
    if len(groups) == 1:
        save_file({k: tensors[k].contiguous() for k in groups[0]}, str(folder / SAFETENSORS), metadata={"format": "pt"})
        as_open_creates(folder / SAFETENSORS)  # (safetensors writes 0600, whatever the umask)
        return [SAFETENSORS]
    files, weight_map = [], {}
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / fname), metadata={"format": "pt"})
        as_open_creates(folder / fname)
        weight_map.update(dict.fromkeys(names, fname))
        files.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                           indent=2, sort_keys=True) + "\n")
    return [*files, INDEX]


# ----------------------------------------------------------------------------- reading
def read_weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index (`model.safetensors.index.json`): tensor name -> file. One
    that is not JSON, holds no weight map, or maps a tensor to anything but a file name in its own
    folder is `DamagedFile`, naming it: a number there would be a raw TypeError in every reader,
    and an absolute or `..` path would read weights from outside the checkpoint."""
    from pipeline.training.checkpoint import DamagedFile

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file:
                raise TypeError(f"weight_map['{name}'] is {json.dumps(file)}, not a file name")
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise ValueError(f"weight_map['{name}'] is '{file}', a file outside the checkpoint's folder")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DamagedFile(index, f"not a safetensors index ({type(e).__name__}: {e})") from None
    return weight_map


class HFCheckpoint:
    """A Llama-architecture checkpoint folder (config.json + one safetensors file, or several
    with an index), read one tensor at a time by our parameter names."""

    def __init__(self, folder: str | Path, key: str = "model.init_from") -> None:
        self.folder, self.key = Path(folder), key
        self.config = read_hf_config(self.folder, key)
        if self.config.get("model_type") != "llama":
            raise ValueError(f"{key}: {self.folder / HF_CONFIG}: model_type '{self.config.get('model_type')}': "
                             "only Llama checkpoints are read")
        # transformers' order (from_pretrained): model.safetensors whenever it is there, else the index. A
        # folder save_pretrained wrote sharded, then single-file (or the other way round) holds both, the
        # older one stale: the run starts from the weights from_pretrained would give
        if (self.folder / SAFETENSORS).is_file():
            self.files = None
        elif (self.folder / INDEX).is_file():
            self.files = read_weight_map(self.folder / INDEX)
        else:
            raise ValueError(no_safetensors(self.folder, key))

    def file_of(self, hf_name: str) -> str | None:
        if self.files is None:
            return SAFETENSORS
        return self.files.get(hf_name)

    def names(self, ours: list[str]) -> dict[str, str]:
        """Our names to the checkpoint's. A tied head reads the embedding (a checkpoint saved
        with tied embeddings has no lm_head)."""
        tied = bool(self.config.get("tie_word_embeddings", False))
        return {n: llama_name("embed.weight" if n == "head.weight" and tied else n) for n in ours}

    @torch.no_grad()
    def check_tied_head(self, rows: int = 4096) -> None:
        """A config that ties the head to the embedding, over a checkpoint that also holds an
        `lm_head.weight` of other values: transformers then unties them (its warning says the config
        is wrong) and computes with the stored head, where `names` reads the embedding. A ValueError
        naming both, read `rows` rows at a time (a 7B's tables are 500 MB each)."""
        from safetensors import safe_open

        if not self.config.get("tie_word_embeddings", False):
            return
        embed, head = llama_name("embed.weight"), "lm_head.weight"
        files = {name: self.file_of(name) for name in (embed, head)}
        if None in files.values():
            return
        opened = {f: safe_open(str(self.folder / f), "pt") for f in set(files.values())}
        if head not in opened[files[head]].keys() or embed not in opened[files[embed]].keys():  # noqa: SIM118
            return
        a, b = opened[files[embed]].get_slice(embed), opened[files[head]].get_slice(head)
        if a.get_shape() == b.get_shape():
            n = a.get_shape()[0]
            if all(torch.equal(a[i:i + rows], b[i:i + rows]) for i in range(0, n, rows)):
                return
        raise ValueError(f"{self.key}: {self.folder / 'config.json'} has tie_word_embeddings true, but "
                         f"{self.folder / files[head]} holds an '{head}' that differs from '{embed}' (transformers "
                         "then unties them and uses the stored head): set tie_word_embeddings to false in "
                         "config.json if the head is its own")

    @torch.no_grad()
    def copy_into(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill `targets` (our name -> whole tensor) from the checkpoint, opening each file once
        and reading only the tensors asked for (cast to the target's dtype). A missing tensor, a
        shape that differs or a quantized (float8, integer) tensor is an error naming the file
        and both names."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for ours, theirs in self.names(list(targets)).items():
            fname = self.file_of(theirs)
            if fname is None:
                raise ValueError(f"{self.key}: {self.folder / INDEX} maps no file to '{theirs}' (our '{ours}')")
            by_file.setdefault(fname, []).append((ours, theirs))
        for fname, pairs in by_file.items():
            with safe_open(str(self.folder / fname), framework="pt") as f:
                keys = set(f.keys())
                for ours, theirs in pairs:
                    if theirs not in keys:
                        raise ValueError(f"{self.key}: {self.folder / fname} has no tensor '{theirs}' (our '{ours}')")
                    check_float(f.get_slice(theirs).get_dtype(), self.folder / fname, theirs, ours, self.key)
                    tensor = f.get_tensor(theirs)
                    if tuple(tensor.shape) != tuple(targets[ours].shape):
                        need = tuple(targets[ours].shape)
                        raise ValueError(f"{self.key}: {self.folder / fname}: '{theirs}' has shape "
                                         f"{tuple(tensor.shape)}, the GPT's '{ours}' needs {need}")
                    targets[ours].copy_(tensor)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the checkpoint by its own name (tests and round-trip checks)."""
        from safetensors import safe_open

        for fname in sorted(set(self.files.values()) if self.files else [SAFETENSORS]):
            with safe_open(str(self.folder / fname), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield k, f.get_tensor(k)


def no_safetensors(folder: Path, key: str) -> str:
    """The one-line error for a Hugging Face folder without safetensors weights (shared by the
    driver's check and the reader, so both give the conversion hint, naming any .bin files)."""
    bins = sorted(p.name for p in folder.glob("*.bin"))
    held = f" (it holds {', '.join(bins[:3])}{', ...' if len(bins) > 3 else ''})" if bins else ""
    return (f"{key}: {folder} has neither {SAFETENSORS} nor {INDEX}{held}: PyTorch .bin checkpoints are not "
            "read; load and save_pretrained them once to convert")


def check_float(dtype: str, file: Path, theirs: str, ours: str, key: str) -> None:
    """Refuse a tensor stored as anything but a plain float (`dtype` as the safetensors header
    writes it, e.g. F8_E4M3, I8): a quantized weight's values mean nothing without its scales,
    and casting it to the model's dtype would load garbage silently."""
    if dtype not in FLOAT_DTYPES:
        mine = "" if ours == theirs else f" (the model's '{ours}')"
        raise ValueError(f"{key}: {file}: '{theirs}'{mine} is stored as {dtype}, not as a float: quantized "
                         "checkpoints cannot be fine-tuned: dequantize first")


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a Hugging Face config.json (rather than our model folder's model_spec.json)."""
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()
