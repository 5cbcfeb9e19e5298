"""Per-strategy state layouts: what DDP, Horovod, FSDP2 and DeepSpeed ZeRO-0/1/2/3 keep on one
rank (parameters, gradients, optimizer state, fp32 master copies, communication buffers), as
functions of the traced step.

It is apart from the trace because it is the one place that has to know the strategies'
layouts (what `ddp.py`, `fsdp.py` and `deepspeed.py` keep on each rank) and must follow them
when they change; it imports neither DeepSpeed nor Ray. `_layout` says every term and which
measurement it was checked against (`tests/test_planner.py`, `benchmarks/planner.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config.schema import (
    DDPConfig,
    DeepSpeedConfig,
    FSDPConfig,
    HorovodConfig,
    OptimConfig,
    PipelineConfig,
)
from pipeline.distributed.planner.trace import ZERO3_PERSISTENCE_THRESHOLD, ModelFacts
from pipeline.distributed.precision import DTYPES

# DeepSpeed ZeRO-3 defaults the pipeline's `ds_config` leaves in place (DeepSpeed 0.19; the
# persistence threshold is in trace.py, with the `ModelFacts` count it defines).
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance (elements)
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters (elements)
HOROVOD_FUSION_BUFFER = 128 * 2**20  # HOROVOD_FUSION_THRESHOLD default


def zero_master_aliases(stage: int, param_bytes: int, offload_optimizer: bool, partition_on_host: bool = False) -> bool:
    """Whether DeepSpeed's fp32 master partition is the parameter partition itself (no second
    copy). DeepSpeed 0.19 alone always clones it, even an fp32 partition on the same device;
    the ZeRO-3 strategy makes the two one tensor (`fp32_master_shares_partition`, deepspeed.py)
    when both are fp32 and on the optimizer's device: not with the optimizer offloaded, nor with
    the parameters offloaded to host memory while the optimizer steps on a GPU (stage3.py's
    `_create_fp32_partitions` then clones the host partition onto the GPU: 4 bytes a parameter
    over N there). ZeRO-1/2 keep their separate copy."""
    return stage == 3 and param_bytes == 4 and not offload_optimizer and not partition_on_host


# ----------------------------------------------------------------------------- bytes by kind
@dataclass
class Breakdown:
    """Bytes one rank holds, by what they are."""

    params: int = 0  # parameters this rank keeps, plus gathered (unsharded) ones in use
    grads: int = 0
    optimizer: int = 0  # optimizer state, fp32 master copies, the step's temporaries
    ema: int = 0  # the EMA's fp32 copy of this rank's weights (trainer.ema_decay > 0)
    activations: int = 0  # saved activations and the step's temporaries (logits, recompute, ...)
    comm: int = 0  # communication buckets and reduce buffers
    reserve: int = 0  # runtime memory no tensor count sees (CUDA context, NCCL)

    @property
    def total(self) -> int:
        return sum(getattr(self, f) for f in _FIELDS)

    def __add__(self, other: Breakdown) -> Breakdown:
        return Breakdown(**{f: getattr(self, f) + getattr(other, f) for f in _FIELDS})


_FIELDS = ("params", "grads", "optimizer", "ema", "activations", "comm", "reserve")



# ----------------------------------------------------------------------------- layouts
@dataclass
class _Layout:
    """A strategy's per-rank memory as a function of the traced step."""

    name: str
    static: Breakdown  # held through the whole step (after the first step: optimizer state exists)
    host: Breakdown  # what offload keeps in host memory, at its peak
    # Per traced operator (phase array in, bytes out): unsharded parameters in use (FSDP units,
    # ZeRO-3 gathers) and transient reduce buffers.
    gathered: Callable[[np.ndarray], np.ndarray]
    reducing: Callable[[np.ndarray], np.ndarray]
    grads_during: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (root, block final grads) -> bytes held
    step: Breakdown  # on top of `static` at the optimizer step: gradients as it sees them, temporaries


