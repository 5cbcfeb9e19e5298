"""Shards on disk: the manifest, damage named by file, hashing once per node, compression, read_split."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import shard_verify
from pipeline.data.shard_format import ShardError, load_manifest
from pipeline.data.shard_store import ShardSet, read_split
from pipeline.data.shard_verify import check_split, verify_split
from pipeline.data.shard_writer import write_dataset
from tests.conftest import ROOT


def test_manifest_records_rows_and_hashes(built_data):
    _, shards = built_data
    m = load_manifest(shards["lm"])
    train = m["splits"]["train"]
    assert sum(s["rows"] for s in train["shards"]) == train["rows"]
    assert all(len(s["sha256"]) == 64 for s in train["shards"])
    assert m["seq_len"] == 32 and train["columns"]["tokens"]["shape"] == [33]
    assert (shards["lm"] / "tokenizer.json").is_file()
    d = load_manifest(shards["diffusion"])
    assert d["image_shape"] == [1, 8, 8] and d["num_classes"] == 10


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(built_data, tmp_path, damage):
    import shutil

    _, shards = built_data
    copy = tmp_path / "shards"
    shutil.copytree(shards["lm"], copy)
    victim = copy / load_manifest(copy)["splits"]["train"]["shards"][0]["file"]
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[:-10])
    else:
        victim.unlink()
    with pytest.raises(ShardError, match=victim.name):
        verify_split(copy, "train")


# A worker process: verify and read every shard of a split, counting the files it hashes (each
# hash slowed down, so that processes started together overlap while hashing).
_WORKER = """
import sys, time
from pipeline.data import shard_verify
from pipeline.data.shard_store import ShardSet
calls, real = [], shard_verify.file_sha256
def counted(path):
    calls.append(path)
    time.sleep(float(sys.argv[3]))
    return real(path)
shard_verify.file_sha256 = counted
shards = ShardSet(sys.argv[1], "train", cache_dir=sys.argv[2])
shards.check_sizes()
for i in range(len(shards.rows)):
    shards.load(i)
print(len(calls))
"""


def _hashes_in_new_processes(root: Path, cache: Path, processes: int = 1, delay: float = 0.0) -> list[int]:
    """Files hashed by each of `processes` worker processes started at once on this node."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(cache), str(delay)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    counts = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        counts.append(int(out.split()[-1]))
    return counts


