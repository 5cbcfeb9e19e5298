"""Prepare a text corpus in bounded memory: normalise, drop short and repeated documents,
split, train a BPE tokenizer, pack sequences.

Prepare is a map over the source's units (files) followed by one merge:
- `clean_unit` (the map; in-process, or a Ray streaming task per file) cleans every document,
  hashes it, picks its split and yields (hash, split, text) record batches.
- `merge` (the driver) takes the batches in unit order, keeps the first copy of every hash
  and appends the kept rows to one Parquet file per split.
Nothing holds the corpus: the map holds one record batch, the merge one batch plus an 8-byte
hash per distinct document (about 70 bytes each in a Python set: 70 MB per million documents).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config.schema import TextDataConfig
from pipeline.data import sources
from pipeline.data.splits import SPLITS, assign_split, content_hash

EOS = "<|endoftext|>"
# A Hugging Face tokenizer's files (model.init_from's): copied as they are through prepare, shard and export.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_SPACES = re.compile(r"[ \t\u00a0]+")
PART_SCHEMA = pa.schema([("hash", pa.uint64()), ("split", pa.int8()), ("text", pa.string()),
                         ("bands", pa.list_(pa.uint64()))])
# MinHash over word 5-grams, 16 bands of 8 rows: two documents collide in some band with
# probability 1 - (1 - J^8)^16: 0.99 at Jaccard 0.85, 0.5 at 0.72, 0.06 at 0.5, 0.001 at 0.4.
_BANDS, _ROWS, _PRIME = 16, 8, 4294967311
_PERM = np.random.default_rng(20261124).integers(1, 1 << 32, size=(2, _BANDS * _ROWS), dtype=np.uint64)
TEXT_SCHEMA = pa.schema([("text", pa.string())])
BATCH = 8192  # documents per record batch (and Parquet row group) while streaming


def clean_text(doc: str) -> str:
    """Unicode NFC, no control characters, single spaces, no trailing blanks; newlines kept."""
    doc = unicodedata.normalize("NFC", doc)
    if not doc.replace("\n", "").replace("\t", "").isprintable():  # the per-character pass only when needed
        doc = "".join(ch for ch in doc if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    lines = [_single_spaces(line).rstrip() for line in doc.split("\n")]
    return "\n".join(lines).strip("\n")


def _single_spaces(line: str) -> str:
    """Runs of blanks as one space. Most lines have none to change, and finding that out with
    `in` is ~15x faster than the regex's scan (prepare of a 1 GiB corpus spent a quarter of its
    time here)."""
    if "  " in line or "\t" in line or "\u00a0" in line:
        return _SPACES.sub(" ", line)
    return line


def clean_unit(job: tuple[str, TextDataConfig, int]) -> Iterator[pa.RecordBatch | dict[str, Any]]:
    """The map step for one source unit: yields its cleaned (hash, split, text) rows as record
    batches, then a dict of counts with the sha256 of the raw documents as read (lineage) and
    how the file was decoded (`sources.decode_lines`). A file that is not text (binary, or no
    encoding fits) yields no rows: its dict names it under `refused`."""
    unit, cfg, seed = job
    raw = hashlib.sha256()
    counts = {"documents_raw": 0, "dropped_short": 0}
    decoding = sources.Decoding()
    split_ids = {s: i for i, s in enumerate(SPLITS)}
    rows: dict[str, list] = {"hash": [], "split": [], "text": [], "bands": []}

    def batch() -> pa.RecordBatch:
        out = pa.RecordBatch.from_pydict(rows, schema=PART_SCHEMA)
        for v in rows.values():
            v.clear()
        return out

    try:
        for doc in sources.read_text_unit(unit, cfg.text_field, cfg.encoding, decoding):
            counts["documents_raw"] += 1
            raw.update(doc.encode("utf-8"))
            raw.update(b"\0")
            text = clean_text(doc)
            if len(text) < cfg.min_chars:
                counts["dropped_short"] += 1
                continue
            digest = content_hash(text.encode("utf-8"))
            rows["hash"].append(int(digest[:16], 16))
            rows["split"].append(split_ids[assign_split(digest, cfg.split, seed)])
            rows["text"].append(text)
            rows["bands"].append(minhash_bands(text) if cfg.near_duplicates == "drop" else None)
            if len(rows["text"]) >= BATCH:
                yield batch()
    except sources.RefusedFile as e:  # raised before the file's first document
        yield {**counts, "raw_sha256": raw.hexdigest(), "unit": unit, "refused": str(e)}
        return
    if rows["text"]:
        yield batch()
    yield {**counts, "raw_sha256": raw.hexdigest(), "unit": unit, "decoding": decoding.status,
           "encoding": decoding.encoding, "repaired_bytes": decoding.repaired_bytes}


def minhash_bands(text: str) -> list[int]:
    """LSH keys of a document: one 64-bit key per band of its MinHash signature over word
    5-grams (crc32 per shingle, seeded universal hashes). Documents sharing a key are near
    duplicates. Stable across processes and machines."""
    words = text.split()
    grams = [" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))]
    h = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))
    sig = ((_PERM[0][:, None] * h[None, :] + _PERM[1][:, None]) % _PRIME).min(axis=1)
    return [int.from_bytes(hashlib.blake2b(sig[b * _ROWS:(b + 1) * _ROWS].tobytes() + bytes([b]),
                                           digest_size=8).digest(), "little") for b in range(_BANDS)]


MAX_NAMED_FILES = 20  # refused / re-decoded / repaired files named in the statistics (all are counted)


def merge(stream: Iterable[pa.RecordBatch | dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Write the map's output, in order, to `<split>.parquet`, keeping the first copy of each
    document. Returns the statistics; `raw_sha256` chains the units' raw hashes in order.

    Besides the documents per rule (read, too short, duplicate, near-duplicate, per split) the
    statistics count the files read, repaired (UTF-8 with stray bytes), re-decoded (another
    encoding) and refused (not text), naming the first few of each; a refused file is also
    reported on stderr. No training document left is an error that says which rule took them."""
    seen: set[int] = set()
    seen_bands: set[int] = set()  # MinHash band keys of the kept documents (near-duplicates only)
    raw = hashlib.sha256()
    stats: dict[str, Any] = {"documents_raw": 0, "dropped_short": 0, "dropped_duplicates": 0,
                             "dropped_near_duplicates": 0,
                             **{f"documents_{s}": 0 for s in SPLITS}, **{f"chars_{s}": 0 for s in SPLITS},
                             "files_read": 0, "files_repaired": 0, "files_redecoded": 0, "files_refused": 0,
                             "bytes_repaired": 0}
    named: dict[str, list[str]] = {"repaired_files": [], "redecoded_files": [], "refused_files": []}
    writers = {s: pq.ParquetWriter(out_dir / f"{s}.parquet", TEXT_SCHEMA, compression="zstd") for s in SPLITS}
    try:
        for item in stream:
            if isinstance(item, dict):  # the end of one unit
                _count_unit(item, stats, named)
                raw.update(bytes.fromhex(item["raw_sha256"]))
                continue
            keep = np.zeros(item.num_rows, dtype=bool)
            bands = item.column(3).to_pylist()
            for i, h in enumerate(item.column(0).to_pylist()):
                if h in seen:
                    stats["dropped_duplicates"] += 1
                elif bands[i] is not None and not seen_bands.isdisjoint(bands[i]):
                    stats["dropped_near_duplicates"] += 1
                else:
                    seen.add(h)
                    seen_bands.update(bands[i] or ())
                    keep[i] = True
            split = item.column(1).to_numpy()
            for i, s in enumerate(SPLITS):
                texts = item.column(2).filter(pa.array(keep & (split == i)))
                if len(texts):
                    writers[s].write_table(pa.table({"text": texts}, schema=TEXT_SCHEMA))
                    stats[f"documents_{s}"] += len(texts)
                    stats[f"chars_{s}"] += int(pc.sum(pc.utf8_length(texts)).as_py())
    finally:
        for w in writers.values():
            w.close()
    stats.update({k: v for k, v in named.items() if v})
    if not stats["documents_train"]:
        raise ValueError(_nothing_left(stats))
    stats["raw_sha256"] = raw.hexdigest()
    return stats


