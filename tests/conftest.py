"""Shared fixtures: a tiny validated config and small real data sets on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import compose, validate
from pipeline.config.loading import apply_overrides

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "tasks.lm.data.vocab_size=300", "tasks.lm.data.seq_len=32", "tasks.lm.data.shard_rows=64",
    "tasks.lm.trainer.max_steps=6", "tasks.lm.trainer.global_batch_size=8", "tasks.lm.trainer.log_every=2",
    "tasks.lm.trainer.ckpt_every=3", "tasks.lm.optim.warmup_steps=2", "tasks.lm.eval.max_batches=2",
    "tasks.lm.eval.batch_size=8",
    "tasks.diffusion.data.augment.copies=1", "tasks.diffusion.data.shard_rows=256",
    "tasks.diffusion.trainer.max_steps=6", "tasks.diffusion.trainer.global_batch_size=16",
    "tasks.diffusion.trainer.log_every=2", "tasks.diffusion.trainer.ckpt_every=3",
    "tasks.diffusion.optim.warmup_steps=2", "tasks.diffusion.eval.max_batches=1",
    "tasks.diffusion.eval.batch_size=16", "tasks.diffusion.eval.sample_cols=2",
    "tasks.diffusion.eval.sample_steps=4",
    # the digit classifier that scores the samples: 30 steps, not 400 (the tiny diffusion evaluate
    # stage took 18.8 s alone, 12.5 s with 30); whether it recognises digits is tests/test_evaluation.py's
    # check (300 steps), the tiny chains check that the scores are there
    "tasks.diffusion.eval.classifier_steps=30",
]
TINY_GROUPS = ["model@tasks.lm.model=gpt_tiny", "model@tasks.diffusion.model=dit_tiny"]


MODULE_SECONDS = ROOT / "tests" / "module_seconds.json"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first. `make test` hands whole modules to its two workers (xdist's
    loadscope, so a module's fixtures are built once) in collection order; xdist's own order, by
    test count, leaves the few-test, many-minute end-to-end modules for last, where one worker
    runs them alone while the other idles. Longest first (the seconds last measured, in
    tests/module_seconds.json: `make test-timings` rewrites it; a module not listed counts as
    short) lets the short modules fill in at the end. A stable sort: tests keep their order
    within a module."""
    if not MODULE_SECONDS.is_file():
        return
    seconds = json.loads(MODULE_SECONDS.read_text())["modules"]
    items.sort(key=lambda item: -float(seconds.get(item.nodeid.split("::")[0], 0.0)))


def tiny_raw(extra: list[str] | None = None) -> dict:
    raw = compose(ROOT / "configs", TINY_GROUPS)
    return apply_overrides(raw, TINY + (extra or []))


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory) -> Iterator[Path]:
    """The node's shard cache for this session (downloaded shards, the verification marker),
    not the user's ~/.cache; subprocesses and Ray workers inherit it."""
    from pipeline.data.shard_format import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("shard-cache"))
    yield Path(os.environ[CACHE_ENV])
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture
def tiny_cfg():
    return validate(tiny_raw())


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small real-text folder: paragraphs of CPython's Language Reference, plus one repeat."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("corpus")
    names = sorted(topics)[:12]
    for n in names:
        (d / f"{n}.txt").write_text(topics[n])
    (d / "repeat.txt").write_text(topics[names[0]])  # exact duplicates to be dropped
    return d


@pytest.fixture(scope="session")
def built_data(tmp_path_factory, text_corpus):
    """Prepared and sharded tiny data for both tasks (real digits, real text)."""
    from pipeline.data.build import prepare, shard

    cfg = validate(tiny_raw([f"tasks.lm.data.source={text_corpus}"]))
    root = tmp_path_factory.mktemp("data")
    out = {}
    for task in ("lm", "diffusion"):
        prepare(cfg.task(task).data, cfg.seed, root / task / "prepared")
        shard(cfg.task(task).data, root / task / "prepared", root / task / "shards")
        out[task] = root / task / "shards"
    return cfg, out


def make_tiny_llama(folder: Path, corpus: Path | None = None, *, vocab: int = 300, pad_vocab: int = 0,
                    tie: bool = False, n_kv: int = 2, layers: int = 2, seed: int = 0) -> Path:
    """A random tiny Llama checkpoint as users bring one: `save_pretrained` of a
    `LlamaForCausalLM` and of its fast tokenizer (byte-level BPE trained on `corpus`, with
    Llama's <s>/</s> and a post-processor that prepends <s>). `pad_vocab` extra embedding rows
    beyond the tokenizer's vocabulary, as padded checkpoints have."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))] if corpus else \
        ["def f(x): return x + 1", "The for statement iterates over a sequence.", "A class is a namespace."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=tok.get_vocab_size() + pad_vocab, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=n_kv,
                         rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


# the tiny Llama and its prepared data, shared by the Hugging Face import and export modules (module-
# scoped: each module builds its own; test_hf_refusals defines its own `llama`). Imported last: the
# module uses make_tiny_llama and tiny_raw above.
from tests.hf_llama import llama, llama_data  # noqa: E402, F401
