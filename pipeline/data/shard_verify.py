"""Does a shard hold the bytes its manifest names? Size checks, content checks, and the node's marker.

Two checks, at two costs:

* `check_split` (cheap): the manifest parses and every shard of the split is there with the
  manifest's size (for a remote folder, one listing). The driver runs it before it takes any Ray
  resource: it catches a damaged manifest and a missing or truncated shard, not flipped bytes.
* content (one full read): the file's sha256 equals the manifest's. It is checked where shards
  are read: by `ShardSet` in every worker (local folders before step 1, remote shards as they
  are downloaded into the cache) and by `verify_split` for a whole split.

Content is hashed once per node, not once per worker process. A process that has hashed a file
leaves a record of it in the node's shard cache (the *marker*: `<cache>/verified/`, one small
JSON file per verified file, written under a temporary name and renamed into place, so no
process ever reads half a record), and the other processes on the node trust the record instead
of reading the file again. Hashing holds a lock (`verified/.lock`, flock): workers that start
together wait for the one hashing, then find its record.

What a record covers: the file's path, the sha256 it matched, and the file's size, mtime, ctime,
inode and device when it was hashed. It is trusted only while all five are unchanged, so a shard
rewritten, truncated, replaced or modified in place after it was hashed is hashed again where it
is next read, and refused (`ShardError`) if it no longer matches. File systems stamp times with a
coarse clock, so a file written twice within one tick keeps its mtime: a record (and this
process's own memory of a hash) is therefore trusted only if the file's mtime was more than
`SETTLED_NS` (2 s) older than the start of that hash, and a file written less than 2 s before
it was hashed is hashed again at its next read (git's "racily clean" rule). Not covered: a change that leaves all five
unchanged (bit rot below the file system, timestamps forged back by hand); delete
`<cache>/verified/` to have every file hashed again. The marker is only a cache: a lost record,
or a cache folder that cannot be written, costs a re-hash and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.atomic import file_sha256
from pipeline.data.shard_format import (
    ShardError,
    default_cache_dir,
    filesystem,
    is_remote,
    load_manifest,
    split_entries,
)

SETTLED_NS = 2_000_000_000  # a file's mtime this much older than a hash's start: a later write shows in it


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def _settled(key: dict[str, int], hashed_at_ns: int) -> bool:
    return key["mtime_ns"] < hashed_at_ns - SETTLED_NS


class NodeMarker:
    """The node's record of files already hashed, in `<cache_dir>/verified/` (see the module
    docstring for what a record covers)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.dir = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "verified"

    def _path(self, path: str) -> Path:
        return self.dir / f"{hashlib.sha256(path.encode()).hexdigest()[:32]}.json"

    def vouches(self, path: str, sha256: str, key: dict[str, int]) -> bool:
        """A record says `path`, exactly as it is now (`key`), was hashed and matched `sha256`."""
        try:
            record = json.loads(self._path(path).read_text())
        except (OSError, ValueError):
            return False
        expected = {"path": path, "sha256": sha256, **key}
        return isinstance(record, dict) and all(record.get(k) == v for k, v in expected.items()) \
            and isinstance(record.get("hashed_at_ns"), int) and _settled(key, record["hashed_at_ns"])

    def record(self, path: str, sha256: str, key: dict[str, int], hashed_at_ns: int) -> None:
        """Record a matched hash (only of a settled file; silently not when the cache is not writable)."""
        if not _settled(key, hashed_at_ns):
            return
        text = json.dumps({"path": path, "sha256": sha256, **key, "hashed_at_ns": hashed_at_ns})
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".record.", dir=self.dir)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                os.replace(tmp, self._path(path))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a file is hashed or downloaded, so the node's processes do it once."""
        fd = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a cache folder that cannot be written: every process hashes for itself
            pass
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock


_HASHED: dict[str, tuple[str, dict[str, int], int]] = {}  # path -> (sha256, stat key, hash start): this process


def _key(path: Path) -> str:
    return str(Path(path).absolute())


def trusted(path: Path, sha256: str, st: os.stat_result, marker: NodeMarker | None) -> bool:
    """Is `path` (now as `st` says) known to match `sha256` without reading it: hashed by this
    process, or recorded in the node's marker, since its last change?"""
    name, key = _key(path), _stat_key(st)
    seen = _HASHED.get(name)
    if seen is not None and seen[0] == sha256 and seen[1] == key and _settled(key, seen[2]):
        return True
    if marker is not None and marker.vouches(name, sha256, key):
        _HASHED[name] = (sha256, key, time.time_ns())
        return True
    return False


