"""The shards of a split as training and evaluation read them: local or remote, cached, verified.

`ShardSet` is what the reader and the loop hold: it turns a shard index into a verified local
file (the shard itself for a local folder; a copy in the node's content-addressed cache for a
remote one) and into numpy columns. `publish` puts a local folder where other nodes can read it,
and `read_split` loads a whole (small) split for evaluation. Checking content is
`shard_verify`'s job; this module decides when it is done.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.shard_format import (
    MANIFEST,
    SUFFIX,
    ShardError,
    check_shard,
    default_cache_dir,
    filesystem,
    is_remote,
    load_manifest,
    read_shard,
    split_entries,
    table_columns,
)
from pipeline.data.shard_verify import (
    SETTLED_NS,
    NodeMarker,
    check_sizes,
    hash_matches,
    remember,
    trusted,
    verify_file,
)


def not_on_this_node(root: str) -> str:
    """Why a worker finds no shards folder: the train stage hands the workers the path the shards
    have on the driver's node, which other nodes see only on a shared file system."""
    import socket

    return (f"{root}: no such folder on this node ({socket.gethostname()}): the workers get the shards' path on "
            "the driver's node; on a cluster whose nodes do not share it, set cluster.shards_uri (s3://bucket/prefix "
            "or a shared folder such as /mnt/shared/shards) and the train stage publishes them there")


class ShardSet:
    """The shards of one split, each verified against the manifest before it is used.

    Local shards are checked in place: size, then sha256, hashed once per node (the node's
    marker in the shard cache vouches for a file unchanged since; see `shard_verify`). Remote
    shards (any fsspec URL) are copied into a content-addressed local cache
    (`<cache>/<sha256>.arrow`), hashed as they arrive and renamed into place only when they
    match, so every process on a node shares one verified copy and a killed download never
    leaves a file that looks finished.
    """

    def __init__(self, root: str | Path, split: str, manifest: dict[str, Any] | None = None,
                 cache_dir: Path | None = None) -> None:
        self.remote = is_remote(root)
        # a file:// root as the path it names (paths are joined onto it: "file:///x" / f became file:/x/f)
        self.root = (str(root) if self.remote else str(root).removeprefix("file://")).rstrip("/")
        if manifest is None and not self.remote and not Path(self.root).exists():
            raise ShardError(not_on_this_node(self.root))
        self.manifest = manifest or load_manifest(root)
        self.split = split
        self.entries = split_entries(self.root, self.manifest, split)
        self.columns = self.manifest["splits"][split]["columns"]
        self.rows = np.array([e["rows"] for e in self.entries], dtype=np.int64)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.marker = NodeMarker(self.cache_dir)

    def check_sizes(self) -> None:
        """Before step 1: every shard is there with the manifest's size, and local shards also
        match their sha256 (hashed once per node). Remote shards are hashed as they are cached."""
        check_sizes(self.root, self.entries)
        if not self.remote:
            for i in range(len(self.entries)):
                self.local_path(i)

    def local_path(self, index: int) -> Path:
        """A verified local copy of shard `index` (the shard itself when the root is local)."""
        e = self.entries[index]
        if self.remote:
            return self._cached(e)
        return verify_file(Path(self.root) / e["file"], e, self.marker)

    def _cached(self, e: dict[str, Any]) -> Path:
        target = self.cache_dir / f"{e['sha256']}{SUFFIX}"
        if self._good_copy(target, e, hash_if_unknown=False):
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with self.marker.lock():  # one download (or hash) per node; the others wait and find it done
            if not self._good_copy(target, e, hash_if_unknown=True):
                self._download(e, target)
        return target

    def _good_copy(self, target: Path, e: dict[str, Any], hash_if_unknown: bool) -> bool:
        """A cached copy with the right size that is known to match (or, with `hash_if_unknown`,
        hashes to) its sha256. A damaged copy is downloaded again."""
        try:
            st = target.stat()
        except FileNotFoundError:
            return False
        if st.st_size != e["bytes"]:
            return False
        return trusted(target, e["sha256"], st, self.marker) or (
            hash_if_unknown and hash_matches(target, e["sha256"], st, self.marker))

    def _download(self, e: dict[str, Any], target: Path) -> None:
        """Copy one remote shard into the cache, hashing it on the way; rename it into place only
        when size and sha256 match. Its mtime is set to before the download began, so the copy
        counts as settled for the node's marker and any later write to it changes its mtime."""
        fs, path = filesystem(self.root)
        url = f"{self.root}/{e['file']}"
        started = time.time_ns()
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
            before = started - 2 * SETTLED_NS
            os.utime(tmp, ns=(before, before))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        remember(target, e["sha256"], target.stat(), started, self.marker)

    def where(self, index: int) -> str:
        """How errors name shard `index`: its file in the shard folder (not the cache's copy)."""
        return f"shard {self.root}/{self.entries[index]['file']}"

    def table(self, index: int) -> pa.Table:
        """One verified shard, memory-mapped (no copy, no decoding when uncompressed), whose row
        count and column types are the manifest's: sha256 vouches for the file, not for the
        manifest, and an edited dtype, shape or row count would otherwise be read as garbage,
        skip rows or fail far from the cause."""
        table = read_shard(self.local_path(index))
        check_shard(table, self.entries[index], self.columns, self.where(index))
        return table

    def load(self, index: int) -> dict[str, np.ndarray]:
        """One shard's columns as numpy arrays shaped as the manifest says."""
        return table_columns(self.table(index), self.columns, where=self.where(index))

    def advise(self, indices: Iterable[int]) -> None:
        """Ask the kernel to start reading these (local, verified) shards now (read-ahead), so the
        reader finds them in the page cache when it gets there. Remote shards are not fetched here."""
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
        views = [table_columns(self.table(int(i)), self.columns, copy=False, where=self.where(int(i)))
                 for i in indices]
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