def test_shards_are_hashed_once_per_node(tmp_path, monkeypatch):
    """Two worker processes starting together hash each shard once between them (one waits for
    the other and trusts the marker it leaves in the node's shard cache); a third hashes nothing.
    A shard changed afterwards is hashed again (its record no longer matches), a freshly written
    one by every process until its mtime has settled, and one damaged after a process trusted it
    is refused where that process reads it. The driver's check reads no content."""
    root, cache = tmp_path / "shards", tmp_path / "cache"
    write_dataset(root, {"train": [{"x": np.arange(96)}]}, 16, {"kind": "test"})
    files = sorted(root.glob("train-*.arrow"))
    a_minute_ago = time.time_ns() - 60 * 10**9  # written by the shard stage, before training started
    for f in files:
        os.utime(f, ns=(a_minute_ago, a_minute_ago))

    assert sum(_hashes_in_new_processes(root, cache, processes=2, delay=0.2)) == len(files) == 6
    assert _hashes_in_new_processes(root, cache) == [0]

    calls: list[str] = []
    real = shard_verify.file_sha256
    monkeypatch.setattr(shard_verify, "file_sha256", lambda path: calls.append(Path(path).name) or real(path))

    def new_process() -> list[str]:
        """What another worker process on this node hashes: it has the marker, no memory of its own."""
        shard_verify._HASHED.clear()
        calls.clear()
        ShardSet(root, "train", cache_dir=cache).check_sizes()
        return list(calls)

    assert new_process() == []
    os.utime(files[2], ns=(a_minute_ago + 10**9,) * 2)  # changed (same bytes): its record no longer vouches
    assert new_process() == [files[2].name]
    assert new_process() == []  # recorded again
    files[4].write_bytes(files[4].read_bytes())  # rewritten just now: too fresh to record
    assert new_process() == [files[4].name]
    assert new_process() == [files[4].name]

    shards = ShardSet(root, "train", cache_dir=cache)
    shards.check_sizes()
    data = bytearray(files[3].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes, after this process verified the shard
    files[3].write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {files[3]} does not match its sha256"):
        shards.load(3)

    calls.clear()
    check_split(root, "train")  # the driver: manifest and sizes only
    assert calls == []
    files[5].write_bytes(files[5].read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"shard {files[5]} is .* bytes, manifest says"):
        check_split(root, "train")



def _many_shards(root, n=200, shard_rows=16) -> ShardSet:
    write_dataset(root, {"train": [{"x": np.arange(n) * 10}]}, shard_rows, {"kind": "test"})
    return ShardSet(root, "train")


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_shards_read_back_the_same(tmp_path, compression):
    images = np.random.default_rng(0).random((50, 1, 4, 4)).astype(np.float32)
    for c in ("none", compression):
        write_dataset(tmp_path / c, {"train": [{"image": images}]}, 16, {"kind": "test"}, c)
    plain, packed = ShardSet(tmp_path / "none", "train"), ShardSet(tmp_path / compression, "train")
    assert load_manifest(tmp_path / compression)["compression"] == compression
    assert packed.entries[0]["bytes"] != plain.entries[0]["bytes"]
    assert all(np.array_equal(plain.load_many([3, 0])[k], packed.load_many([3, 0])[k]) for k in ("id", "image"))
    assert np.array_equal(plain.load_many([3, 0])["image"], np.concatenate([images[48:], images[:16]]))



def test_read_split_returns_manifest_shapes(built_data):
    _, shards = built_data
    d = read_split(shards["diffusion"], "val")
    assert d["image"].shape[1:] == (1, 8, 8) and d["image"].flags.writeable


def test_shards_missing_on_a_worker_node_say_to_publish_them(tmp_path):
    """Workers get the shards' path on the driver's node; on a node that does not share that file
    system (every cluster recipe's workers: the head takes no worker) the folder is missing, which
    was a bare "no shard manifest". Now it names the node and `cluster.shards_uri`."""
    import socket

    missing = tmp_path / "driver-only" / "shards"
    with pytest.raises(ShardError, match=rf"^{missing}: no such folder on this node \({socket.gethostname()}\): "
                                         r".*set cluster\.shards_uri"):
        ShardSet(missing, "train")
    missing.mkdir(parents=True)  # there, but not sharded: the stage to run
    with pytest.raises(ShardError, match=r"no shard manifest at .*: run the shard stage first"):
        ShardSet(missing, "train")


def test_shards_publish_to_a_shared_folder(tmp_path):
    """`cluster.shards_uri` may name a shared file system (the cluster recipes' /mnt/shared/shards):
    publishing there failed on the folder fsspec's local copy does not make."""
    from pipeline.data.shard_store import publish

    write_dataset(tmp_path / "s", {"train": [{"x": np.arange(96)}]}, 16, {"kind": "test"})
    target = tmp_path / "shared" / "shards" / "lm" / "md5"
    assert publish(tmp_path / "s", str(target)) == str(target)
    shards = ShardSet(target, "train")
    shards.check_sizes()
    assert shards.rows.sum() == 96
    assert (target / "manifest.json").read_bytes() == (tmp_path / "s" / "manifest.json").read_bytes()
    uri = ShardSet(f"file://{target}", "train")  # (a file:// root: no missing folder, and its shards read)
    uri.check_sizes()
    assert uri.rows.sum() == 96 and read_split(f"file://{target}", "train", 20)["x"].tolist() == list(range(20))
    # published again (another train stage of the same data): the same bytes are not rewritten under
    # the readers of the first; a changed file is swapped in whole
    inode = (target / "manifest.json").stat().st_ino
    publish(tmp_path / "s", str(target))
    assert (target / "manifest.json").stat().st_ino == inode
    assert not list(target.glob("*.tmp"))
