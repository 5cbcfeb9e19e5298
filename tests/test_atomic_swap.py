"""`atomic_dir` replacing an existing folder (prepare's, shard's, a model's or an export's output)
survives a SIGKILL at any point of the swap: the folder is there afterwards, old or new, and no
full copy of it is left beside it for good.

On Linux the swap is one `renameat2(RENAME_EXCHANGE)`; the portable fallback takes two renames,
and a writer killed between them leaves the folder missing and the previous one moved aside:
the next writer, or a reader of its checksum record, moves it back. The kills are real: a
subprocess SIGKILLs itself right after the step under test (patched in that subprocess only;
the module has no test hook)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import atomic
from pipeline.atomic import atomic_dir, checksum_record, describe_files, read_checksum_record

ROOT = Path(__file__).resolve().parents[1]
CHECKSUMS = "checksums.json"

# argv: target, version, where to die ("between": the two-rename fallback, after moving the old
# folder aside; "after_exchange": right after the one-step swap, before the old folder is deleted)
_KILLED_WRITER = r'''
import os, signal, sys
from pathlib import Path
from pipeline import atomic

target, version, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

if where == "between":
    atomic._renameat2 = lambda src, dst, flags: False  # another OS, or a file system without the flag
    real_rename, real_replace = os.rename, os.replace

    def rename(src, dst, real=real_rename):
        real(src, dst)
        if os.fspath(src) == os.fspath(target):  # the old folder was just moved aside
            die()

    os.rename, os.replace = rename, lambda src, dst: rename(src, dst, real_replace)
else:
    real_renameat2 = atomic._renameat2

    def renameat2(src, dst, flags):
        done = real_renameat2(src, dst, flags)
        if done and flags == atomic._RENAME_EXCHANGE:
            die()
        return done

    atomic._renameat2 = renameat2

with atomic.atomic_dir(target) as d:
    (d / "data.txt").write_text(version)
    (d / "checksums.json").write_text(atomic.checksum_record(atomic.describe_files(d)))
'''


def _write(target: Path, version: str) -> None:
    with atomic_dir(target) as d:
        (d / "data.txt").write_text(version)
        (d / CHECKSUMS).write_text(checksum_record(describe_files(d)))


def _killed_writer(target: Path, version: str, where: str) -> None:
    """Run a writer of `target` (version `version`) that SIGKILLs itself at `where`."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target), version, where], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _exchange_works(folder: Path) -> bool:
    """Whether this OS and the file system under `folder` swap two names in one step (asked of
    libc here, not of the module under test)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    a, b = folder / ".probe-a", folder / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    finally:
        a.rmdir()
        b.rmdir()


def _killed_between_the_renames(tmp_path: Path) -> Path:
    """`out` at v1, then a writer of v2 killed after moving v1 aside: the state the defect left."""
    target = tmp_path / "out"
    _write(target, "v1")
    _killed_writer(target, "v2", "between")
    left = _names(tmp_path)
    assert "out" not in left and any(n.startswith(".out.old-") for n in left), left
    return target


def test_the_next_writer_that_fails_still_puts_back_the_folder_a_killed_swap_moved_aside(tmp_path):
    """The previous folder is restored (not the killed writer's new one: the swap is the commit
    point, and the killed writer's caller never saw it), the dead writer's copies are removed."""
    target = _killed_between_the_renames(tmp_path)
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("a later writer that fails before its own swap")
    assert (target / "data.txt").read_text() == "v1"
    assert _names(tmp_path) == ["out"]


def test_the_next_writer_after_a_killed_swap_leaves_only_its_folder(tmp_path):
    target = _killed_between_the_renames(tmp_path)
    _write(target, "v3")
    assert (target / "data.txt").read_text() == "v3"
    assert _names(tmp_path) == ["out"]


def test_a_reader_of_the_checksum_record_restores_the_folder_a_killed_swap_moved_aside(tmp_path):
    """Loading a model or export folder reads its checksum record first: a folder missing after
    a killed swap is moved back there, so the reader sees the previous, complete folder."""
    target = _killed_between_the_renames(tmp_path)
    record = read_checksum_record(target / CHECKSUMS)
    assert isinstance(record, dict) and set(record) == {"data.txt"}, record
    assert (target / "data.txt").read_text() == "v1"
    assert [n for n in _names(tmp_path) if n.startswith(".out.old-")] == []


def test_a_copy_the_two_rename_swap_left_before_writers_were_named_is_restored(tmp_path):
    """`.<name>.old-<pid>` (what atomic_dir wrote before, e.g. left by the audit's reproducer)."""
    target = tmp_path / "out"
    legacy = tmp_path / f".out.old-{_dead_pid()}"
    legacy.mkdir()
    (legacy / "data.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("a later writer that fails")
    assert (target / "data.txt").read_text() == "v1"
    assert _names(tmp_path) == ["out"]


def test_only_dead_writers_old_copies_are_removed_once_the_folder_exists(tmp_path):
    """With the folder in place, an `.old-` copy is garbage once its writer is gone; a live
    writer's (it may be mid-swap) and another host's or pid namespace's are left alone."""
    host, pidns, _ = atomic._writer_tag().rsplit("-", 2)
    dead, live = _dead_pid(), os.getppid()
    names = {
        "dead": f".out.old-{host}-{pidns}-{dead}-0123abcd",
        "dead_legacy": f".out.old-{dead}",
        "live": f".out.old-{host}-{pidns}-{live}-0123abcd",
        "other_host": f".out.old-{host}x-{pidns}-{dead}-0123abcd",
        "other_ns": f".out.old-{host}-{pidns}1-{dead}-0123abcd",
        "other_folder": f".out2.old-{host}-{pidns}-{dead}-0123abcd",
    }
    _write(tmp_path / "out", "v1")
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.txt").write_text("a full copy")
    _write(tmp_path / "out", "v2")
    assert set(_names(tmp_path)) == {"out"} | {v for k, v in names.items() if not k.startswith("dead")}
    assert (tmp_path / "out" / "data.txt").read_text() == "v2"


def test_replacing_a_folder_never_leaves_its_name_missing(tmp_path, monkeypatch):
    """Where the one-step exchange works, no rename ever moves the folder away from its name."""
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here: the two-rename fallback is tested above")
    target = tmp_path / "out"
    _write(target, "v1")
    missing = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def spy(src, dst, real=real):
            real(src, dst)
            if not os.path.lexists(target):
                missing.append((os.fspath(src), os.fspath(dst)))

        monkeypatch.setattr(os, name, spy)
    _write(target, "v2")
    monkeypatch.undo()
    assert missing == []
    assert (target / "data.txt").read_text() == "v2" and _names(tmp_path) == ["out"]


def test_a_writer_killed_right_after_the_exchange_leaves_the_new_folder(tmp_path):
    """Killed after the one-step swap, before deleting the previous folder (now under its
    temporary's name): the new folder is in place and the next writer removes the old one."""
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    target = tmp_path / "out"
    _write(target, "v1")
    _killed_writer(target, "v2", "after_exchange")
    assert (target / "data.txt").read_text() == "v2"
    left = [n for n in _names(tmp_path) if n != "out"]
    assert len(left) == 1 and left[0].startswith(".out.tmp-")
    assert (tmp_path / left[0] / "data.txt").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("a later writer that fails")
    assert _names(tmp_path) == ["out"] and (target / "data.txt").read_text() == "v2"


def test_weights_files_are_readable_as_the_umask_allows(tmp_path):
    """`model.safetensors` came out 0600 (mkstemp's mode in the streamed writer, and safetensors'
    own writer's), whatever the umask, and the export copies it with its mode: a model folder on
    shared storage was unreadable to a serving account or a colleague. Weights are now created as
    every other artifact file is, 0666 less the umask."""
    import stat

    import torch

    from pipeline.models.hf import write_safetensors
    from pipeline.safetensors_stream import write_streamed
    from pipeline.training.checkpoint import WEIGHTS, write_model

    before = os.umask(0o022)
    try:
        write_model(tmp_path / "model", {"w": torch.ones(2, 2)}, {"kind": "test"})
        tensor = torch.zeros(3)
        write_streamed(tmp_path / "streamed.safetensors", {"t": (tensor.dtype, tuple(tensor.shape))}, [("t", tensor)])
        hf_files = [tmp_path / name for name in write_safetensors({"a": torch.ones(8), "b": torch.ones(8)},
                                                                 tmp_path, max_bytes=40)]  # two files, an index
        os.umask(0o077)
        write_model(tmp_path / "private", {"w": torch.ones(2, 2)}, {"kind": "test"})
    finally:
        os.umask(before)
    assert len(hf_files) == 3
    for path in (tmp_path / "model" / WEIGHTS, tmp_path / "streamed.safetensors", *hf_files):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "private" / WEIGHTS).stat().st_mode) == 0o600  # the umask still rules