def _count_unit(item: dict[str, Any], stats: dict[str, Any], named: dict[str, list[str]]) -> None:
    """Add one unit's end-of-unit counts to the statistics."""
    stats["documents_raw"] += item["documents_raw"]
    stats["dropped_short"] += item["dropped_short"]
    unit = item.get("unit", "?")
    if item.get("refused"):
        print(f"warning: prepare skipped {item['refused']}", file=sys.stderr, flush=True)
        kind, note = "refused", item["refused"].removeprefix(f"{unit}: ")
    else:
        stats["files_read"] += 1
        stats["bytes_repaired"] += item.get("repaired_bytes", 0)
        if item.get("decoding") == "repaired":
            kind, note = "repaired", f"{item['repaired_bytes']} bytes read as cp1252"
        elif item.get("decoding") == "re-decoded":
            kind, note = "redecoded", item["encoding"]
        else:
            return
    stats[f"files_{kind}"] += 1
    if len(named[f"{kind}_files"]) < MAX_NAMED_FILES:
        named[f"{kind}_files"].append(f"{unit} ({note})")


def _nothing_left(stats: dict[str, Any]) -> str:
    """The one-line error for a corpus with no training document left: what each rule took."""
    files = stats["files_read"] + stats["files_refused"]
    held = stats["documents_val"] + stats["documents_test"]
    msg = (f"no training documents left: read {stats['documents_raw']} documents from {stats['files_read']} of "
           f"{files} files; dropped {stats['dropped_short']} too short (data.min_chars), "
           f"{stats['dropped_duplicates']} exact duplicates, {stats['dropped_near_duplicates']} near-duplicates "
           f"(data.near_duplicates); {held} held out for val/test (data.split)")
    if stats["files_refused"]:
        msg += f"; refused {stats['files_refused']} files that are not text: " + ", ".join(stats["refused_files"])
    return msg


