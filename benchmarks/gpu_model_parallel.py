"""World-size-1 check of the tensor- and pipeline-parallel code paths (issue 15), for a machine
with one GPU: the mesh strategy is built with its tp and pp paths switched on over size-1
mesh dimensions (DTensor column/row splits, a one-stage torch.distributed.pipelining schedule,
FSDP2 or its replicated twin around them), and trains a GPT for a few steps against the plain
DDP strategy on the same batches.

Printed (and written to $OUT/gpu_model_parallel.json when OUT is set): per layout and dtype,
the per-step losses, the largest relative difference from DDP's, and the step time.

    PYTHONPATH=. python benchmarks/gpu_model_parallel.py [--device cuda|cpu] [--steps 10] [--d-model 512]

fp32 is held to 1e-5 relative (TF32 off); bf16 is reported (it runs, with autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

CASES = {  # name -> (strategy, tp path, pp path, schedule)
    "ddp": ("ddp", False, False, "1f1b"),
    "tp-path (replicate)": ("ddp", True, False, "1f1b"),
    "tp-path (fsdp)": ("fsdp", True, False, "1f1b"),
    "pp-path gpipe": ("ddp", False, True, "gpipe"),
    "pp-path 1f1b (fsdp)": ("fsdp", False, True, "1f1b"),
    "tp+pp paths (fsdp)": ("fsdp", True, True, "1f1b"),
}


def run_case(name: str, dtype: str, device: torch.device, steps: int, d_model: int) -> dict:
    from pipeline.config.schema import DDPConfig, FSDPConfig, GPTConfig, OptimConfig, ParallelConfig
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.mesh_strategy import MeshStrategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.tasks.lm import LanguageModeling
    from pipeline.training.optim import build_optimizer

    strategy_name, use_tp, use_pp, schedule = CASES[name]
    accum, vocab, seq = 2, 4096, 256
    settings = StepSettings(4, accum, 1.0)
    precision = Precision(dtype, device)
    scfg = DDPConfig() if strategy_name == "ddp" else FSDPConfig()
    if use_tp or use_pp:
        strategy = MeshStrategy(scfg, precision, device, settings, ParallelConfig(pp_schedule=schedule))
        strategy.use_tp, strategy.use_pp = use_tp, use_pp
    else:
        strategy = build_strategy(scfg, precision, device, settings)
    with torch.device("meta"):
        model = GPT(GPTConfig(d_model=d_model, n_layers=4, n_heads=8, n_kv_heads=4), vocab, seq)
    torch.manual_seed(0)
    strategy.setup(model, lambda m: build_optimizer(m, OptimConfig(lr=1e-3, warmup_steps=0)))
    task = LanguageModeling()
    gen = torch.Generator().manual_seed(1)
    losses, times = [], []
    for _ in range(steps):
        rows = torch.randint(0, vocab, (8, seq + 1), generator=gen).to(device)
        micros = [{"x": rows[i::accum, :-1], "y": rows[i::accum, 1:]} for i in range(accum)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(strategy.forward_backward(micros, task, None))
        strategy.clip_and_step(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # (read after the timing: the step leaves its loss on the device)
    return {"losses": [float(v) for v in losses], "step_ms": statistics.median(times[1:]) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {"device": label, "torch": torch.__version__, "cases": {}}
    failed = []
    for dtype in ("fp32", "bf16"):
        ref = None
        for name in CASES:
            got = run_case(name, dtype, device, args.steps, args.d_model)
            ref = ref or got["losses"]
            worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got["losses"], strict=True))
            results["cases"][f"{name} {dtype}"] = {**got, "max_rel_diff_vs_ddp": worst}
            ok = worst <= 1e-5 if dtype == "fp32" else all(map(lambda v: v == v, got["losses"]))
            failed += [] if ok else [f"{name} {dtype}"]
            print(f"{label} {dtype:>4} {name:>22}: loss {got['losses'][0]:.4f} -> {got['losses'][-1]:.4f}  "
                  f"max rel diff vs ddp {worst:.2e}  step {got['step_ms']:.1f} ms  {'ok' if ok else 'FAIL'}",
                  flush=True)
    dist.destroy_process_group()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_model_parallel.json").write_text(json.dumps(results, indent=2))
    if failed:
        raise SystemExit(f"not equal to DDP: {', '.join(failed)}")


if __name__ == "__main__":
    main()
