"""Fixed-size shards with a manifest, and their verification.

Shards are Arrow IPC files (`.arrow`, Arrow's own on-disk format, the one Hugging Face
`datasets` memory-maps too; pyarrow, polars and DuckDB read them). A reader memory-maps a shard
and gets its columns with no decoding at all: a token row or an image is a fixed-size-list
value over one contiguous buffer. Parquet was the first choice and measured 4-5x slower to read
here: its definition levels and encodings must be decoded even uncompressed. Buffer compression
(`data.shard_compression`: lz4 or zstd) trades read speed for size, for shards that travel
over a network. The manifest records rows, bytes and sha256 per shard; readers refuse a shard
that does not match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.atomic import atomic_dir

MANIFEST = "manifest.json"
SUFFIX = ".arrow"


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
        table = _table(part)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=self.options) as w:
            w.write_table(table)
        self.shards.append({"file": name, "rows": rows, "sha256": sha256_file(path), "bytes": path.stat().st_size})
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
    directory, then move it into place.

    The directory appears complete or not at all: a crash mid-write leaves the old one intact.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        entries = {}
        for split, batches in splits.items():
            writer = SplitWriter(tmp, split, shard_rows, compression)
            for batch in batches:
                writer.write(batch)
            entries[split] = writer.close()
        manifest = {"format": "arrow-ipc", "compression": compression, "shard_rows": shard_rows, **meta,
                    "splits": entries}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir / MANIFEST


def _fs(root: str | Path):
    import fsspec

    return fsspec.core.url_to_fs(str(root))


def is_remote(root: str | Path) -> bool:
    return "://" in str(root) and not str(root).startswith("file://")


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder, local or at an fsspec URL (s3://...)."""
    fs, path = _fs(root)
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


_SHARD_FIELDS = {"file": str, "rows": int, "bytes": int, "sha256": str}


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


def verify_split(root: Path, split: str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """Check every shard of a local split against the manifest: present, same size, same sha256."""
    shards = ShardSet(root, split, manifest)
    return [shards.local_path(i) for i in range(len(shards.rows))]


_VERIFIED: set[tuple[str, str]] = set()  # (path, sha256) already hashed by this process


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("PIPELINE_SHARD_CACHE", Path.home() / ".cache" / "pipeline" / "shards"))


