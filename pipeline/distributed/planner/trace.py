"""The fake-tensor trace: what the model the loop would build holds while one micro-batch goes
forward and backward, without a GPU or any storage.

It is apart from the layouts because it knows nothing of strategies: it builds the model under
`FakeTensorMode`, runs the task's real loss and its backward with the configured activation
checkpointing and precision, and counts the bytes of every storage alive after each operator.
What it returns (`ModelFacts`: parameter counts and module call order; `ActivationProfile`:
live bytes per operator, linear in the micro-batch) is what every strategy layout
(`layouts.py`) is applied to. The package docstring says why activations are traced, not
estimated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import TaskConfig, TrainerConfig
from pipeline.distributed.activation import apply_activation_checkpointing
from pipeline.distributed.compile import compile_targets
from pipeline.distributed.planner.compiled import fresh_dynamo, planning_backend
from pipeline.distributed.planner.cuda_kernels import cuda_autocast_flags, cuda_kernels
from pipeline.distributed.units import repeated_blocks

# DeepSpeed ZeRO-3's default (DeepSpeed 0.19), here because `ModelFacts.small_params` counts by it;
# the other ZeRO-3 defaults are in layouts.py.
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole


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
    # elements of the state dict's entries: a tied weight under each of its names, persistent
    # buffers too (what an EMA of the state dict clones); 0 = `params`
    state_numel: int = 0
    # per repeated block, elements of the weights precision fp8 converts (torchao's Float8Linear):
    # FSDP2 all-gathers those in float8 (`precision.fp8_all_gather`); () without fp8
    fp8_block_params: tuple[int, ...] = ()

    def gathered_block_bytes(self, lp: int, float8: bool) -> int:
        """Bytes of the largest block gathered whole in dtype size `lp`, its converted weights in
        one byte each when `float8`."""
        if not float8 or not self.fp8_block_params:
            return self.largest_block * lp
        return max(b * lp - f * (lp - 1) for b, f in zip(self.block_params, self.fp8_block_params, strict=True))

    @property
    def largest_block(self) -> int:
        return max(self.block_params, default=0)


def merge_facts(parts: list[ModelFacts]) -> ModelFacts:
    """The facts of one rank that runs several pipeline stages (interleaved schedules): their
    parameters side by side (the stages of one rank share none), calls in stage order."""
    offsets = np.cumsum([0] + [len(f.param_numels) for f in parts])
    return ModelFacts(
        params=sum(f.params for f in parts), root_params=sum(f.root_params for f in parts),
        block_params=tuple(b for f in parts for b in f.block_params),
        matrix_params=sum(f.matrix_params for f in parts), small_params=sum(f.small_params for f in parts),
        param_numels=tuple(n for f in parts for n in f.param_numels),
        module_calls=tuple(tuple(int(o) + i for i in call) for f, o in zip(parts, offsets, strict=False)
                           for call in f.module_calls),
        state_numel=sum(f.state_numel or f.params for f in parts),
        fp8_block_params=tuple(n for f in parts for n in f.fp8_block_params))


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
    Python object is finalized (PyTorch keeps one Python object per live storage). Storages
    made under `uncounted()` (values a compiled kernel fuses away, `compiled.py`) are tracked
    at 0 bytes. Compiled code runs under it (`ignore_compile_internals`), its graphs' operators
    counted, and higher-order operators pass through it whole."""

    supports_higher_order_operators = True

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.live: dict[int, weakref.ref] = {}
        self.now = 0
        self.counting = True
        self.samples: list[int] = []
        self.phase = 0  # set by block hooks: 0 outside the blocks, 1 in a block's forward, 2 in its backward
        self.phases: list[int] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        before, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = before

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
                n = st.nbytes() if self.counting else 0
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
    forward_end: int = 0  # index of the last operator of forward: what a pipeline keeps per micro-batch
    recv: tuple[int, int] = (0, 0)  # a pipeline stage's receive buffers: hidden state in, output gradient


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


def traces_compiled(trainer: TrainerConfig) -> bool:
    """Whether the trace runs inductor's graphs (`compiled.py`) rather than eager. Not for
    regions checkpointed whole (full, every k-th block): replayed on CPU they came out 5-19%
    under inductor's measured allocations, while the eager trace stays above them, so those
    are traced eagerly. Operator-level checkpointing (`selective`, `op`) replays exactly."""
    if trainer.compile == "none":
        return False
    return trainer.activation_checkpointing == "none" or (
        trainer.activation_checkpointing == "selective" and trainer.ac_selective == "op")


