"""Activation checkpointing, full and selective by operator (`ac_selective=op`) vs none, on a
12-layer GPT: peak step memory and step time.

Each mode runs in its own fresh process (so one cannot inherit the other's heap), with glibc
told to return every allocation above 64 KiB to the OS on free (MALLOC_MMAP_THRESHOLD_), so
the resident set follows live tensors. After warm-up steps (optimizer state allocated,
gradients freed) the process resets its high-water mark (/proc/self/clear_refs) and runs one
forward + backward: the peak above the resident baseline is the memory the step needs on top
of weights and optimizer state (activations, plus gradients as backward produces them). Step
times are the median of timed full steps; modes alternate over rounds.

    python benchmarks/activation_checkpointing.py [--layers 12] [--rounds 3] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, layers: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pipeline.config.schema import GPTConfig, OptimConfig
    from pipeline.distributed.activation import apply_activation_checkpointing
    from pipeline.models.gpt import GPT
    from pipeline.training.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vocab, seq, batch = 2048, 256, 8
    model = GPT(GPTConfig(d_model=512, n_layers=layers, n_heads=8), vocab, seq)
    apply_activation_checkpointing(model, "selective" if mode == "op" else mode, "op")
    opt = build_optimizer(model, OptimConfig())
    x = torch.randint(0, vocab, (batch, seq + 1))

    def fwd_bwd():
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()

    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    baseline = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fwd_bwd()
    peak = _rss_kib("VmHWM")
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"step_s": statistics.median(times), "peak_above_baseline_mib": (peak - baseline) / 1024,
            "grad_mib": grad_bytes / 2**20, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_child(mode: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--layers", str(args.layers),
                          "--steps", str(args.steps), "--threads", str(args.threads)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.steps, args.threads)))
        return
    results: dict[str, list[dict]] = {"none": [], "full": [], "op": []}
    for r in range(args.rounds):
        for mode in results:
            res = run_child(mode, args)
            results[mode].append(res)
            print(f"round {r + 1} {mode:>4}: step {res['step_s'] * 1e3:.0f} ms, peak above baseline "
                  f"{res['peak_above_baseline_mib']:.0f} MiB (gradients {res['grad_mib']:.0f} MiB)", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    grads = results["none"][0]["grad_mib"]
    print(f"\nGPT d_model 512, {args.layers} layers ({results['none'][0]['params_m']:.1f}M params), batch 8 x seq 256,"
          f" fp32, {args.threads} threads; medians of {args.rounds} rounds")
    for mode, targets in (("full", ("  (target <= 0.333)", "   (target <= 1.4)")), ("op", ("", ""))):
        mem = med(mode, "peak_above_baseline_mib") / med("none", "peak_above_baseline_mib")
        act = (med(mode, "peak_above_baseline_mib") - grads) / med("none", "peak_above_baseline_mib")
        per_round = [f["step_s"] / n["step_s"] for f, n in zip(results[mode], results["none"], strict=True)]
        print(f"peak step memory, {mode} / none: {mem:.3f}{targets[0]}")
        print(f"  the same without the {grads:.0f} MiB of gradients held at its peak: {act:.3f}")
        print(f"step time, {mode} / none: {statistics.median(per_round):.3f} median of per-round ratios "
              f"({', '.join(f'{r:.3f}' for r in per_round)}){targets[1]}")


if __name__ == "__main__":
    main()
