"""The plan: one rank's peak for a task, config and world size, the largest micro-batch that
fits, and what to change when nothing does.

It is apart from the trace and the layouts because it only combines them: it applies a
strategy's layout (`layouts.py`) to the traced activations (`trace.py`), takes the worse of
forward/backward and the optimizer step, adds the CUDA runtime reserve, and searches the
micro-batch exactly (every operator's bytes are linear in it). `check_fits` is the train
stage's check before any Ray resource.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config.elastic import worker_counts
from pipeline.config.parallel import check_task_parallel
from pipeline.config.schema import PipelineConfig, TaskConfig
from pipeline.config.sizes import format_size, parse_size
from pipeline.distributed.pipeline_parallel import rank_stages
from pipeline.distributed.planner.layouts import Breakdown, _Layout, _layout, _trace_dtype
from pipeline.distributed.planner.trace import (
    ActivationProfile,
    activation_profile,
    merge_facts,
    spec_for_planning,
    traces_compiled,
)
from pipeline.distributed.precision import DTYPES, FP8_DEVICE_ERROR

GiB = 2**30
# CUDA context, NCCL communicators and cuBLAS workspaces: outside the caching allocator, so no
# tensor count sees them. About 0.5-1 GiB per process on current GPUs; we reserve 1 GiB.
CUDA_RUNTIME_RESERVE = 1 * GiB
MAX_MICRO_BATCH = 1 << 20


@dataclass
class MemoryPlan:
    """One rank's peak for one task, config and world size."""

    task: str
    strategy: str
    workers: int
    precision: str
    target: str
    activation_checkpointing: str
    num_params: int
    micro_batch: int  # the one planned: given, else the configured one, else 1
    item_shape: str  # "sequence 2048" or "image 1x8x8"
    device: Breakdown  # at the peak
    phase: str  # when the peak happens: "forward/backward" or "optimizer step"
    host: Breakdown  # what offload keeps in host memory
    device_memory: int | None = None
    largest_micro_batch: int | None = None  # None: no device memory given; 0: not even 1 fits
    suggestion: str = ""
    notes: list[str] = field(default_factory=list)
    split: str = ""  # under tp/pp, whose parameters num_params counts ("per tp rank (of 2)", ...)

    @property
    def total(self) -> int:
        return self.device.total

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return self.total <= self.device_memory



# ----------------------------------------------------------------------------- the plan
def _autocast_dtype(precision: str) -> torch.dtype | None:
    return None if precision == "fp32" else DTYPES[precision]


def _data_parallel(cfg: PipelineConfig, workers: int) -> int:
    """The data-parallel ranks among `workers`: the rest split the model (tp x pp)."""
    return workers // (cfg.parallel.tp * cfg.parallel.pp)


def _configured_micro_batch(tcfg: TaskConfig, workers: int) -> int | None:
    g, a = tcfg.trainer.global_batch_size, tcfg.trainer.grad_accum_steps
    return g // (workers * a) if g % (workers * a) == 0 else None


