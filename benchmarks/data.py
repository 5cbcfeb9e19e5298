"""Data path benchmarks, each a ratio measured side by side in one run.

1. Prepare and shard throughput on a generated 1 GiB text corpus (MB of raw text per second,
   peak RSS of this process).
2. Reader throughput / raw sequential read of the same shard bytes. The reader is the one
   training uses (windowed shuffle, rank slicing, prefetch thread, decoded into numpy
   batches); the raw read is `read()` of the shard files in order. Both start cold: each
   file's pages are dropped from the page cache first (posix_fadvise DONTNEED), so both
   read from disk. Rounds alternate.
3. The share of training-step time spent waiting for data in the default LM training (the
   pipeline's own `data_wait_frac`), with prefetch on (the default) and off.

    python benchmarks/data.py [--size-mib 1024] [--rounds 5] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.config import compose, validate
from pipeline.config.loading import apply_overrides
from pipeline.config.schema import TextDataConfig
from pipeline.data.build import prepare, shard
from pipeline.data.reader import GlobalOrderReader
from pipeline.data.shard_store import ShardSet
from pipeline.data.synthetic import write_corpus
from pipeline.training.loop import train
from pipeline.training.session import LocalSession

ROOT = Path(__file__).resolve().parents[1]


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path]) -> float:
    _drop_cache(paths)
    start = time.perf_counter()
    for p in paths:
        with p.open("rb", buffering=0) as fh:
            while fh.read(1 << 22):
                pass
    return time.perf_counter() - start


def reader_read(root: Path, batch: int, window: int, prefetch: int) -> float:
    shards = ShardSet(root, "train")
    for i in range(len(shards.rows)):
        shards.local_path(i)  # verification happens once before step 1; not part of streaming
    _drop_cache([Path(root) / e["file"] for e in shards.entries])
    reader = GlobalOrderReader(shards, batch, seed=0, window=window, prefetch=prefetch)
    start = time.perf_counter()
    for _ in range(reader.n // batch):
        reader.next_local_batch()
    reader.close()
    return time.perf_counter() - start


def data_wait(steps: int, prefetch: int, shards: Path) -> float:
    raw = apply_overrides(compose(ROOT / "configs"), [
        f"tasks.lm.trainer.max_steps={steps}", "tasks.lm.trainer.log_every=10",
        f"tasks.lm.trainer.ckpt_every={10 * steps}", f"tasks.lm.trainer.prefetch_batches={prefetch}"])
    state = train(validate(raw), "lm", shards, LocalSession(None))
    windows = state.history[1:]  # the first window holds warm-up
    return statistics.median(h["data_wait_frac"] for h in windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # on disk here (not tmpfs): the raw read is a real read
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        write_corpus(corpus, args.size_mib << 20)
        mb = corpus.stat().st_size / 1e6
        cfg = TextDataConfig(source=str(corpus), shard_rows=4096)
        t0 = time.perf_counter()
        prepare(cfg, 0, tmp / "prepared")
        t1 = time.perf_counter()
        manifest = shard(cfg, tmp / "prepared", tmp / "shards")
        t2 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"corpus {mb:,.0f} MB: prepare {t1 - t0:.1f} s ({mb / (t1 - t0):.1f} MB/s), shard {t2 - t1:.1f} s "
              f"({mb / (t2 - t1):.1f} MB/s), both {mb / (t2 - t0):.1f} MB/s; peak RSS {peak:.0f} MiB", flush=True)

        root = manifest.parent
        files = [root / e["file"] for e in ShardSet(root, "train").entries]
        size = sum(p.stat().st_size for p in files) / 1e6
        ratios: dict[int, list[float]] = {0: [], 2: []}
        reader_read(root, args.batch, window=16, prefetch=2)  # warm-up: imports and first allocations
        for r in range(args.rounds):
            raw_s = raw_read(files)
            line = f"round {r + 1}: raw read {size / raw_s:,.0f} MB/s"
            for prefetch in ratios:
                rd_s = reader_read(root, args.batch, window=16, prefetch=prefetch)
                ratios[prefetch].append(raw_s / rd_s)
                line += f"; reader (prefetch {prefetch}) {size / rd_s:,.0f} MB/s, ratio {raw_s / rd_s:.2f}"
            print(line, flush=True)
        print(f"reader / raw sequential read of {size:,.0f} MB of shards (batch {args.batch}, window 16), median: "
              + ", ".join(f"prefetch {p} {statistics.median(v):.2f}" for p, v in ratios.items()))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate(compose(ROOT / "configs"))
        prepare(cfg.task("lm").data, cfg.seed, Path(tmp) / "prepared")
        shards = shard(cfg.task("lm").data, Path(tmp) / "prepared", Path(tmp) / "shards").parent
        on, off = [], []
        for r in range(min(args.rounds, 3)):
            on.append(data_wait(args.steps, 2, shards))
            off.append(data_wait(args.steps, 0, shards))
            print(f"round {r + 1}: data wait / step time: prefetch 2 {on[-1]:.4%}, no prefetch {off[-1]:.4%}",
                  flush=True)
        print(f"default LM training, data wait share of step time (median): prefetch on "
              f"{statistics.median(on):.4%}, off {statistics.median(off):.4%}")


if __name__ == "__main__":
    main()
