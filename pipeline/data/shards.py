"""Fixed-size Parquet shards with a manifest, and their verification.

Parquet because every tool in this stack reads it (pyarrow, Ray Data, DuckDB, pandas), it is
columnar and compressed, and a fixed-size-list column keeps token rows and images zero-copy.
The manifest records rows and sha256 per shard; readers refuse a shard that does not match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_dir

MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _table(columns: dict[str, np.ndarray]) -> pa.Table:
    arrays = {}
    for name, arr in columns.items():
        if arr.ndim == 1:
            arrays[name] = pa.array(arr)
        else:
            flat = arr.reshape(len(arr), -1)
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    return pa.table(arrays)


def write_split(out_dir: Path, split: str, columns: dict[str, np.ndarray], shard_rows: int) -> dict[str, Any]:
    """Write one split as shards of `shard_rows` rows (the last may be shorter). Returns its manifest entry."""
    n = len(next(iter(columns.values())))
    shards = []
    for i, start in enumerate(range(0, n, shard_rows)):
        name = f"{split}-{i:05d}.parquet"
        part = {k: v[start : start + shard_rows] for k, v in columns.items()}
        pq.write_table(_table(part), out_dir / name, compression="zstd")
        shards.append({"file": name, "rows": len(next(iter(part.values()))), "sha256": sha256_file(out_dir / name),
                       "bytes": (out_dir / name).stat().st_size})
    return {
        "rows": n,
        "shards": shards,
        "columns": {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in columns.items()},
    }


def write_dataset(out_dir: Path, splits: dict[str, dict[str, np.ndarray]], shard_rows: int, meta: dict) -> Path:
    """Write all splits and the manifest into a fresh directory, then move it into place.

    The directory appears complete or not at all: a crash mid-write leaves the old one intact.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        manifest = {"format": "parquet", "shard_rows": shard_rows, **meta,
                    "splits": {s: write_split(tmp, s, cols, shard_rows) for s, cols in splits.items()}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir / MANIFEST


def load_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no shard manifest at {path}: run the shard stage first")
    return json.loads(path.read_text())


def verify_split(root: Path, split: str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """Check every shard of a split against the manifest: present, same size, same sha256."""
    root = Path(root)
    manifest = manifest or load_manifest(root)
    if split not in manifest["splits"]:
        raise ShardError(f"{root / MANIFEST}: no split '{split}'")
    paths = []
    for entry in manifest["splits"][split]["shards"]:
        p = root / entry["file"]
        if not p.is_file():
            raise ShardError(f"shard {p} is missing")
        if p.stat().st_size != entry["bytes"]:
            raise ShardError(f"shard {p} is {p.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        if sha256_file(p) != entry["sha256"]:
            raise ShardError(f"shard {p} does not match its sha256 in the manifest (corrupt)")
        paths.append(p)
    return paths


def read_split(root: Path, split: str) -> dict[str, np.ndarray]:
    """Verify, then load a whole split as numpy arrays shaped as the manifest says."""
    manifest = load_manifest(root)
    paths = verify_split(root, split, manifest)
    cols = manifest["splits"][split]["columns"]
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    out = {}
    for name, spec in cols.items():
        col = table.column(name).combine_chunks()
        if spec["shape"]:
            arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), *spec["shape"])
        else:
            arr = col.to_numpy(zero_copy_only=False)
        out[name] = np.array(arr, dtype=spec["dtype"])  # writable copy, not an Arrow view
    return out
