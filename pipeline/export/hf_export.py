"""The language model as a Hugging Face `transformers` folder, checked as the ONNX graph is.

`export/<task>/hf/` holds `config.json`, `generation_config.json`, the weights
(`model.safetensors`, or several files and `model.safetensors.index.json` above
`export.hf_shard_mb`) and the tokenizer (`tokenizer.json`, `tokenizer_config.json`), so
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it with no
custom code (and vLLM serves it). The weights are written from the consolidated state dict
with safetensors directly (no second model in memory); `transformers` itself then loads the
folder for the check:
- logits of `transformers`' model equal ours on fixed validation rows within
  `export.hf_max_abs_diff` (fp32; a bf16/fp16 folder is compared with our model holding the
  same rounded weights),
- greedy generation of 20 tokens gives the same tokens (a divergence is accepted only where
  our two best logits are closer than the bound: a tie, not a bug),
- the tokenizer encodes a sample as ours does.
A failed check fails the export, before anything is registered.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import ExportConfig, GPTConfig
from pipeline.data.text import EOS, HF_TOKENIZER_FILES
from pipeline.models.hf import architecture, from_hf_views, hf_config, merged_eos, to_hf_state, write_safetensors

HF_DIR = "hf"
NEW_TOKENS, PROMPT_TOKENS, CHECK_ROWS = 20, 8, 4
SAMPLE_TEXT = "The for statement iterates over the items of any sequence, in order."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype(ecfg: ExportConfig, spec: dict[str, Any]) -> str:
    """`export.hf_dtype`; auto: the dtype of the checkpoint the model came from, else float32."""
    if ecfg.hf_dtype != "auto":
        return ecfg.hf_dtype
    source = (spec.get("hf_source") or {}).get("config") or {}
    dtype = source.get("dtype") or source.get("torch_dtype") or "float32"
    return dtype if dtype in _DTYPES else "float32"


def write_tokenizer(tokenizer_dir: Path, out: Path, max_seq_len: int, eos_token: str = EOS,
                    source_config: dict[str, Any] | None = None) -> dict[str, int | None]:
    """The tokenizer files `AutoTokenizer` reads; returns the bos/eos/pad ids for config.json.

    `eos_token` is the document separator the shards were packed with (the manifest's
    `eos_token`): whichever tokenizer wrote them, it is the eos the folder declares, so that
    config.json's eos_token_id, the tokenizer's and the training data agree. A Hugging Face
    tokenizer that came with its `tokenizer_config.json` is copied as it is (its eos is the
    manifest's: prepare read it there). One without (prepare took its eos from config.json) and
    our own BPE are wrapped as a fast tokenizer: a Hugging Face one with bos from the source's
    config.json (`source_config`), ours with the separator as bos too."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if raw.token_to_id(eos_token) is None:  # (wrapped, it would become a new token beyond the embedding)
        raise ValueError(f"export: {tokenizer_dir / 'tokenizer.json'} has no token '{eos_token}', the eos_token "
                         "the shards' manifest names: the shards and their tokenizer disagree; run prepare again")
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        for name in HF_TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out / name)
        tok = PreTrainedTokenizerFast.from_pretrained(str(out))
        if tok.eos_token != eos_token:  # (its config names no eos, or another: the shards' separator is the eos)
            tok.eos_token = eos_token
            tok.save_pretrained(str(out))
    else:
        bos = EOS if source_config is None and eos_token == EOS else _token(raw, (source_config or {}), "bos_token_id")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token=bos,
                                      eos_token=eos_token, model_max_length=max_seq_len)
        tok.save_pretrained(str(out))
        # The class name every transformers release knows (5.x reads it as its tokenizers backend).
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _token(raw: Any, config: dict[str, Any], key: str) -> str | None:
    """The token string config.json's `key` (a token id, or a list of them: the first) names, if
    the tokenizer has it."""
    value = config.get(key)
    value = value[0] if isinstance(value, list) and value else value
    return raw.id_to_token(value) if isinstance(value, int) and not isinstance(value, bool) else None


