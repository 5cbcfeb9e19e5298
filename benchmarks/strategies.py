"""Strategies side by side: per-rank training-state memory at N=2, and CPU MFU at N=1.

memory: each strategy trains a GPT (d_model 512, 4 layers, vocabulary 2048) on 2 real gloo
ranks; right after the backward of step 2 (gradients and optimizer state both alive) every
tensor reachable from the strategy (module parameters and their gradients, DTensor shards,
ZeRO partitions, optimizer state, DeepSpeed's flat buffers) is summed once per storage.
Printed: bytes per rank and the ratio to DDP's.

mfu: model FLOPs per second of a training step (6 x params x tokens + the attention term, as
`GPT.flops_per_token`) divided by the 2048 x 2048 GEMM rate of the same dtype, measured in
the same run. The bare loop is the shortest correct PyTorch loop; each strategy runs the
pipeline's own `train()` loop (reader, strategy, precision, schedule, bookkeeping) in a
1-rank group. Rounds alternate so that machine noise hits every side alike.

    python benchmarks/strategies.py [--part memory|mfu|all] [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.distributed import VARIANTS

STRATEGIES = {k: v for k, v in VARIANTS.items() if k != "zero3_offload"}
MODEL = ["tasks.lm.model.d_model=512", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=8",
         "tasks.lm.data.seq_len=256", "tasks.lm.data.vocab_size=2048", "tasks.diffusion.trainer.ema_decay=0"]


# ----------------------------------------------------------------------------- memory
def held_bytes(*roots: object) -> int:
    """Bytes of every distinct tensor storage reachable from `roots` (a bounded object walk)."""
    seen_obj: set[int] = set()
    seen_storage: set[int] = set()
    total = 0

    def visit(obj: object, depth: int) -> None:
        nonlocal total
        if id(obj) in seen_obj or depth > 6:
            return
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            if t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen_storage:
                    seen_storage.add(storage.data_ptr())
                    total += storage.nbytes()
            for extra in (getattr(obj, "grad", None), getattr(obj, "ds_tensor", None)):
                if extra is not None:
                    visit(extra, depth + 1)
            return
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                visit(p, depth + 1)
            for b in obj.buffers():
                visit(b, depth + 1)
            return
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer):
            visit(obj.state, depth + 1)
            visit(obj.param_groups, depth + 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            visit(vars(obj), depth + 1)  # ZeRO optimizers keep partitions and flat buffers as attributes

    for r in roots:
        visit(r, 0)
    return total


def ddp_bucket_bytes(model: object) -> int:
    """The gradient buckets DDP's C++ reducer holds (one more copy of every gradient, unless
    gradient_as_bucket_view), which no Python object reaches: its logging data lists their sizes.
    (DeepSpeed's buckets are Python tensors, counted by `held_bytes`.)"""
    import re

    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return 0
    sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
    return sum(int(n) for n in re.findall(r"\d+", sizes))


def _memory_rank(rank: int, world: int, overrides: list[str], dtype: str) -> int:
    import torch.nn.functional as F

    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.config.schema import GPTConfig
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.training.optim import build_optimizer

    root = Path(__file__).resolve().parents[1]
    cfg = validate(apply_overrides(compose(root / "configs"), [*MODEL, *overrides, f"precision.dtype={dtype}"]))
    tcfg = cfg.task("lm")
    device = torch.device("cpu")
    precision = Precision(dtype, device)
    strategy = build_strategy(cfg.strategy, precision, device, StepSettings(2, 1, 1.0))
    with torch.device("meta"):
        model = GPT(GPTConfig.model_validate(tcfg.model.model_dump()), 2048, 256)
    torch.manual_seed(0)
    strategy.setup(model, lambda m: build_optimizer(m, tcfg.optim))
    x = torch.randint(0, 2048, (2, 257))
    held = 0
    for step in range(2):
        with precision.autocast():
            loss = F.cross_entropy(strategy.model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        strategy.backward(loss)
        if step == 1:
            held = held_bytes(strategy.model, strategy.optimizer, getattr(strategy, "engine", None) and
                              strategy.engine.optimizer) + ddp_bucket_bytes(strategy.model)
        strategy.clip_and_step(1.0)
    return held


def memory(args) -> None:
    from pipeline.runtime.horovod import run_horovod  # noqa: F401 - imported to fail early if missing
    from pipeline.runtime.local_group import run_group

    for dtype in ("fp32", "bf16"):
        rows = {}
        for name in ("ddp", "fsdp", "zero1", "zero2", "zero3"):
            rows[name] = max(run_group(_memory_rank, 2, STRATEGIES[name], dtype))
        print(f"\nper-rank bytes of parameters + gradients + optimizer state, N=2, {dtype} "
              f"(GPT d_model 512, 4 layers, vocab 2048):")
        for name, b in rows.items():
            target = "   (target <= 0.55)" if name in ("fsdp", "zero3") else ""
            print(f"  {name:>6}: {b / 2**20:8.1f} MiB   ratio to ddp {b / rows['ddp']:.3f}{target}", flush=True)


# ----------------------------------------------------------------------------- MFU
def gemm_rate(dtype: torch.dtype, seconds: float = 2.0) -> float:
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t0)


def _bare_rank(rank: int, world: int, shards: str, dtype: str, steps: int) -> float:
    """FLOP/s of the shortest correct loop (same model, rows, batch and optimizer)."""
    import numpy as np
    import torch.nn.functional as F

    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.data.shard_format import load_manifest
    from pipeline.data.shard_store import read_split
    from pipeline.distributed.precision import Precision
    from pipeline.tasks import task_named
    from pipeline.training.optim import build_optimizer

    cfg = validate(apply_overrides(compose(Path(__file__).resolve().parents[1] / "configs"), MODEL))
    tcfg, task = cfg.task("lm"), task_named("lm")
    spec = task.model_spec(tcfg, load_manifest(Path(shards)))
    torch.manual_seed(0)
    model = task.build(spec)
    opt = build_optimizer(model, tcfg.optim)
    precision = Precision(dtype, torch.device("cpu"))
    tokens = torch.from_numpy(read_split(Path(shards), "train")["tokens"].astype(np.int64))
    b = 8
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        batch = tokens[(i * b + torch.arange(b)) % len(tokens)]
        with precision.autocast():
            loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    per_token = task.flops_per_item(model, spec)
    return per_token * b * spec["max_seq_len"] / statistics.median(times[2:])


def _pipeline_rank(rank: int, world: int, shards: str, overrides: list[str], steps: int) -> float:
    """FLOP/s of the pipeline's own loop under one strategy."""
    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.training.loop import train
    from pipeline.training.session import LocalSession

    extra = [f"tasks.lm.trainer.max_steps={steps}", "tasks.lm.trainer.log_every=2", "tasks.lm.trainer.eval_every=0",
             f"tasks.lm.trainer.ckpt_every={100 * steps}", "tasks.lm.trainer.global_batch_size=8",
             "cluster.num_workers=1"]
    cfg = validate(apply_overrides(compose(Path(__file__).resolve().parents[1] / "configs"),
                                   [*MODEL, *extra, *overrides]))
    state = train(cfg, "lm", Path(shards), LocalSession(None))
    return statistics.median(h["model_tflops"] for h in state.history[1:-1]) * 1e12


def _horovod_rank(shards: str, overrides: list[str], steps: int) -> float:
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(2)
    return _pipeline_rank(0, 1, shards, overrides, steps)


def mfu(args) -> None:
    import ray

    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.data.build import prepare, shard
    from pipeline.runtime.horovod import run_horovod
    from pipeline.runtime.local_group import run_group

    root = Path(__file__).resolve().parents[1]
    cfg = validate(apply_overrides(compose(root / "configs"), MODEL))
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    with tempfile.TemporaryDirectory() as tmp:
        prepare(cfg.task("lm").data, cfg.seed, Path(tmp) / "prepared")
        shard(cfg.task("lm").data, Path(tmp) / "prepared", Path(tmp) / "shards")
        shards = str(Path(tmp) / "shards")
        for dtype in ("fp32", "bf16"):
            names = ["bare", *STRATEGIES]
            rates: dict[str, list[float]] = {n: [] for n in names}
            gemm: list[float] = []
            for r in range(args.rounds):
                gemm.append(gemm_rate(torch.float32 if dtype == "fp32" else torch.bfloat16))
                for name in names:
                    if name == "bare":
                        rate = run_group(_bare_rank, 1, shards, dtype, args.steps)[0]
                    elif name == "horovod":
                        rate = run_horovod(_horovod_rank, [shards, [*STRATEGIES[name], f"precision.dtype={dtype}"],
                                                           args.steps], 1, 2, False)[0]
                    else:
                        rate = run_group(_pipeline_rank, 1, shards, [*STRATEGIES[name], f"precision.dtype={dtype}"],
                                         args.steps)[0]
                    rates[name].append(rate)
                print(f"round {r + 1} {dtype}: GEMM {gemm[-1] / 1e9:.0f} GFLOP/s; " + ", ".join(
                    f"{n} {rates[n][-1] / gemm[-1]:.3f}" for n in names), flush=True)
            peak = statistics.median(gemm)
            print(f"\nMFU {dtype} (GPT d_model 512, 4 layers, seq 256, batch 8, N=1; 2048^2 GEMM "
                  f"{peak / 1e9:.0f} GFLOP/s median; {args.rounds} rounds; '/ bare' is the median of per-round "
                  f"ratios, which cancels the machine's round-to-round drift):")
            for name in names:
                m = statistics.median(r / g for r, g in zip(rates[name], gemm, strict=True))
                vs = statistics.median(r / b for r, b in zip(rates[name], rates["bare"], strict=True))
                print(f"  {name:>8}: MFU {m:.3f}   / bare {vs:.3f}" + ("   (target >= 0.95)" if name != "bare" else ""))
            ddp_time = statistics.median(b / r for r, b in zip(rates["ddp"], rates["bare"], strict=True))
            print(f"  pipeline DDP step time / bare step time: {ddp_time:.3f}   (target <= 1.03)", flush=True)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["memory", "mfu", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    if args.part in ("memory", "all"):
        memory(args)
    if args.part in ("mfu", "all"):
        mfu(args)


if __name__ == "__main__":
    main()