def remember(path: Path, sha256: str, st: os.stat_result, hashed_at_ns: int, marker: NodeMarker | None) -> None:
    """`path` (as `st` says) matched `sha256` in a hash started at `hashed_at_ns`: remember it in
    this process and record it in the node's marker."""
    name, key = _key(path), _stat_key(st)
    _HASHED[name] = (sha256, key, hashed_at_ns)
    if marker is not None:
        marker.record(name, sha256, key, hashed_at_ns)


def hash_matches(path: Path, sha256: str, st: os.stat_result, marker: NodeMarker | None) -> bool:
    """Hash `path` now (`st`: its stat before the read); on a match, remember it."""
    hashed_at = time.time_ns()
    if file_sha256(path) != sha256:
        return False
    remember(path, sha256, st, hashed_at, marker)
    return True


def verify_file(path: Path, entry: dict[str, Any], marker: NodeMarker | None) -> Path:
    """`path` if it holds the shard `entry` (a manifest entry) names, else a ShardError naming it:
    present, the manifest's size, and its sha256 (hashed only if neither this process nor the
    node's marker vouches for the file as it is now)."""
    path = Path(path)
    st = _stat_file(path)
    if st.st_size != entry["bytes"]:
        raise ShardError(f"shard {path} is {st.st_size} bytes, manifest says {entry['bytes']} (truncated?)")
    if trusted(path, entry["sha256"], st, marker):
        return path
    with marker.lock() if marker is not None else contextlib.nullcontext():
        st = _stat_file(path)  # another process may have hashed it while this one waited
        if not trusted(path, entry["sha256"], st, marker) and not hash_matches(path, entry["sha256"], st, marker):
            raise ShardError(f"shard {path} does not match its sha256 in the manifest (corrupt)")
    return path


def _stat_file(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise ShardError(f"shard {path} is missing")
    return st


def check_sizes(root: str | Path, entries: list[dict[str, Any]]) -> None:
    """Every shard in `entries` exists under `root` (local or remote) with the manifest's size."""
    if not is_remote(root):
        for e in entries:
            p = Path(root) / e["file"]
            size = _stat_file(p).st_size
            if size != e["bytes"]:
                raise ShardError(f"shard {p} is {size} bytes, manifest says {e['bytes']} (truncated?)")
        return
    fs, path = filesystem(root)
    root = str(root).rstrip("/")
    sizes = {Path(f["name"]).name: f["size"] for f in fs.ls(path, detail=True)}
    for e in entries:
        if e["file"] not in sizes:
            raise ShardError(f"shard {root}/{e['file']} is missing")
        if sizes[e["file"]] != e["bytes"]:
            raise ShardError(f"shard {root}/{e['file']} is {sizes[e['file']]} bytes, manifest says "
                             f"{e['bytes']} (truncated?)")


def check_split(root: str | Path, split: str, manifest: dict[str, Any] | None = None, *,
                batch: tuple[int, str] | None = None) -> None:
    """The driver's check before it takes resources: the manifest is valid and every shard of
    `split` is there with its size. No content is read (workers hash, once per node). With
    `batch` (a global batch size and the key that sets it), the split holds at least one batch:
    the reader refuses less, but only inside a worker, after Ray and the MLflow run started."""
    manifest = manifest or load_manifest(root)
    entries = split_entries(root, manifest, split)
    check_sizes(root, entries)
    rows = sum(e["rows"] for e in entries)
    if batch is not None and rows < batch[0]:
        raise ShardError(f"{str(root).rstrip('/')}: split '{split}' has {rows} rows, fewer than one global batch "
                         f"({batch[1]}={batch[0]}): lower it, or add data")


def verify_split(root: str | Path, split: str, manifest: dict[str, Any] | None = None,
                 cache_dir: Path | None = None) -> list[Path]:
    """Check every shard of a local split against the manifest (present, same size, same sha256;
    hashed unless the node's marker vouches for it) and return their paths. Remote shards are
    verified as they are cached (`ShardSet`)."""
    if is_remote(root):
        raise ShardError(f"{root}: verify_split checks a local shard folder; remote shards are verified as "
                         "they are downloaded")
    manifest = manifest or load_manifest(root)
    marker = NodeMarker(cache_dir)
    return [verify_file(Path(root) / e["file"], e, marker) for e in split_entries(root, manifest, split)]