def publish(local_root: Path, uri: str) -> str:
    """Copy a local shard folder to `uri` (s3://..., or a folder on a file system every node
    shares), shards first and the manifest last, so a half-finished upload has no manifest and no
    reader trusts it. Shards already there with the right size are not sent again. Returns `uri`."""
    fs, path = filesystem(uri)
    manifest = load_manifest(local_root)
    if not is_remote(uri):  # (fsspec's local copy does not make the folder; an object store needs none)
        Path(path).mkdir(parents=True, exist_ok=True)
    have = {}
    if fs.exists(path):
        have = {Path(f["name"]).name: f["size"] for f in fs.ls(path, detail=True)}
    extra = [p.name for p in Path(local_root).iterdir() if p.name != MANIFEST and not p.name.endswith(SUFFIX)]
    put = fs.put_file if is_remote(uri) else _swap_in  # (an object store's PUT is whole or nothing)
    for e in (entry for split in manifest["splits"].values() for entry in split["shards"]):
        if have.get(e["file"]) != e["bytes"]:
            put(str(Path(local_root) / e["file"]), f"{path}/{e['file']}")
    for name in extra:  # the tokenizer
        put(str(Path(local_root) / name), f"{path}/{name}")
    put(str(Path(local_root) / MANIFEST), f"{path}/{MANIFEST}")
    return uri


def _swap_in(src: str, dst: str) -> None:
    """Copy `src` to `dst` on a shared file system in one swap, and not at all when `dst` already
    holds the same bytes: two train stages publishing the same shards (the folder is named by the
    manifest's md5) rewrote its manifest in place while the other's workers read it."""
    import filecmp
    import shutil

    if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
        return
    # a temporary name of this writer's own (the same pid on two nodes is common in containers)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=f".{os.path.basename(dst)}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    return table_columns(pa.concat_tables(tables), shards.columns, max_rows, where=f"split '{split}' of {root}")
