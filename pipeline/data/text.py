"""Prepare a text corpus in bounded memory: normalise, drop short and repeated documents,
split, train a BPE tokenizer, pack sequences.

Prepare is a map over the source's units (files) followed by one merge:
- `clean_unit` (the map; in-process, or a Ray streaming task per file) cleans every document,
  hashes it, computes its MinHash band keys and split, and yields (hash, split, text, bands)
  record batches.
- `merge` (the driver) takes the batches in unit order, keeps the first copy of every hash
  (exact de-duplication) in a candidates file beside the output, then groups the candidates
  into near-duplicate clusters (documents sharing a band key, transitively) and writes each
  cluster to one split: the split of its member with the smallest hash, so a near-duplicate of
  a training document is never held out, and which split a cluster gets does not depend on
  file order. With `near_duplicates=drop` only that member is kept. A document keeps its own
  hash's split while it has no near-duplicate, but adding one can move the old members of its
  cluster (to the new member's split, when its hash is the smallest): no cluster rule keeps both
  old splits and clusters whole.
Nothing holds the corpus: the map holds one record batch; the merge one batch plus an 8-byte
hash per distinct document (about 70 bytes each in a Python set: 70 MB per million documents),
then, for the clusters, one band's keys at a time (8 bytes per document) and about 30 bytes per
document (hash, split, cluster label, the colliding pairs).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import zlib
from array import array
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
from pipeline.data.cleaning import clean_characters
from pipeline.data.splits import SPLITS, assign_split, check_splits, content_hash

EOS = "<|endoftext|>"
# A Hugging Face tokenizer's files (model.init_from's): copied as they are through prepare, shard and export.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PART_SCHEMA = pa.schema([("hash", pa.uint64()), ("split", pa.int8()), ("text", pa.string()),
                         ("bands", pa.list_(pa.uint64()))])
# MinHash over word 5-grams, 16 bands of 8 rows: two documents collide in some band with
# probability 1 - (1 - J^8)^16: 0.99 at Jaccard 0.85, 0.5 at 0.72, 0.06 at 0.5, 0.001 at 0.4.
_BANDS, _ROWS, _GRAM = 16, 8, 5
_SEEDS = np.random.default_rng(20261124).integers(1, 1 << 63, size=(_GRAM + 2 * _BANDS * _ROWS + _BANDS * _ROWS),
                                                  dtype=np.uint64) | 1  # odd 64-bit multipliers
_WORD_MIX, _PERM_A, _PERM_B, _BAND_MIX = np.split(_SEEDS, np.cumsum([_GRAM, _BANDS * _ROWS, _BANDS * _ROWS]))
TEXT_SCHEMA = pa.schema([("text", pa.string())])
# The exactly de-duplicated documents between merge's two passes: text and one column per band.
CANDIDATE_SCHEMA = pa.schema([("text", pa.string()), *((f"b{b}", pa.uint64()) for b in range(_BANDS))])
CANDIDATES = "_candidates.parquet"
BATCH = 8192  # documents per record batch (and Parquet row group) while streaming
BATCH_CHARS = 32 << 20  # ... or fewer, once they hold this many characters (documents of up to 1 MiB each)

def clean_text(doc: str) -> str:
    """Unicode NFC, control characters as line breaks or spaces, no lone surrogates, no trailing
    blanks on a line, no blank lines around the document; indentation and every other character
    kept (see `clean_document`)."""
    return clean_document(doc)[0]


def clean_document(doc: str) -> tuple[str, int]:
    """`clean_text` and the number of lone surrogates it dropped (counted in the statistics)."""
    doc, surrogates = clean_characters(doc)
    return "\n".join(line.rstrip() for line in doc.split("\n")).strip("\n"), surrogates


def clean_unit(job: tuple[str, TextDataConfig, int]) -> Iterator[pa.RecordBatch | dict[str, Any]]:
    """The map step for one source unit: yields its cleaned (hash, split, text, bands) rows as
    record batches, then a dict of counts with the sha256 of the raw documents as read (lineage)
    and how the file was decoded (`sources.decode_lines`). A file that is not text (binary, or no
    encoding fits) yields no rows: its dict names it under `refused`.

    The hash is of the stripped text, so copies that differ only in the blanks around them are
    exact duplicates. The split comes from `data.split.seed`, not the job's (top-level) seed,
    which stays in the job for the callers that pass it."""
    unit, cfg, _seed = job
    raw = hashlib.sha256()
    counts = {"documents_raw": 0, "dropped_short": 0, "dropped_surrogates": 0}
    decoding = sources.Decoding()
    split_ids = {s: i for i, s in enumerate(SPLITS)}
    rows: dict[str, Any] = {"hash": [], "split": [], "text": []}
    chars = 0  # in `rows`: a batch is bounded in characters too, so a file of long documents streams

    def batch() -> pa.RecordBatch:
        keys = minhash_keys(rows["text"])
        rows["bands"] = pa.ListArray.from_arrays(np.arange(0, keys.size + 1, _BANDS, dtype=np.int32),
                                                 pa.array(keys.ravel(), type=pa.uint64()))
        out = pa.RecordBatch.from_pydict(rows, schema=PART_SCHEMA)
        for column in ("hash", "split", "text"):
            rows[column] = []
        return out

    try:
        for doc in sources.read_text_unit(unit, cfg.text_field, cfg.encoding, decoding):
            counts["documents_raw"] += 1
            raw.update(doc.encode("utf-8", "surrogatepass"))  # as read: a lone surrogate hashes, not raises
            raw.update(b"\0")
            text, surrogates = clean_document(doc)
            counts["dropped_surrogates"] += surrogates
            if len(text) < cfg.min_chars:
                counts["dropped_short"] += 1
                continue
            digest = content_hash(text.strip().encode("utf-8"))
            rows["hash"].append(int(digest[:16], 16))
            rows["split"].append(split_ids[assign_split(digest, cfg.split)])
            rows["text"].append(text)
            chars += len(text)
            if len(rows["text"]) >= BATCH or chars >= BATCH_CHARS:
                yield batch()
                chars = 0
    except sources.RefusedFile as e:  # raised before the file's first document
        yield {**counts, "raw_sha256": raw.hexdigest(), "unit": unit, "refused": str(e),
               "near_duplicates": cfg.near_duplicates}
        return
    if rows["text"]:
        yield batch()
    yield {**counts, "raw_sha256": raw.hexdigest(), "unit": unit, "decoding": decoding.status,
           "encoding": decoding.encoding, "repaired_bytes": decoding.repaired_bytes,
           "null_values": decoding.null_values, "near_duplicates": cfg.near_duplicates}


def minhash_bands(text: str) -> list[int]:
    """LSH keys of one document (`minhash_keys` of a batch of one)."""
    return minhash_keys([text])[0].tolist()


_GRAM_CHUNK = 16384  # shingles per step: the 128 x chunk matrix is 16 MiB, however long a document


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, elementwise (wrapping uint64 arithmetic)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def minhash_keys(texts: list[str]) -> np.ndarray:
    """LSH keys of a batch of documents: per document a row of 16, one 64-bit key per band of
    its MinHash signature over word 5-grams. Documents sharing a key in a band are near
    duplicates. Stable across processes and machines (crc32 and seeded arithmetic only).

    Vectorised over the batch because every document is hashed (near-duplicates are clustered
    whether they are kept or dropped): a shingle's hash mixes its five words' crc32s (each word
    hashed once, not each shingle), and the 128 hash functions are multiply-shift, which needs
    no division."""
    if not texts:
        return np.empty((0, _BANDS), dtype=np.uint64)
    lengths, words_crc = [], []
    for text in texts:
        words = text.split()
        words_crc.extend(map(zlib.crc32, map(str.encode, words)))
        if len(words) < _GRAM:  # a short document is one shingle, padded
            words_crc.extend([0] * (_GRAM - len(words)))
        lengths.append(max(len(words), _GRAM))
    w = np.array(words_crc, dtype=np.uint64)
    grams = np.array(lengths) - (_GRAM - 1)  # shingles per document, one at least
    gram_starts = np.cumsum([0, *grams[:-1]])
    word_starts = np.cumsum([0, *lengths[:-1]])
    # a shingle at every word position of the batch, then the ones inside a document
    mixed = sum(w[j:len(w) - _GRAM + 1 + j] * _WORD_MIX[j] for j in range(_GRAM))
    h = _fmix64(mixed[np.arange(grams.sum()) + np.repeat(word_starts - gram_starts, grams)])
    sig = np.full((len(texts), _BANDS * _ROWS), np.iinfo(np.uint64).max, dtype=np.uint64)
    for a in range(0, len(h), _GRAM_CHUNK):
        b = min(a + _GRAM_CHUNK, len(h))
        block = _PERM_A[:, None] * h[None, a:b] + _PERM_B[:, None]  # (mod 2^64: the top bits are the hash)
        first = np.searchsorted(gram_starts, a, side="right") - 1  # the documents whose shingles are in a:b
        last = np.searchsorted(gram_starts, b - 1, side="right") - 1
        mins = np.minimum.reduceat(block, np.maximum(gram_starts[first:last + 1], a) - a, axis=1)
        sig[first:last + 1] = np.minimum(sig[first:last + 1], mins.T)
    # A band's key mixes its 8 minima (the top 32 bits of each) with odd multipliers: two different
    # bands collide with probability about 2^-63.
    sig >>= np.uint64(32)
    return (sig.reshape(len(texts), _BANDS, _ROWS) * _BAND_MIX.reshape(_BANDS, _ROWS)).sum(axis=2, dtype=np.uint64)


MAX_NAMED_FILES = 20  # refused / re-decoded / repaired files named in the statistics (all are counted)


def merge(stream: Iterable[pa.RecordBatch | dict[str, Any]], out_dir: Path,
          split_key: str = "tasks.lm.data.split") -> dict[str, Any]:
    """Write the map's output to `<split>.parquet` (in order within each split), keeping the
    first copy of each document and giving every near-duplicate cluster one split; with
    `data.near_duplicates=drop` (which each unit's counts carry), one document per cluster.
    Returns the statistics; `raw_sha256` chains the units' raw hashes in order.

    Two passes, because a cluster's split is known only once all of its members are: the first
    keeps the exact-deduplicated documents in a candidates file in `out_dir` (removed after), the
    second finds the clusters (`_clusters`) and writes each document to its cluster's split.

    Besides the documents per rule (read, too short, duplicate, near-duplicate, per split) the
    statistics count the files read, repaired (UTF-8 with stray bytes), re-decoded (another
    encoding) and refused (not text), naming the first few of each, and the documents whose split
    is their cluster's rather than their own hash's; a refused file is also reported on stderr.
    No training document left is an error that says which rule took them, and an empty val or
    test split one that names `split_key` and the counts."""
    seen: set[int] = set()
    hashes, splits = array("Q"), array("b")  # per candidate, in order
    raw = hashlib.sha256()
    stats: dict[str, Any] = {"documents_raw": 0, "dropped_short": 0, "dropped_duplicates": 0,
                             "dropped_near_duplicates": 0, "near_duplicate_clusters": 0, "dropped_surrogates": 0,
                             **{f"documents_{s}": 0 for s in SPLITS}, **{f"chars_{s}": 0 for s in SPLITS},
                             "files_read": 0, "files_repaired": 0, "files_redecoded": 0, "files_refused": 0,
                             "bytes_repaired": 0, "skipped_null_values": 0}
    named: dict[str, list[str]] = {"repaired_files": [], "redecoded_files": [], "refused_files": []}
    candidates = out_dir / CANDIDATES
    drop = False
    try:
        with pq.ParquetWriter(candidates, CANDIDATE_SCHEMA, compression="zstd") as writer:
            for item in stream:
                if isinstance(item, dict):  # the end of one unit
                    _count_unit(item, stats, named)
                    drop = item.get("near_duplicates") == "drop"
                    raw.update(bytes.fromhex(item["raw_sha256"]))
                    continue
                keep = np.zeros(item.num_rows, dtype=bool)
                for i, h in enumerate(item.column(0).to_pylist()):
                    if h in seen:
                        stats["dropped_duplicates"] += 1
                    else:
                        seen.add(h)
                        keep[i] = True
                kept = item.filter(pa.array(keep))
                hashes.frombytes(kept.column(0).to_numpy().tobytes())
                splits.frombytes(kept.column(1).to_numpy().tobytes())
                bands = kept.column(3).flatten().to_numpy().reshape(-1, _BANDS)
                writer.write_table(pa.table([kept.column(2), *bands.T], schema=CANDIDATE_SCHEMA))
        del seen
        h = np.frombuffer(hashes, dtype=np.uint64)
        labels = _clusters(candidates, len(h))
        # Per cluster, the member with the smallest hash: its split is the cluster's, and it is
        # the one document `drop` keeps. Neither depends on the order the files were read in, but
        # both depend on the members: a new near-duplicate with a smaller hash moves its cluster.
        order = np.lexsort((h, labels))
        first = np.ones(len(order), dtype=bool)
        first[1:] = labels[order][1:] != labels[order][:-1]
        chosen = order[first]  # indexed by cluster label (labels are 0 .. clusters - 1)
        sizes = np.bincount(labels)
        stats["near_duplicate_clusters"] = int((sizes > 1).sum())
        # (clusters are chains of band collisions: a very large one, all in one split, shows here)
        stats["largest_near_duplicate_cluster"] = int(sizes.max()) if len(sizes) else 0
        own = np.frombuffer(splits, dtype=np.int8)
        split = own[chosen][labels]
        keep = np.ones(len(h), dtype=bool)
        if drop:
            keep[:] = False
            keep[chosen] = True
            stats["dropped_near_duplicates"] = len(h) - len(chosen)
        # (placed by their cluster against their own hash: what adding near-duplicates can do to a split)
        stats["documents_split_by_cluster"] = int((keep & (split != own)).sum())
        _write_splits(candidates, out_dir, keep, split, stats)
    finally:
        candidates.unlink(missing_ok=True)
    stats.update({k: v for k, v in named.items() if v})
    if not stats["documents_train"]:
        raise ValueError(_nothing_left(stats))
    check_splits({s: stats[f"documents_{s}"] for s in SPLITS}, split_key, "documents")
    stats["raw_sha256"] = raw.hexdigest()
    return stats


def _clusters(candidates: Path, n: int) -> np.ndarray:
    """Near-duplicate cluster label (0 .. clusters - 1) of each of the `n` candidate documents:
    the connected components of "shares a MinHash band key". One band's keys are read at a
    time, so memory is 8 bytes per document for the keys plus the colliding pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    src, dst = [], []
    for b in range(_BANDS):
        keys = pq.read_table(candidates, columns=[f"b{b}"]).column(0).to_numpy()
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]
        src.append(order[:-1][same])
        dst.append(order[1:][same])
        del keys, order, same
    u, v = np.concatenate(src), np.concatenate(dst)
    if not len(u):
        return np.arange(n)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))  # a pair repeats in 16 bands at most
    return connected_components(graph, directed=False)[1]


