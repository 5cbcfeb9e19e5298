"""What a shard folder is: Arrow IPC shard files and the manifest that describes them.

Writing, reading, caching and verification all agree on the names, manifest fields and column
encoding defined here, so this is the one module to read (and change) when the format changes.

A shard folder holds `<split>-<nnnnn>.arrow` files and `manifest.json`::

    {"format": "arrow-ipc", "compression": "none" | "lz4" | "zstd", "shard_rows": N,
     "kind": "text" | "images", ...what the data fixes (vocab_size, image_shape, lineage)...,
     "splits": {"train": {"rows": N, "columns": {"tokens": {"dtype": "int32", "shape": [129]}, ...},
                          "shards": [{"file": "train-00000.arrow", "rows": N, "bytes": B,
                                      "sha256": "..."}, ...]}, ...}}

Shards are Arrow IPC files (Arrow's own on-disk format, the one Hugging Face `datasets`
memory-maps too; pyarrow, polars and DuckDB read them). A reader memory-maps a shard and gets
its columns with no decoding at all: a token row or an image is a fixed-size-list value over one
contiguous buffer, reshaped by the manifest's `shape`. Parquet was the first choice and measured
4-5x slower to read here: its definition levels and encodings must be decoded even
uncompressed. Buffer compression (`data.shard_compression`: lz4 or zstd) trades read speed for
size, for shards that travel over a network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

MANIFEST = "manifest.json"
SUFFIX = ".arrow"
CACHE_ENV = "PIPELINE_SHARD_CACHE"  # the node's shard cache (downloaded shards, verification marker)


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match its manifest."""


