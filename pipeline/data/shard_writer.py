"""Writing a shard folder: column batches in, fixed-size Arrow IPC shards and their manifest out.

Kept apart from reading because the shard stage is its only user, and because what it
guarantees is about writing: bounded memory (at most one shard of rows pending), and a folder
that appears complete or not at all (a crash mid-write leaves the previous one intact). The
size and sha256 it records per shard are what `shard_verify` checks later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.atomic import atomic_dir, file_sha256
from pipeline.data.shard_format import MANIFEST, SUFFIX, to_table


class SplitWriter:
    """Streams column batches into shards of exactly `shard_rows` rows (the last may be shorter).

    An `id` column (the row's position in the split) is added, so readers and tests can name
    every sample. At most one shard of rows is held in memory.
    """

    def __init__(self, out_dir: Path, split: str, shard_rows: int, compression: str = "none") -> None:
        self.out_dir, self.split, self.shard_rows = Path(out_dir), split, shard_rows
        self.options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
        self.rows = 0
        self.shards: list[dict[str, Any]] = []
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._columns: dict[str, dict[str, Any]] | None = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        n = len(next(iter(columns.values())))
        if not n:
            return
        cols = {"id": np.arange(self.rows + self._pending_rows, self.rows + self._pending_rows + n, dtype=np.int64),
                **columns}
        if self._columns is None:
            self._columns = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in cols.items()}
        self._pending.append(cols)
        self._pending_rows += n
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        # One pending block is sliced, not copied: a large batch is cut into shards without
        # re-copying its remainder for every shard.
        joined = self._pending[0] if len(self._pending) == 1 else {
            k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
        part = {k: v[:rows] for k, v in joined.items()}
        rest = {k: v[rows:] for k, v in joined.items()}
        name = f"{self.split}-{len(self.shards):05d}{SUFFIX}"
        path = self.out_dir / name
        table = to_table(part)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=self.options) as w:
            w.write_table(table)
        self.shards.append({"file": name, "rows": rows, "sha256": file_sha256(path), "bytes": path.stat().st_size})
        self.rows += rows
        self._pending_rows -= rows
        self._pending = [rest] if self._pending_rows else []

    def close(self) -> dict[str, Any]:
        """Write the remaining rows; returns the split's manifest entry."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self.rows:
            raise ValueError(f"split '{self.split}' has no rows to shard: too little data (text: fewer tokens "
                             "than one sequence; lower data.seq_len or add documents)")
        return {"rows": self.rows, "shards": self.shards, "columns": self._columns}


def write_dataset(out_dir: Path, splits: dict[str, Iterable[dict[str, np.ndarray]]], shard_rows: int,
                  meta: dict, compression: str = "none") -> Path:
    """Write all splits (each an iterable of column batches) and the manifest into a fresh
    directory, then move it into place; returns the manifest's path.

    The directory appears complete or not at all: a crash mid-write leaves the old one intact.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_splits(tmp, splits, shard_rows, meta, compression)
    return out_dir / MANIFEST


def write_splits(folder: Path, splits: dict[str, Iterable[dict[str, np.ndarray]]], shard_rows: int,
                 meta: dict, compression: str = "none") -> None:
    """`write_dataset`'s body, into a folder the caller makes atomic (with more files beside the
    shards: one swap, one temporary a killed writer leaves for the next to remove)."""
    entries = {}
    for split, batches in splits.items():
        writer = SplitWriter(folder, split, shard_rows, compression)
        for batch in batches:
            writer.write(batch)
        entries[split] = writer.close()
    manifest = {"format": "arrow-ipc", "compression": compression, "shard_rows": shard_rows, **meta,
                "splits": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
