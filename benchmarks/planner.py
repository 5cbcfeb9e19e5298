"""The memory planner against measured peaks, and the README table the planner makes.

validate (default): for DDP, FSDP2, DeepSpeed ZeRO-1/2/3, and tensor or pipeline parallel (GPipe, 1F1B and
interleaved 1F1B, 2 micro-batches) over both ranks (under ddp, which is FSDP2's `replicate` there, and
fsdp), with and without full activation checkpointing, at two GPT sizes, and for the diffusion task's
DiT (data-parallel strategies only; its EMA on: the planner counts it), the pipeline's own `train()`
loop runs 3 steps (DDP; 2 for the others) on 2 real gloo ranks (`run_group`, as tests/test_strategies.py
does). Every rank measures its own peak; the
planner predicts it from the same config and the same shard manifest.

How a peak is measured (per rank, per config, all configs one after another in the same two
processes): glibc is told to serve every allocation above 64 KiB with its own mapping and to
return it on free (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so the resident set
follows live tensors instead of glibc's heap. The baseline is the resident set just before
`train()` (model not built yet); when the strategy's setup is done (the loop asks the session
for its checkpoint) the kernel's high-water mark is reset (`/proc/self/clear_refs` = 5), and
each step's report reads VmHWM and resets it again. Measured peak = the highest VmHWM of the
training steps minus the baseline: what the training step holds on top of a bare process,
which is what the planner predicts (setup transients, e.g. materialising the whole model before
sharding, are reported separately, not compared). The process's own memory growth
(allocator arenas, DeepSpeed's buffers of a few KiB, thread stacks) counts against the planner.

readme: the planner's table for the GPT presets x DDP / FSDP2 / ZeRO-3 (+ offload) x 8 and 64
GPUs of 80 GiB, bf16, sequence 2048 (markdown, pasted into the README).

    python benchmarks/planner.py [--part validate|readme|all] [--sizes small,large,dit]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

SIZES: dict[str, list[str]] = {
    # the test's pair (tests/test_planner.py): the same checks at a quarter of the benchmark's compute
    "tiny": ["tasks.lm.model.d_model=256", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=4",
             "tasks.lm.trainer.global_batch_size=8"],
    "small": ["tasks.lm.model.d_model=512", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=8",
              "tasks.lm.trainer.global_batch_size=8"],
    "large": ["tasks.lm.model.d_model=768", "tasks.lm.model.n_layers=8", "tasks.lm.model.n_heads=12",
              "tasks.lm.trainer.global_batch_size=4"],
    # the diffusion task's DiT on the digits resized to 32 x 32 (patch 2: 256 tokens an image)
    "dit": ["tasks.diffusion.model.d_model=384", "tasks.diffusion.model.depth=6", "tasks.diffusion.model.n_heads=6",
            "tasks.diffusion.trainer.global_batch_size=16"],
    "dit_tiny": ["tasks.diffusion.model.d_model=256", "tasks.diffusion.model.depth=4",  # the test's
                 "tasks.diffusion.model.n_heads=4", "tasks.diffusion.trainer.global_batch_size=16"],
    # the DDPM U-Net (unet_small's layout, wider), on the same 32 x 32 digits
    "unet": ["tasks.diffusion.model.base_channels=64", "tasks.diffusion.model.channel_mults=[1,2,2]",
             "tasks.diffusion.trainer.global_batch_size=16"],
}
DIFFUSION_SIZES = {"dit", "dit_tiny", "unet"}  # the others are the lm task's
BASE = {"unet": ["model@tasks.diffusion.model=unet_small"]}  # Hydra overrides composing a size's base config
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3", "tp2", "fsdp_tp2", "pp2_1f1b", "pp2_gpipe", "fsdp_pp2_1f1b",
              "pp2_interleaved")
ACCUM2 = ["tasks.lm.trainer.grad_accum_steps=2"]  # the pipeline's micro-batches
PIPELINES = {  # pipeline parallel over both ranks (dp = 1), under ddp (FSDP2's replicate there) or fsdp
    "pp2_1f1b": ["strategy.name=ddp", "parallel.pp=2", "parallel.pp_schedule=1f1b", *ACCUM2],
    "pp2_gpipe": ["strategy.name=ddp", "parallel.pp=2", "parallel.pp_schedule=gpipe", *ACCUM2],
    "fsdp_pp2_1f1b": ["strategy.name=fsdp", "parallel.pp=2", "parallel.pp_schedule=1f1b", *ACCUM2],
    "pp2_interleaved": ["strategy.name=ddp", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", *ACCUM2],
}
DIFFUSION_STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")  # no tensor or pipeline split of the DiT
AC_MODES = ("none", "full")
STEPS = int(os.environ.get("PLANNER_STEPS", "3"))  # DDP's; the others stop after 2 (measure_rank)
SEQ_LEN = 256
DATA = [f"tasks.lm.data.seq_len={SEQ_LEN}", "tasks.lm.data.vocab_size=2048", "tasks.lm.data.shard_rows=64"]
IMAGE_DATA = ["tasks.diffusion.data.image_size=32", "tasks.diffusion.data.augment.copies=0",
              "tasks.diffusion.data.shard_rows=64"]


def task_of(size: str) -> str:
    """The task a size row trains: the diffusion task's DiT, else the lm task's GPT."""
    return "diffusion" if size in DIFFUSION_SIZES else "lm"


def loop(task: str) -> list[str]:
    """The trainer overrides of a measured run: STEPS + 1 steps, a report each step, no
    checkpoints or evaluation, no prefetching thread."""
    t = f"tasks.{task}"
    return [f"{t}.trainer.max_steps={STEPS + 1}", f"{t}.trainer.log_every=1", f"{t}.trainer.ckpt_every=1000",
            f"{t}.trainer.eval_every=0", f"{t}.trainer.prefetch_batches=0", f"{t}.optim.warmup_steps=1"]


LOOP = [*loop("lm"), "tasks.diffusion.trainer.ema_decay=0"]  # (the GPT rows; the DiT's keep its EMA)


def configs(sizes: tuple[str, ...] = ("small", "large"), strategies: tuple[str, ...] = STRATEGIES,
            ac_modes: tuple[str, ...] = AC_MODES, extra: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(name, raw config) for every measured combination."""
    from pipeline.config import compose
    from pipeline.config.loading import apply_overrides
    from pipeline.distributed import LAYOUT_VARIANTS, VARIANTS

    variants = {**VARIANTS, **LAYOUT_VARIANTS, **PIPELINES}
    out = []
    for size in sizes:
        base = compose(ROOT / "configs", BASE.get(size, []))
        task = task_of(size)
        setup = [*DATA, *LOOP] if task == "lm" else [*IMAGE_DATA, *loop(task)]
        for strategy in strategies:
            if task == "diffusion" and strategy not in DIFFUSION_STRATEGIES:
                continue
            for ac in ac_modes:
                raw = apply_overrides(_copy(base),
                                      [*setup, *SIZES[size], *variants[strategy],
                                       f"tasks.{task}.trainer.activation_checkpointing={ac}", *extra])
                out.append((f"{size}/{strategy}/ac={ac}", raw))
    return out