def _state_bytes(optim: OptimConfig) -> int:
    """Optimizer state bytes per fp32 parameter element."""
    if optim.name in ("adam", "adamw"):
        return 8
    if optim.name == "sgd":
        return 4 if optim.momentum > 0 else 0
    return 4 + (4 if optim.momentum > 0 else 0)  # rmsprop: square average (+ momentum buffer)


def step_temporaries(optim: OptimConfig, target: str) -> int:
    """Temporaries of one optimizer step, in copies of the largest tensor it updates.

    `impl: auto` is torch's fused kernel on CUDA (no temporaries) and, on CPU, its per-tensor
    loop (torch defaults `foreach` off for CPU tensors): Adam(W) makes `sqrt(exp_avg_sq)` and
    the quotient of `addcdiv` for one tensor at a time (2 copies), plus `grad + wd * param` for
    Adam's L2 decay; RMSprop the square root (and the L2 term); SGD only the L2 term.
    tests/test_planner.py measures these against torch's optimizers. Under DeepSpeed the
    "largest tensor" is the rank's whole flat partition of a parameter group.
    """
    if optim.impl in ("fused", "apex") or (optim.impl == "auto" and target == "cuda"):
        return 0
    l2 = 1 if optim.weight_decay > 0 and optim.name != "adamw" else 0
    if optim.name in ("adam", "adamw"):
        return 2 + l2
    if optim.name == "rmsprop":
        return 1 + l2
    return l2


def _ds_buckets(strategy: DeepSpeedConfig, precision: str, num_params: int) -> int:
    """The reduce / all-gather / prefetch bucket (elements) the strategy writes into ds_config."""
    from pipeline.distributed.base import StepSettings
    from pipeline.distributed.deepspeed import DeepSpeedStrategy
    from pipeline.distributed.precision import Precision

    # (the buckets do not depend on the precision's device: fp8 is asked for as the bf16 it computes in,
    # so no device check refuses a plan made on a machine without float8 tensor cores)
    dtype = "bf16" if precision == "fp8" else precision
    config = DeepSpeedStrategy(strategy, Precision(dtype, torch.device("cpu")), torch.device("cpu"),
                               StepSettings(1, 1, 1.0)).ds_config(num_params)
    return int(config["zero_optimization"]["reduce_bucket_size"])


def zero3_gathered_peak(facts: ModelFacts, prefetch: int, max_reuse: int = ZERO3_MAX_REUSE_DISTANCE,
                        max_live: int = ZERO3_MAX_LIVE_PARAMETERS) -> int:
    """Most parameter elements ZeRO-3 holds gathered at once, replaying its coordinator's rules
    over the module call order (forward, then backward in reverse): a module's parameters are
    gathered when it runs, the next `prefetch` elements of upcoming modules are gathered ahead,
    and after it runs its parameters are released unless the next `max_reuse` elements of the
    trace use them again. With the defaults (1e9) a model under ~5e8 parameters keeps
    everything it gathered in forward until backward releases it; a 7B model about 1e9
    elements around the turn from forward to backward."""
    numel = facts.param_numels
    persistent = {i for i, n in enumerate(numel) if n <= ZERO3_PERSISTENCE_THRESHOLD}
    trace = [tuple(i for i in call if i not in persistent) for call in facts.module_calls]
    trace = trace + trace[::-1]
    sizes = [sum(numel[i] for i in call) for call in trace]
    gathered: set[int] = set()
    held = peak = 0
    for s, call in enumerate(trace):
        for i in call:
            if i not in gathered:
                gathered.add(i)
                held += numel[i]
        budget, fetched = min(prefetch, max_live - held), 0
        for later in trace[s + 1:]:
            if fetched >= budget:
                break
            for i in later:
                if i not in gathered:
                    gathered.add(i)
                    held += numel[i]
                    fetched += numel[i]
        peak = max(peak, held)
        reused: set[int] = set()
        traversed = 0
        for later, size in zip(trace[s + 1:], sizes[s + 1:], strict=True):
            if traversed >= max_reuse:
                break
            reused.update(later)
            traversed += size
        for i in call:
            if i in gathered and i not in reused:
                gathered.discard(i)
                held -= numel[i]
    return peak


