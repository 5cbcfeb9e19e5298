"""Pipeline step time / bare PyTorch step time, same model, data and batch, measured in one run.

The pipeline side is `pipeline.training.loop.train` in one process (strategy, precision,
reader, LR schedule, loss bookkeeping, logging; N=1 so no collective). The bare side is the
shortest correct loop over the same token rows. Rounds alternate so that machine noise hits
both sides alike; the median ratio and the ratio of the best rounds are reported.

    python benchmarks/overhead.py [--steps 30] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import compose, validate
from pipeline.config.loading import apply_overrides
from pipeline.data.build import prepare, shard
from pipeline.data.shard_format import load_manifest
from pipeline.data.shard_store import read_split
from pipeline.tasks import task_named
from pipeline.training.loop import train
from pipeline.training.optim import build_optimizer
from pipeline.training.session import LocalSession


def pipeline_step_time(cfg, shards: Path, steps: int) -> float:
    state = train(cfg, "lm", shards, LocalSession(None))
    batch_tokens = cfg.task("lm").trainer.global_batch_size * cfg.task("lm").data.seq_len
    windows = state.history[1:]  # the first window holds warm-up
    return statistics.median(batch_tokens / h["tokens_per_s"] for h in windows)


def bare_step_time(cfg, shards: Path, steps: int) -> float:
    tcfg = cfg.task("lm")
    spec = task_named("lm").model_spec(tcfg, load_manifest(shards))
    torch.manual_seed(cfg.seed)
    model = task_named("lm").build(spec)
    opt = build_optimizer(model, tcfg.optim)
    tokens = torch.from_numpy(read_split(shards, "train")["tokens"].astype(np.int64))
    b = tcfg.trainer.global_batch_size
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = tokens[torch.randint(0, len(tokens), (b,))]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[steps // 5 :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parents[1]
    raw = apply_overrides(compose(root / "configs"), [
        f"tasks.lm.trainer.max_steps={args.steps}", "tasks.lm.trainer.log_every=5",
        f"tasks.lm.trainer.ckpt_every={10 * args.steps}", "tasks.lm.optim.warmup_steps=5"])
    cfg = validate(raw)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(cfg.task("lm").data, cfg.seed, Path(tmp) / "prepared")
        shard(cfg.task("lm").data, Path(tmp) / "prepared", Path(tmp) / "shards")
        shards = Path(tmp) / "shards"
        ratios, bares, pipes = [], [], []
        for r in range(args.rounds):
            bare = bare_step_time(cfg, shards, args.steps)
            pipe = pipeline_step_time(cfg, shards, args.steps)
            ratios.append(pipe / bare)
            bares.append(bare)
            pipes.append(pipe)
            print(f"round {r + 1}: bare {bare * 1e3:.1f} ms/step, pipeline {pipe * 1e3:.1f} ms/step, "
                  f"ratio {pipe / bare:.3f}", flush=True)
    m = cfg.task("lm").model
    lm = cfg.task("lm")
    print(f"\nmodel {m.preset} (d_model {m.d_model}, {m.n_layers} layers), batch {lm.trainer.global_batch_size}"
          f" x seq {lm.data.seq_len}, {args.threads} threads, fp32, 1 process")
    print(f"overhead ratio (pipeline / bare), median of {args.rounds} rounds: {statistics.median(ratios):.3f}")
    # Noise on a shared machine only ever adds time, so the fastest round of each side is the cleanest figure.
    print(f"overhead ratio, best round of each side: {min(pipes) / min(bares):.3f} "
          f"({min(pipes) * 1e3:.1f} / {min(bares) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
