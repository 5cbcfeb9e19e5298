"""Shard folders whose manifest no longer describes their files, a shard stage killed while it
writes the tokenizer, and the folders `atomic_dir` leaves: each is refused in one line naming the
shard file and the field, or leaves the previous artifact whole.

Real shards throughout (the session's `built_data`, copied before any edit); the one stand-in is
a tokenizer copy that dies halfway, the crash the shard stage must survive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline import atomic
from pipeline.atomic import atomic_dir, file_sha256
from pipeline.data import build
from pipeline.data.shard_format import MANIFEST, ShardError, read_shard, table_columns
from pipeline.data.shard_store import ShardSet, read_split
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def lm_shards(built_data, tmp_path_factory) -> Path:
    """The session's real text shards, copied once for this module (tests copy them again
    before they damage anything)."""
    _, shards = built_data
    copy = tmp_path_factory.mktemp("damaged-shards") / "lm"
    shutil.copytree(shards["lm"], copy)
    first = json.loads((copy / MANIFEST).read_text())["splits"]["train"]["shards"][0]
    assert first["rows"] == 64  # a full shard: fewer and more rows are both possible edits
    return copy


def _damaged_copy(src: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    edit(manifest["splits"]["train"])
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(split: dict[str, Any]) -> None:
        node = split
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


EDITS = {  # what an edited manifest says, and the field the error must name
    "dtype": (_set(("columns", "tokens", "dtype"), "float32"), "'dtype'"),
    "shape": (_set(("columns", "tokens", "shape"), [11]), "'shape'"),
    "rows_less": (_set(("shards", 0, "rows"), 3), "'rows'"),
    "rows_more": (_set(("shards", 0, "rows"), 104), "'rows'"),
}
READS = {
    "load": lambda root: ShardSet(root, "train").load(0),
    "load_many": lambda root: ShardSet(root, "train").load_many([0]),
    "read_split": lambda root: read_split(root, "train"),
}


def _assert_one_line_naming(err: pytest.ExceptionInfo, shard: Path, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert str(shard) in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_damaged_manifest_field_is_named_with_the_shard(lm_shards, tmp_path, edit, read):
    """dtype int32 -> float32 read garbage floats, rows 64 -> 3 skipped 61 rows, 64 -> 104 and
    shape [33] -> [11] failed with a bare IndexError / reshape error: all are now a ShardError
    naming the shard file and the field, whichever way the shard is read."""
    change, field = EDITS[edit]
    root = _damaged_copy(lm_shards, tmp_path / "shards", change)
    with pytest.raises(ShardError) as err:
        READS[read](root)
    _assert_one_line_naming(err, root / "train-00000.arrow", field)


def test_damaged_manifest_untouched_copy_reads(lm_shards, tmp_path):
    """The checks refuse only a manifest that disagrees: the undamaged copy reads as written."""
    root = _damaged_copy(lm_shards, tmp_path / "shards", lambda split: None)
    cols = ShardSet(root, "train").load(0)
    assert cols["tokens"].shape == (64, 33) and str(cols["tokens"].dtype) == "int32"


def test_damaged_shard_with_an_int64_column_is_named(lm_shards, tmp_path):
    """A shard rewritten with int64 tokens (size and sha256 updated, so the file itself checks
    out) is refused naming the shard file, the column and both types, not as 'a shard column'."""
    root = _damaged_copy(lm_shards, tmp_path / "shards", lambda split: None)
    path = root / "train-00000.arrow"
    table = pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()  # in memory: the file is rewritten
    wide = table.set_column(table.schema.get_field_index("tokens"), "tokens",
                            table.column("tokens").cast(pa.list_(pa.int64(), 33)))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, wide.schema) as w:
        w.write_table(wide)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (root / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(ShardError) as err:
        ShardSet(root, "train").load(0)
    _assert_one_line_naming(err, path, "'tokens'", "'dtype'", "int64", "int32")
    # the column conversion itself names its source too (it had no path to name before)
    with pytest.raises(ShardError) as err:
        table_columns(read_shard(path), manifest["splits"]["train"]["columns"], where=f"shard {path}")
    _assert_one_line_naming(err, path, "'tokens'", "'dtype'", "int64")


# ----------------------------------------------------------------------------- the tokenizer
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _half_then(die: Callable[[], None]) -> Callable[[Path, Path, bytes], None]:
    """A tokenizer copy that writes half of tokenizer.json and then dies (`die`)."""
    def copy(prepared: Path, out_dir: Path, tokenizer: bytes) -> None:
        (out_dir / build.TOKENIZER).write_bytes(tokenizer[: len(tokenizer) // 2])
        die()
    return copy


def test_damaged_tokenizer_write_is_inside_the_atomic_swap(built_data, lm_shards, tmp_path, monkeypatch):
    """A shard stage that dies while it writes the tokenizer leaves the previous folder as it
    was, tokenizer included, and no half-written tokenizer where a later stage looks."""
    cfg, shards = built_data
    prepared = shards["lm"].parent / "prepared"
    out = tmp_path / "shards"
    shutil.copytree(lm_shards, out)
    before = _snapshot(out)

    def die() -> None:
        raise RuntimeError("killed while writing the tokenizer")

    monkeypatch.setattr(build, "copy_tokenizer", _half_then(die))
    with pytest.raises(RuntimeError, match="killed"):
        build.shard(cfg.task("lm").data, prepared, out)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no temporary left behind


def test_damaged_tokenizer_written_is_the_one_hashed(built_data, tmp_path):
    """The manifest's tokenizer_sha256 is the hash of the tokenizer.json the folder holds."""
    cfg, shards = built_data
    out = tmp_path / "shards"
    build.shard(cfg.task("lm").data, shards["lm"].parent / "prepared", out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tokenizer_sha256"] == file_sha256(out / build.TOKENIZER)
    assert (out / build.TOKENIZER).read_bytes() == (shards["lm"].parent / "prepared" / build.TOKENIZER).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


_KILLED = """
import os, signal, sys
from pathlib import Path
from pipeline.config.schema import TextDataConfig
from pipeline.data import build
from pipeline.data.shard_writer import SplitWriter

def copy(prepared, out_dir, tokenizer):
    (out_dir / build.TOKENIZER).write_bytes(tokenizer[: len(tokenizer) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

def write(self, batch, _write=SplitWriter.write):
    _write(self, batch)
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[4] == "tokenizer":
    build.copy_tokenizer = copy
else:  # the first shard rows written: where the stage spends its time
    SplitWriter.write = write
cfg = TextDataConfig.model_validate_json(Path(sys.argv[1]).read_text())
build.shard(cfg, Path(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.mark.parametrize("where", ["tokenizer", "shards"])
def test_damaged_shard_stage_sigkilled_in_the_tokenizer_write(built_data, lm_shards, tmp_path, where):
    """SIGKILL mid-tokenizer or mid-shards: the old folder is untouched, the only leftover is the
    writer's hidden temporary, and the next atomic write of that folder removes it since its
    writer is gone (one temporary: the shards are written into the stage's own, not a nested one)."""
    cfg, shards = built_data
    out = tmp_path / "data" / "shards"
    out.parent.mkdir()
    shutil.copytree(lm_shards, out)
    before = _snapshot(out)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.task("lm").data.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(cfg_file), str(shards["lm"].parent / "prepared"),
                             str(out), where], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert _snapshot(out) == before
    left = [p.name for p in out.parent.iterdir() if p.name != "shards"]
    assert len(left) == 1 and left[0].startswith(".shards.tmp-") and f"-{proc.pid}-" in left[0], left
    if where == "tokenizer":
        assert (out.parent / left[0] / MANIFEST).is_file()  # the new folder was complete but for the tokenizer
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("a later writer that fails: the folder stays, the dead writer's copy goes")
    assert [p.name for p in out.parent.iterdir()] == ["shards"]
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- atomic_dir
def test_atomic_dir_gets_the_mode_a_plain_mkdir_gives(tmp_path):
    """An atomically written folder (shards, checkpoints, exports) has the mode os.mkdir would
    give it under the same umask, not mkdtemp's private 0700."""
    for umask in (0o022, 0o077, 0o002):
        old = os.umask(umask)
        try:
            plain = tmp_path / f"plain-{umask:o}"
            os.mkdir(plain)
            with atomic_dir(tmp_path / f"atomic-{umask:o}") as d:
                (d / "f").write_text("x")
        finally:
            os.umask(old)
        assert (tmp_path / f"atomic-{umask:o}").stat().st_mode & 0o7777 == plain.stat().st_mode & 0o7777, umask


def test_atomic_dir_removes_only_temporaries_whose_writer_is_gone(tmp_path):
    """Stale temporaries of the same folder written on this host (and pid namespace) by a pid
    that no longer exists are removed; a live writer's, another host's, an unparsable one and
    another folder's are left alone."""
    host, pidns, _ = atomic._writer_tag().rsplit("-", 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    names = {
        "dead": f".out.tmp-{host}-{pidns}-{dead.pid}-0123abcd",
        "live": f".out.tmp-{host}-{pidns}-{live}-0123abcd",
        "other_host": f".out.tmp-{host}x-{pidns}-{dead.pid}-0123abcd",
        "other_ns": f".out.tmp-{host}-{pidns}1-{dead.pid}-0123abcd",
        "old_format": ".out.tmp-k3j_x9a2",
        "other_folder": f".out2.tmp-{host}-{pidns}-{dead.pid}-0123abcd",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.arrow").write_bytes(b"a full copy")
    with atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("new")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out"} | {v for k, v in names.items() if k != "dead"}
    assert (tmp_path / "out" / "f").read_text() == "new"
