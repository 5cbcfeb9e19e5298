"""GPU throughput and MFU of the GPT presets: tokens/s and model FLOPs utilisation for gpt_125m,
gpt_350m and gpt_1b at sequence 2048, eager vs `trainer.compile=blocks`, bf16 vs fp8, without
and with full activation checkpointing, each at the micro-batch that fills the GPU's memory.

One process, one GPU, no Ray: the DDP strategy at world size 1 (no wrapper) running the loop's
own step (`Strategy.forward_backward` + `clip_and_step`: autocast, fused AdamW, clipping, the
on-device skip) on random tokens, the optimizer and precision the config names. The micro-batch
is the memory planner's largest for this GPU's memory (`pipeline.distributed.planner.plan`,
`target="cuda"`); should it not fit after all (allocator fragmentation; the planner counts
fp8 as bf16 and traces compiled whole-block checkpointing eagerly), it is lowered by a fifth
until a step runs, and the row's note keeps each out-of-memory: what the allocator held before
it, the request that failed and the planner's peak there (the data a planner fix starts from).
MFU = model FLOPs (`GPT.flops_per_token`: 6N + attention) per second over the dense peak of the
precision in use (`pipeline.training.mfu`: bf16 or fp8, from the table by device name).

    python benchmarks/gpu.py                      # the full table (one GPU; some minutes per row)
    python benchmarks/gpu.py --json results.json  # the rows as JSON too
    python benchmarks/gpu.py --presets gpt_125m --compile none --precision bf16
    python benchmarks/gpu.py --profile            # and each row's top kernels for one step
    python benchmarks/gpu.py --presets gpt_1b --compile blocks:eager-loss,blocks --ac none
                                                  # the compiled loss (`trainer.compile_loss`) against the eager one
    python benchmarks/gpu.py --smoke              # CPU: gpt_tiny, sequence 64, 2 steps (checks the script)

Figures (one H200, 2026-12-04) are in benchmarks/RESULTS.md, "On a GPU".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("gpt_125m", "gpt_350m", "gpt_1b")
VOCAB = 50257
AC = {  # --ac labels: trainer.activation_checkpointing (and ac_selective)
    "none": ["tasks.lm.trainer.activation_checkpointing=none"],
    "full": ["tasks.lm.trainer.activation_checkpointing=full"],
    "op": ["tasks.lm.trainer.activation_checkpointing=selective", "tasks.lm.trainer.ac_selective=op"],
}


@dataclasses.dataclass
class Row:
    model: str
    compile: str
    precision: str
    ac: str
    params_m: float | None = None
    micro_batch: int | None = None
    planned_micro_batch: int | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    step_ms: float | None = None
    peak_gib: float | None = None
    planned_gib: float | None = None  # the planner's peak at the micro-batch run, less its CUDA runtime reserve
    note: str = ""


def config(preset: str, seq: int, precision: str, ac: str, compile_mode: str, micro: int = 1,
           strategy: str = "ddp", vocab: int = VOCAB):
    """The validated pipeline config of one row (the lm task; DDP unless told). `compile_mode` is a
    trainer.compile value, with `:eager-loss` for trainer.compile_loss=false."""
    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.config.schema import TrainerConfig

    groups = [f"model@tasks.lm.model={preset}", f"strategy={strategy}"]
    overrides = [f"precision.dtype={precision}", f"tasks.lm.data.seq_len={seq}", f"tasks.lm.data.vocab_size={vocab}",
                 *AC[ac], f"tasks.lm.trainer.global_batch_size={micro}",
                 "tasks.lm.optim.warmup_steps=0", "cluster.num_workers=1"]
    mode, _, loss = compile_mode.partition(":")
    if "compile" in TrainerConfig.model_fields:
        overrides.append(f"tasks.lm.trainer.compile={mode}")
    if "compile_loss" in TrainerConfig.model_fields:
        overrides.append(f"tasks.lm.trainer.compile_loss={loss != 'eager-loss'}")
    return validate(apply_overrides(compose(ROOT / "configs", groups), overrides))


def planned_micro_batch(preset: str, seq: int, precision: str, ac: str, compile_mode: str, device: torch.device,
                        memory: int | None) -> int | None:
    """The memory planner's largest micro-batch for this device's memory (None: it cannot say)."""
    from pipeline.distributed.planner import plan

    if memory is None:
        return None
    try:
        p = plan(config(preset, seq, precision, ac, compile_mode), "lm", workers=1, device_memory=memory,
                 target="cuda" if device.type == "cuda" else "cpu", micro_batch=1, suggest=False)
    except Exception as e:  # the planner models what the strategies do; say so and search instead
        print(f"  planner: {type(e).__name__}: {e}; searching instead", flush=True)
        return None
    return p.largest_micro_batch


def planned_peak(preset: str, seq: int, precision: str, ac: str, compile_mode: str, device: torch.device,
                 micro: int) -> float | None:
    """The memory planner's peak at `micro`, in GiB and less its CUDA runtime reserve, so that it
    compares with `max_memory_allocated` (None: it cannot say)."""
    from pipeline.distributed.planner import plan

    try:
        p = plan(config(preset, seq, precision, ac, compile_mode, micro), "lm", workers=1,
                 target="cuda" if device.type == "cuda" else "cpu", micro_batch=micro, suggest=False)
    except Exception:  # already said by planned_micro_batch
        return None
    return (p.total - p.device.reserve) / 2**30


def profile_step(step, sync) -> None:
    """Where one step's GPU time goes: the kernels with the most self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60),
              flush=True)
    except Exception as e:  # a profiler that does not work here costs the row nothing
        print(f"  profiler: {type(e).__name__}: {e}", flush=True)


