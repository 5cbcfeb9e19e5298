"""Memory planner: what one rank holds at the peak of a training step, per strategy, from the
config alone (no GPU, no Ray, no process group), and the largest micro-batch that fits.

It sits beside the strategies because it has to know their layouts (what `ddp.py`, `fsdp.py`
and `deepspeed.py` keep on each rank); it imports neither DeepSpeed nor Ray.

How the numbers are made, and why this way:

* **Parameters** are counted on the model the loop would build (`task_for_data(kind).build(spec)`),
  constructed under `FakeTensorMode`: every tensor has its shape and dtype but no storage, so a
  7B preset costs nothing to build. Repeated blocks (the FSDP units) come from
  `units.repeated_blocks`, as in the strategies.
* **Activations are traced, not estimated.** The fake model runs one forward and backward of
  the task's real loss (`Task.loss`), with the configured activation checkpointing
  (`activation.apply_activation_checkpointing`) and precision (bf16/fp16 autocast, and
  low-precision parameters where the strategy keeps them), while a dispatch mode counts the
  bytes of every tensor storage alive after each operator (weak references tell when one is
  freed). That is the allocation sequence eager PyTorch makes, without making it: saved
  activations, autocast weight copies, logits and cross-entropy buffers, one block's recompute
  under checkpointing, and the backward's gradient temporaries all appear by themselves. The
  trace runs at micro-batch 1 and 2; every operator's live bytes are linear in the micro-batch
  (`fixed + per_item * B`), which makes the largest micro-batch an exact integer computation.
  The trace is on CPU tensors, so it sees the CPU's attention kernel: `scaled_dot_product_attention`
  runs the flash kernel there (q, k, v, output and log-sum-exp saved) except with attention
  dropout, where the CPU falls back to the math path (the T x T matrix is saved). For a CUDA
  target the trace runs attention without dropout, which is what the CUDA flash kernel saves
  (its dropout mask is regenerated from an RNG state, not stored). CUDA's autocast op lists
  differ slightly from the CPU's (which ops stay fp32); the trace uses the CPU's.
* **Static state per strategy** (parameters, gradients, optimizer state, fp32 master copies,
  communication buffers) follows each strategy's layout; see `_layout` for every term and
  which measurement it was checked against (`tests/test_planner.py`, `benchmarks/planner.py`).

Peak = the larger of (static + gathered parameters + the worst operator of forward/backward,
with gradients as the strategy holds them at that moment) and (static + gradients + the
optimizer step's temporaries). On a CUDA target a fixed runtime reserve (CUDA context, NCCL and
cuBLAS workspaces, which the caching allocator never sees) is added; allocator fragmentation is
not modelled.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import (
    DDPConfig,
    DeepSpeedConfig,
    FSDPConfig,
    HorovodConfig,
    OptimConfig,
    PipelineConfig,
    TaskConfig,
    TrainerConfig,
)
from pipeline.config.sizes import format_size, parse_size
from pipeline.distributed.activation import apply_activation_checkpointing
from pipeline.distributed.precision import DTYPES
from pipeline.distributed.units import repeated_blocks

GiB = 2**30
# CUDA context, NCCL communicators and cuBLAS workspaces: outside the caching allocator, so no
# tensor count sees them. About 0.5-1 GiB per process on current GPUs; we reserve 1 GiB.
CUDA_RUNTIME_RESERVE = 1 * GiB
# DeepSpeed ZeRO-3 defaults the pipeline's `ds_config` leaves in place (DeepSpeed 0.19).
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance (elements)
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters (elements)
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
HOROVOD_FUSION_BUFFER = 128 * 2**20  # HOROVOD_FUSION_THRESHOLD default
MAX_MICRO_BATCH = 1 << 20


def zero_master_aliases(stage: int, param_bytes: int, offload_optimizer: bool) -> bool:
    """Whether DeepSpeed's fp32 master partition is the parameter partition itself (no second
    copy). DeepSpeed 0.19 alone always clones it, even an fp32 partition on the same device;
    the ZeRO-3 strategy makes the two one tensor (`fp32_master_shares_partition`, deepspeed.py) when both
    are fp32 and the optimizer is not offloaded. ZeRO-1/2 keep their separate copy."""
    from pipeline.distributed import deepspeed as ds_strategy

    return (stage == 3 and param_bytes == 4 and not offload_optimizer
            and hasattr(ds_strategy, "fp32_master_shares_partition"))


# ----------------------------------------------------------------------------- model facts
@dataclass(frozen=True)
class ModelFacts:
    """Parameter counts of the model the loop would build, in elements."""

    params: int
    root_params: int  # outside the repeated blocks (embeddings, head, final norm): FSDP's root unit
    block_params: tuple[int, ...]  # per repeated block, in order
    matrix_params: int  # parameters with 2+ dims: the optimizer's weight-decay group (the larger one)
    small_params: int  # parameters of at most ZERO3_PERSISTENCE_THRESHOLD elements (ZeRO-3 keeps them whole)
    param_numels: tuple[int, ...]  # every (unique) parameter, indexed as in `module_calls`
    module_calls: tuple[tuple[int, ...], ...]  # forward order of module calls that own parameters

    @property
    def largest_block(self) -> int:
        return max(self.block_params, default=0)


def spec_for_planning(tcfg: TaskConfig, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model spec the loop would build, from a shard manifest when there is one, else from
    the config alone (vocabulary size and sequence length for text; for images the builtin
    digits' 1x8x8-style shape and 10 classes, or 3 channels and 10 classes for other sources,
    an assumption the class count barely matters to)."""
    from pipeline.tasks import task_for_data

    if manifest is None:
        d = tcfg.data
        if d.kind == "text":
            manifest = {"vocab_size": d.vocab_size, "seq_len": d.seq_len}
        else:
            channels = 1 if d.source == "builtin:digits" else 3
            manifest = {"image_shape": [channels, d.image_size, d.image_size], "num_classes": 10}
    return task_for_data(tcfg.data.kind).model_spec(tcfg, manifest)