def write_hf_folder(model: torch.nn.Module, spec: dict[str, Any], tokenizer_dir: Path, out: Path,
                    ecfg: ExportConfig) -> dict[str, Any]:
    """Write the folder (the caller makes `out` atomic). `tokenizer_dir` is the shards' folder:
    its tokenizer and manifest (the eos the data was packed with). Returns what was written, or
    {"hf_architecture": None, "hf_skipped": reason} when no stock architecture matches."""
    from transformers import AutoConfig, GenerationConfig

    from pipeline.data.shard_format import load_manifest

    cfg = GPTConfig.model_validate(spec["model"])
    arch, name = architecture(cfg)
    if arch is None:
        return {"hf_architecture": None, "hf_skipped": name}
    out.mkdir(parents=True, exist_ok=True)
    dtype = export_dtype(ecfg, spec)
    source = spec.get("hf_source") or {}
    eos = load_manifest(tokenizer_dir).get("eos_token", EOS)  # the separator the shards were packed with
    tokens = write_tokenizer(tokenizer_dir, out, spec["max_seq_len"], eos, source.get("config"))
    fields = hf_config(cfg, arch, spec["vocab_size"], spec["max_seq_len"], tokens, dtype, source.get("config"))
    fields.pop("transformers_version", None)
    config = AutoConfig.for_model(**fields)
    config.save_pretrained(str(out))
    generation = (GenerationConfig.from_dict(source["generation_config"]) if source.get("generation_config")
                  else GenerationConfig.from_model_config(config))
    # generate() and vLLM stop at generation_config.json's eos, not config.json's: the tokenizer's eos
    # (the separator the model learned to end documents with) is added there as hf_config adds it
    generation.eos_token_id = merged_eos(generation.eos_token_id, tokens.get("eos_token_id"))
    generation.save_pretrained(str(out))
    state = {k: v.detach().to("cpu", _DTYPES[dtype]) for k, v in model.state_dict().items()}
    files = write_safetensors(to_hf_state(state, cfg, arch), out, ecfg.hf_shard_mb * 2**20)
    return {"hf_architecture": name, "hf_dtype": dtype, "hf_files": files}


