"""Sharded initialisation of the large GPT presets on one GPU under FSDP2, against the memory planner.

For each preset (default gpt_1b and gpt_7b): the model is built on the meta device, FSDP2 at
world size 1 shards and materialises it unit by unit on the GPU (`pipeline.distributed.sharded_init`),
then a few bf16 training steps run at sequence 2048 with full activation checkpointing. Printed
per preset, in GiB of the caching allocator (`torch.cuda.max_memory_allocated`; the CUDA context
is outside it, so the planner's 1 GiB runtime reserve is taken off its total before comparing):

* setup peak: what materialising held at most, against the planner's parameter bytes (the
  whole model at N=1) plus the largest initialisation unit (the issue's bound);
* training peak: the highest allocation over the steps, against the planner's per-rank total
  for the same config and micro-batch.

One process, no Ray: a world-size-1 NCCL group (gloo on CPU for `--smoke`).

    python benchmarks/gpu_sharded_init.py                      # gpt_1b and gpt_7b on cuda:0
    python benchmarks/gpu_sharded_init.py --json out.json
    python benchmarks/gpu_sharded_init.py --smoke              # CPU: gpt_tiny, sequence 64 (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

GiB = 2**30


def config(preset: str, seq: int, micro: int, ac: str, precision: str):
    """gpu.py's row config under FSDP2, eager (the 7B preset's tokenizer has 32,000 tokens)."""
    from gpu import config as row_config  # benchmarks/ is this script's folder

    vocab = 32000 if preset == "gpt_7b" else 50257
    return row_config(preset, seq, precision, ac, "none", micro, strategy="fsdp", vocab=vocab), vocab


def largest_unit_bytes(model: torch.nn.Module) -> int:
    """The biggest initialisation unit (a block, or everything outside the blocks)."""
    from pipeline.distributed.units import repeated_blocks

    blocks = repeated_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    per_block = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)
    return max(outside, per_block)


def run(preset: str, seq: int, micro: int, ac: str, precision: str, steps: int, device: torch.device) -> dict[str, Any]:
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.planner import plan
    from pipeline.distributed.planner.planning import CUDA_RUNTIME_RESERVE
    from pipeline.distributed.precision import Precision
    from pipeline.tasks import task_for_data
    from pipeline.training.optim import build_optimizer

    cuda = device.type == "cuda"
    cfg, vocab = config(preset, seq, micro, ac, precision)
    tcfg = cfg.task("lm")
    memory = torch.cuda.mem_get_info(device)[1] if cuda else 2 * GiB
    p = plan(cfg, "lm", workers=1, device_memory=memory, target="cuda" if cuda else "cpu", micro_batch=micro,
             suggest=False)
    task = task_for_data("text")
    spec = task.model_spec(tcfg, {"vocab_size": vocab, "seq_len": seq})
    with torch.device("meta"):
        model = task.build(spec)
    params = sum(q.numel() for q in model.parameters())
    unit = largest_unit_bytes(model)
    prec = Precision(precision, device)
    settings = StepSettings(micro, 1, tcfg.trainer.grad_clip, (ac, "every_k", 2))
    strategy = build_strategy(cfg.strategy, prec, device, settings)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    strategy.setup(model, lambda m: build_optimizer(m, tcfg.optim))
    if cuda:
        torch.cuda.synchronize(device)
    setup_s = time.perf_counter() - t0
    setup_peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    rows = torch.randint(0, vocab, (micro, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"x": rows[:, :-1], "y": rows[:, 1:]}
    losses, t1 = [], time.perf_counter()
    for _ in range(steps):
        loss = strategy.forward_backward([batch], task, None)
        strategy.clip_and_step(tcfg.trainer.grad_clip)
        losses.append(float(loss))
    if cuda:
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - t1) / steps
    train_peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    planned = p.total - p.device.reserve
    result = {"preset": preset, "params": params, "seq": seq, "micro_batch": micro, "ac": ac, "precision": precision,
              "setup_s": setup_s, "step_s": step_s, "losses": losses,
              "setup_peak": setup_peak, "setup_bound": params * 4 + unit, "planned_params": p.device.params,
              "train_peak": train_peak, "planned_peak": planned, "planned_phase": p.phase,
              "planned_breakdown": {k: getattr(p.device, k) for k in ("params", "grads", "optimizer", "activations",
                                                                       "comm", "reserve")},
              "planned_largest_micro_batch": p.largest_micro_batch, "runtime_reserve": CUDA_RUNTIME_RESERVE,
              "reserved_peak": torch.cuda.max_memory_reserved(device) if cuda else None}
    if train_peak:
        result["planned_over_measured"] = planned / train_peak
    del strategy, model
    return result


def show(r: dict[str, Any]) -> str:
    def g(v: int | None) -> str:
        return "n/a" if v is None else f"{v / GiB:.2f}"

    ratio = f"{r['planned_over_measured']:.3f}" if "planned_over_measured" in r else "n/a"
    return (f"| {r['preset']} | {r['params'] / 1e9:.2f}B | {r['micro_batch']}x{r['seq']} | {g(r['setup_peak'])} "
            f"(bound {g(r['setup_bound'])}) | {r['setup_s']:.1f} | {g(r['train_peak'])} | {g(r['planned_peak'])} "
            f"({r['planned_phase']}) | {ratio} | {r['step_s']:.2f} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="gpt_1b,gpt_7b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--ac", default="full")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU: gpt_tiny, sequence 64, 2 steps, gloo")
    args = ap.parse_args()
    if args.smoke:
        args.presets, args.seq, args.steps, args.precision = "gpt_tiny", 64, 2, "fp32"
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    from pipeline.runtime.local_group import free_port

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
        name = torch.cuda.get_device_name(device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
        name = "CPU"
    results = []
    print(f"FSDP2 at world size 1 on {name}, torch {torch.__version__}; GiB of the caching allocator", flush=True)
    print("| preset | params | micro x seq | setup peak GiB | setup s | training peak GiB | planned GiB (phase) | "
          "planned/measured | step s | loss |", flush=True)
    print("| --- " * 10 + "|", flush=True)
    for preset in args.presets.split(","):
        try:
            r = run(preset, args.seq, args.micro_batch, args.ac, args.precision, args.steps, device)
        except torch.OutOfMemoryError as e:
            r = {"preset": preset, "error": f"out of memory: {str(e).splitlines()[0]}"}
            print(f"| {preset} | {r['error']} |", flush=True)
        else:
            print(show(r), flush=True)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