def job_task(name: str) -> str:
    """The task of a job named by `configs` ("size/strategy/ac=...", or "warmup:" + that)."""
    return task_of(name.removeprefix("warmup:").split("/")[0])


def _copy(raw: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(raw)


def build_shards(root: Path, tasks: tuple[str, ...] = ("lm",)) -> dict[str, Path]:
    """Shards per task: text of `SEQ_LEN`-token rows (a generated corpus of real words, BPE
    vocabulary 2048); the builtin digits at 32 x 32 for the diffusion task."""
    from pipeline.config import compose, validate
    from pipeline.config.loading import apply_overrides
    from pipeline.data.build import prepare, shard
    from pipeline.data.synthetic import write_corpus

    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    write_corpus(corpus / "words.txt", 600_000)
    cfg = validate(apply_overrides(compose(ROOT / "configs"), [*DATA, *IMAGE_DATA, f"tasks.lm.data.source={corpus}"]))
    out = {}
    for task in tasks:
        data = cfg.task(task).data
        prepare(data, cfg.seed, root / task / "prepared")
        shard(data, root / task / "prepared", root / task / "shards")
        out[task] = root / task / "shards"
    return out


# ----------------------------------------------------------------------------- measurement (in each rank)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


class _Stop(Exception):
    """Raised from the session's report after the last measured step (no final checkpoint)."""


class MeasuringSession:
    """A LocalSession stand-in that reads the process's high-water mark around each step."""

    def __init__(self, rank: int, world: int, steps: int) -> None:
        import torch

        self.rank, self.world, self.device = rank, world, torch.device("cpu")
        self.steps = steps
        self.after_setup_kib = 0
        self.setup_peak_kib = 0
        self.step_peaks_kib: list[int] = []
        self.after_step_kib: list[int] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[None]:
        # The loop asks for a checkpoint right after strategy.setup: the step measurement starts here.
        self.setup_peak_kib = _status_kib("VmHWM")
        self.after_setup_kib = _status_kib("VmRSS")
        _reset_high_water()
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.step_peaks_kib.append(_status_kib("VmHWM"))
        self.after_step_kib.append(_status_kib("VmRSS"))
        _reset_high_water()
        if metrics["step"] >= self.steps:
            raise _Stop

    def log_step(self, entry: dict[str, Any]) -> None:
        pass  # no tracking in a memory measurement

    def tag_run(self, tags: dict[str, str]) -> None:
        pass


def warmup_jobs(jobs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """One step of a tiny GPT per distinct strategy among `jobs`, run first and not measured: the
    first use of a strategy imports modules lazily (torch._dynamo with the first optimizer, about
    70 MiB; DeepSpeed's and FSDP's internals) and faults in library code pages, a once-per-process
    cost that belongs to the process baseline, not to any step."""
    from pipeline.config.loading import apply_overrides

    seen, out = set(), []
    tiny = {"gpt": ["tasks.lm.model.d_model=64", "tasks.lm.model.n_layers=4", "tasks.lm.model.n_heads=2"],
            "dit": ["tasks.diffusion.model.d_model=64", "tasks.diffusion.model.depth=2",
                    "tasks.diffusion.model.n_heads=2"],
            "unet": ["tasks.diffusion.model.base_channels=8"]}
    for name, raw in jobs:
        task = job_task(name)
        kind = raw["tasks"][task]["model"]["kind"]
        key = (kind, raw["strategy"]["name"], raw["strategy"].get("zero_stage"), raw["precision"]["dtype"])
        if key in seen:
            continue
        seen.add(key)
        out.append((f"warmup:{name}", apply_overrides(_copy(raw), tiny[kind])))
    return out


def measure_rank(rank: int, world: int, jobs: list[tuple[str, dict[str, Any]]],
                 shards: dict[str, str]) -> list[dict[str, Any]]:
    """Runs inside each rank: every job's training-step peak above the pre-setup baseline
    (after `warmup_jobs`, whose results are dropped)."""
    import torch.distributed as dist

    from pipeline.config import validate
    from pipeline.training.loop import train

    out = []
    warm = warmup_jobs(jobs)
    for name, raw in [*warm, *jobs]:
        cfg = validate(raw)
        gc.collect()
        dist.barrier()
        _reset_high_water()
        baseline, file0 = _status_kib("VmRSS"), _status_kib("RssFile")
        # DDP on CPU reaches its steady state in step 3 (its rebuilt buckets become resident in step 2's
        # backward); every other layout is steady from step 2 (measured: steps 2 and 3 within 0.3 MiB).
        session = MeasuringSession(rank, world, STEPS if raw["strategy"]["name"] == "ddp" else 2)
        start = time.perf_counter()
        task = job_task(name)
        with contextlib.suppress(_Stop):
            train(cfg, task, Path(shards[task]), session)
        seconds = time.perf_counter() - start
        if name.startswith("warmup:"):
            continue
        out.append({"name": name, "baseline": baseline * 1024, "file_growth": (_status_kib("RssFile") - file0) * 1024,
                    "setup_peak": (session.setup_peak_kib - baseline) * 1024,
                    "after_setup": (session.after_setup_kib - baseline) * 1024,
                    "step_peaks": [(p - baseline) * 1024 for p in session.step_peaks_kib],
                    "after_steps": [(p - baseline) * 1024 for p in session.after_step_kib],
                    "peak": (max(session.step_peaks_kib) - baseline) * 1024, "seconds": seconds})
        del session
        gc.collect()
    return out


def measure(jobs: list[tuple[str, dict[str, Any]]], shards: dict[str, Path], world: int = 2) -> list[dict[str, Any]]:
    """All jobs in one group of `world` spawned gloo ranks; per job the largest rank's figures."""
    from pipeline.runtime.local_group import run_group

    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # read by glibc when the spawned ranks start
    try:
        per_rank = run_group(measure_rank, world, jobs, {k: str(v) for k, v in shards.items()}, timeout_s=1200)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    merged = []
    for i in range(len(jobs)):
        rows = [r[i] for r in per_rank]
        worst = max(rows, key=lambda r: r["peak"])
        merged.append({**worst, "ranks": [r["peak"] for r in rows]})
    return merged


def predict(raw: dict[str, Any], shards: Path, task: str = "lm", world: int = 2):
    """The planner's per-rank plan for a measured config (CPU target, the shards' manifest)."""
    from pipeline.config import validate
    from pipeline.data.shard_format import load_manifest
    from pipeline.distributed.planner import plan

    return plan(validate(raw), task, workers=world, target="cpu", manifest=load_manifest(shards))


def compare(jobs: list[tuple[str, dict[str, Any]]], shards: dict[str, Path]) -> list[dict[str, Any]]:
    """Predicted vs measured per job: the rows of the validation table."""
    measured = measure(jobs, shards)
    rows = []
    for (name, raw), m in zip(jobs, measured, strict=True):
        task = job_task(name)
        p = predict(raw, shards[task], task)
        rows.append({"name": name, "predicted": p.total, "measured": m["peak"], "phase": p.phase,
                     "error": p.total / m["peak"] - 1, "plan": p, "m": m})
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def print_validation(rows: list[dict[str, Any]]) -> None:
    from pipeline.distributed.planner.report import format_count

    print("| config | params | predicted MiB | measured MiB (rank 0, 1) | error | predicted peak during |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p, m = r["plan"], r["m"]
        ranks = ", ".join(_mib(x) for x in m["ranks"])
        print(f"| {r['name']} | {format_count(p.num_params)} | {_mib(r['predicted'])} | {_mib(r['measured'])} "
              f"({ranks}) | {r['error']:+.1%} | {r['phase']} |")
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nworst |error| {worst:.1%} over {len(rows)} configs")


# ----------------------------------------------------------------------------- README table
PRESETS = [("gpt_125m", 50257), ("gpt_350m", 50257), ("gpt_1b", 50257), ("gpt_7b", 32000)]
README_STRATEGIES = [
    ("DDP", ["strategy=ddp"]),
    ("FSDP2", ["strategy=fsdp"]),
    ("ZeRO-3", ["strategy=deepspeed", "strategy.zero_stage=3"]),
    ("ZeRO-3 + offload", ["strategy=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true",
                          "strategy.offload_params=true"]),
]


def readme_table(workers: tuple[int, ...] = (8, 64), memory: str = "80GiB", seq_len: int = 2048) -> str:
    """Markdown: per preset and strategy, the largest micro-batch at sequence 2048 on N GPUs of
    80 GiB, bf16, without and with full activation checkpointing (0 = does not fit)."""
    from pipeline.config import compose, validate
    from pipeline.distributed.planner import plan

    head = "| model | strategy | " + " | ".join(f"{n} × 80 GiB: micro-batch (no AC / full AC), GiB per rank at 1"
                                               for n in workers) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in workers) + " |"]
    for preset, vocab in PRESETS:
        for label, strategy in README_STRATEGIES:
            cells = []
            for n in workers:
                got = []
                for ac in ("none", "full"):
                    raw = compose(ROOT / "configs", [f"model@tasks.lm.model={preset}", *strategy, "precision=bf16",
                                                     f"tasks.lm.data.seq_len={seq_len}",
                                                     f"tasks.lm.data.vocab_size={vocab}",
                                                     f"tasks.lm.trainer.activation_checkpointing={ac}",
                                                     "tasks.diffusion.trainer.ema_decay=0"])
                    p = plan(validate(raw), "lm", workers=n, device_memory=memory, target="cuda", micro_batch=1,
                             suggest=False)
                    got.append(p)
                none, full = got
                fits = none.largest_micro_batch or full.largest_micro_batch
                cell = (f"{none.largest_micro_batch} / {full.largest_micro_batch}, {none.total / 2**30:.1f}"
                        if fits else f"does not fit ({none.total / 2**30:.0f} GiB)")
                cells.append(cell)
            params = f"{got[0].num_params / 1e9:.2f}B"
            lines.append(f"| {preset} ({params}) | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("validate", "readme", "all"), default="validate")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--ac", default=",".join(AC_MODES))
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every measured config")
    args = ap.parse_args()
    if args.part in ("validate", "all"):
        jobs = configs(tuple(args.sizes.split(",")), tuple(args.strategies.split(",")), tuple(args.ac.split(",")),
                       tuple(args.override))
        with tempfile.TemporaryDirectory(prefix="planner-") as d:
            shards = build_shards(Path(d), tuple(sorted({task_of(s) for s in args.sizes.split(",")})))
            start = time.perf_counter()
            rows = compare(jobs, shards)
            print_validation(rows)
            print(f"({time.perf_counter() - start:.0f} s for {len(rows)} configs on 2 ranks)")
    if args.part in ("readme", "all"):
        print(readme_table())


if __name__ == "__main__":
    main()