# ----------------------------------------------------------------------------- the trace
class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storages created under it and still alive, sampled after every operator.

    Storages that existed before (parameters, buffers) are ignored: the strategy layout counts
    those. A storage is counted once however many views share it, and uncounted when its
    Python object is finalized (PyTorch keeps one Python object per live storage)."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.live: dict[int, weakref.ref] = {}
        self.now = 0
        self.samples: list[int] = []
        self.phase = 0  # set by block hooks: 0 outside the blocks, 1 in a block's forward, 2 in its backward
        self.phases: list[int] = []

    def _freed(self, key: int, nbytes: int) -> None:
        self.now -= nbytes
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self.ignore or key in self.live or not st.nbytes():
                    continue
                n = st.nbytes()
                self.live[key] = weakref.ref(st, lambda _r, key=key, n=n: self._freed(key, n))
                self.now += n
        self.samples.append(self.now)
        self.phases.append(self.phase)
        return out


@dataclass(frozen=True)
class _Trace:
    """One forward + backward at one micro-batch: per operator, live bytes of everything the
    step created (activations, temporaries, gradients) and the gradient bytes already final,
    split into the root unit's and the blocks'."""

    live: np.ndarray
    root_grads: np.ndarray
    block_grads: np.ndarray
    phase: np.ndarray  # 0 outside the repeated blocks, 1 in a block's forward, 2 in a block's backward


