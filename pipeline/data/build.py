"""The prepare and shard steps for both data kinds, as the stages call them.

prepare: raw source -> cleaned, de-duplicated, split (and augmented / tokenizer-trained) files
         plus statistics.
shard:   prepared files -> fixed-size Arrow IPC shards with a manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.atomic import atomic_dir, file_sha256
from pipeline.config.schema import ImageDataConfig, TextDataConfig
from pipeline.data import image_sources, images, sources, text
from pipeline.data.parallel import ordered_flatmap, ordered_map
from pipeline.data.shard_format import MANIFEST
from pipeline.data.shard_writer import write_splits
from pipeline.data.splits import SPLITS
from pipeline.progress import counting

TOKENIZER, STATS = "tokenizer.json", "stats.json"


def prepare(cfg: TextDataConfig | ImageDataConfig, seed: int, out_dir: Path,
            tokenizer_from: Path | None = None, task: str | None = None) -> dict[str, Any]:
    """Write the prepared splits to `out_dir` (atomically) and return the statistics. Text
    gets a BPE tokenizer trained on its training split, or `tokenizer_from`'s (a Hugging Face
    checkpoint folder's, when the model starts from one). `task` names the config key an empty
    split is refused under (`tasks.<task>.data.split`)."""
    with atomic_dir(out_dir) as tmp:
        if isinstance(cfg, TextDataConfig):
            units = sources.text_units(cfg.source)
            with counting("[prepare]", "reading and cleaning", len(units), "files") as counter:
                cleaned = ordered_flatmap(text.clean_unit, ((u, cfg, seed) for u in units), cfg.ray,
                                          done=counter.step)  # (a file counts once its documents are in)
                stats = text.merge(cleaned, tmp, **split_key(task))
            if tokenizer_from is not None:
                stats.update(text.copy_hf_tokenizer(Path(tokenizer_from), tmp))
            else:
                stats["tokenizer_documents"] = text.train_tokenizer(tmp / "train.parquet", cfg.vocab_size,
                                                                    tmp / TOKENIZER, cfg.tokenizer_max_chars,
                                                                    stats["chars_train"])
            stats["tokenizer_sha256"] = file_sha256(tmp / TOKENIZER)
            stats["source_units"] = len(units)
        else:
            raw = hashlib.sha256()  # of the raw examples as read, in order: the "raw data" of lineage
            raw_x, raw_y, n_classes = image_sources.read_images(cfg.source)
            raw.update(np.ascontiguousarray(raw_x).data)  # the array's own bytes, not a copy of them
            raw.update(np.ascontiguousarray(raw_y).data)
            splits_img, stats = images.prepare_images(raw_x, raw_y, cfg, seed, **split_key(task))
            stats["num_classes"] = n_classes
            stats["raw_sha256"] = raw.hexdigest()
            for name, (x, y) in splits_img.items():
                np.savez(tmp / f"{name}.npz", images=x.astype(np.float32, copy=False), labels=y)
        stats["source"] = cfg.source
        (tmp / STATS).write_text(json.dumps(stats, indent=2, sort_keys=True))
    return stats


def _token_rows(cfg: TextDataConfig, split_file: Path, tokenizer_json: str,
                eos: str) -> Iterator[dict[str, np.ndarray]]:
    total = pq.ParquetFile(split_file).metadata.num_rows
    sizes: deque[int] = deque()  # documents per batch handed out, in order

    def batches() -> Iterator[tuple[list[str], str, str]]:
        for docs in text.iter_documents(split_file):
            sizes.append(len(docs))
            yield docs, tokenizer_json, eos

    with counting("[shard]", f"tokenizing {split_file.stem}", total, "docs") as bar:
        def encoded() -> Iterator[Any]:
            for batch in ordered_map(text.encode, batches(), cfg.ray):
                bar.step(sizes.popleft())  # counted encoded, not handed to Ray (a window of batches ahead)
                yield batch

        for block in text.pack_sequences(encoded(), cfg.seq_len):
            yield {"tokens": block}


def shard(cfg: TextDataConfig | ImageDataConfig, prepared: Path, out_dir: Path) -> Path:
    """Write the shards and manifest; returns the manifest path. Text streams: one batch of
    documents and one shard of rows at a time."""
    from pipeline.training.checkpoint import read_json

    stats = read_json(prepared / STATS, "prepare")
    tokenizer = b""
    if isinstance(cfg, TextDataConfig):
        # read once: the bytes the rows are encoded with are the bytes hashed and shipped
        tokenizer = (prepared / TOKENIZER).read_bytes()
        tokenizer_json = tokenizer.decode()
        eos = stats.get("eos_token", text.EOS)
        splits = {s: _token_rows(cfg, prepared / f"{s}.parquet", tokenizer_json, eos) for s in SPLITS}
        from tokenizers import Tokenizer

        meta = {"kind": "text", "seq_len": cfg.seq_len,
                "vocab_size": Tokenizer.from_str(tokenizer_json).get_vocab_size(),
                "tokenizer_sha256": hashlib.sha256(tokenizer).hexdigest(), "eos_token": eos}
    else:
        splits, image_shape = {}, None
        for s in SPLITS:
            with np.load(prepared / f"{s}.npz") as z:
                x, y = z["images"].astype(np.float32, copy=False), z["labels"]
            cols = {"image": x, "label": y}
            if s == "train" and cfg.balance == "weights":  # the loss weighs each example by its class
                cols["weight"] = images.class_weights(y, stats["num_classes"])
            splits[s] = [cols]
            image_shape = image_shape or list(x.shape[1:])
        meta = {"kind": "images", "image_shape": image_shape, "num_classes": stats["num_classes"]}
    meta.update({"source": stats["source"], "raw_sha256": stats.get("raw_sha256"),  # lineage back to raw data
                 # what prepare read, repaired and dropped: the train stage logs these to MLflow (data/*)
                 "prepare_counts": {k: v for k, v in sorted(stats.items())
                                    if isinstance(v, int) and not isinstance(v, bool)}})
    # The tokenizer travels with the shards it encoded, inside the same atomic swap: written after
    # it, a crash would leave new shards beside a missing or truncated tokenizer and the old
    # folder gone.
    with atomic_dir(out_dir) as tmp:
        write_splits(tmp, splits, cfg.shard_rows, meta, cfg.shard_compression)
        if isinstance(cfg, TextDataConfig):
            copy_tokenizer(prepared, tmp, tokenizer)
    return out_dir / MANIFEST


def copy_tokenizer(prepared: Path, out_dir: Path, tokenizer: bytes) -> None:
    """Put the tokenizer files beside the shards: tokenizer.json as the bytes the manifest's
    `tokenizer_sha256` hashes, the others (a Hugging Face tokenizer's config) as prepare left them."""
    (out_dir / TOKENIZER).write_bytes(tokenizer)
    for name in text.HF_TOKENIZER_FILES:
        if name != TOKENIZER and (prepared / name).is_file():
            (out_dir / name).write_bytes((prepared / name).read_bytes())


def split_key(task: str | None) -> dict[str, str]:
    """The `split_key` argument naming `tasks.<task>.data.split`, where the task is known."""
    return {"split_key": f"tasks.{task}.data.split"} if task else {}


def file_md5(path: Path) -> str:
    """DVC's hash of a single file (plain md5 of its bytes), for lineage tags that match dvc.lock."""
    h = hashlib.md5()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
