"""Data at scale: prepare and shard as Ray tasks give byte-identical outputs, and a 1 GiB
corpus prepares and shards in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import TextDataConfig
from pipeline.data.build import prepare, shard
from pipeline.data.shard_verify import verify_split

ROOT = Path(__file__).resolve().parents[1]


def test_prepare_and_shard_as_ray_tasks_match_in_process(text_corpus, tmp_path):
    """The per-file map (streaming generator tasks) and the tokenization map run on a real local
    Ray; the prepared files, tokenizer and every shard hash equal the in-process result."""
    import ray

    base = {"source": str(text_corpus), "vocab_size": 300, "seq_len": 32, "shard_rows": 64}
    local = TextDataConfig(**base)
    prepare(local, 7, tmp_path / "a" / "prepared")
    shard(local, tmp_path / "a" / "prepared", tmp_path / "a" / "shards")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        distributed = TextDataConfig(**base, ray=True)
        stats = prepare(distributed, 7, tmp_path / "b" / "prepared")
        shard(distributed, tmp_path / "b" / "prepared", tmp_path / "b" / "shards")
    finally:
        ray.shutdown()
    assert stats["source_units"] == 13 and stats["dropped_duplicates"] > 0  # repeat.txt repeats a file
    for split in ("train", "val", "test"):
        assert pq.read_table(tmp_path / "a" / "prepared" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "b" / "prepared" / f"{split}.parquet"))
    one, two = (json.loads((tmp_path / x / "shards" / "manifest.json").read_text()) for x in "ab")
    assert one == two and one["splits"]["train"]["rows"] > 0


@pytest.mark.scale
def test_one_gib_corpus_prepares_and_shards_in_bounded_memory(tmp_path):
    """A generated 1 GiB text file goes through prepare in a fresh process whose peak RSS stays
    well under 1 GiB, every paragraph accounted for. The shard stage's memory is one batch of
    documents and their tokens whatever the size, so it is measured on a sixteenth of that input
    (tokenising 1 GiB costs about 7 minutes of 2 CPUs, and proves no more): its peak, in a
    process of its own, stays under the same bound and the shards verify."""
    from pipeline.data.synthetic import write_corpus

    corpus = tmp_path / "corpus.txt"
    paragraphs = write_corpus(corpus, 1 << 30)
    assert corpus.stat().st_size >= 1 << 30
    stats = _run_stages(corpus, tmp_path / "gib", shard=False)
    assert stats["documents_raw"] == paragraphs
    assert sum(stats[f"documents_{s}"] for s in ("train", "val", "test")) == paragraphs

    corpus.unlink()
    paragraphs = write_corpus(corpus, 64 << 20, seed=1)
    stats = _run_stages(corpus, tmp_path / "sixteenth", shard=True)
    assert stats["documents_raw"] == paragraphs
    out = tmp_path / "sixteenth"
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 100_000  # ~64 MiB of text in 129-token rows
    assert len(verify_split(out / "shards", "train")) == len(manifest["splits"]["train"]["shards"])


def _run_stages(corpus: Path, out: Path, shard: bool) -> dict:
    """prepare (and shard) `corpus` into `out` in a fresh process; its statistics, with each
    stage's peak RSS asserted under 768 MiB."""
    script = (
        "import json, sys; from pathlib import Path\n"
        "from pipeline.config.schema import TextDataConfig\n"
        "from pipeline.data.build import prepare, shard\n"
        "def peak_kib():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "cfg = TextDataConfig(source=sys.argv[1], shard_rows=4096)\n"
        "out = Path(sys.argv[2])\n"
        "stats = prepare(cfg, 0, out / 'prepared')\n"
        "stats['prepare_peak_kib'] = peak_kib()\n"
        "if sys.argv[3] == 'shard':\n"
        "    open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS: the shard stage's own peak\n"
        "    shard(cfg, out / 'prepared', out / 'shards')\n"
        "    stats['shard_peak_kib'] = peak_kib()\n"
        "(out / 'stats.json').write_text(json.dumps(stats))\n"
    )
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", script, str(corpus), str(out), "shard" if shard else "-"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads((out / "stats.json").read_text())
    # VmHWM is this process image's own high-water mark. Not ru_maxrss: Linux carries the parent's
    # peak over a fork + exec into it (pytest's, hundreds of MiB after the other tests).
    size = corpus.stat().st_size / 2**20
    for stage in ("prepare", "shard") if shard else ("prepare",):
        peak_mib = stats[f"{stage}_peak_kib"] / 1024
        print(f"{stage} of a {size:.0f} MiB corpus: peak RSS {peak_mib:.0f} MiB")
        assert peak_mib < 768, f"{stage} of {size:.0f} MiB peaked at {peak_mib:.0f} MiB"
    return stats