def run(preset: str, seq: int, precision: str, ac: str, compile_mode: str, micro: int, steps: int, warmup: int,
        device: torch.device, profile: bool = False) -> dict[str, Any]:
    """Build, set up and time `steps` training steps after `warmup` ones. Raises torch's
    OutOfMemoryError when the micro-batch does not fit."""
    from pipeline.distributed import StepSettings, build_strategy
    from pipeline.distributed.precision import Precision
    from pipeline.tasks import task_for_data
    from pipeline.training.mfu import device_peak
    from pipeline.training.optim import build_optimizer, describe_optimizer

    cfg = config(preset, seq, precision, ac, compile_mode, micro)
    tcfg = cfg.task("lm")
    task = task_for_data("text")
    spec = task.model_spec(tcfg, {"vocab_size": VOCAB, "seq_len": seq})
    with torch.device("meta"):
        model = task.build(spec)
    flops_per_token = task.flops_per_item(model, spec)
    params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    prec = Precision(precision, device, cfg.precision.fp8_emulate, cfg.precision.fp8_all_gather)
    settings: dict[str, Any] = {}
    tr = tcfg.trainer
    if "compile" in {f.name for f in dataclasses.fields(StepSettings)}:
        settings["compile"] = tr.compile
    if tr.compile != "none" and getattr(tr, "compile_loss", False):
        task.compile_loss()  # as the loop does
    strategy = build_strategy(cfg.strategy, prec, device,
                              StepSettings(micro, 1, tr.grad_clip,
                                           (tr.activation_checkpointing, tr.ac_selective, tr.ac_every_k), **settings))
    fp8_layers = prec.prepare(model, strategy.gathers_weights)  # as the loop does: after the strategy exists
    strategy.setup(model, lambda m: build_optimizer(m, tcfg.optim))
    rows = torch.randint(0, VOCAB, (micro, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"x": rows[:, :-1], "y": rows[:, 1:]}

    def step() -> None:
        strategy.forward_backward([batch], task, None)
        strategy.clip_and_step(tcfg.trainer.grad_clip)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):  # compilation, kernel selection, optimizer state
        step()
    sync()
    # the warm-up's peak too (the first steps allocate the optimizer state, compile, autotune): an
    # out-of-memory happens there, so the planner is compared with the larger of the two
    warm_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = max(torch.cuda.max_memory_allocated(device), warm_peak) if device.type == "cuda" else None
    if profile:
        profile_step(step, sync)
    optimizer = strategy.optimizer
    tokens_per_s = micro * seq * steps / seconds
    peak_flops = device_peak(device, prec.mfu_precision)
    return {"params": params, "tokens_per_s": tokens_per_s, "step_ms": seconds / steps * 1e3,
            "mfu": flops_per_token * tokens_per_s / 1e12 / peak_flops.tflops if peak_flops else None,
            "peak_source": peak_flops.describe() if peak_flops else "unknown", "peak_bytes": peak,
            "fp8_layers": fp8_layers, "optimizer": describe_optimizer(optimizer)}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # compiled graphs of the last row