def _run_fake(kind: str, spec: dict[str, Any], trainer: TrainerConfig, param_dtype: torch.dtype,
              autocast_dtype: torch.dtype | None, target: str, micro_batch: int,
              tp: int = 1, stage: tuple[int, int] | None = None, fp8: bool = False,
              fp8_emulate: bool = False) -> tuple[ModelFacts, _Trace]:
    """Build the model under FakeTensorMode and trace one forward + backward at `micro_batch`;
    with `tp` > 1, the model one tensor-parallel rank computes (`tensor_parallel.localize`);
    with `stage` (index, count), that pipeline stage alone (`pipeline_parallel.split_stage`): it
    takes the previous stage's hidden state (a received buffer) and, but for the last, runs
    backward from a gradient of its output's shape, as a pipeline schedule does. `fp8`: the
    layers precision fp8 converts are torchao's Float8Linear, as the loop converts them (for a
    CUDA target with float8 GEMMs, `_scaled_mm`, which fake tensors run on any device; with
    `fp8_emulate` (precision.fp8_emulate) or for the CPU, torchao's emulation, what runs there:
    no `_scaled_mm`, each GEMM on the dequantised operands)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pipeline.distributed.pipeline_parallel import split_stage
    from pipeline.distributed.tensor_parallel import localize, tp_plan
    from pipeline.tasks import task_for_data

    task = task_for_data(kind)
    compiled = traces_compiled(trainer)
    # (compiled regions of checkpointed blocks save a real RNG state: let it into the fake mode)
    with fresh_dynamo() if compiled else contextlib.nullcontext(), FakeTensorMode(allow_non_fake_inputs=compiled):
        model = task.build(spec)
        if tp > 1:
            localize(model, tp_plan(model), tp)
        if stage is not None:
            model = split_stage(model, *stage)
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
        if fp8:
            from pipeline.distributed.precision import convert_to_fp8

            convert_to_fp8(model, emulate=fp8_emulate or target == "cpu")
        apply_activation_checkpointing(model, trainer.activation_checkpointing, trainer.ac_selective,
                                       trainer.ac_every_k)
        model.train()
        batch = _fake_batch(kind, spec, micro_batch)
        tracker: _LiveBytes | None = None
        if compiled:  # module calls in eager order first: hooks inside compiled code would be traced into it
            with torch.no_grad():
                task.loss(model, batch, None)
            calls_forward = list(calls)
            for h in hooks:
                h.remove()
            block_types = {type(b) for b in blocks} if trainer.compile == "model" else set()
            backend = planning_backend(lambda: tracker, target, block_types)
            for module in compile_targets(model, trainer.compile):
                module.forward = torch.compile(module.forward, backend=backend, dynamic=False)
            if trainer.compile_loss:
                task.compile_loss(backend=backend, dynamic=False)
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

        # (under activation checkpointing, the checkpoint wrappers; a compiled model's replay sets the phases)
        for unit in repeated_blocks(model) if not (compiled and trainer.compile == "model") else []:
            grad_hooks += [unit.register_forward_pre_hook(set_phase(1)), unit.register_forward_hook(set_phase(0)),
                           unit.register_full_backward_pre_hook(set_phase(2)),
                           unit.register_full_backward_hook(set_phase(0))]
        cuda = cuda_kernels(eager=trainer.compile == "none") if target == "cuda" else contextlib.nullcontext()
        autocast = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        flags = (cuda_autocast_flags(autocast_dtype) if fp8 and target == "cuda" and autocast_dtype is not None
                 else contextlib.nullcontext())
        first, last = stage is None or stage[0] == 0, stage is None or stage[0] == stage[1] - 1
        recv = [0, 0]  # bytes of the stage's receive buffers: the hidden state in, its output's gradient
        if not first:  # the hidden state received from the previous stage (it needs a gradient)
            batch["x"] = torch.zeros(*batch["x"].shape, model.cfg.d_model, dtype=param_dtype, requires_grad=True)
            tracker.ignore.add(batch["x"].untyped_storage()._cdata)  # a persistent buffer, counted by the plan
            recv[0] = batch["x"].untyped_storage().nbytes()
        with cuda, flags, tracker:
            with autocast:
                if stage is None:
                    loss = task.loss(model, batch, None)
                else:
                    inputs, target = task.pipeline_io(batch)
                    out = model(*inputs)
                    loss = task.output_loss(out, target) if last else out
            if not compiled:
                calls_forward = list(calls)  # (checkpointed blocks call their modules again in backward)
            forward_end = len(tracker.samples) - 1
            if last:
                loss.backward()
            else:
                with tracker.uncounted():  # (the stage's receive buffer for it, as above)
                    grad = torch.zeros_like(loss)
                recv[1] = grad.untyped_storage().nbytes()
                loss.backward(grad)
                del grad
        for h in [*hooks, *grad_hooks]:
            h.remove()
        n = len(tracker.samples)
        root = np.zeros(n, dtype=np.int64)
        blk = np.zeros(n, dtype=np.int64)
        for at, r, b in marks:  # a gradient counts as final from the first operator after its hook
            root[min(at, n - 1):] = r
            blk[min(at, n - 1):] = b
        trace = _Trace(np.asarray(tracker.samples, dtype=np.int64), root, blk,
                       np.asarray(tracker.phases, dtype=np.int8), max(forward_end, 0), (recv[0], recv[1]))
        numels = tuple(p.numel() for p in params)
        facts = ModelFacts(
            params=sum(numels),
            root_params=sum(p.numel() for p in params if id(p) not in in_block),
            block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks),
            matrix_params=sum(p.numel() for p in params if p.dim() >= 2),
            small_params=sum(n for n in numels if n <= ZERO3_PERSISTENCE_THRESHOLD),
            param_numels=numels,
            module_calls=tuple(calls_forward),
            state_numel=sum(t.numel() for t in model.state_dict().values()),
            fp8_block_params=tuple(sum(m.weight.numel() for m in b.modules() if type(m).__name__ == "Float8Linear")
                                   for b in blocks) if fp8 else (),
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
    forward_end: int = 0  # the operator ending forward (`_Trace.forward_end`)
    compile_fallback: str = ""  # why a compiled step was traced eagerly after all (this torch's inductor)
    recv_per_item: int = 0  # a pipeline stage's receive buffers for one micro-batch, per item (`receive_buffers`)

    def receive_buffers(self, micro_batches: int) -> ActivationProfile:
        """This profile with the receive buffers a pipeline stage keeps for the whole run: torch's
        `PipelineStage` allocates, per micro-batch of the step, one buffer for the hidden state it
        receives (but the first stage) and one for its output's gradient (but the last), once,
        and keeps them (`_setup_forward_recv_info`, `_setup_backward_recv_info`)."""
        return self.holding(0, micro_batches * self.recv_per_item)

    def held(self) -> tuple[int, int]:
        """(fixed, per item) bytes one micro-batch's forward state holds while it waits for its
        backward in a pipeline: what is live when forward ends (saved activations, the output,
        the received input), gradients aside."""
        f = self.forward_end
        return int(self.fixed[f] - self.root_grads[f] - self.block_grads[f]), int(self.per_item[f])

    def holding(self, fixed: int, per_item: int) -> ActivationProfile:
        """This profile with `fixed + per_item x micro-batch` more bytes held throughout."""
        return dataclasses.replace(self, fixed=self.fixed + fixed, per_item=self.per_item + per_item)

    def in_flight(self, micro_batches: int) -> ActivationProfile:
        """This profile with `micro_batches - 1` more micro-batches' forward state held throughout
        (a pipeline stage that runs several forwards before their backwards)."""
        fixed, per_item = self.held()
        extra = max(micro_batches - 1, 0)
        return self.holding(extra * fixed, extra * per_item)


_PROFILE_CACHE: dict[tuple, ActivationProfile] = {}
LOW = 2  # the smaller of the two traced micro-batches (`activation_profile`)


def activation_profile(tcfg: TaskConfig, spec: dict[str, Any], param_dtype: torch.dtype,
                       autocast_dtype: torch.dtype | None, target: str, tp: int = 1,
                       stage: tuple[int, int] | None = None, fp8: bool = False,
                       fp8_emulate: bool = False) -> ActivationProfile:
    """Trace at micro-batch 2 and 3 and split every operator's live bytes into a fixed part and
    a per-item part (exact while every operator's tensors scale linearly with the batch, as a
    Transformer's and a U-Net's do; tests/test_planner.py checks a third point). Not 1: there
    autograd skips the batch reduction of a broadcast parameter's gradient (DiT's position
    table), one operator fewer than at any other micro-batch."""
    import json

    key = (json.dumps(spec, sort_keys=True), tcfg.trainer.activation_checkpointing, tcfg.trainer.ac_selective,
           tcfg.trainer.ac_every_k, tcfg.trainer.label_smoothing,
           traces_compiled(tcfg.trainer) and (tcfg.trainer.compile, tcfg.trainer.compile_loss), str(param_dtype),
           str(autocast_dtype), target, tp, stage, fp8, fp8 and (fp8_emulate or target == "cpu"))
    if key in _PROFILE_CACHE:
        return _PROFILE_CACHE[key]
    kind = tcfg.data.kind

    def run(trainer: TrainerConfig) -> tuple[ModelFacts, _Trace, _Trace]:
        facts, low = _run_fake(kind, spec, trainer, param_dtype, autocast_dtype, target, LOW, tp, stage, fp8,
                               fp8_emulate)
        return facts, low, _run_fake(kind, spec, trainer, param_dtype, autocast_dtype, target, LOW + 1, tp, stage,
                                     fp8, fp8_emulate)[1]

    fallback = ""
    try:
        facts, low, high = run(tcfg.trainer)
    except Exception as e:  # compiled traces lean on inductor internals that another torch may lack
        if not traces_compiled(tcfg.trainer):
            raise
        while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
            e = inner  # (dynamo wraps a backend's error: name the root one)
        fallback = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        facts, low, high = run(tcfg.trainer.model_copy(update={"compile": "none"}))
    if len(low.live) != len(high.live):
        raise RuntimeError(f"planner: the traced step runs different operators at micro-batch {LOW} and {LOW + 1}; "
                           "its activations are not linear in the batch")
    per_item = high.live - low.live
    profile = ActivationProfile(facts, low.live - LOW * per_item, per_item, low.root_grads, low.block_grads,
                                low.phase, torch.empty(0, dtype=param_dtype).element_size(), low.forward_end,
                                fallback, sum(high.recv) - sum(low.recv))
    _PROFILE_CACHE[key] = profile
    return profile