class ShardSet:
    """The shards of one split, each verified against the manifest before it is used.

    Local shards are checked in place (size, then sha256, once per process). Remote shards
    (any fsspec URL) are copied into a content-addressed local cache (`<cache>/<sha256>.arrow`),
    hashed as they arrive and renamed into place only when they match, so every rank on a node
    shares one verified copy and a killed download never leaves a file that looks finished.
    """

    def __init__(self, root: str | Path, split: str, manifest: dict[str, Any] | None = None,
                 cache_dir: Path | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.remote = is_remote(root)
        self.manifest = manifest or load_manifest(root)
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.root}/{MANIFEST}: no split '{split}'")
        self.split = split
        self.entries = self.manifest["splits"][split]["shards"]
        self.columns = self.manifest["splits"][split]["columns"]
        self.rows = np.array([e["rows"] for e in self.entries], dtype=np.int64)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def check_sizes(self) -> None:
        """Every shard exists with the manifest's size: cheap, and done before step 1."""
        if not self.remote:
            for i in range(len(self.entries)):
                self.local_path(i)
            return
        fs, path = _fs(self.root)
        sizes = {Path(f["name"]).name: f["size"] for f in fs.ls(path, detail=True)}
        for e in self.entries:
            if e["file"] not in sizes:
                raise ShardError(f"shard {self.root}/{e['file']} is missing")
            if sizes[e["file"]] != e["bytes"]:
                raise ShardError(f"shard {self.root}/{e['file']} is {sizes[e['file']]} bytes, manifest says "
                                 f"{e['bytes']} (truncated?)")

    def local_path(self, index: int) -> Path:
        """A verified local copy of shard `index` (the shard itself when the root is local)."""
        e = self.entries[index]
        if self.remote:
            return self._cached(e)
        p = Path(self.root) / e["file"]
        if not p.is_file():
            raise ShardError(f"shard {p} is missing")
        if p.stat().st_size != e["bytes"]:
            raise ShardError(f"shard {p} is {p.stat().st_size} bytes, manifest says {e['bytes']} (truncated?)")
        if (str(p), e["sha256"]) not in _VERIFIED:
            if sha256_file(p) != e["sha256"]:
                raise ShardError(f"shard {p} does not match its sha256 in the manifest (corrupt)")
            _VERIFIED.add((str(p), e["sha256"]))
        return p

    def _cached(self, e: dict[str, Any]) -> Path:
        import os
        import tempfile

        target = self.cache_dir / f"{e['sha256']}{SUFFIX}"
        if target.is_file() and target.stat().st_size == e["bytes"] and (
                (str(target), e["sha256"]) in _VERIFIED or sha256_file(target) == e["sha256"]):
            _VERIFIED.add((str(target), e["sha256"]))
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fs, path = _fs(self.root)
        url = f"{self.root}/{e['file']}"
        fd, tmp = tempfile.mkstemp(prefix=f".{e['sha256'][:16]}.", dir=self.cache_dir)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                try:
                    src = fs.open(f"{path}/{e['file']}", "rb")
                except FileNotFoundError:
                    raise ShardError(f"shard {url} is missing") from None
                with src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
            if os.path.getsize(tmp) != e["bytes"]:
                raise ShardError(f"shard {url} is {os.path.getsize(tmp)} bytes, manifest says {e['bytes']} "
                                 "(truncated?)")
            if h.hexdigest() != e["sha256"]:
                raise ShardError(f"shard {url} does not match its sha256 in the manifest (corrupt)")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _VERIFIED.add((str(target), e["sha256"]))
        return target

    def table(self, index: int) -> pa.Table:
        """One verified shard, memory-mapped (no copy, no decoding when uncompressed)."""
        return read_shard(self.local_path(index))

    def load(self, index: int) -> dict[str, np.ndarray]:
        """One shard's columns as numpy arrays shaped as the manifest says."""
        return _columns(self.table(index), self.columns)

    def advise(self, indices: Iterable[int]) -> None:
        """Ask the kernel to start reading these (local, verified) shards now (read-ahead), so the
        reader finds them in the page cache when it gets there. Remote shards are not fetched here."""
        import os

        if self.remote or not hasattr(os, "posix_fadvise"):
            return
        for i in indices:
            fd = os.open(self.local_path(int(i)), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def load_many(self, indices: Iterable[int], spare: dict[str, np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]:
        """Several shards' rows concatenated, in the order given: one copy out of the mapped files,
        into `spare`'s buffers when they are large enough (the caller no longer uses them)."""
        views = [_columns(self.table(int(i)), self.columns, copy=False) for i in indices]
        n = sum(len(v["id"]) for v in views)
        out = {}
        for name in self.columns:
            first = views[0][name]
            buf = spare.get(name) if spare else None
            buf = buf.base if buf is not None and buf.base is not None else buf
            if buf is None or len(buf) < n or buf.shape[1:] != first.shape[1:] or buf.dtype != first.dtype:
                buf = np.empty((n, *first.shape[1:]), dtype=first.dtype)
            out[name] = np.concatenate([v[name] for v in views], out=buf[:n])
        return out


def read_shard(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _columns(table: pa.Table, spec: dict[str, Any], limit: int | None = None,
             copy: bool = True) -> dict[str, np.ndarray]:
    """Numpy arrays of a table's columns; `copy=False` keeps the single contiguous copy that
    combining chunks makes (read-only), enough for a reader that only gathers from it."""
    out = {}
    for name, col_spec in spec.items():
        col = table.column(name)
        if limit is not None:
            col = col.slice(0, limit)
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # one chunk: no copy
        dtype = np.dtype(col_spec["dtype"])
        arr = _view(col.flatten() if col_spec["shape"] else col, dtype).reshape(len(col), *col_spec["shape"])
        out[name] = arr.copy() if copy else arr
    return out


def _view(arr: pa.Array, dtype: np.dtype) -> np.ndarray:
    """A numpy view of a primitive Arrow array without nulls: its data buffer, no copy (faster
    than `to_numpy`, which takes milliseconds per call on some column types)."""
    if arr.null_count or arr.type.bit_width != 8 * dtype.itemsize:
        raise ShardError(f"a shard column of type {arr.type} does not match the manifest's {dtype}")
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def publish(local_root: Path, uri: str) -> str:
    """Copy a local shard folder to `uri` (s3://...), shards first and the manifest last, so a
    half-finished upload has no manifest and no reader trusts it. Shards already there with the
    right size are not sent again. Returns `uri`."""
    fs, path = _fs(uri)
    manifest = load_manifest(local_root)
    have = {}
    if fs.exists(path):
        have = {Path(f["name"]).name: f["size"] for f in fs.ls(path, detail=True)}
    extra = [p.name for p in Path(local_root).iterdir() if p.name != MANIFEST and not p.name.endswith(SUFFIX)]
    for e in (entry for split in manifest["splits"].values() for entry in split["shards"]):
        if have.get(e["file"]) != e["bytes"]:
            fs.put_file(str(Path(local_root) / e["file"]), f"{path}/{e['file']}")
    for name in extra:  # the tokenizer
        fs.put_file(str(Path(local_root) / name), f"{path}/{name}")
    fs.put_file(str(Path(local_root) / MANIFEST), f"{path}/{MANIFEST}")
    return uri


def read_split(root: str | Path, split: str, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Verify, then load a split (or its first `max_rows` rows: only the shards they need) as
    numpy arrays shaped as the manifest says. For evaluation; training streams with the reader."""
    shards = ShardSet(root, split)
    tables, rows = [], 0
    for i in range(len(shards.rows)):
        if max_rows is not None and rows >= max_rows:
            break
        tables.append(shards.table(i))
        rows += tables[-1].num_rows
    return _columns(pa.concat_tables(tables), shards.columns, max_rows)
