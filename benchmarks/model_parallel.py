"""Tensor and pipeline parallelism side by side with DDP (issue 15), on real gloo ranks.

memory: per-rank bytes of parameters + gradients + optimizer state right after the backward of
step 2 (everything alive), for DDP, TP=2, PP=2 (2 ranks) and FSDP2 x TP = 2 x 2 (4 ranks),
as a ratio to DDP's. Same GPT as benchmarks/strategies.py (d_model 512, 4 layers, vocab 2048).

bubble: PP=2 with m = 4 and 8 micro-batches under GPipe and 1F1B. Each rank times its stage's
compute (every forward and backward of a micro-batch, measured around the stage's own calls)
and the whole step; idle = 1 - busy / step, against the schedule's ideal (p - 1) / (m + p - 1).
Communication waits count as idle, as they do on a GPU.

speed: median step time of TP=2 and PP=2 (m = 4, 1F1B) over DDP's at N=2, fp32, the same
global batch (16 x 256 tokens), rounds alternating so machine noise hits each side alike.

    PYTHONPATH=. python benchmarks/model_parallel.py [--part memory|bubble|speed|all] [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.strategies import ddp_bucket_bytes, held_bytes

MODEL = ["tasks.lm.model.d_model=512", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=8",
         "tasks.lm.data.seq_len=256", "tasks.lm.data.vocab_size=2048"]
LAYOUTS = {  # name -> (ranks, overrides)
    "ddp": (2, ["strategy.name=ddp"]),
    "tp2": (2, ["strategy.name=ddp", "parallel.tp=2"]),
    "pp2": (2, ["strategy.name=ddp", "parallel.pp=2"]),
    "fsdp_tp2x2": (4, ["strategy.name=fsdp", "parallel.tp=2", "cluster.num_workers=4"]),
}


def _build(overrides: list[str], accum: int, world: int):
    """A strategy set up on the benchmark GPT, its task and a fixed batch of token rows."""
    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.config.schema import GPTConfig
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.precision import Precision
    from pipeline.models.gpt import GPT
    from pipeline.tasks.lm import LanguageModeling
    from pipeline.training.optim import build_optimizer

    root = Path(__file__).resolve().parents[1]
    cfg = validate(apply_overrides(compose(root / "configs"), [*MODEL, *overrides, f"cluster.num_workers={world}",
                                                               f"tasks.lm.trainer.grad_accum_steps={accum}"]))
    tcfg = cfg.task("lm")
    device = torch.device("cpu")
    global_batch = 16
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    strategy = build_strategy(cfg.strategy, Precision("fp32", device), device,
                              StepSettings(global_batch // (dp * accum), accum, 1.0), cfg.parallel)
    with torch.device("meta"):
        model = GPT(GPTConfig.model_validate(tcfg.model.model_dump()), 2048, 256)
    torch.manual_seed(0)
    strategy.setup(model, lambda m: build_optimizer(m, tcfg.optim))
    rows = torch.randint(0, 2048, (global_batch // dp, 257), generator=torch.Generator().manual_seed(1))
    micros = [{"x": rows[i::accum, :-1], "y": rows[i::accum, 1:]} for i in range(accum)]
    return strategy, LanguageModeling(), micros


# ----------------------------------------------------------------------------- memory
def _memory_rank(rank: int, world: int, overrides: list[str]) -> int:
    strategy, task, micros = _build(overrides, 2 if any("pp=" in o for o in overrides) else 1, world)
    held = 0
    for step in range(2):
        strategy.forward_backward(micros, task, None)
        if step == 1:
            held = held_bytes(strategy.model, strategy.optimizer) + ddp_bucket_bytes(strategy.model)
        strategy.clip_and_step(1.0)
    return held


def memory(args) -> None:
    from pipeline.runtime.local_group import run_group

    rows = {name: max(run_group(_memory_rank, ranks, overrides)) for name, (ranks, overrides) in LAYOUTS.items()}
    print("\nper-rank bytes of parameters + gradients + optimizer state, fp32 (GPT d_model 512, 4 layers, "
          "vocab 2048; the largest rank):")
    for name, b in rows.items():
        print(f"  {name:>11}: {b / 2**20:8.1f} MiB   ratio to ddp {b / rows['ddp']:.3f}", flush=True)


# ----------------------------------------------------------------------------- bubble
def _bubble_rank(rank: int, world: int, schedule: str, micro: int, steps: int) -> tuple[float, float]:
    """(median idle fraction, median step seconds) of this rank over `steps` timed steps."""
    strategy, task, micros = _build(["strategy.name=ddp", "parallel.pp=2", f"parallel.pp_schedule={schedule}"],
                                    micro, world)
    strategy.forward_backward(micros, task, None)  # builds the schedule (shape inference), warms up
    strategy.clip_and_step(1.0)
    stages = getattr(strategy.schedule, "_stages", None) or [strategy.schedule._stage]  # interleaved: two
    busy = [0.0]

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                busy[0] += time.perf_counter() - t0
        return run

    # forward_maybe_with_nosync / backward_maybe_with_nosync are the stage's compute, without its sends;
    # the last stage's loss is computed outside them, by the schedule (it was counted idle)
    for stage in stages:
        stage.forward_maybe_with_nosync = timed(stage.forward_maybe_with_nosync)
        stage.backward_maybe_with_nosync = timed(stage.backward_maybe_with_nosync)
    strategy.schedule._maybe_compute_loss = timed(strategy.schedule._maybe_compute_loss)
    idle, secs = [], []
    for _ in range(steps):
        torch.distributed.barrier()
        busy[0] = 0.0
        t0 = time.perf_counter()
        strategy.forward_backward(micros, task, None)
        elapsed = time.perf_counter() - t0
        strategy.clip_and_step(1.0)
        idle.append(1 - busy[0] / elapsed)
        secs.append(elapsed)
    return statistics.median(idle), statistics.median(secs)


def bubble(args) -> None:
    from pipeline.runtime.local_group import run_group

    print("\npipeline bubble, PP=2 (idle fraction per rank: measured vs the schedule's (p-1)/(v*m+p-1), v the "
          "stages per rank):")
    for schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
        v = 2 if schedule == "interleaved_1f1b" else 1
        for m in (4, 8):
            got = run_group(_bubble_rank, 2, schedule, m, args.steps)
            ideal = 1 / (v * m + 1)
            print(f"  {schedule:>16} m={m}: rank 0 idle {got[0][0]:.3f}, rank 1 idle {got[1][0]:.3f}   "
                  f"ideal {ideal:.3f}   step {got[0][1] * 1e3:.0f} ms", flush=True)


# ----------------------------------------------------------------------------- speed
def _speed_rank(rank: int, world: int, overrides: list[str], accum: int, steps: int) -> float:
    strategy, task, micros = _build(overrides, accum, world)
    times = []
    for _ in range(steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        strategy.forward_backward(micros, task, None)
        strategy.clip_and_step(1.0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def speed(args) -> None:
    from pipeline.runtime.local_group import run_group

    sides = {"ddp": (LAYOUTS["ddp"][1], 1), "tp2": (LAYOUTS["tp2"][1], 1),
             "pp2 (1f1b, m=4)": (LAYOUTS["pp2"][1], 4)}
    per_round: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, (overrides, accum) in sides.items():
            per_round[name].append(max(run_group(_speed_rank, 2, overrides, accum, args.steps)))
        print(f"  round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in per_round.items()), flush=True)
    ddp = statistics.median(per_round["ddp"])
    print("\nstep time at N=2, fp32, 16 x 256 tokens per step (median of rounds):")
    for name, values in per_round.items():
        med = statistics.median(values)
        ratios = [v / d for v, d in zip(values, per_round["ddp"], strict=True)]
        print(f"  {name:>16}: {med * 1e3:7.0f} ms   ratio to ddp {med / ddp:.2f} "
              f"(rounds {min(ratios):.2f} to {max(ratios):.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["memory", "bubble", "speed", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for part in ("memory", "bubble", "speed"):
        if args.part in (part, "all"):
            globals()[part](args)


if __name__ == "__main__":
    main()
