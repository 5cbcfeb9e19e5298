"""Prepare a text corpus: normalise, de-duplicate, split, train a BPE tokenizer, pack sequences."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.config.schema import TextDataConfig
from pipeline.data.splits import SPLITS, Deduper, assign_split, content_hash

EOS = "<|endoftext|>"
_SPACES = re.compile(r"[ \t\u00a0]+")


def clean_text(doc: str) -> str:
    """Unicode NFC, no control characters, single spaces, no trailing blanks; newlines kept."""
    doc = unicodedata.normalize("NFC", doc)
    doc = "".join(ch for ch in doc if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [_SPACES.sub(" ", line).rstrip() for line in doc.split("\n")]
    return "\n".join(lines).strip("\n")


def prepare_text(docs: Iterable[str], cfg: TextDataConfig, seed: int) -> tuple[dict[str, list[str]], dict]:
    """Clean, drop short and repeated documents, and split them. Returns the splits and statistics."""
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    dedupe = Deduper()
    raw = short = 0
    for doc in docs:
        raw += 1
        text = clean_text(doc)
        if len(text) < cfg.min_chars:
            short += 1
            continue
        digest = content_hash(text.encode())
        if dedupe.seen(digest):
            continue
        splits[assign_split(digest, cfg.split, seed)].append(text)
    if not splits["train"]:
        raise ValueError("no training documents left after cleaning: is data.source empty or data.min_chars too high?")
    stats = {
        "documents_raw": raw,
        "dropped_short": short,
        "dropped_duplicates": dedupe.duplicates,
        **{f"documents_{s}": len(v) for s, v in splits.items()},
        **{f"chars_{s}": sum(map(len, v)) for s, v in splits.items()},
    }
    return splits, stats


def train_tokenizer(train_docs: list[str], vocab_size: int, path: Path) -> None:
    """Byte-level BPE on the training split only (no look at val/test), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    tok.save(str(path))


def pack_sequences(docs: list[str], tokenizer_path: Path, seq_len: int) -> np.ndarray:
    """Tokenize, join documents with EOS and cut into disjoint rows of seq_len + 1 tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    row = seq_len + 1
    n = len(ids) // row
    if n == 0:
        raise ValueError(f"split has {len(ids)} tokens, fewer than one sequence of {row}: lower data.seq_len")
    return np.asarray(ids[: n * row], dtype=np.int32).reshape(n, row)