@dataclass
class _Evaluator:
    """Peak bytes of one layout at any micro-batch (vectorised over the traced operators)."""

    layout: _Layout
    profile: ActivationProfile
    reserve: int

    def __post_init__(self) -> None:
        p, lay = self.profile, self.layout
        self._grads = lay.grads_during(p.root_grads, p.block_grads)
        self._gathered = lay.gathered(p.phase)
        self._reducing = lay.reducing(p.phase)
        # everything but the per-item part of the activations, per operator
        self._fixed = p.fixed - p.root_grads - p.block_grads + self._grads + self._gathered + self._reducing

    def fwd_bwd(self, micro_batch: int) -> tuple[int, Breakdown]:
        p, lay = self.profile, self.layout
        at = int(np.argmax(self._fixed + p.per_item * micro_batch))
        acts = int(p.fixed[at] + p.per_item[at] * micro_batch - p.root_grads[at] - p.block_grads[at])
        b = lay.static + Breakdown(params=int(self._gathered[at]), grads=int(self._grads[at]), activations=acts,
                                   comm=int(self._reducing[at]), reserve=self.reserve)
        return b.total, b

    def optimizer_step(self) -> tuple[int, Breakdown]:
        b = self.layout.static + self.layout.step + Breakdown(reserve=self.reserve)
        return b.total, b

    def peak(self, micro_batch: int) -> tuple[Breakdown, str]:
        f, fb = self.fwd_bwd(micro_batch)
        s, sb = self.optimizer_step()
        return (fb, "forward/backward") if f >= s else (sb, "optimizer step")

    def largest_micro_batch(self, budget: int) -> int:
        """Exact: every operator's bytes are a + b x micro-batch, so each gives an upper bound."""
        if self.optimizer_step()[0] > budget:
            return 0
        room = budget - self.layout.static.total - self.reserve - self._fixed
        per = self.profile.per_item
        if np.any(room[per <= 0] < 0):
            return 0
        grows = per > 0
        if not np.any(grows):
            return MAX_MICRO_BATCH
        return int(max(0, min(MAX_MICRO_BATCH, int(np.min(room[grows] // per[grows])))))


class _Ranks:
    """The worst of several ranks that hold different things (pipeline stages): the peak is the
    largest rank's, the micro-batch that fits the smallest one's; `layout` and `profile` are the
    rank of the last `peak` asked (the first rank until then)."""

    def __init__(self, ranks: list[_Evaluator]) -> None:
        self.ranks, self.worst = ranks, 0

    @property
    def layout(self) -> _Layout:
        return self.ranks[self.worst].layout

    @property
    def profile(self) -> ActivationProfile:
        return self.ranks[self.worst].profile

    def peak(self, micro_batch: int) -> tuple[Breakdown, str]:
        peaks = [r.peak(micro_batch) for r in self.ranks]
        self.worst = max(range(len(peaks)), key=lambda i: peaks[i][0].total)
        return peaks[self.worst]

    def optimizer_step(self) -> tuple[int, Breakdown]:
        return max((r.optimizer_step() for r in self.ranks), key=lambda x: x[0])

    def largest_micro_batch(self, budget: int) -> int:
        return min(r.largest_micro_batch(budget) for r in self.ranks)


def in_flight(schedule: str, stage: int, stages: int, micro_batches: int) -> int:
    """Micro-batches whose forward state a pipeline stage holds at once: GPipe runs every forward
    before any backward; 1F1B's stage s runs `stages - s` forwards before its first backward."""
    return micro_batches if schedule == "gpipe" else min(stages - stage, micro_batches)


def interleaved_in_flight(rank: int, local_stages: int, pp: int, micro_batches: int) -> list[int]:
    """Per local stage of a rank under interleaved 1F1B, the micro-batches whose forward state it
    holds when its first backward runs, replaying torch's ScheduleInterleaved1F1B: a rank runs
    `(v - 1) x per_round + 2 (pp - 1 - rank)` warm-up forwards (at most every forward), then one
    more before that backward; forward i belongs to local stage `(i // per_round) % v`."""
    rounds = max(1, micro_batches // pp)
    per_round = micro_batches // rounds
    total = micro_batches * local_stages
    warmup = min((local_stages - 1) * per_round + 2 * (pp - 1 - rank), total)
    counts = [0] * local_stages
    for i in range(min(warmup + 1, total)):
        counts[(i // per_round) % local_stages] += 1
    return counts


def _evaluator(cfg: PipelineConfig, task_name: str, workers: int, target: str,
               manifest: dict[str, Any] | None) -> tuple[_Evaluator | _Ranks, dict[str, Any]]:
    """The evaluator of one rank (data and tensor parallel: every rank alike), or of each
    pipeline stage's rank (`_Ranks`): the stage's own trace, with the micro-batches its schedule
    keeps in flight, and the state of its own parameters."""
    tcfg = cfg.task(task_name)
    spec = spec_for_planning(tcfg, manifest)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = _data_parallel(cfg, workers)
    reserve = CUDA_RUNTIME_RESERVE if target == "cuda" else 0
    ema = tcfg.trainer.ema_decay > 0  # the loop keeps an fp32 average of the weights
    dtypes = (_trace_dtype(cfg), _autocast_dtype(cfg.precision.dtype))
    fp8 = cfg.precision.dtype == "fp8"  # the converted layers traced as Float8Linear
    emulate = cfg.precision.fp8_emulate  # ... running torchao's emulation, as training does then
    if pp == 1:
        profile = activation_profile(tcfg, spec, *dtypes, target, tp, fp8=fp8, fp8_emulate=emulate)
        return _Evaluator(_layout(cfg, profile.facts, dp, tcfg.optim, target, ema), profile, reserve), spec
    ranks = []
    schedule, n = cfg.parallel.pp_schedule, tcfg.trainer.grad_accum_steps
    for rank in range(pp):
        stages = rank_stages(rank, pp, schedule)
        profiles = [activation_profile(tcfg, spec, *dtypes, target, tp, (s, pp * len(stages)), fp8=fp8,
                                       fp8_emulate=emulate) for s in stages]
        if len(stages) == 1:
            held = profiles[0].in_flight(in_flight(schedule, rank, pp, n)).receive_buffers(n)
        else:  # traced on the later local stage (the first backward's), the others' forwards held beside it
            counts = interleaved_in_flight(rank, len(stages), pp, n)
            counts[-1] -= 1  # (the traced one)
            extra = [(c, p.held()) for c, p in zip(counts, profiles, strict=True)]
            held = profiles[-1].holding(sum(c * f for c, (f, _) in extra),
                                        sum(c * i for c, (_, i) in extra) + n * sum(p.recv_per_item for p in profiles))
        facts = merge_facts([p.facts for p in profiles])
        ranks.append(_Evaluator(_layout(cfg, facts, dp, tcfg.optim, target, ema), held, reserve))
    return _Ranks(ranks), spec


def _split(cfg: PipelineConfig, ev: _Evaluator | _Ranks) -> str:
    """Whose parameters a plan under tp/pp counts: one tp rank's, of the peak rank's stage."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    where = [f"tp rank (of {tp})"] if tp > 1 else []
    if pp > 1:
        where.append(f"pipeline stage {getattr(ev, 'worst', 0)} (of {pp}, the peak rank's)")
    return " per " + ", ".join(where) if where else ""


def _item_shape(spec: dict[str, Any]) -> str:
    if "max_seq_len" in spec:
        return f"sequence {spec['max_seq_len']}"
    return "image " + "x".join(str(d) for d in spec["image_shape"])


def plan(cfg: PipelineConfig, task_name: str, workers: int | None = None, device_memory: int | str | None = None,
         target: str | None = None, micro_batch: int | None = None,
         manifest: dict[str, Any] | None = None, suggest: bool = True) -> MemoryPlan:
    """Plan one task's training step per rank.

    workers: all ranks, dp x tp x pp (default `cluster.num_workers`); device_memory: bytes or a size
    string (default `cluster.device_memory`); target: "cuda" or "cpu" (default from
    `cluster.use_gpu`); micro_batch: default the configured one (global batch / workers /
    accumulation), else 1; manifest: the shard manifest, when the shards exist.

    A layout the train stage refuses for this task (heads or layers tp/pp does not divide, a
    pipeline schedule short of micro-batches) raises its own one-line error: no plan, and so no
    "fits", for what cannot run (the CLI and `check_fits` plan through here).
    """
    check_task_parallel(cfg, task_name)
    workers = workers or cfg.cluster.num_workers
    if workers % (cfg.parallel.tp * cfg.parallel.pp):
        raise ValueError(f"parallel.tp={cfg.parallel.tp} x parallel.pp={cfg.parallel.pp} does not divide "
                         f"{workers} workers")
    target = target or ("cuda" if cfg.cluster.use_gpu else "cpu")
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target: expected cuda or cpu (got {target!r})")
    if cfg.precision.dtype == "fp8" and target == "cpu" and not cfg.precision.fp8_emulate:
        # the train stage refuses it: no plan for what cannot run
        raise ValueError(FP8_DEVICE_ERROR.format(what="this plan's target is the CPU (plan a GPU with --target cuda, "
                                                      "or set cluster.use_gpu)"))
    if device_memory is None:
        device_memory = cfg.cluster.device_memory
    memory = parse_size(device_memory) if device_memory is not None else None
    tcfg = cfg.task(task_name)
    ev, spec = _evaluator(cfg, task_name, workers, target, manifest)
    configured = _configured_micro_batch(tcfg, _data_parallel(cfg, workers))
    mb = micro_batch or configured or 1
    device, phase = ev.peak(mb)
    result = MemoryPlan(task_name, ev.layout.name, workers, cfg.precision.dtype, target,
                        tcfg.trainer.activation_checkpointing, ev.profile.facts.params, mb,
                        _item_shape(spec), device, phase, ev.layout.host, memory, split=_split(cfg, ev))
    if micro_batch is None and configured is None:
        result.notes.append(f"trainer.global_batch_size {tcfg.trainer.global_batch_size} does not divide into "
                            f"{workers} workers x {tcfg.trainer.grad_accum_steps} accumulation steps: shown at "
                            "micro-batch 1")
    if tcfg.trainer.compile != "none":
        if ev.profile.compile_fallback:
            result.notes.append(f"trainer.compile={tcfg.trainer.compile}: inductor's graphs could not be traced with "
                                f"this torch ({ev.profile.compile_fallback}); traced eagerly")
        elif not traces_compiled(tcfg.trainer):
            result.notes.append(f"trainer.compile={tcfg.trainer.compile} with activation_checkpointing="
                                f"{tcfg.trainer.activation_checkpointing}: traced eagerly (inductor's checkpointed "
                                "regions are not modelled; the eager trace was above them on CPU)")
        elif target == "cuda":
            result.notes.append(f"trainer.compile={tcfg.trainer.compile}: traced on inductor's own graphs (what its "
                                "partitioner saves, what its fused kernels write), checked against inductor's CPU "
                                "allocations, not yet its CUDA ones")
    if memory is not None:
        result.largest_micro_batch = ev.largest_micro_batch(memory)
        if suggest:
            result.suggestion = _suggest(cfg, task_name, workers, target, memory, result, manifest)
    return result


def _with(cfg: PipelineConfig, strategy: dict[str, Any] | None = None, ac: str | None = None,
          task_name: str | None = None, accum: int | None = None) -> PipelineConfig:
    """`cfg` with a suggestion applied: a strategy, an activation checkpointing mode, or (for
    `task_name`) a gradient accumulation."""
    raw = cfg.model_dump(mode="json")
    if accum is not None and task_name is not None:
        raw["tasks"][task_name]["trainer"]["grad_accum_steps"] = accum
    if strategy is not None:
        raw["strategy"] = strategy
    if ac is not None and task_name is not None:  # a trainer.activation_checkpointing value, or "op"
        trainer = raw["tasks"][task_name]["trainer"]
        trainer["activation_checkpointing"] = "selective" if ac == "op" else ac
        if ac == "op":
            trainer["ac_selective"] = "op"
    return PipelineConfig.model_validate(raw)


ALTERNATIVES: list[tuple[str, dict[str, Any]]] = [
    ("strategy.name=fsdp", {"name": "fsdp"}),
    ("strategy.name=deepspeed strategy.zero_stage=3", {"name": "deepspeed", "zero_stage": 3}),
    ("strategy.name=deepspeed strategy.zero_stage=3 strategy.offload_optimizer=true",
     {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True}),
    ("strategy.name=deepspeed strategy.zero_stage=3 strategy.offload_optimizer=true strategy.offload_params=true",
     {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True}),
]


def _runs_with(cfg: PipelineConfig, strategy: str, target: str) -> bool:
    """Whether the precision can train under `strategy` at all (a suggestion the train stage would
    refuse is none): fp8 runs under ddp or fsdp only, and DeepSpeed's fp16 needs a CPU with fp16
    arithmetic when the target is the CPU."""
    if strategy != "deepspeed":
        return True
    if cfg.precision.dtype == "fp8":
        return False
    if cfg.precision.dtype == "fp16" and target == "cpu":
        from pipeline.distributed.deepspeed import cpu_fp16_supported

        return cpu_fp16_supported()
    return True


def _accumulation_fits(cfg: PipelineConfig, task_name: str, accum: int, workers: int, target: str, memory: int,
                       manifest: dict[str, Any] | None) -> bool:
    """Whether `grad_accum_steps=accum` is one to suggest: the train stage takes it (interleaved
    1F1B's equal rounds, 1F1B's at least pp micro-batches), and under parallel.pp its micro-batch
    fits when planned at that accumulation. A pipeline's accumulation is its micro-batch count, which
    sets what each stage holds: GPipe keeps every micro-batch's forward state until backward (and
    every schedule a receive buffer per micro-batch), so more, smaller micro-batches may hold as
    much as before, and the largest micro-batch at the configured accumulation says nothing."""
    changed = _with(cfg, task_name=task_name, accum=accum)
    try:
        check_task_parallel(changed, task_name)
    except ValueError:
        return False
    if cfg.parallel.pp == 1:  # data and tensor parallel: the accumulation changes nothing a rank holds
        return True
    tcfg = changed.task(task_name)
    micro_batch = tcfg.trainer.global_batch_size // (_data_parallel(cfg, workers) * accum)
    ev, _ = _evaluator(changed, task_name, workers, target, manifest)
    return ev.largest_micro_batch(memory) >= micro_batch


def _suggest(cfg: PipelineConfig, task_name: str, workers: int, target: str, memory: int, p: MemoryPlan,
             manifest: dict[str, Any] | None) -> str:
    """One sentence: fine as is, the micro-batch to use, or a layout that would fit."""
    tcfg = cfg.task(task_name)
    best = p.largest_micro_batch or 0
    key = f"tasks.{task_name}.trainer"
    split = cfg.parallel.tp * cfg.parallel.pp > 1  # model-parallel: the suggestions keep tp and pp
    dp = _data_parallel(cfg, workers)
    if best >= 1:
        if p.micro_batch is None or p.micro_batch <= best:
            return f"fits: largest micro-batch {best}"
        g, configured = tcfg.trainer.global_batch_size, tcfg.trainer.grad_accum_steps
        # an accumulation that splits the global batch at every worker count a run may train on
        # (the elastic range, when `workers` is in it), from the configured one up: a micro-batch
        # asked for (`plan --micro-batch`) may not fit where the configured one does
        dps = {_data_parallel(cfg, w) for w in worker_counts(cfg)} if workers in worker_counts(cfg) else set()
        for accum in range(configured, g + 1):
            if not all(g % (d * accum) == 0 for d in dps | {dp}) or g // (dp * accum) > best:
                continue
            if accum == configured:  # (`best` was planned at this accumulation)
                return (f"micro-batch {p.micro_batch} does not fit, {best} does: the configured micro-batch "
                        f"{g // (dp * accum)} fits")
            if not _accumulation_fits(cfg, task_name, accum, workers, target, memory, manifest):
                continue
            return (f"micro-batch {p.micro_batch} does not fit, {best} does: set {key}.grad_accum_steps={accum} "
                    f"(micro-batch {g // (dp * accum)})")
        # (at the configured accumulation, a smaller global batch gives a micro-batch that fits)
        return f"micro-batch {p.micro_batch} does not fit, {best} does: lower {key}.global_batch_size"
    tries: list[tuple[str, PipelineConfig]] = []
    ac = tcfg.trainer.activation_checkpointing
    current = cfg.strategy.model_dump()
    for label, strat in ALTERNATIVES[:1] if split else ALTERNATIVES:  # (tp/pp run under ddp or fsdp only)
        merged = {**{k: v for k, v in current.items() if k == "backend"}, **strat}
        if merged.get("name") == current.get("name") and all(current.get(k) == v for k, v in strat.items()):
            continue
        if not _runs_with(cfg, merged["name"], target):
            continue
        try:
            tries.append((label, _with(cfg, merged)))
        except ValueError:  # a layout the rest of the config refuses (compile with ZeRO-3): no suggestion
            continue
    if ac != "full":
        tries.insert(0, (f"{key}.activation_checkpointing=full", _with(cfg, ac="full", task_name=task_name)))
        tries += [(f"{label} {key}.activation_checkpointing=full", _with(c, ac="full", task_name=task_name))
                  for label, c in list(tries[1:])]
        if not (ac == "selective" and tcfg.trainer.ac_selective == "op"):  # less recomputation than full: first
            tries.insert(0, (f"{key}.activation_checkpointing=selective {key}.ac_selective=op",
                             _with(cfg, ac="op", task_name=task_name)))
    for label, alt in tries:
        ev, _ = _evaluator(alt, task_name, workers, target, manifest)
        fit = ev.largest_micro_batch(memory)
        if fit >= 1:
            return f"nothing fits at micro-batch 1; {label} would fit (largest micro-batch {fit})"
    if split:
        return (f"nothing fits at micro-batch 1 with parallel.tp={cfg.parallel.tp} x parallel.pp={cfg.parallel.pp}, "
                "even with fsdp and full checkpointing")
    full_shard = _with(cfg, {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                             "offload_params": True}, ac="full", task_name=task_name)
    for more in (2**k for k in range(1, 13)):
        if more <= workers:
            continue
        ev, _ = _evaluator(full_shard, task_name, more, target, manifest)
        if ev.largest_micro_batch(memory) >= 1:
            return (f"nothing fits at micro-batch 1 on {workers} workers, with any strategy; ZeRO-3 with offload and "
                    f"full activation checkpointing fits on {more} workers")
    return "nothing fits at micro-batch 1, with any strategy, on up to 4096 workers"


def worst_with_suggestion(cfg: PipelineConfig, task_name: str, plans: list[MemoryPlan],
                          manifest: dict[str, Any] | None = None) -> MemoryPlan | None:
    """Of the plans of the worker counts a run may train on, the one furthest above its device
    memory (the first of equals: the fewest workers), with the suggestion made for that count:
    an accumulation chosen at the configured count alone can leave a smaller count over. None
    when every plan fits (or no device memory is known)."""
    too_big = [p for p in plans if p.device_memory is not None and p.total > p.device_memory]
    if not too_big:
        return None
    p = max(too_big, key=lambda q: q.total)
    assert p.device_memory is not None
    p.suggestion = _suggest(cfg, task_name, p.workers, p.target, p.device_memory, p, manifest)
    return p


def check_fits(cfg: PipelineConfig, task_name: str, manifest: dict[str, Any] | None = None) -> MemoryPlan | None:
    """The train stage's check, before any Ray resource: when `cluster.device_memory` is set,
    raise ValueError (one line, starting with the key) if the configured micro-batch cannot fit
    at some worker count a run may train on. An elastic run (`cluster.min_workers`) keeps the
    global batch at fewer workers, so each rank's micro-batch (and a sharded strategy's shard)
    grows: every count of the range is planned (the traces are cached: only the layout
    arithmetic repeats), and the error names the count. Returns the plan at `num_workers`."""
    if cfg.cluster.device_memory is None:
        return None
    counts = worker_counts(cfg)
    plans = [plan(cfg, task_name, workers=w, manifest=manifest, suggest=False) for w in counts]
    assert all(p.device_memory is not None for p in plans)
    p = worst_with_suggestion(cfg, task_name, plans, manifest)
    if p is None:
        return plans[-1]
    memory = p.device_memory
    assert memory is not None
    where, breakdown = f"({p.strategy}, {p.workers} workers, {p.precision})", f"python -m pipeline plan {task_name}"
    if len(counts) > 1:
        where = (f"on {p.workers} worker{'s' if p.workers > 1 else ''} (elastic: cluster.min_workers..cluster."
                 f"num_workers = {counts.start}..{counts.stop - 1}; {p.strategy}, {p.precision})")
        breakdown += f" --workers {p.workers}"
    raise ValueError(
        f"cluster.device_memory: tasks.{task_name} needs {format_size(p.total)} per rank at micro-batch "
        f"{p.micro_batch} {where} but a device has {format_size(memory)}; {p.suggestion} ({breakdown} shows "
        "the breakdown)")