@contextlib.contextmanager
def _attention_without_dropout() -> Iterator[None]:
    """CUDA's flash kernel saves an RNG state, not a dropout mask: trace attention without dropout."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs["dropout_p"] = 0.0
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _fake_batch(kind: str, spec: dict[str, Any], micro_batch: int) -> dict[str, torch.Tensor]:
    """What `Task.batch_to_tensors` returns, as (fake) zeros of the right shapes and dtypes."""
    if kind == "text":
        t = spec["max_seq_len"]
        return {"x": torch.zeros(micro_batch, t, dtype=torch.long), "y": torch.zeros(micro_batch, t, dtype=torch.long)}
    return {"x": torch.zeros(micro_batch, *spec["image_shape"]), "y": torch.zeros(micro_batch, dtype=torch.long)}


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` for fake tensors (whose `_apply` cannot swap them), keeping ties."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point():
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]


def _run_fake(kind: str, spec: dict[str, Any], trainer: TrainerConfig, param_dtype: torch.dtype,
              autocast_dtype: torch.dtype | None, target: str, micro_batch: int) -> tuple[ModelFacts, _Trace]:
    """Build the model under FakeTensorMode and trace one forward + backward at `micro_batch`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pipeline.tasks import task_for_data

    task = task_for_data(kind)
    with FakeTensorMode():
        model = task.build(spec)
        blocks = repeated_blocks(model)
        params = list(model.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        in_block = {id(p) for b in blocks for p in b.parameters()}
        calls: list[tuple[int, ...]] = []

        def record(module: nn.Module, _args: Any) -> None:
            owned = tuple(index[id(p)] for p in module.parameters(recurse=False) if id(p) in index)
            if owned:
                calls.append(owned)

        hooks = [m.register_forward_pre_hook(record) for m in model.modules()
                 if any(True for _ in m.parameters(recurse=False))]
        if param_dtype != torch.float32:
            _cast_parameters(model, param_dtype)
        apply_activation_checkpointing(model, trainer.activation_checkpointing, trainer.ac_selective,
                                       trainer.ac_every_k)
        model.train()
        batch = _fake_batch(kind, spec, micro_batch)
        ignore = {t.untyped_storage()._cdata for t in [*params, *model.buffers()]}
        root_done, block_done = [0], [0]
        marks: list[tuple[int, int, int]] = []
        tracker = _LiveBytes(ignore)

        def grad_ready(p: torch.Tensor) -> None:
            n = p.grad.untyped_storage().nbytes() if p.grad is not None else 0
            if id(p) in in_block:
                block_done[0] += n
            else:
                root_done[0] += n
            marks.append((len(tracker.samples), root_done[0], block_done[0]))

        grad_hooks = [p.register_post_accumulate_grad_hook(grad_ready) for p in params]

        def set_phase(value: int) -> Callable[..., None]:
            def hook(*_args: Any) -> None:
                tracker.phase = value
            return hook

        for unit in repeated_blocks(model):  # (the checkpoint wrappers, under activation checkpointing)
            grad_hooks += [unit.register_forward_pre_hook(set_phase(1)), unit.register_forward_hook(set_phase(0)),
                           unit.register_full_backward_pre_hook(set_phase(2)),
                           unit.register_full_backward_hook(set_phase(0))]
        cuda = _attention_without_dropout() if target == "cuda" else contextlib.nullcontext()
        autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with cuda, tracker:
            with autocast:
                loss = task.loss(model, batch, None)
            calls_forward = list(calls)  # (checkpointed blocks call their modules again in backward)
            loss.backward()
        for h in [*hooks, *grad_hooks]:
            h.remove()
        n = len(tracker.samples)
        root = np.zeros(n, dtype=np.int64)
        blk = np.zeros(n, dtype=np.int64)
        for at, r, b in marks:  # a gradient counts as final from the first operator after its hook
            root[min(at, n - 1):] = r
            blk[min(at, n - 1):] = b
        trace = _Trace(np.asarray(tracker.samples, dtype=np.int64), root, blk,
                       np.asarray(tracker.phases, dtype=np.int8))
        numels = tuple(p.numel() for p in params)
        facts = ModelFacts(
            params=sum(numels),
            root_params=sum(p.numel() for p in params if id(p) not in in_block),
            block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks),
            matrix_params=sum(p.numel() for p in params if p.dim() >= 2),
            small_params=sum(n for n in numels if n <= ZERO3_PERSISTENCE_THRESHOLD),
            param_numels=numels,
            module_calls=tuple(calls_forward),
        )
    return facts, trace


@dataclass
class ActivationProfile:
    """Per operator of a forward + backward: live bytes = fixed + per_item x micro-batch, and
    the gradient bytes already final (in the traced parameter dtype)."""

    facts: ModelFacts
    fixed: np.ndarray
    per_item: np.ndarray
    root_grads: np.ndarray
    block_grads: np.ndarray
    phase: np.ndarray
    grad_bytes: int  # bytes per gradient element in the trace


_PROFILE_CACHE: dict[tuple, ActivationProfile] = {}


