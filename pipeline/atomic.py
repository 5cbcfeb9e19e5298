"""Atomic writes: a file or directory appears complete or not at all; and checksums.

Every artifact a later stage trusts (shards, checkpoints, exported models) goes through here,
so a crash or a killed worker never leaves a half-written one behind. A file damaged after it
was written (truncated, bytes flipped) is caught by the size and sha256 recorded beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    The temporary is made as `mkdir` makes a folder (0777 less the umask), not mkdtemp's private
    0700, which the rename would keep on the artifact. Its name carries the writer's host, pid
    namespace and pid, so temporaries that a killed writer left for the same `target` (full
    copies) are removed here once that writer is gone."""
    target = Path(target)
    with scratch_dir(target) as tmp:  # (removed on the way out unless it became `target`)
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)


@contextlib.contextmanager
def scratch_dir(target: Path | str) -> Iterator[Path]:
    """A fresh temporary folder beside `target`, named and cleaned as `atomic_dir`'s (one a killed
    writer left is removed by the next writer here), deleted on the way out: for staging what is
    copied elsewhere (MLflow's artifact store), not for an artifact that stays."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = _make_temporary_dir(target)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _writer_tag() -> str:
    """Who writes a temporary: `<host>-<pid namespace>-<pid>`. The namespace (0 where /proc has
    none) keeps two containers sharing a host name and a folder from taking each other's pids
    for their own."""
    try:
        pidns = os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]") or "0"
    except OSError:
        pidns = "0"
    return f"{socket.gethostname()}-{pidns}-{os.getpid()}"


def _make_temporary_dir(target: Path) -> Path:
    """A fresh `.<name>.tmp-<writer>-<random>` folder beside `target`, mode 0777 less the umask."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{_writer_tag()}-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:  # another writer's name (all but impossible): draw again
            continue
        return tmp


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporaries of `target` whose writer is gone: written on this host, in this pid
    namespace, by a pid that no longer exists. Anything else (another host's, a live or unknown
    writer's, a name of another format) is left alone."""
    prefix = f".{target.name}.tmp-"
    host, pidns, me = _writer_tag().rsplit("-", 2)
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        parts = p.name[len(prefix):].rsplit("-", 3)
        if len(parts) != 4 or parts[0] != host or parts[1] != pidns or not parts[2].isdigit() \
                or parts[2] == me or _pid_alive(int(parts[2])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists here (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return True  # undecidable: keep the temporary
    return True


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: readers see the old
    file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    # created as `open()` creates a file (0666 less the umask), not mkstemp's private 0600, which
    # the rename would keep; O_EXCL: never another writer's temporary
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- checksums: every file an artifact holds, recorded when it is written, checked when it is read ---

def file_sha256(path: Path | str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def json_digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys): a record that carries its own
    digest shows a damaged copy even when the damaged text still parses."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """A file's entry in a checksum record: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def describe_files(directory: Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `directory` (relative POSIX paths as keys)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not skip(rel):
            out[rel] = describe_file(p)
    return out


def checksum_record(files: dict[str, dict[str, Any]], **fields: Any) -> str:
    """The text of a checksum file: `files` as `describe_files` gives them, plus its own digest."""
    return json.dumps({**fields, "files": files, "sha256": json_digest(files)}, indent=1, sort_keys=True)


def read_checksum_record(path: Path) -> dict[str, dict[str, Any]] | str:
    """The files a checksum file lists, or why it cannot be trusted (a string)."""
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable: {type(e).__name__}"
    if json_digest(files) != record.get("sha256"):
        return "its own digest does not match its contents"
    return files


def check_file(path: Path, expected: list[dict[str, Any]], size_only: bool = False) -> str | None:
    """None if `path` matches one of the `expected` records (size, sha256), else why not."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    sizes = sorted({e["size"] for e in expected})
    if size not in sizes:
        return f"{size:,} bytes, {' or '.join(f'{s:,}' for s in sizes)} recorded"
    if not size_only and file_sha256(path) not in {e["sha256"] for e in expected if e["size"] == size}:
        return "its sha256 differs from the recorded one"
    return None
