"""The prepare and shard steps for both data kinds, as the stages call them.

prepare: raw source -> cleaned, de-duplicated, split (and augmented / tokenizer-trained) files
         plus statistics.
shard:   prepared files -> fixed-size Parquet shards with a manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_dir
from pipeline.config.schema import ImageDataConfig, TextDataConfig
from pipeline.data import images, sources, text
from pipeline.data.shards import sha256_file, write_dataset
from pipeline.data.splits import SPLITS

TOKENIZER, STATS = "tokenizer.json", "stats.json"


def _hashed(docs: Iterable[str], h: Any) -> Iterator[str]:
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
        yield doc


def prepare(cfg: TextDataConfig | ImageDataConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """Write the prepared splits to `out_dir` (atomically) and return the statistics."""
    raw = hashlib.sha256()  # of the raw examples as read, in order: the "raw data" of lineage
    with atomic_dir(out_dir) as tmp:
        if isinstance(cfg, TextDataConfig):
            docs = _hashed(sources.read_text_documents(cfg.source, cfg.text_field), raw)
            splits, stats = text.prepare_text(docs, cfg, seed)
            for name, docs in splits.items():
                pq.write_table(pa.table({"text": docs}), tmp / f"{name}.parquet")
            text.train_tokenizer(splits["train"], cfg.vocab_size, tmp / TOKENIZER)
            stats["tokenizer_sha256"] = sha256_file(tmp / TOKENIZER)
        else:
            raw_x, raw_y, n_classes = sources.read_images(cfg.source)
            raw.update(np.ascontiguousarray(raw_x).tobytes())
            raw.update(np.ascontiguousarray(raw_y).tobytes())
            splits_img, stats = images.prepare_images(raw_x, raw_y, cfg, seed)
            stats["num_classes"] = n_classes
            for name, (x, y) in splits_img.items():
                np.savez(tmp / f"{name}.npz", images=x.astype(np.float32), labels=y)
        stats["source"] = cfg.source
        stats["raw_sha256"] = raw.hexdigest()
        (tmp / STATS).write_text(json.dumps(stats, indent=2, sort_keys=True))
    return stats


def shard(cfg: TextDataConfig | ImageDataConfig, prepared: Path, out_dir: Path) -> Path:
    """Write the shards and manifest; returns the manifest path."""
    stats = json.loads((prepared / STATS).read_text())
    if isinstance(cfg, TextDataConfig):
        tok = prepared / TOKENIZER
        columns = {}
        for s in SPLITS:
            docs = pq.read_table(prepared / f"{s}.parquet").column("text").to_pylist()
            rows = text.pack_sequences(docs, tok, cfg.seq_len)
            columns[s] = {"id": np.arange(len(rows), dtype=np.int64), "tokens": rows}
        from tokenizers import Tokenizer

        meta = {"kind": "text", "seq_len": cfg.seq_len, "vocab_size": Tokenizer.from_file(str(tok)).get_vocab_size(),
                "tokenizer_sha256": sha256_file(tok)}
    else:
        columns = {}
        for s in SPLITS:
            with np.load(prepared / f"{s}.npz") as z:
                x, y = z["images"], z["labels"]
            columns[s] = {"id": np.arange(len(y), dtype=np.int64), "image": x.astype(np.float32), "label": y}
        meta = {"kind": "images", "image_shape": list(columns["train"]["image"].shape[1:]),
                "num_classes": stats["num_classes"]}
    meta.update({"source": stats["source"], "raw_sha256": stats.get("raw_sha256")})  # lineage back to raw data
    manifest = write_dataset(out_dir, columns, cfg.shard_rows, meta)
    if isinstance(cfg, TextDataConfig):  # the tokenizer travels with the shards it encoded
        (out_dir / TOKENIZER).write_bytes((prepared / TOKENIZER).read_bytes())
    return manifest


def file_md5(path: Path) -> str:
    """DVC's hash of a single file (plain md5 of its bytes), for lineage tags that match dvc.lock."""
    h = hashlib.md5()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