def activation_profile(tcfg: TaskConfig, spec: dict[str, Any], param_dtype: torch.dtype,
                       autocast_dtype: torch.dtype | None, target: str) -> ActivationProfile:
    """Trace at micro-batch 1 and 2 and split every operator's live bytes into a fixed part and
    a per-item part (exact while every operator's tensors scale linearly with the batch, as a
    Transformer's and a U-Net's do; tests/test_planner.py checks a third point)."""
    import json

    key = (json.dumps(spec, sort_keys=True), tcfg.trainer.activation_checkpointing, tcfg.trainer.ac_selective,
           tcfg.trainer.ac_every_k, tcfg.trainer.label_smoothing, str(param_dtype), str(autocast_dtype), target)
    if key in _PROFILE_CACHE:
        return _PROFILE_CACHE[key]
    kind = tcfg.data.kind
    facts, one = _run_fake(kind, spec, tcfg.trainer, param_dtype, autocast_dtype, target, 1)
    _, two = _run_fake(kind, spec, tcfg.trainer, param_dtype, autocast_dtype, target, 2)
    if len(one.live) != len(two.live):
        raise RuntimeError("planner: the traced step runs different operators at micro-batch 1 and 2; "
                           "its activations are not linear in the batch")
    per_item = two.live - one.live
    profile = ActivationProfile(facts, one.live - per_item, per_item, one.root_grads, one.block_grads, one.phase,
                                torch.empty(0, dtype=param_dtype).element_size())
    _PROFILE_CACHE[key] = profile
    return profile


# ----------------------------------------------------------------------------- results
@dataclass
class Breakdown:
    """Bytes one rank holds, by what they are."""

    params: int = 0  # parameters this rank keeps, plus gathered (unsharded) ones in use
    grads: int = 0
    optimizer: int = 0  # optimizer state, fp32 master copies, the step's temporaries
    activations: int = 0  # saved activations and the step's temporaries (logits, recompute, ...)
    comm: int = 0  # communication buckets and reduce buffers
    reserve: int = 0  # runtime memory no tensor count sees (CUDA context, NCCL)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.comm + self.reserve

    def __add__(self, other: Breakdown) -> Breakdown:
        return Breakdown(*(getattr(self, f) + getattr(other, f) for f in _FIELDS))