def measure(row: Row, seq: int, steps: int, warmup: int, device: torch.device, memory: int | None,
            max_micro: int | None, profile: bool = False, fixed_micro: int | None = None) -> Row:
    planned = None if fixed_micro else planned_micro_batch(row.model, seq, row.precision, row.ac, row.compile,
                                                           device, memory)
    row.planned_micro_batch = planned
    micro = fixed_micro or planned or 1
    if max_micro:
        micro = min(micro, max_micro)
    search = planned is None and not fixed_micro and device.type == "cuda"  # no plan: double until it does not fit
    best: dict[str, Any] | None = None
    ooms: list[str] = []  # what each out-of-memory reached, against the plan: the data to fix the planner with
    while micro >= 1:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result = run(row.model, seq, row.precision, row.ac, row.compile, micro, steps, warmup, device, profile)
        except torch.OutOfMemoryError as e:
            ooms.append(oom_note(e, micro, device, planned_peak(row.model, seq, row.precision, row.ac, row.compile,
                                                                device, micro)))
            print(f"  {ooms[-1]}", flush=True)
            _free()
            if search and best is not None:
                break
            micro = micro * 4 // 5 if micro > 1 else 0
            search = False
            continue
        _free()
        best = {**result, "micro": micro}
        if search and (max_micro is None or micro * 2 <= max_micro):
            micro *= 2
            continue
        break
    if best is None:
        row.note = "; ".join(["does not fit at micro-batch 1", *ooms])
        return row
    row.params_m = best["params"] / 1e6
    row.micro_batch = best["micro"]
    row.tokens_per_s, row.mfu, row.step_ms = best["tokens_per_s"], best["mfu"], best["step_ms"]
    row.peak_gib = best["peak_bytes"] / 2**30 if best["peak_bytes"] else None
    row.planned_gib = planned_peak(row.model, seq, row.precision, row.ac, row.compile, device, best["micro"])
    row.note = "; ".join(filter(None, [f"{best['fp8_layers']} Float8Linear" if best["fp8_layers"] else "",
                                       best["optimizer"], *ooms]))
    return row


def oom_note(error: Exception, micro: int, device: torch.device, planned: float | None) -> str:
    """One line for an out-of-memory at `micro`: the most the allocator held before it, the
    request that failed (from torch's message) and the planner's peak there, in GiB."""
    import re

    held = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    asked = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", str(error))
    return (f"OOM at micro-batch {micro}: held up to {'n/a' if held is None else f'{held:.1f}'} GiB"
            f"{f', then asked {asked.group(1)}' if asked else ''}, planned "
            f"{'n/a' if planned is None else f'{planned:.1f}'} GiB")


