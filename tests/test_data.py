"""Prepare, shard and read: cleaning, de-duplication, stable splits, manifests, verification,
and the deterministic resumable reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.atomic import file_sha256
from pipeline.config.schema import AugmentConfig, ImageDataConfig, SplitConfig, TextDataConfig
from pipeline.data import shard_verify
from pipeline.data.build import prepare
from pipeline.data.images import augment, prepare_images
from pipeline.data.reader import GlobalOrderReader
from pipeline.data.shard_format import ShardError, load_manifest
from pipeline.data.shard_store import ShardSet, read_split
from pipeline.data.shard_verify import check_split, verify_split
from pipeline.data.shard_writer import write_dataset
from pipeline.data.sources import DataSourceError, read_images, read_text_documents
from pipeline.data.splits import assign_split, content_hash
from pipeline.data.text import clean_text
from tests.conftest import ROOT


def test_clean_text_normalises_unicode_and_spaces():
    assert clean_text("Cafe\u0301  bar\t\tbaz \x07\n\nnext  ") == "Café bar baz\n\nnext"


def test_prepare_text_drops_short_and_duplicate_documents(tmp_path):
    docs = ["A paragraph long enough to keep.", "A paragraph long enough to keep.", "short",
            *[f"Another distinct paragraph number {i} here." for i in range(30)]]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:20]))
    (tmp_path / "b.txt").write_text("\n\n".join([docs[0], *docs[20:]]))  # a repeat across files too
    stats = prepare(TextDataConfig(source=str(tmp_path), min_chars=10, vocab_size=300), 1, tmp_path / "out")
    assert stats["dropped_duplicates"] == 2 and stats["dropped_short"] == 1 and stats["documents_raw"] == 34
    kept = [d for s in ("train", "val", "test")
            for d in pq.read_table(tmp_path / "out" / f"{s}.parquet")["text"].to_pylist()]
    assert len(kept) == len(set(kept)) == 31
    assert sum(stats[f"documents_{s}"] for s in ("train", "val", "test")) == 31


def test_near_duplicates_are_dropped_when_asked(tmp_path):
    """Paragraphs that differ in one word of 60 are near-duplicates; unrelated ones are not."""
    from pipeline.data.synthetic import _words

    rng = np.random.default_rng(0)
    vocab = _words()
    originals = [" ".join(rng.choice(vocab, 60)) for _ in range(40)]
    edited = [" ".join([*d.split()[:30], "CHANGED", *d.split()[31:]]) for d in originals[:10]]
    (tmp_path / "docs.txt").write_text("\n\n".join(originals + edited))
    kept = {}
    for mode in ("keep", "drop"):
        cfg = TextDataConfig(source=str(tmp_path / "docs.txt"), near_duplicates=mode, vocab_size=300)
        stats = prepare(cfg, 0, tmp_path / mode)
        kept[mode] = sum(stats[f"documents_{s}"] for s in ("train", "val", "test"))
        assert stats["dropped_duplicates"] == 0
    assert kept == {"keep": 50, "drop": 40}


def test_split_assignment_is_stable_when_data_grows():
    cfg = SplitConfig()
    old = {f"doc {i}": assign_split(content_hash(f"doc {i}".encode()), cfg, 7) for i in range(200)}
    grown = {f"doc {i}": assign_split(content_hash(f"doc {i}".encode()), cfg, 7) for i in range(400)}
    assert all(grown[k] == v for k, v in old.items())
    counts = {s: list(grown.values()).count(s) for s in ("train", "val", "test")}
    assert counts["train"] > 250 and counts["val"] > 15 and counts["test"] > 15


def test_text_sources_read_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "from jsonl"}) + "\n")
    docs = list(read_text_documents(str(tmp_path), text_field="body"))
    assert docs == ["first paragraph", "second paragraph", "from jsonl"]
    with pytest.raises(DataSourceError, match="no field 'text'"):
        list(read_text_documents(str(tmp_path / "b.jsonl")))
    with pytest.raises(DataSourceError, match="does not exist"):
        list(read_text_documents(str(tmp_path / "missing")))


def test_parquet_text_source_streams_batches_and_names_a_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"document number {i}" for i in range(3000)]
    pq.write_table(pa.table({"id": list(range(3000)), "body": rows}), tmp_path / "part-0.parquet", row_group_size=500)
    assert list(read_text_documents(str(tmp_path), text_field="body")) == rows
    with pytest.raises(DataSourceError, match=r"no column 'text' \(data.text_field; columns: id, body\)"):
        list(read_text_documents(str(tmp_path / "part-0.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataSourceError, match=r"bad\.parquet: not a readable Parquet file"):
        list(read_text_documents(str(tmp_path), text_field="body"))


def test_hugging_face_saved_dataset_source(tmp_path):
    """A real `datasets` save_to_disk, read back with pyarrow (the pipeline needs no `datasets`)."""
    datasets = pytest.importorskip("datasets")

    train = datasets.Dataset.from_dict({"content": ["alpha text", "beta text"], "label": [0, 1]})
    test = datasets.Dataset.from_dict({"content": ["gamma text"], "label": [1]})
    train.save_to_disk(str(tmp_path / "one"))
    assert list(read_text_documents(str(tmp_path / "one"), text_field="content")) == ["alpha text", "beta text"]
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    assert list(read_text_documents(str(tmp_path / "both"), text_field="content")) == [
        "alpha text", "beta text", "gamma text"]
    with pytest.raises(DataSourceError, match="no column 'text'"):
        list(read_text_documents(str(tmp_path / "one")))


def test_builtin_text_is_real_prose():
    docs = list(read_text_documents("builtin:python-docs"))
    assert len(docs) > 5000
    assert any("Assert statements are a convenient way" in d for d in docs)


def test_image_sources_npz_and_builtin(tmp_path):
    x, y, n = read_images("builtin:digits")
    assert x.shape == (1797, 1, 8, 8) and n == 10 and x.min() >= 0 and x.max() <= 1
    np.savez(tmp_path / "mine.npz", images=(x[:20, 0] * 255).astype(np.uint8), labels=y[:20])
    x2, y2, _ = read_images(str(tmp_path / "mine.npz"))
    assert x2.shape == (20, 1, 8, 8) and x2.max() <= 1.0 and (y2 == y[:20]).all()


def test_augmentation_is_seeded_label_preserving_and_in_range():
    x, y, _ = read_images("builtin:digits")
    cfg = AugmentConfig(copies=2)
    a1, a2 = augment(x[:10], cfg, seed=3), augment(x[:10], cfg, seed=3)
    assert a1.shape == (20, 1, 8, 8) and np.array_equal(a1, a2)
    assert a1.min() >= 0.0 and a1.max() <= 1.0
    assert not np.allclose(a1[:10], x[:10])  # it changed the pixels
    splits, stats = prepare_images(x, y, ImageDataConfig(augment=cfg), seed=0)
    assert stats["images_train"] == 3 * sum(stats["class_counts_train"]) // 3
    tx, ty = splits["train"]
    assert tx.min() >= -1 and tx.max() <= 1 and len(tx) == len(ty)


def test_colour_class_folders_and_colour_jitter(tmp_path):
    """PNG class folders in colour stay 3-channel; colour jitter changes channels differently."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y, n = read_images(str(tmp_path))
    assert x.shape == (6, 3, 6, 6) and n == 2 and y.tolist() == [0, 0, 0, 1, 1, 1]
    still = augment(x, AugmentConfig(copies=1, rotate_deg=0, shift_px=0, noise_std=0), seed=1)
    jittered = augment(x, AugmentConfig(copies=1, rotate_deg=0, shift_px=0, noise_std=0, color_jitter=0.4), seed=1)
    assert np.allclose(still, x, atol=1e-6) and not np.allclose(jittered, x, atol=1e-3)
    assert jittered.min() >= 0 and jittered.max() <= 1


