"""Remote data through a real S3 server (moto): sources, and shards cached, verified and named per node."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.atomic import file_sha256
from pipeline.data.build import prepare
from pipeline.data.image_sources import read_images
from pipeline.data.reader import GlobalOrderReader
from pipeline.data.shard_format import ShardError, load_manifest
from pipeline.data.shard_store import ShardSet, read_split
from pipeline.data.sources import DataSourceError, read_text_documents


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, in its own process; s3fs
    finds it through the standard AWS environment variables, as it would a real endpoint."""
    from pipeline.runtime.local_group import free_port
    from tests.e2e_project import moto_server

    port = free_port()
    server = moto_server("127.0.0.1", port)
    endpoint = f"http://127.0.0.1:{port}"
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
    import s3fs

    from pipeline.config import validate
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