def default_cache_dir() -> Path:
    """The node's shard cache: `$PIPELINE_SHARD_CACHE`, default `~/.cache/pipeline/shards`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "pipeline" / "shards"))


# ----------------------------------------------------------------------------- where a folder is
def is_remote(root: str | Path) -> bool:
    return "://" in str(root) and not str(root).startswith("file://")


def filesystem(root: str | Path):
    """(fsspec file system, path within it) of a local path or a URL (s3://...)."""
    import fsspec

    return fsspec.core.url_to_fs(str(root))


# ----------------------------------------------------------------------------- the manifest
_SHARD_FIELDS = {"file": str, "rows": int, "bytes": int, "sha256": str}


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder, local or at an fsspec URL (s3://...), checked for shape."""
    fs, path = filesystem(root)
    where = f"{str(root).rstrip('/')}/{MANIFEST}"
    if not fs.isfile(f"{path}/{MANIFEST}"):
        raise ShardError(f"no shard manifest at {where}: run the shard stage first")
    with fs.open(f"{path}/{MANIFEST}", "rb") as fh:
        blob = fh.read()
    try:
        manifest = json.loads(blob.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ShardError(f"{where} is corrupt (not UTF-8 text at byte {e.start}): run the shard stage again") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{where} is corrupt ({e}): run the shard stage again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ShardError(f"{where} is not a shard manifest (no 'splits' mapping): run the shard stage again")
    if problem := _shape_problem(manifest["splits"]):
        raise ShardError(f"{where} is not a valid shard manifest ({problem}): run the shard stage again")
    return manifest


def split_entries(root: str | Path, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The manifest's shard entries of `split` (file, rows, bytes, sha256), or a ShardError."""
    if split not in manifest["splits"]:
        raise ShardError(f"{str(root).rstrip('/')}/{MANIFEST}: no split '{split}'")
    return manifest["splits"][split]["shards"]


def _shape_problem(splits: dict[str, Any]) -> str | None:
    """What is wrong with the manifest's splits (valid JSON of the wrong shape), or None."""
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list) \
                or not isinstance(split.get("columns"), dict):
            return f"split '{name}' has no 'shards' list or 'columns' mapping"
        for i, entry in enumerate(split["shards"]):
            if not isinstance(entry, dict):
                return f"split '{name}', shard {i} is not a mapping"
            for field, kind in _SHARD_FIELDS.items():
                if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
                    return f"split '{name}', shard {i}: '{field}' is missing or not a {kind.__name__}"
    return None


# ----------------------------------------------------------------------------- columns <-> Arrow
def to_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Numpy columns as an Arrow table: 1-D arrays as they are, N-D ones as fixed-size lists
    over one flat buffer (the per-row shape goes into the manifest)."""
    arrays = {}
    for name, arr in columns.items():
        if arr.ndim == 1:
            arrays[name] = pa.array(arr)
        else:
            flat = arr.reshape(len(arr), -1)
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    return pa.table(arrays)


def read_shard(path: Path) -> pa.Table:
    """One shard file, memory-mapped (no copy, no decoding when uncompressed)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def check_shard(table: pa.Table, entry: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    """A ShardError naming `where` ("shard <file>") and the field unless the table read from it
    holds the manifest entry's row count and the split's columns, each with the manifest's value
    type and values per row. Size and sha256 say the file is the one written; this says the
    manifest still describes it (an edited manifest has no digest of its own). Only the schema
    and the row count are looked at: metadata, no data is read."""
    if table.num_rows != entry["rows"]:
        raise ShardError(f"{where}: field 'rows' is {entry['rows']} in the manifest, the file holds "
                         f"{table.num_rows} rows (manifest edited or shard replaced): run the shard stage again")
    for name, col_spec in spec.items():
        if problem := _column_problem(table.schema, name, col_spec):
            raise ShardError(f"{where}: {problem}: run the shard stage again")


def _column_problem(schema: pa.Schema, name: str, col_spec: Any) -> str | None:
    """Why column `name` of a shard does not match its manifest spec (dtype, shape), or None. A
    1-D column is a primitive Arrow column; an N-D one a fixed-size list of prod(shape) values."""
    if schema.get_field_index(name) < 0:
        return f"column '{name}' is in the manifest but not in the file"
    dtype, shape = (col_spec.get("dtype"), col_spec.get("shape")) if isinstance(col_spec, dict) else (None, None)
    try:
        value = pa.from_numpy_dtype(np.dtype(dtype)) if isinstance(dtype, str) and np.dtype(dtype).isnative \
            else None
    except (TypeError, ValueError, pa.ArrowNotImplementedError):
        value = None
    if value is None or not pa.types.is_primitive(value):  # not a dtype, byte-swapped, objects, strings
        return f"column '{name}' field 'dtype' is {dtype!r} in the manifest, not a native numeric dtype"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return f"column '{name}' field 'shape' is {shape!r} in the manifest, not a list of sizes"
    actual = schema.field(name).type
    per_row = actual.list_size if pa.types.is_fixed_size_list(actual) else None
    actual_value = actual.value_type if per_row is not None else actual
    if actual_value != value:
        return f"column '{name}' field 'dtype' is {dtype} in the manifest, the file holds {actual_value}"
    if per_row != (math.prod(shape) if shape else None):
        held = "one value" if per_row is None else f"{per_row} values"
        return f"column '{name}' field 'shape' is {shape} in the manifest, the file holds {held} per row"
    return None


def table_columns(table: pa.Table, spec: dict[str, Any], limit: int | None = None,
                  copy: bool = True, where: str = "a shard table") -> dict[str, np.ndarray]:
    """Numpy arrays of a table's columns, shaped as the manifest's `columns` spec says; `copy=False`
    keeps the single contiguous copy that combining chunks makes (read-only), enough for a reader
    that only gathers from it. The table was checked against the manifest when it was read
    (`check_shard`, in `ShardSet.table`); `where` ("shard <file>") is named in any error."""
    out = {}
    for name, col_spec in spec.items():
        col = table.column(name)
        if limit is not None:
            col = col.slice(0, limit)
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # one chunk: no copy
        dtype = np.dtype(col_spec["dtype"])
        arr = _view(col.flatten() if col_spec["shape"] else col, dtype, where, name)
        arr = arr.reshape(len(col), *col_spec["shape"])
        out[name] = arr.copy() if copy else arr
    return out


def _view(arr: pa.Array, dtype: np.dtype, where: str, name: str) -> np.ndarray:
    """A numpy view of a primitive Arrow array without nulls: its data buffer, no copy (faster
    than `to_numpy`, which takes milliseconds per call on some column types)."""
    if arr.null_count:
        raise ShardError(f"{where}: column '{name}' has {arr.null_count} null values (shards hold none)")
    if arr.type.bit_width != 8 * dtype.itemsize:
        raise ShardError(f"{where}: column '{name}' field 'dtype' is {dtype} in the manifest, the file holds "
                         f"{arr.type}")
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