def check_lengths(max_seq_len: int) -> tuple[int, int]:
    """(prompt tokens, new tokens) of the greedy check: 8 + 20, fewer where the model's context
    is shorter (neither model may run past it: GPT-2's positions end there, and our GPT crops
    its context where transformers' Llama would not)."""
    prompt = max(1, min(PROMPT_TOKENS, max_seq_len // 2))
    return prompt, max(0, min(NEW_TOKENS, max_seq_len - prompt))


@torch.no_grad()
def check_hf_folder(folder: Path, model: torch.nn.Module, rows: np.ndarray, tokenizer_file: Path,
                    dtype: str) -> dict[str, Any]:
    """Load `folder` with `transformers` and compare it with `model` (see the module docstring).
    Returns the figures; raises when transformers reports missing or unexpected weights, when a
    weight in the folder is not ours (rounded to `dtype`), or when the tokenizer's eos is not
    config.json's.

    Host memory: besides `model`, only transformers' model (in fp32: the logits bound is an fp32
    one, which bf16 arithmetic would not meet). Our model is compared holding the same rounded
    weights without a copy of it: its parameters are pointed, for the check, at transformers'
    own tensors (views in our layout), after each was checked to equal ours rounded."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # (a bar per load in the stage's log otherwise)
    hf, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"export: transformers loads {folder} with {problems}")
    hf.eval()
    params = dict(model.named_parameters())  # (a tied head is the embedding: named once)
    rounded = from_hf_views(hf.state_dict(), hf.config.model_type, {k: tuple(p.shape) for k, p in params.items()},
                            folder)
    for ours, view in rounded.items():  # one tensor at a time: no second copy of the model
        want = params[ours].detach().to(_DTYPES[dtype]).float()
        if not bool(((view == want) | (view.isnan() & want.isnan())).all()):
            raise ValueError(f"export: {folder}: the weight written for our '{ours}' is not ours rounded to {dtype}")
    originals = {k: p.data for k, p in params.items()}
    was_training = model.training
    try:
        for k, p in params.items():  # our model now computes with exactly the folder's (rounded) weights
            p.data = rounded[k]
        model.eval()
        figures = _compare(hf, model, rows)
    finally:
        for k, p in params.items():
            p.data = originals[k]
        model.train(was_training)

    tok = AutoTokenizer.from_pretrained(str(folder))
    eos = hf.config.eos_token_id
    if tok.eos_token_id is None or tok.eos_token_id not in (eos if isinstance(eos, list) else [eos]):
        raise ValueError(f"export: {folder}: the tokenizer's eos_token '{tok.eos_token}' (id {tok.eos_token_id}) "
                         f"is not config.json's eos_token_id {eos}")
    tok.model_max_length = 1 << 30  # (the sample may be longer than a tiny model's context: no warning)
    raw = Tokenizer.from_file(str(tokenizer_file))
    tokenizer_same = tok.encode(SAMPLE_TEXT, add_special_tokens=False) == raw.encode(SAMPLE_TEXT,
                                                                                       add_special_tokens=False).ids
    return {**figures, "hf_tokenizer_equal": float(tokenizer_same)}


def _compare(hf: torch.nn.Module, ours: torch.nn.Module, rows: np.ndarray) -> dict[str, Any]:
    """Logits on the rows and greedy continuations of their first tokens, both models."""
    x = torch.from_numpy(rows[:CHECK_ROWS, :-1].astype(np.int64))
    expected = ours(x).float()
    got = hf(input_ids=x).logits.float()
    diff = float((got - expected).abs().max())

    n_prompt, n_new = check_lengths(getattr(ours, "max_seq_len", x.shape[1]))
    prompt = x[:, :n_prompt]
    mine = ours.generate(prompt, n_new, temperature=0)[:, n_prompt:]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                         min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                         pad_token_id=hf.config.pad_token_id or 0)[:, n_prompt:] if n_new else mine
    same, ties = generation_agreement(ours, prompt, mine, theirs, diff)
    return {"hf_max_abs_logit_diff": diff, "hf_greedy_tokens_equal": float(same), "hf_greedy_ties": ties}


def generation_agreement(model: torch.nn.Module, prompt: torch.Tensor, mine: torch.Tensor, theirs: torch.Tensor,
                         bound: float) -> tuple[bool, int]:
    """(do the greedy continuations agree, how many rows diverged at a tie). A row that
    diverges where our two best logits are within `bound` of each other is a tie: either
    token is a correct greedy choice, and the continuations after it are not comparable."""
    if mine.shape != theirs.shape:
        return False, 0
    ties = 0
    for row in range(mine.shape[0]):
        differ = (mine[row] != theirs[row]).nonzero()
        if not len(differ):
            continue
        at = int(differ[0])
        context = torch.cat([prompt[row], mine[row, :at]])[None]
        top2 = model(context)[0, -1].float().topk(2).values
        if float(top2[0] - top2[1]) > 2 * bound:
            return False, ties
        ties += 1
    return True, ties


def export_hf(model: torch.nn.Module, spec: dict[str, Any], shards: Path, out: Path,
              ecfg: ExportConfig) -> dict[str, Any]:
    """Write `out` (inside the export's atomic folder) and check it on the first validation
    rows; raise when the check fails. Returns the figures (metrics) and what was written."""
    from pipeline.data.shard_store import read_split

    written = write_hf_folder(model, spec, shards, out, ecfg)
    if written["hf_architecture"] is None:
        return written
    rows = read_split(shards, "val", max_rows=CHECK_ROWS)["tokens"]
    figures = check_hf_folder(out, model, rows, shards / "tokenizer.json", written["hf_dtype"])
    if not figures["hf_max_abs_logit_diff"] <= ecfg.hf_max_abs_diff:  # NaN (damaged weights) fails too
        raise ValueError(f"export: the transformers model's logits differ from ours by "
                         f"{figures['hf_max_abs_logit_diff']:.2e} > export.hf_max_abs_diff {ecfg.hf_max_abs_diff:.0e}")
    if not figures["hf_greedy_tokens_equal"]:
        raise ValueError(f"export: greedy generation of {check_lengths(spec['max_seq_len'])[1]} tokens differs "
                         "between transformers and ours")
    if not figures["hf_tokenizer_equal"]:
        raise ValueError(f"export: AutoTokenizer.from_pretrained({out}) encodes differently from the shards' tokenizer")
    return {**written, **figures}