def _trace_dtype(cfg: PipelineConfig) -> torch.dtype:
    """The parameter dtype forward/backward runs with: DDP and Horovod keep fp32 parameters
    (autocast casts them per op); FSDP's MixedPrecisionPolicy gathers low-precision units and
    DeepSpeed casts the whole module to bf16/fp16."""
    if isinstance(cfg.strategy, (DDPConfig, HorovodConfig)) and cfg.parallel.tp * cfg.parallel.pp == 1:
        return torch.float32
    return DTYPES[cfg.precision.dtype]  # (under tp/pp ddp is FSDP2's `replicate`: the same policy)


def _const(value: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda phase: np.full(phase.shape, value, dtype=np.int64)


def _layout(cfg: PipelineConfig, facts: ModelFacts, workers: int, optim: OptimConfig, target: str,
            ema: bool = False) -> _Layout:
    """Per-rank bytes of one strategy (`_state_layout`), with the EMA's copy of the weights when
    `ema` (trainer.ema_decay > 0). The loop averages `strategy.ema_source()` into fp32 clones on
    its device, one per state-dict entry (a tied weight twice): the whole state dict under DDP,
    Horovod, ZeRO-0 and fp32 ZeRO-1/2, this rank's shards under FSDP2 (DTensors) and its fp32
    master partition under ZeRO-3 and bf16/fp16 ZeRO-1/2 (the optimizer's own partition: in host
    memory when the optimizer is offloaded there). With ZeRO-3's optimizer
    offloaded that partition is in host memory, but DeepSpeed hands it over as a copy on the
    device (`safe_get_local_fp32_param`), so the EMA is on the device, and each update makes
    the copies of every partition again: a second copy at the step. Measured with the DiT on 2
    ranks (benchmarks/planner.py, tests/test_planner.py): left out, every row was under by
    about this copy (10-15%)."""
    layout = _state_layout(cfg, facts, workers, optim, target)
    if not ema:
        return layout
    s, N = cfg.strategy, workers
    entries = facts.state_numel or facts.params
    master_part = isinstance(s, DeepSpeedConfig) and s.zero_stage in (1, 2) and cfg.precision.dtype in ("bf16", "fp16")
    sharded = isinstance(s, FSDPConfig) or (isinstance(s, DeepSpeedConfig) and s.zero_stage == 3) or master_part
    copy = (math.ceil(entries / N) if sharded else entries) * 4
    if master_part and s.offload_optimizer:  # (the partition it averages lives in host memory)
        layout.host.ema += copy
    else:
        layout.static.ema += copy
    if isinstance(s, DeepSpeedConfig) and s.zero_stage == 3 and s.offload_optimizer:
        layout.step.ema += copy
    return layout


def _state_layout(cfg: PipelineConfig, facts: ModelFacts, workers: int, optim: OptimConfig, target: str) -> _Layout:
    """Per-rank bytes of one strategy. P = parameters, N = workers, lp = bytes of the dtype the
    strategy computes with (bf16/fp16: 2, fp32: 4), S = optimizer state bytes per element
    (AdamW: 8), k = the step's temporaries in copies of its largest tensor (`step_temporaries`).
    The comments say what each term is; tests/test_planner.py and benchmarks/RESULTS.md compare
    the totals with measured peaks."""
    s = cfg.strategy
    precision = cfg.precision.dtype
    lp = torch.empty(0, dtype=DTYPES[precision]).element_size()
    P, N = facts.params, workers
    S = _state_bytes(optim)
    k = step_temporaries(optim, target)
    shard = math.ceil(P / N)
    largest = max(facts.param_numels)
    nothing = _const(0)
    whole = lambda root, block: root + block  # noqa: E731 - gradients held whole, as param.grad

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    mesh = (f" x tp={tp}" if tp > 1 else "") + (f" x pp={pp} ({cfg.parallel.pp_schedule})" if pp > 1 else "")
    if mesh and isinstance(s, DDPConfig):
        # Tensor or pipeline parallel (P: this rank's slices or stage; N: the dp ranks) with ddp: FSDP2's
        # `replicate` over the dp ranks. Parameters, gradients and optimizer state whole in fp32. Like FSDP2 it
        # computes with unsharded copies of the parameters (in lp; a copy in fp32 too, measured),
        # but never reshards them: the whole copy stays from the first forward to the end of
        # backward. Each block's gradients go through an lp + fp32 reduce buffer, as FSDP2's.
        block = facts.largest_block
        gathered = _const(P * lp)

        def replicate_reducing(phase: np.ndarray) -> np.ndarray:
            return np.where(phase == 2, block * (lp + 4), 0)

        return _Layout(f"replicate (FSDP2){mesh}", Breakdown(params=P * 4, optimizer=P * S), Breakdown(),
                       gathered, replicate_reducing, lambda root, blk: (root + blk) // lp * 4,
                       Breakdown(grads=P * 4, optimizer=k * largest * 4))

    if isinstance(s, (DDPConfig, HorovodConfig)):
        # Every rank: fp32 parameters, gradients and optimizer state. DDP's reducer keeps flat
        # buckets of every gradient (gradient_as_bucket_view=False): a second full gradient copy
        # (on CPU its pages become resident in the first backward after DDP rebuilds its buckets,
        # i.e. from step 3 on). Horovod fuses tensors into one fusion buffer instead.
        if isinstance(s, DDPConfig):
            comm, name = (P * 4 if N > 1 else 0), "ddp"
        else:
            comm, name = (min(HOROVOD_FUSION_BUFFER, P * 4) if N > 1 else 0), "horovod"
        return _Layout(name, Breakdown(params=P * 4, optimizer=P * S, comm=comm), Breakdown(), nothing, nothing,
                       whole, Breakdown(grads=P * 4, optimizer=k * largest * 4))

    if isinstance(s, FSDPConfig):
        # Parameters, gradients and optimizer state sharded 1/N in fp32 (the model's dtype); units
        # are gathered in lp (MixedPrecisionPolicy). The root unit (embeddings, head, final norm)
        # stays gathered from its forward to the end of backward (FSDP2 never reshards the root
        # after forward), and its gradients stay whole until its post-backward at the very end.
        # A block is gathered for its forward (plus a block-sized all-gather buffer while it is
        # copied out; CUDA also prefetches the next block) and again for its backward, after which
        # its gradients go through an fp32 reduce-scatter buffer and 1/N of them stay, in fp32.
        # Under fp8 with float8 all-gather (over more than one rank) a block's converted weights
        # are gathered and kept in one byte each.
        block = facts.largest_block
        # (FSDPStrategy gathers at any world size; on the tp/pp mesh only over more than one dp rank)
        float8 = precision == "fp8" and cfg.precision.fp8_all_gather and (N > 1 or not mesh)
        unit = facts.gathered_block_bytes(lp, float8)
        root = facts.root_params * lp
        ahead = unit if target == "cuda" else 0
        if s.reshard_after_forward:
            def gathered(phase: np.ndarray) -> np.ndarray:
                return root + np.where(phase == 1, 2 * unit + ahead, np.where(phase == 2, unit + ahead, 0))
        else:  # blocks stay gathered from their forward to their backward
            gathered = _const(facts.params * lp)

        def reducing(phase: np.ndarray) -> np.ndarray:
            return np.where(phase == 2, block * (lp + 4), 0)

        def fsdp_grads(root_done: np.ndarray, block_done: np.ndarray) -> np.ndarray:
            return root_done + (block_done // lp) * 4 // N

        suffix = ("" if s.reshard_after_forward else ", reshard_after_forward=False") + ")"
        suffix += mesh
        return _Layout(f"fsdp (FSDP2{suffix}", Breakdown(params=shard * 4, optimizer=shard * S), Breakdown(),
                       gathered, reducing, fsdp_grads,
                       Breakdown(grads=shard * 4, optimizer=k * math.ceil(largest / N) * 4))

    assert isinstance(s, DeepSpeedConfig)
    bucket = _ds_buckets(s, precision, P)
    stage = s.zero_stage
    on_host = s.offload_params and target == "cuda"  # (on a CPU target both are host memory: one tensor)
    master = 0 if (zero_master_aliases(stage, lp, s.offload_optimizer, on_host)
                   or (stage == 0 and precision == "fp32")) else 4
    offload_name = [w for w, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on]
    name = f"deepspeed ZeRO-{stage}" + (f" (offload {', '.join(offload_name)})" if offload_name else "")
    group = math.ceil(facts.matrix_params / N)  # the rank's flat partition of the larger parameter group
    # At the step DeepSpeed flattens the group's reduced gradient partition and casts it to fp32
    # for the optimizer, which then steps that one flat tensor (k temporaries of its size).
    if stage == 0:
        # Data parallel with DeepSpeed's own all-reduce bucket; bf16/fp16 keep a full fp32 master.
        static = Breakdown(params=P * lp, optimizer=P * (S + master), comm=bucket * lp)
        return _Layout(name, static, Breakdown(), nothing, nothing, whole,
                       Breakdown(grads=P * lp + (P * 4 if lp != 4 else 0), optimizer=k * largest * 4))
    if stage in (1, 2):
        # Whole lp parameters (one flat buffer), the fp32 master partition and optimizer state
        # 1/N, the reduce bucket. Stage 1 keeps whole gradients until the end of backward;
        # stage 2 copies each into the bucket as it is produced and keeps its own partition.
        # Both hold the reduced partition (lp) into the step (`flat_step` on top).
        opt_state = shard * (S + master)
        static = Breakdown(params=P * lp, comm=bucket * lp)
        if s.offload_optimizer:
            host = Breakdown(optimizer=opt_state + k * group * 4, grads=shard * 4)
            step = Breakdown(grads=shard * lp)
        else:
            static.optimizer = opt_state
            host = Breakdown()
            step = Breakdown(grads=shard * lp + group * 4 + (group * lp if lp != 4 else 0), optimizer=k * group * 4)

        def zero_grads(root_done: np.ndarray, block_done: np.ndarray) -> np.ndarray:
            return root_done + block_done if stage == 1 else (root_done + block_done) // N

        return _Layout(name, static, host, nothing, nothing, zero_grads, step)

    # Stage 3: lp parameter partitions (parameters of at most 1e5 elements stay whole on every
    # rank), the fp32 master partition (the partition itself in fp32 since issue 14:
    # `zero_master_aliases`), a preallocated fp32 gradient-partition buffer, one reduce bucket;
    # each module's parameters are gathered as it runs (`zero3_gathered_peak`).
    small = facts.small_params
    gathered = _const(zero3_gathered_peak(facts, bucket) * lp)
    opt_state = shard * (S + master)
    static = Breakdown(params=shard * lp + small * lp, comm=bucket * lp, grads=shard * 4)
    host = Breakdown()
    step = Breakdown(grads=group * 4 + (group * lp if lp != 4 else 0), optimizer=k * group * 4)
    if s.offload_optimizer:
        host = Breakdown(optimizer=opt_state + k * group * 4, grads=shard * 4 + group * 4)
        static.grads = 0
        step = Breakdown()
    else:
        static.optimizer = opt_state
    if s.offload_params:
        host.params += shard * lp
        static.params = small * lp
    return _Layout(name, static, host, gathered, nothing, lambda root, block: np.zeros_like(root), step)
