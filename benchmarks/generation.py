"""Serving many prompts: `GPT.generate_batch` (left-padded rows in one KV cache, as the served
model runs a request) against `GPT.generate` once per prompt, side by side in one process.

A GPT-2-small shape (12 layers, d_model 768) with an 8k vocabulary and random weights, prompts
of 16 lengths from 8 to 68 tokens, greedy. Both ways must give every prompt the same tokens (the
script stops otherwise); the ratio is of wall times, the median over rounds, the two ways
alternating.

    python benchmarks/generation.py [--prompts 16] [--new 32] [--rounds 3] [--layers 12] [--device cuda]

On CUDA the model runs in bf16 (greedy tokens may then differ between the ways where two logits
round alike: the script reports how many prompts agree instead of stopping).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config.schema import GPTConfig
from pipeline.models.gpt import GPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=args.d_model, n_layers=args.layers, n_heads=12), 8192, 256).eval().to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 8192, (8 + 4 * i,), generator=g).tolist() for i in range(args.prompts)]

    def one_at_a_time() -> list[list[int]]:
        return [model.generate(torch.tensor([p], device=device), args.new, temperature=0)[0, len(p) :].tolist()
                for p in prompts]

    def batched() -> list[list[int]]:
        return model.generate_batch(prompts, args.new, temperature=0)

    times: dict[str, list[float]] = {"one at a time": [], "one batch": []}
    results = {}
    for _ in range(args.rounds):
        for name, fn in (("one at a time", one_at_a_time), ("one batch", batched)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    agree = sum(a == b for a, b in zip(results["one at a time"], results["one batch"], strict=True))
    if agree != len(prompts) and device.type != "cuda":
        raise SystemExit("the batch gave some prompt other tokens than it gets alone")
    tokens = args.prompts * args.new
    params = sum(p.numel() for p in model.parameters()) / 1e6
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{params:.0f}M-parameter GPT, {args.prompts} prompts of 8..{8 + 4 * (args.prompts - 1)} tokens, "
          f"{args.new} new tokens each, greedy, on {on} ({agree} of {len(prompts)} prompts with the same tokens "
          "both ways)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:14s} {med:7.2f} s  {tokens / med:8.1f} tokens/s")
    ratio = statistics.median(times["one at a time"]) / statistics.median(times["one batch"])
    print(f"  batched is {ratio:.1f}x the throughput")


if __name__ == "__main__":
    main()