@pytest.mark.parametrize("balance", ["oversample", "weights"])
def test_class_balance(balance, tmp_path):
    """An imbalanced set: oversampling evens the training classes; weights leave the data as it
    is and give each class the same total weight (a `weight` column in the train shards)."""
    from pipeline.data.build import shard
    from pipeline.data.images import class_weights

    x, y, _ = read_images("builtin:digits")
    keep = np.flatnonzero((y != 3) | (np.arange(len(y)) % 6 == 0))  # digit 3 is rare
    np.savez(tmp_path / "rare3.npz", images=x[keep, 0], labels=y[keep])
    cfg = ImageDataConfig(source=str(tmp_path / "rare3.npz"), balance=balance, augment=AugmentConfig(copies=0))
    stats = prepare(cfg, 0, tmp_path / "prepared")
    before, after = stats["class_counts_train_before_balance"], stats["class_counts_train"]
    assert before[3] < min(before[:3] + before[4:]) // 3
    if balance == "oversample":
        assert len(set(after)) == 1 and after[0] == max(before)
    else:
        assert after == before
        shard(cfg, tmp_path / "prepared", tmp_path / "shards")
        train = read_split(tmp_path / "shards", "train")
        totals = np.bincount(train["label"], weights=train["weight"])
        assert np.allclose(totals, totals[0], rtol=1e-4) and abs(train["weight"].mean() - 1) < 1e-5
        assert "weight" not in read_split(tmp_path / "shards", "val")
        assert np.allclose(class_weights(np.array([0, 0, 0, 1]), 3), [2 / 3, 2 / 3, 2 / 3, 2.0])


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