def _write_splits(candidates: Path, out_dir: Path, keep: np.ndarray, split: np.ndarray,
                  stats: dict[str, Any]) -> None:
    """The second pass: the candidates, in order, appended to their `<split>.parquet`."""
    writers = {s: pq.ParquetWriter(out_dir / f"{s}.parquet", TEXT_SCHEMA, compression="zstd") for s in SPLITS}
    try:
        start = 0
        for batch in pq.ParquetFile(candidates, pre_buffer=False).iter_batches(batch_size=BATCH, columns=["text"]):
            end = start + batch.num_rows
            for i, s in enumerate(SPLITS):
                texts = batch.column(0).filter(pa.array(keep[start:end] & (split[start:end] == i)))
                if len(texts):
                    writers[s].write_table(pa.table({"text": texts}, schema=TEXT_SCHEMA))
                    stats[f"documents_{s}"] += len(texts)
                    stats[f"chars_{s}"] += int(pc.sum(pc.utf8_length(texts)).as_py())
            start = end
    finally:
        for w in writers.values():
            w.close()


def _count_unit(item: dict[str, Any], stats: dict[str, Any], named: dict[str, list[str]]) -> None:
    """Add one unit's end-of-unit counts to the statistics."""
    stats["documents_raw"] += item["documents_raw"]
    stats["dropped_short"] += item["dropped_short"]
    stats["dropped_surrogates"] += item.get("dropped_surrogates", 0)
    unit = item.get("unit", "?")
    if item.get("refused"):
        print(f"warning: prepare skipped {item['refused']}", file=sys.stderr, flush=True)
        kind, note = "refused", item["refused"].removeprefix(f"{unit}: ")
    else:
        stats["files_read"] += 1
        stats["bytes_repaired"] += item.get("repaired_bytes", 0)
        stats["skipped_null_values"] += item.get("null_values", 0)  # records whose text was null
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
    Special tokens written inside a document (a literal `<|endoftext|>`) are encoded as the text
    they are (`_tokenizer`): the only separator is the one appended here.

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
    """The tokenizer that encodes documents: special tokens in the text are plain text
    (`encode_special_tokens`), or a document quoting `<|endoftext|>` would get a false document
    boundary and decode to something else than it is."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    return tok


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