def iter_documents(path: Path, batch_size: int = BATCH) -> Iterator[list[str]]:
    """Batches of documents from a prepared split file."""
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_size, columns=["text"]):
        yield batch.column("text").to_pylist()


# BPE training slows down badly on one very long word (a line of 200,000 'x' takes 40 s, of a
# million never ends): the trainer sees runs of non-space characters cut to this length.
MAX_WORD_CHARS = 256
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


def _capped_words(doc: str) -> list[str]:
    """`doc` as the tokenizer trainer sees it: in pieces cut inside every whitespace-free run
    longer than `MAX_WORD_CHARS`, so no piece holds a longer one (a document without such a
    run, nearly every one, stays whole). Only training sees the pieces; encoding is unchanged."""
    pieces, start = [], 0
    for run in _LONG_WORD.finditer(doc):
        for cut in range(run.start() + MAX_WORD_CHARS, run.end(), MAX_WORD_CHARS):
            pieces.append(doc[start:cut])
            start = cut
    pieces.append(doc[start:])
    return pieces


def train_tokenizer(train_split: Path, vocab_size: int, path: Path, max_chars: int, total_chars: int) -> int:
    """Byte-level BPE on the training split only (no look at val/test), saved as tokenizer.json.

    The trainer's memory grows with the distinct words it sees, so a split larger than
    `max_chars` is sampled: every k-th document, spread over the whole split (SentencePiece's
    `input_sentence_size` does the same). Words longer than `MAX_WORD_CHARS` are cut for
    training (`_capped_words`). Returns the number of documents trained on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stride = max(1, -(-total_chars // max_chars))
    used = 0

    def sample() -> Iterator[list[str]]:
        nonlocal used
        index = 0
        for docs in iter_documents(train_split):
            picked = docs[(-index) % stride::stride]
            index += len(docs)
            used += len(picked)
            yield [piece for doc in picked for piece in _capped_words(doc)]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample(), trainer=trainer)
    tok.save(str(path))
    return used


def encode(job: tuple[list[str], str, str]) -> np.ndarray:
    """Token ids of a batch of documents, each followed by the `eos` token (the shard stage's
    map step). A tokenizer with a post-processor (a Llama tokenizer's BOS) applies it per document.

    The tokenizer travels as its JSON text, so a Ray task on another node needs no file."""
    docs, tokenizer_json, eos_token = job
    tok = _tokenizer(tokenizer_json)
    eos = tok.token_to_id(eos_token)
    # An Encoding holds strings and offsets per token: encode a few hundred documents at a time
    # (without offsets) so the transient memory stays small.
    return np.concatenate([
        np.fromiter(chain.from_iterable(chain(e.ids, (eos,)) for e in tok.encode_batch_fast(docs[i:i + 512])),
                    dtype=np.int32)
        for i in range(0, len(docs), 512)])


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def copy_hf_tokenizer(folder: Path, out_dir: Path, key: str = "tasks.lm.model.init_from") -> dict[str, Any]:
    """Use a Hugging Face checkpoint's tokenizer instead of training one: copy its files into
    `out_dir` and return the statistics prepare records (its sha256, the document separator).

    The separator is the checkpoint's eos token (tokenizer_config.json, else config.json's
    eos_token_id). A folder without `tokenizer.json` (a slow, SentencePiece-only tokenizer) is
    an error saying how to convert it."""
    import json

    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{key}: {folder} has no tokenizer.json (a fast tokenizer): convert it once with "
                         "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    for name in HF_TOKENIZER_FILES:
        if (folder / name).is_file():
            (out_dir / name).write_bytes((folder / name).read_bytes())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() \
        else {}
    eos = tcfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None and (folder / "config.json").is_file():
        eos_id = json.loads((folder / "config.json").read_text()).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
        eos = tok.id_to_token(eos_id) if eos_id is not None else None
    if eos is None or tok.token_to_id(eos) is None:
        raise ValueError(f"{key}: {folder}: no eos token the tokenizer knows (tokenizer_config.json eos_token, "
                         "config.json eos_token_id): documents need a separator")
    return {"tokenizer_source": str(folder), "eos_token": eos, "tokenizer_documents": 0}


def pack_sequences(id_blocks: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Join token id blocks and yield them as disjoint rows of seq_len + 1 tokens (the tail that
    does not fill a row carries over to the next block; the final one is dropped)."""
    row = seq_len + 1
    carry = np.empty(0, dtype=np.int32)
    for ids in id_blocks:
        ids = np.concatenate([carry, ids])
        n = len(ids) // row
        carry = ids[n * row:]
        if n:
            yield ids[: n * row].reshape(n, row)