def _arrays(n=40):
    return {"id": np.arange(n), "x": np.arange(n) * 10}


def test_global_order_does_not_depend_on_worker_count():
    one = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    two = [GlobalOrderReader(_arrays(), global_batch=8, rank=r, world=2, seed=5) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (40 samples / 8)
        ref = one.next_local_batch()["id"]
        got = np.concatenate([r.next_local_batch()["id"] for r in two])
        assert np.array_equal(ref, got)


def test_reader_resumes_exactly():
    straight = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    seen = [straight.next_local_batch()["id"] for _ in range(9)]
    first = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    for _ in range(4):
        first.next_local_batch()
    resumed = GlobalOrderReader(_arrays(), global_batch=8, seed=5)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.next_local_batch()["id"] for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(seen[4:], rest, strict=True))
    each_epoch = np.concatenate(seen[:5])
    assert sorted(each_epoch.tolist()) == list(range(40))  # an epoch is a permutation: none lost or repeated


def test_reader_refuses_a_different_global_batch():
    r = GlobalOrderReader(_arrays(), global_batch=8)
    with pytest.raises(ValueError, match="global batch"):
        GlobalOrderReader(_arrays(), global_batch=4).load_state_dict(r.state_dict())


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


def test_windowed_order_does_not_depend_on_worker_count(tmp_path):
    """13 shards shuffled in windows of 4: 1, 2 and 4 workers (with prefetch) see one order."""
    one = GlobalOrderReader(_many_shards(tmp_path / "s"), global_batch=8, seed=3, window=4)
    many = {w: [GlobalOrderReader(ShardSet(tmp_path / "s", "train"), global_batch=8, rank=r, world=w, seed=3,
                                  window=4, prefetch=2) for r in range(w)] for w in (2, 4)}
    seen = []
    for _ in range(50):  # two epochs of 25 batches
        ref = one.next_local_batch()
        assert np.array_equal(ref["x"], ref["id"] * 10)  # rows stay whole
        for readers in many.values():
            assert np.array_equal(ref["id"], np.concatenate([r.next_local_batch()["id"] for r in readers]))
        seen.append(ref["id"])
        assert len(one._decoded) <= 2  # memory: the current and the previous window of decoded rows
    epochs = np.concatenate(seen).reshape(2, 200)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(200))  # each epoch: all, once
    assert not np.array_equal(epochs[0], epochs[1])  # and a new order every epoch
    first_window = set(epochs[0][:48] // 16)  # rows early in the epoch all come from the first window
    assert len(first_window) == 4
    for readers in many.values():
        for r in readers:
            r.close()


def test_streaming_reader_resumes_mid_epoch_exactly(tmp_path):
    """Stop after 17 batches (mid-epoch, mid-window), resume from the saved state with another
    worker count: the samples are exactly those an uninterrupted run sees next."""
    shards = _many_shards(tmp_path / "s")
    straight = GlobalOrderReader(shards, global_batch=8, seed=3, window=4, prefetch=2)
    expected = [straight.next_local_batch()["id"] for _ in range(40)]
    first = GlobalOrderReader(shards, global_batch=8, rank=0, world=2, seed=3, window=4, prefetch=3)
    for _ in range(17):
        first.next_local_batch()  # prefetch has decoded batches beyond 17; they must not count
    state = first.state_dict()
    resumed = [GlobalOrderReader(ShardSet(tmp_path / "s", "train"), global_batch=8, rank=r, world=4, seed=3,
                                 window=4, prefetch=2) for r in range(4)]
    for r in resumed:
        r.load_state_dict(state)
    rest = [np.concatenate([r.next_local_batch()["id"] for r in resumed]) for _ in range(23)]
    assert all(np.array_equal(a, b) for a, b in zip(expected[17:], rest, strict=True))
    with pytest.raises(ValueError, match="shuffle window"):
        GlobalOrderReader(shards, global_batch=8, seed=3, window=2).load_state_dict(state)


def test_read_split_returns_manifest_shapes(built_data):
    _, shards = built_data
    d = read_split(shards["diffusion"], "val")
    assert d["image"].shape[1:] == (1, 8, 8) and d["image"].flags.writeable


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, in its own process; s3fs
    finds it through the standard AWS environment variables, as it would a real endpoint."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from pipeline.runtime.local_group import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert server.poll() is None, "moto_server exited"
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "moto_server did not come up"
            time.sleep(0.3)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients: one made for an earlier server is stale
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        os.killpg(server.pid, 9)
        server.wait()


def test_s3_round_trip(s3_server, tmp_path):
    """Text files on S3 (JSONL, Parquet, plain text) read exactly as the same files on disk,
    and prepare builds the same splits from either."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from pipeline.config import validate
    from pipeline.data.build import prepare
    from tests.conftest import tiny_raw

    local = tmp_path / "corpus"
    local.mkdir()
    (local / "a.txt").write_text("a first paragraph of plain text\n\na second paragraph of plain text")
    (local / "b.jsonl").write_text("".join(json.dumps({"text": f"json record number {i} here"}) + "\n"
                                           for i in range(50)))
    pq.write_table(pa.table({"text": [f"parquet row number {i} here" for i in range(200)]}), local / "c.parquet")
    fs = s3fs.S3FileSystem()
    fs.mkdir("corpus-bucket")
    fs.put(str(local), "corpus-bucket/raw", recursive=True)
    assert sorted(fs.ls("corpus-bucket/raw")) == [f"corpus-bucket/raw/{n}" for n in ("a.txt", "b.jsonl", "c.parquet")]

    remote = list(read_text_documents("s3://corpus-bucket/raw"))
    assert remote == list(read_text_documents(str(local))) and len(remote) == 252
    with pytest.raises(DataSourceError, match="does not exist"):
        list(read_text_documents("s3://corpus-bucket/nothing-here"))

    stats = {}
    for name, source in (("local", str(local)), ("s3", "s3://corpus-bucket/raw")):
        cfg = validate(tiny_raw([f"tasks.lm.data.source={source}", "tasks.lm.data.min_chars=5"]))
        stats[name] = prepare(cfg.task("lm").data, cfg.seed, tmp_path / name)
    assert stats["local"]["raw_sha256"] == stats["s3"]["raw_sha256"]
    assert stats["local"]["tokenizer_sha256"] == stats["s3"]["tokenizer_sha256"]
    for split in ("train", "val", "test"):
        assert pq.read_table(tmp_path / "local" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "s3" / f"{split}.parquet"))

    # images: an .npz and a class-folder tree read the same from S3 as from disk
    from PIL import Image

    x, y, _ = read_images("builtin:digits")
    np.savez(tmp_path / "digits.npz", images=x[:30, 0], labels=y[:30])
    for i in range(4):
        (tmp_path / "folders" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0] * 255).astype(np.uint8)).save(tmp_path / "folders" / f"class{i % 2}" / f"{i}.png")
    fs.put(str(tmp_path / "digits.npz"), "corpus-bucket/images/digits.npz")
    fs.put(str(tmp_path / "folders"), "corpus-bucket/images/folders", recursive=True)
    for local_src, remote_src in ((tmp_path / "digits.npz", "s3://corpus-bucket/images/digits.npz"),
                                  (tmp_path / "folders", "s3://corpus-bucket/images/folders")):
        a, b = read_images(str(local_src)), read_images(remote_src)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_remote_shards_are_cached_verified_and_named(s3_server, built_data, tmp_path):
    """Shards published to S3 read through a content-addressed local cache give the same
    batches as the local folder; a damaged or missing remote shard is named; an upload cut
    short (no manifest yet) is refused."""
    import s3fs

    from pipeline.data.shard_store import publish

    _, shards = built_data
    local_root = shards["lm"]
    fs = s3fs.S3FileSystem()
    fs.mkdir("shards-bucket")
    url = publish(local_root, "s3://shards-bucket/lm/v1")
    remote = ShardSet(url, "train", cache_dir=tmp_path / "cache")
    remote.check_sizes()
    local = ShardSet(local_root, "train")
    a = GlobalOrderReader(local, global_batch=8, seed=1, window=2)
    b = GlobalOrderReader(remote, global_batch=8, seed=1, window=2, prefetch=2)
    for _ in range(12):
        assert all(np.array_equal(x, y) for x, y in zip(a.next_local_batch().values(),
                                                        b.next_local_batch().values(), strict=True))
    b.close()
    manifest = load_manifest(local_root)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != "verified")  # (the node's marker)
    published = {f"{e['sha256']}.arrow" for e in manifest["splits"]["train"]["shards"]}
    assert cached and set(cached) < published  # streamed: only the shards read so far were fetched
    assert all(file_sha256(tmp_path / "cache" / name) == name.split(".")[0] for name in cached)
    assert read_split(url, "val")["tokens"].shape == read_split(local_root, "val")["tokens"].shape

    victim = manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray((local_root / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    publish(local_root, "s3://shards-bucket/lm/bad")
    fs.pipe(f"shards-bucket/lm/bad/{victim}", bytes(data))  # same size, other bytes
    bad = ShardSet("s3://shards-bucket/lm/bad", "train", cache_dir=tmp_path / "cache2")
    bad.check_sizes()  # sizes agree: only the hash can tell
    with pytest.raises(ShardError, match=f"{victim} does not match its sha256"):
        bad.load(1)
    # nothing half-trusted left in the cache, and nothing recorded as verified (only the marker's lock file)
    assert [p.name for p in (tmp_path / "cache2").iterdir()] == ["verified"]
    assert [p.name for p in (tmp_path / "cache2" / "verified").iterdir()] == [".lock"]
    fs.pipe(f"shards-bucket/lm/bad/{victim}", bytes(data[:-10]))
    with pytest.raises(ShardError, match=f"{victim} is .* bytes, manifest says"):
        ShardSet("s3://shards-bucket/lm/bad", "train", cache_dir=tmp_path / "cache2").check_sizes()
    fs.rm(f"shards-bucket/lm/bad/{victim}")
    with pytest.raises(ShardError, match=f"{victim} is missing"):
        ShardSet("s3://shards-bucket/lm/bad", "train", cache_dir=tmp_path / "cache2").check_sizes()
    fs.put(str(local_root / victim), "shards-bucket/lm/partial/" + victim)
    with pytest.raises(ShardError, match="no shard manifest"):
        ShardSet("s3://shards-bucket/lm/partial", "train")
