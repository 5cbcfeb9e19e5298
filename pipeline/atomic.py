"""Atomic writes: a file or directory appears complete or not at all; and checksums.

Every artifact a later stage trusts (shards, checkpoints, exported models) goes through here,
so a crash or a killed worker never leaves a half-written one behind. A file damaged after it
was written (truncated, bytes flipped) is caught by the size and sha256 recorded beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one step.

    The temporary is made as `mkdir` makes a folder (0777 less the umask), not mkdtemp's private
    0700, which the rename would keep on the artifact. Its name carries the writer's host, pid
    namespace and pid, so temporaries that a killed writer left for the same `target` (full
    copies) are removed here once that writer is gone. A swap a killed writer left half done (see
    `_swap_into_place`) is undone first: `restore_interrupted_swap`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(target)
    with scratch_dir(target) as tmp:  # (removed on the way out unless it became `target`)
        yield tmp
        _swap_into_place(tmp, target)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` where `target` is; the previous `target` is deleted.

    Replacing an existing folder cannot be one `rename` (POSIX refuses a non-empty destination).
    On Linux `renameat2(RENAME_EXCHANGE)` swaps the two names in one step, so `target` is always
    there, old or new; the previous folder then sits under the temporary's name, which the next
    writer's sweep removes if this process dies before it does. Elsewhere (another OS, or a file
    system without the flag) it takes two renames: `target` -> `.<name>.old-<writer>-<random>`,
    then `tmp` -> `target`. A kill between them leaves no `target`; the `.old-` name carries the
    writer like a temporary's, so the next writer (or a reader, see `read_checksum_record`) can
    tell the writer is dead and move the copy back (`restore_interrupted_swap`)."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        _remove(tmp)  # (the previous artifact now)
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # (a failed swap keeps the previous artifact where it was)
        raise
    # renamed to a temporary's name before it is deleted: a kill mid-delete leaves a partial copy
    # the next writer's sweep removes, never an `.old-` one `restore_interrupted_swap` would put back
    trash = _sibling(target, "tmp")
    os.rename(old, trash)
    _remove(trash)


def restore_interrupted_swap(target: Path | str) -> bool:
    """Undo a swap of `target` that a killed writer left half done; True if `target` was restored.

    If `target` is missing and a dead writer's `.<name>.old-` copy of it exists (the previous
    artifact, complete: it was moved aside whole), it is renamed back. The dead writer's new
    temporary is not promoted instead, even though the swap only starts once the new folder is
    written: the swap is the commit point, and the writer's caller never learned it happened, so
    what it does after (prepare's statistics file, an export's registration, DVC's lock) exists
    only for the previous artifact; putting that back keeps them consistent, and the rerun that
    follows a killed stage writes the new one again. Once `target` exists, dead writers' `.old-`
    copies are garbage and removed. Copies of live writers, other hosts or pid namespaces are
    left alone (their writer may be mid-swap); so are names this module does not write, except
    `.<name>.old-<pid>` (the two-rename swap before writers were named), taken as this host's."""
    target = Path(target)
    aside = [p for p in _dead_writers_siblings(target, "old", legacy=True) if p.is_dir() and not p.is_symlink()]
    restored = False
    if aside and not os.path.lexists(target):
        newest = max(aside, key=lambda p: p.lstat().st_ctime_ns)  # (a rename sets the ctime: the last moved aside)
        aside.remove(newest)
        with contextlib.suppress(OSError):  # (another process restored it first, or wrote a new one)
            _rename_noreplace(newest, target)
            restored = True
    if os.path.lexists(target):
        for p in aside:
            shutil.rmtree(p, ignore_errors=True)
    return restored


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
    for p in _dead_writers_siblings(target, "tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A fresh name `.<name>.<kind>-<writer>-<random>` beside `target` (nothing is created)."""
    return target.with_name(f".{target.name}.{kind}-{_writer_tag()}-{uuid.uuid4().hex[:8]}")


def _dead_writers_siblings(target: Path, kind: str, legacy: bool = False) -> list[Path]:
    """`target`'s siblings named `.<name>.<kind>-<host>-<pidns>-<pid>-<random>` whose writer is
    this host's and pid namespace's and no longer runs; with `legacy`, also `.<name>.<kind>-<pid>`
    of a pid that no longer runs here."""
    prefix = f".{target.name}.{kind}-"
    host, pidns, me = _writer_tag().rsplit("-", 2)
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        rest = p.name[len(prefix):]
        parts = rest.rsplit("-", 3)
        if legacy and rest.isdigit():
            pid = rest
        elif len(parts) == 4 and parts[0] == host and parts[1] == pidns and parts[2].isdigit():
            pid = parts[2]
        else:
            continue
        if pid != me and not _pid_alive(int(pid)):
            found.append(p)
    return found


def _remove(path: Path) -> None:
    """Delete a folder (or a file, a link) if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2 flags (linux/fs.h)
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux `renameat2(src, dst, flags)` through libc; False where it is not available (another
    OS, a libc without the wrapper, a kernel or file system refusing the flag), for the caller's
    portable fallback. Any other failure raises as `os.rename` would."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@functools.cache
def _libc_renameat2() -> Any:
    """libc's `renameat2` (glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing if `dst` exists (`RENAME_NOREPLACE` where there is one; a
    plain rename, which refuses a non-empty folder but replaces an empty one, elsewhere)."""
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)


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


def as_open_creates(path: Path | str) -> None:
    """Give a file the mode `open()` creates files with (0666 less the umask). mkstemp's private
    0600, which safetensors' own writer also uses, would stay with the artifact through the rename
    and `copy2`: a model folder on shared storage unreadable to a serving account or a colleague."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
    """The files a checksum file lists, or why it cannot be trusted (a string).

    A record missing because its whole folder is (an `atomic_dir` swap a killed writer left half
    done) is read again after `restore_interrupted_swap` moved the previous folder back: readers
    of model and export folders recover as the next writer would."""
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except FileNotFoundError:
        if not os.path.lexists(path.parent) and restore_interrupted_swap(path.parent):
            return read_checksum_record(path)
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