def unavailable(row: Row, device: torch.device) -> str | None:
    """Why a row cannot run here (None: it can)."""
    import dataclasses as dc
    import importlib.util

    from pipeline.config.schema import TrainerConfig
    from pipeline.distributed import StepSettings
    from pipeline.distributed.precision import fp8_unavailable

    if row.precision == "fp8":
        if (why := fp8_unavailable(device)) is not None:
            return why.split("; ", 1)[-1].split(". Use", 1)[0]
        if importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (pip install -e '.[gpu]')"
    if row.compile != "none" and "compile" not in {f.name for f in dc.fields(StepSettings)}:
        return "trainer.compile is not in this version"
    if row.compile.endswith(":eager-loss") and "compile_loss" not in TrainerConfig.model_fields:
        return "trainer.compile_loss is not in this version"
    return None


def table(rows: list[Row], device_name: str) -> str:
    lines = [f"GPT presets on {device_name}, one device, DDP strategy (no wrapper), sequence as given",
             "| model | params | compile | precision | AC | micro-batch (planned) | tokens/s | MFU | step ms | "
             "peak GiB (planned) | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        def f(v: float | None, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        planned = f" ({r.planned_micro_batch})" if r.planned_micro_batch is not None else ""
        params = "n/a" if r.params_m is None else f"{r.params_m:.0f}M"
        lines.append(f"| {r.model} | {params} | {r.compile} | {r.precision} | {r.ac} | "
                     f"{r.micro_batch if r.micro_batch is not None else 'n/a'}{planned} | "
                     f"{f(r.tokens_per_s, ',.0f')} | "
                     f"{'n/a' if r.mfu is None else format(r.mfu, '.1%')} | {f(r.step_ms, '.1f')} | "
                     f"{f(r.peak_gib, '.1f')}{'' if r.planned_gib is None else f' ({r.planned_gib:.1f})'} | "
                     f"{r.note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--compile", default="none,blocks",
                    help="trainer.compile values to compare (`blocks:eager-loss`: with trainer.compile_loss=false)")
    ap.add_argument("--precision", default="bf16,fp8")
    ap.add_argument("--ac", default="none,full",
                    help="activation checkpointing: none, full, op (selective by operator: ac_selective=op)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--max-micro-batch", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None, help="this micro-batch, not the planner's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--profile", action="store_true", help="print each row's top kernels for one step")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: gpt_tiny, sequence 64, 2 steps, micro-batch at most 4")
    args = ap.parse_args()
    if args.smoke:
        args.presets, args.compile, args.seq, args.steps, args.warmup = "gpt_tiny", "none", 64, 2, 1
        args.max_micro_batch, args.device = 4, "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda":
        from pipeline.config.schema import ClusterConfig
        from pipeline.runtime.cuda_allocator import configure_cuda_allocator

        torch.cuda.set_device(device)
        allocator = configure_cuda_allocator(ClusterConfig().cuda_alloc_conf)  # what a training worker runs with
        print(f"CUDA allocator settings: {allocator or 'torch default'}", flush=True)
        memory = torch.cuda.mem_get_info(device)[1]
        device_name = torch.cuda.get_device_name(device)
    else:
        memory, device_name = (2**30 if args.smoke else None), f"CPU ({torch.get_num_threads()} threads)"
    rows: list[Row] = []
    for preset in args.presets.split(","):
        for compile_mode in args.compile.split(","):
            for precision in args.precision.split(","):
                for ac in args.ac.split(","):
                    row = Row(preset, compile_mode, precision, ac)
                    print(f"{preset} compile={compile_mode} {precision} ac={ac} ...", flush=True)
                    if (why := unavailable(row, device)) is not None:
                        row.note = f"not run: {why}"
                    else:
                        measure(row, args.seq, args.steps, args.warmup, device, memory, args.max_micro_batch,
                                args.profile, args.micro_batch)
                    rows.append(row)
    out = table(rows, device_name)
    print(out)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "seq": args.seq, "steps": args.steps,
                                         "torch": torch.__version__, "rows": [dataclasses.asdict(r) for r in rows]},
                                        indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