_FIELDS = ("params", "grads", "optimizer", "activations", "comm", "reserve")


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

    @property
    def total(self) -> int:
        return self.device.total

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return self.total <= self.device_memory


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

    config = DeepSpeedStrategy(strategy, Precision(precision, torch.device("cpu")), torch.device("cpu"),
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
    if isinstance(cfg.strategy, (DDPConfig, HorovodConfig)):
        return torch.float32
    return DTYPES[cfg.precision.dtype]


def _const(value: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda phase: np.full(phase.shape, value, dtype=np.int64)


def _layout(cfg: PipelineConfig, facts: ModelFacts, workers: int, optim: OptimConfig, target: str) -> _Layout:
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
        block = facts.largest_block
        root = facts.root_params * lp
        ahead = block * lp if target == "cuda" else 0
        if s.reshard_after_forward:
            def gathered(phase: np.ndarray) -> np.ndarray:
                return root + np.where(phase == 1, 2 * block * lp + ahead, np.where(phase == 2, block * lp + ahead, 0))
        else:  # blocks stay gathered from their forward to their backward
            gathered = _const(facts.params * lp)

        def reducing(phase: np.ndarray) -> np.ndarray:
            return np.where(phase == 2, block * (lp + 4), 0)

        def fsdp_grads(root_done: np.ndarray, block_done: np.ndarray) -> np.ndarray:
            return root_done + (block_done // lp) * 4 // N

        suffix = "" if s.reshard_after_forward else ", reshard_after_forward=False"
        return _Layout(f"fsdp (FSDP2{suffix})", Breakdown(params=shard * 4, optimizer=shard * S), Breakdown(),
                       gathered, reducing, fsdp_grads,
                       Breakdown(grads=shard * 4, optimizer=k * math.ceil(largest / N) * 4))

    assert isinstance(s, DeepSpeedConfig)
    bucket = _ds_buckets(s, precision, P)
    stage = s.zero_stage
    master = 0 if (zero_master_aliases(stage, lp, s.offload_optimizer) or (stage == 0 and precision == "fp32")) else 4
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


# ----------------------------------------------------------------------------- the plan
def _autocast_dtype(precision: str) -> torch.dtype | None:
    return None if precision == "fp32" else DTYPES[precision]


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


def _evaluator(cfg: PipelineConfig, task_name: str, workers: int, target: str,
               manifest: dict[str, Any] | None) -> tuple[_Evaluator, dict[str, Any]]:
    tcfg = cfg.task(task_name)
    spec = spec_for_planning(tcfg, manifest)
    profile = activation_profile(tcfg, spec, _trace_dtype(cfg), _autocast_dtype(cfg.precision.dtype), target)
    layout = _layout(cfg, profile.facts, workers, tcfg.optim, target)
    reserve = CUDA_RUNTIME_RESERVE if target == "cuda" else 0
    return _Evaluator(layout, profile, reserve), spec


def _item_shape(spec: dict[str, Any]) -> str:
    if "max_seq_len" in spec:
        return f"sequence {spec['max_seq_len']}"
    return "image " + "x".join(str(d) for d in spec["image_shape"])


def plan(cfg: PipelineConfig, task_name: str, workers: int | None = None, device_memory: int | str | None = None,
         target: str | None = None, micro_batch: int | None = None,
         manifest: dict[str, Any] | None = None, suggest: bool = True) -> MemoryPlan:
    """Plan one task's training step per rank.

    workers: data-parallel ranks (default `cluster.num_workers`); device_memory: bytes or a size
    string (default `cluster.device_memory`); target: "cuda" or "cpu" (default from
    `cluster.use_gpu`); micro_batch: default the configured one (global batch / workers /
    accumulation), else 1; manifest: the shard manifest, when the shards exist.
    """
    workers = workers or cfg.cluster.num_workers
    target = target or ("cuda" if cfg.cluster.use_gpu else "cpu")
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target: expected cuda or cpu (got {target!r})")
    if device_memory is None:
        device_memory = cfg.cluster.device_memory
    memory = parse_size(device_memory) if device_memory is not None else None
    tcfg = cfg.task(task_name)
    ev, spec = _evaluator(cfg, task_name, workers, target, manifest)
    configured = _configured_micro_batch(tcfg, workers)
    mb = micro_batch or configured or 1
    device, phase = ev.peak(mb)
    result = MemoryPlan(task_name, ev.layout.name, workers, cfg.precision.dtype, target,
                        tcfg.trainer.activation_checkpointing, ev.profile.facts.params, mb,
                        _item_shape(spec), device, phase, ev.layout.host, memory)
    if micro_batch is None and configured is None:
        result.notes.append(f"trainer.global_batch_size {tcfg.trainer.global_batch_size} does not divide into "
                            f"{workers} workers x {tcfg.trainer.grad_accum_steps} accumulation steps: shown at "
                            "micro-batch 1")
    if memory is not None:
        result.largest_micro_batch = ev.largest_micro_batch(memory)
        if suggest:
            result.suggestion = _suggest(cfg, task_name, workers, target, memory, result, manifest)
    return result


def _with(cfg: PipelineConfig, strategy: dict[str, Any] | None = None, ac: str | None = None,
          task_name: str | None = None) -> PipelineConfig:
    raw = cfg.model_dump(mode="json")
    if strategy is not None:
        raw["strategy"] = strategy
    if ac is not None and task_name is not None:
        raw["tasks"][task_name]["trainer"]["activation_checkpointing"] = ac
    return PipelineConfig.model_validate(raw)


ALTERNATIVES: list[tuple[str, dict[str, Any]]] = [
    ("strategy.name=fsdp", {"name": "fsdp"}),
    ("strategy.name=deepspeed strategy.zero_stage=3", {"name": "deepspeed", "zero_stage": 3}),
    ("strategy.name=deepspeed strategy.zero_stage=3 strategy.offload_optimizer=true",
     {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True}),
    ("strategy.name=deepspeed strategy.zero_stage=3 strategy.offload_optimizer=true strategy.offload_params=true",
     {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True}),
]


def _suggest(cfg: PipelineConfig, task_name: str, workers: int, target: str, memory: int, p: MemoryPlan,
             manifest: dict[str, Any] | None) -> str:
    """One sentence: fine as is, the micro-batch to use, or a layout that would fit."""
    tcfg = cfg.task(task_name)
    best = p.largest_micro_batch or 0
    key = f"tasks.{task_name}.trainer"
    if best >= 1:
        if p.micro_batch is None or p.micro_batch <= best:
            return f"fits: largest micro-batch {best}"
        g = tcfg.trainer.global_batch_size
        for accum in range(tcfg.trainer.grad_accum_steps + 1, g + 1):
            if g % (workers * accum) == 0 and g // (workers * accum) <= best:
                return (f"micro-batch {p.micro_batch} does not fit, {best} does: set {key}.grad_accum_steps={accum} "
                        f"(micro-batch {g // (workers * accum)})")
        return f"micro-batch {p.micro_batch} does not fit, {best} does: lower {key}.global_batch_size"
    tries: list[tuple[str, PipelineConfig]] = []
    ac = tcfg.trainer.activation_checkpointing
    current = cfg.strategy.model_dump()
    for label, strat in ALTERNATIVES:
        merged = {**{k: v for k, v in current.items() if k == "backend"}, **strat}
        if merged.get("name") == current.get("name") and all(current.get(k) == v for k, v in strat.items()):
            continue
        tries.append((label, _with(cfg, merged)))
    if ac != "full":
        tries.insert(0, (f"{key}.activation_checkpointing=full", _with(cfg, ac="full", task_name=task_name)))
        tries += [(f"{label} {key}.activation_checkpointing=full", _with(c, ac="full", task_name=task_name))
                  for label, c in list(tries[1:])]
    for label, alt in tries:
        ev, _ = _evaluator(alt, task_name, workers, target, manifest)
        fit = ev.largest_micro_batch(memory)
        if fit >= 1:
            return f"nothing fits at micro-batch 1; {label} would fit (largest micro-batch {fit})"
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


def check_fits(cfg: PipelineConfig, task_name: str, manifest: dict[str, Any] | None = None) -> MemoryPlan | None:
    """The train stage's check, before any Ray resource: when `cluster.device_memory` is set,
    raise ValueError (one line, starting with the key) if the configured micro-batch cannot fit."""
    if cfg.cluster.device_memory is None:
        return None
    p = plan(cfg, task_name, manifest=manifest)
    assert p.device_memory is not None
    if p.total <= p.device_memory:
        return p
    raise ValueError(
        f"cluster.device_memory: tasks.{task_name} needs {format_size(p.total)} per rank at micro-batch "
        f"{p.micro_batch} ({p.strategy}, {p.workers} workers, {p.precision}) but a device has "
        f"{format_size(p.device_memory)}; {p.suggestion} (python -m pipeline plan {task_name} shows the breakdown)")


# ----------------------------------------------------------------------------- output
def format_plan(p: MemoryPlan) -> str:
    """A small table a person reads: one row per kind of memory, device and host columns."""
    mb = p.micro_batch if p.micro_batch is not None else 1
    lines = [f"memory plan: {p.task}, {p.num_params / 1e6:,.1f}M parameters, {p.strategy}, {p.workers} workers, "
             f"{p.precision}, activation checkpointing {p.activation_checkpointing}, {p.target} target",
             f"per rank at micro-batch {mb} ({p.item_shape}); peak during the {p.phase}"]
    rows = [("parameters", "params"), ("gradients", "grads"), ("optimizer state", "optimizer"),
            ("activations", "activations"), ("communication buffers", "comm")]
    if p.device.reserve:
        rows.append(("CUDA runtime reserve", "reserve"))
    offloaded = p.host.total > 0
    width = max(len(r[0]) for r in rows) + 2
    head = f"  {'':<{width}}{'device':>12}" + (f"{'host':>12}" if offloaded else "")
    lines.append(head)
    for label, attr in rows:
        line = f"  {label:<{width}}{format_size(getattr(p.device, attr)):>12}"
        if offloaded:
            line += f"{format_size(getattr(p.host, attr)):>12}"
        lines.append(line)
    lines.append(f"  {'total':<{width}}{format_size(p.total):>12}" +
                 (f"{format_size(p.host.total):>12}" if offloaded else ""))
    if p.device_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"device memory {format_size(p.device_memory)}: micro-batch {mb} {verdict}; "
                     f"largest micro-batch that fits: {p.largest_micro_batch}")
        if p.suggestion and not p.suggestion.startswith("fits"):
            lines.append(p.suggestion)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


__all__ = ["ActivationProfile", "Breakdown", "MemoryPlan", "ModelFacts", "activation_profile", "check_fits",
           "format_plan", "plan", "spec_for_planning", "zero3_gathered_peak"]
