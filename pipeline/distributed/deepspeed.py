"""DeepSpeed ZeRO stages 0-3, with optional CPU offload of optimizer state and parameters.

`deepspeed.initialize` runs inside the worker, over the process group Ray Train already set
up. We hand DeepSpeed a torch optimizer rather than an `optimizer` block: the block would
JIT-compile DeepSpeed's fused Adam (minutes, and a C++ toolchain on every worker). Mixed
precision is DeepSpeed's own (bf16 with fp32 master weights; fp16 with dynamic loss scaling),
configured from `precision.dtype`; gradient accumulation and clipping are DeepSpeed's too,
configured from the trainer settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config.elastic import CANNOT_RESHARD
from pipeline.distributed.base import OptimizerFactory, Strategy, gather_rows
from pipeline.distributed.sharded_init import init_by_unit, materialize_buffers

TAG = "deepspeed"  # checkpoint sub-directory: <checkpoint>/deepspeed/{mp_rank_00_model_states.pt, *optim_states.pt}


CPU_FP16_ERROR = ("precision.dtype: DeepSpeed's fp16 on CPU needs a CPU with AVX512-FP16 (oneDNN fp16), "
                  "which this one lacks; use bf16 or fp32, or train on GPUs")


def cpu_fp16_supported() -> bool:
    """What DeepSpeed's CPU accelerator checks before it accepts an fp16 config."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    reshard_limit = CANNOT_RESHARD["deepspeed"]
    _parts: dict[str, nn.Parameter] | None = None  # ZeRO-3's partitioned parameters by state-dict name
    _masters: dict[str, nn.Parameter] | None = None  # ZeRO 0-2, bf16/fp16: parameters with an fp32 master apart

    def ds_config(self, num_params: int) -> dict[str, Any]:
        c, s, dtype = self.cfg, self.settings, self.precision.name
        # DeepSpeed's default communication buckets hold 5e8 elements (2 GB in fp32), sized for
        # billion-parameter models; a bucket never needs to be larger than a fraction of the model.
        bucket = c.bucket_elements or int(min(5e8, max(2**20, num_params // 50)))
        zero: dict[str, Any] = {"stage": c.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if c.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket
        pin = self.device.type == "cuda"
        if c.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if c.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        return {
            "train_micro_batch_size_per_gpu": s.micro_batch_size,
            "gradient_accumulation_steps": s.grad_accum_steps,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,  # offload steps our torch optimizer on the CPU
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import deepspeed

        if self.precision.name == "fp16" and self.device.type == "cpu" and not cpu_fp16_supported():
            raise ValueError(CPU_FP16_ERROR)
        self.checkpoint_activations(model)
        self.compile(model)  # ZeRO 0-2 (the config refuses compile under ZeRO-3)
        config = self.ds_config(sum(p.numel() for p in model.parameters()))
        if self.cfg.zero_stage == 3 and any(p.is_meta for p in model.parameters()):
            self._partition_at_init(model, config)
        else:  # ZeRO 0-2 keep whole parameters on every rank
            model = self.materialize(model)
        optimizer = make_optimizer(model)
        hidden_step = self.cfg.zero_stage == 0 and self.precision.name != "fp32"
        with fp32_master_shares_partition(), _step_without_effect(optimizer, hidden_step):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine = self.model = engine
        self.optimizer = optimizer  # ZeRO steps this optimizer over its partitions: the loop sets its lr

    def _partition_at_init(self, model: nn.Module, config: dict[str, Any]) -> None:
        """ZeRO-3's sharded initialisation: each unit (a block, or the embeddings) is drawn whole,
        in the order an unsharded `init_weights` draws it, then handed to `deepspeed.zero.Init`,
        which partitions it and frees the whole tensors before the next unit exists. What
        `zero.Init` does at construction, unit by unit, with DDP's exact initial weights."""
        import deepspeed

        dtype = self.precision.dtype if self.precision.name != "fp32" else torch.float32
        materialize_buffers(model, self.device)

        def partition(pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
            whole = [full for _, full in pairs]
            for full in whole:
                full.data = full.data.to(dtype)
            # mem_efficient_linear=False: with `module=`, zero.Init would swap F.linear globally
            deepspeed.zero.Init(module=nn.ParameterList(whole), config_dict_or_path=config,
                                mem_efficient_linear=False)

        init_by_unit(model, self.device, partition, keep_whole=True, weights=self.init_from,
                     key=self.init_from_key)

    @property
    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def describe(self) -> str:
        c = self.cfg
        offload = [what for what, on in (("optimizer", c.offload_optimizer), ("params", c.offload_params)) if on]
        return f"deepspeed ZeRO-{c.zero_stage}" + (f" (CPU offload: {', '.join(offload)})" if offload else "")

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor | float, bool]:
        """DeepSpeed's engine clips, unscales, checks for overflow and steps, and decides the
        skip itself, on the host (`was_step_applied` is a Python bool): the one backend whose
        step keeps a host decision. Its norm is passed on as it comes (a tensor stays unread).

        Except ZeRO-0 in fp32: there the engine drives the plain torch optimizer with no overflow
        check and no norm (a NaN gradient was applied, poisoning every later step, and the norm
        logged as 0.0). Its gradients, already averaged over the ranks, are measured here; on a
        non-finite step the engine steps with the optimizer's own step made a no-op, so no weight
        and no optimizer state moves while DeepSpeed's counters advance and its gradients are
        zeroed as usual."""
        if self.cfg.zero_stage == 0 and self.precision.name == "fp32":
            return self._guarded_plain_step()
        self.engine.step()  # clips (config gradient_clipping), unscales, steps, zeroes gradients
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = 0.0
        elif not isinstance(norm, torch.Tensor):
            norm = float(norm)
        return norm, bool(self.engine.was_step_applied())

    def _guarded_plain_step(self) -> tuple[torch.Tensor, bool]:
        """ZeRO-0 fp32's step with the skip the other backends make (`clip_and_step`)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        finite = bool(torch.isfinite(norm))
        optimizer = self.engine.optimizer
        own = optimizer.__dict__.get("step")  # an instance's own step (a wrapper's), put back after
        if not finite:
            optimizer.step = lambda *args, **kwargs: None  # (an instance attribute over the class's step)
        try:
            self.engine.step()  # clips (config gradient_clipping), steps, zeroes gradients
        finally:
            if not finite:
                if own is None:
                    del optimizer.step
                else:
                    optimizer.step = own
        return norm, finite

    # ---------------------------------------------------------------- EMA and export: the fp32 masters
    def _partitioned(self) -> dict[str, nn.Parameter]:
        """State-dict names of ZeRO-3's partitioned parameters (tied weights appear under each name);
        found once, since the EMA asks every step and the parameter objects never change."""
        if self._parts is None:
            self._parts = {} if self.cfg.zero_stage != 3 else {
                k: v for k, v in self.engine.module.state_dict(keep_vars=True).items() if hasattr(v, "ds_id")}
        return self._parts

    def _mastered(self) -> dict[str, nn.Parameter]:
        """ZeRO 0-2 in bf16/fp16: the parameters (by state-dict name) whose fp32 master copy
        DeepSpeed's optimizer keeps apart from the bf16/fp16 module weights: those it links to a
        fragment of its fp32 partition (ZeRO-1/2 and its BF16 optimizer: `_hp_mapping`, set on
        every rank, None where the rank holds none of the parameter) or, under ZeRO-0, those in
        the fp32 copy its FP16 optimizers hold whole on every rank. Empty in fp32 (the
        module weights are the master) and under ZeRO-3 (`_partitioned`). Found once."""
        if self._masters is None:
            whole = self._whole_masters()
            self._masters = {} if self.cfg.zero_stage == 3 or self.precision.name == "fp32" else {
                k: v for k, v in self.engine.module.state_dict(keep_vars=True).items()
                if isinstance(v, nn.Parameter) and (hasattr(v, "_hp_mapping") or id(v) in whole)}
        return self._masters

    def _whole_masters(self) -> dict[int, torch.Tensor]:
        """ZeRO-0 in bf16/fp16 (DeepSpeed's FP16 optimizers, whole on every rank): each trained
        parameter's fp32 master, by `id`: the fp32 copy of it the unfused optimizer steps (ours,
        a torch optimizer), or its view of the flat fp32 copy the fused one steps (parameters laid
        end to end, as `_flatten_dense_tensors` lays them). The optimizer's tensors, no copy."""
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        opt = self.engine.optimizer
        masters: dict[int, torch.Tensor] = {}
        if self.cfg.zero_stage == 0 and isinstance(opt, FP16_UnfusedOptimizer):
            for fp32, params in zip(opt.fp32_groups, opt.fp16_groups, strict=True):
                masters.update((id(p), m) for p, m in zip(params, fp32, strict=True))
        elif self.cfg.zero_stage == 0 and isinstance(opt, FP16_Optimizer):
            for flat, params in zip(opt.fp32_groups_flat, opt.fp16_groups, strict=True):
                start = 0
                for p in params:
                    masters[id(p)] = flat.narrow(0, start, p.numel()).view_as(p)
                    start += p.numel()
        return masters

    def _local_masters(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 master weights under the state dict's names (`_mastered` non-empty):
        under ZeRO-1/2 the fragment of each parameter its optimizer partition holds (1-d, the
        flat parameter's elements from `_hp_mapping.lp_fragment_address.start` on; empty where
        it holds none), under ZeRO-0 the whole fp32 master; buffers and frozen parameters as the
        module holds them. Views of the optimizer's state, no copy, no communication."""
        masters, whole = self._mastered(), self._whole_masters()
        out: dict[str, torch.Tensor] = {}
        for k, v in self.engine.module.state_dict(keep_vars=True).items():
            if k not in masters:
                out[k] = v.detach()
            elif id(v) in whole:
                out[k] = whole[id(v)]
            elif v._hp_mapping is not None:
                out[k] = v._hp_mapping.get_hp_fragment()
            else:
                out[k] = torch.empty(0, dtype=torch.float32, device=self.device)
        return out

    def ema_source(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights wherever DeepSpeed keeps them apart from the module's (not its
        bf16/fp16 copies, whose rounding would swallow every update below one ulp), each rank's
        own part only, so the EMA is as sharded as the optimizer state and its update needs no
        communication. Under ZeRO-3 each rank's fp32 master partition of every parameter (1-d,
        padded to the same length on every rank); under ZeRO-1/2 in bf16/fp16 each rank's
        fragment of it (`_local_masters`); under ZeRO-0 in bf16/fp16 the whole fp32 master. In
        fp32, ZeRO 0-2 train the module's weights themselves: their state dict, as under DDP."""
        parts = self._partitioned()
        if parts:
            from deepspeed.utils import safe_get_local_fp32_param

            return {k: safe_get_local_fp32_param(p) for k, p in parts.items()}
        if self._mastered():
            return self._local_masters()
        return super().ema_source()

    def full_shapes(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[int, ...]]:
        """Whole shapes: ZeRO-3 keeps each parameter's in `ds_shape` (the tensor itself is a
        partition, or empty outside a gather); a ZeRO-1/2 master fragment has its parameter's."""
        parts, masters = self._partitioned(), self._mastered()
        if state is None:
            state = self.engine.module.state_dict(keep_vars=True)
        return {k: tuple(parts[k].ds_shape) if k in parts else tuple(masters[k].shape) if k in masters
                else tuple(v.shape) for k, v in state.items()}

    def full_tensors(self, state: dict[str, torch.Tensor] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The model's weights: DeepSpeed's fp32 master copy where it keeps one (ZeRO 0-3, bf16,
        fp16), gathered from every rank's partition for each parameter in turn (a collective
        under ZeRO 1-3); or an EMA state in `ema_source`'s layout, gathered the same way. Under
        ZeRO-3 each rank sends its fp32 partition to rank 0 (`gather_rows`), as for an EMA state
        (`ema_source`'s ZeRO-3 partitions): DeepSpeed's own full-parameter gather is an
        all-gather, the whole tensor on every rank. Under ZeRO-1/2 in bf16/fp16 each rank places
        its fragment in a zeroed whole tensor and these are summed on rank 0 (`_whole_master`),
        the weights from the optimizer's fragments as an EMA state from its own."""
        import torch.distributed as dist

        first = not dist.is_initialized() or dist.get_rank() == 0
        parts, masters = self._partitioned(), self._mastered()
        if state is None and masters:  # ZeRO 0-2, bf16/fp16: the fp32 master, this rank's part of it
            state = self._local_masters()
        if masters:
            whole = self._whole_masters()
            for k, v in state.items():
                p = masters.get(k)
                if p is None or id(p) in whole:  # whole on every rank
                    yield k, v.detach().float().cpu() if first else None
                else:
                    yield k, self._whole_master(v, p, first)
            return
        if state is None and not parts:  # ZeRO 0-2 in fp32: whole parameters (the master itself)
            from deepspeed.utils import safe_get_full_fp32_param

            for k, v in self.engine.module.state_dict(keep_vars=True).items():
                master = safe_get_full_fp32_param(v) if isinstance(v, nn.Parameter) else None
                whole = master if master is not None else v.detach()
                yield k, whole.float().cpu() if first else None
                del master, whole  # before the next gather: one whole tensor at a time
            return
        weights = state is None
        if weights:  # ZeRO-3's weights: each parameter's fp32 partition, taken when its turn comes
            state = self.engine.module.state_dict(keep_vars=True)
        for k, v in state.items():
            if k not in parts:
                yield k, v.detach().float().cpu() if first else None
                continue
            yield k, self._whole_parameter(parts[k], first) if weights else self._whole(v, parts[k])

    def _whole_master(self, fragment: torch.Tensor, p: nn.Parameter, first: bool) -> torch.Tensor | None:
        """The ZeRO-1/2 parameter `p` whole on rank 0 (None elsewhere), in fp32, from every rank's
        `fragment` of it (`_local_masters`' layout: its elements from the `_hp_mapping` offset on,
        empty where the rank holds none): each rank writes its fragment into a zeroed whole
        tensor, and a sum to rank 0 (`reduce`) joins them exactly (each element comes from one
        rank, the others add zeros). What DeepSpeed's `safe_get_full_fp32_param` does, with a
        reduce where it all-reduces. One whole tensor per rank at a time. Collective."""
        import torch.distributed as dist

        whole = torch.zeros(p.numel(), dtype=torch.float32, device=self.device)
        mapping = p._hp_mapping
        if mapping is not None:
            at = mapping.lp_fragment_address
            whole.narrow(0, at.start, at.numel).copy_(fragment.detach().reshape(-1))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.reduce(whole, dst=0)
        return whole.view(p.shape).cpu() if first else None

    def _whole_parameter(self, p: nn.Parameter, first: bool) -> torch.Tensor | None:
        """One ZeRO-3 parameter whole on rank 0 (None elsewhere), in fp32: its fp32 master partition
        from every rank; a frozen parameter, which has no master, gathered by DeepSpeed in the
        dtype it trains in. Collective."""
        from deepspeed import zero
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        if local is None:
            with zero.GatheredParameters([p]):
                return p.detach().float().cpu() if first else None
        return self._whole(local, p)

    def _whole(self, partition: torch.Tensor, p: nn.Parameter) -> torch.Tensor | None:
        """The parameter `p` whole on rank 0 (None elsewhere) from every rank's `partition` of it
        (1-d, padded to one length on every rank), sent to rank 0 (`gather_rows`). On the
        backend's device: an offloaded optimizer keeps its fp32 partitions in host memory."""
        import torch.distributed as dist

        world = dist.get_world_size()
        pieces = gather_rows(partition.detach().to(self.device), [partition.numel()] * world, list(range(world)))
        return pieces[: p.ds_numel].view(p.ds_shape).float().cpu() if pieces is not None else None

    # ---------------------------------------------------------------- checkpoints
    def _extra_file(self, directory: Path) -> Path:
        import torch.distributed as dist

        return directory / TAG / f"extra_rank_{dist.get_rank():05d}.pt"

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """DeepSpeed's own files, plus each rank's `extra` in a file of its own: DeepSpeed keeps
        `client_state` from rank 0 only, and a ZeRO-3 EMA differs per rank."""
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        path = self._extra_file(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(extra, path)

    def load(self, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory / TAG}")
        file = self._extra_file(directory)
        if not file.exists():
            raise RuntimeError(f"{file} is missing: this checkpoint was written by another number of ranks "
                               "or an older version of the pipeline")
        extra = torch.load(file, map_location=self.device, weights_only=True)
        if extra.get("ema") and self._mastered():
            extra["ema"] = self._ema_pieces(extra["ema"])
        return extra

    def _ema_pieces(self, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An EMA state saved before bf16/fp16 ZeRO-1/2 averaged the fp32 master (whole tensors,
        as `ema_source` then handed out the module's state dict) cut to this rank's fragments
        (`_local_masters`' layout), so a run checkpointed by the older pipeline resumes. A state in
        that layout already passes through (a fragment has the whole shape only when it is the
        whole 1-d parameter, which the cut leaves as it is)."""
        whole = self._whole_masters()
        out = dict(ema)
        for k, p in self._mastered().items():
            v = ema.get(k)
            if v is None or id(p) in whole or tuple(v.shape) != tuple(p.shape):
                continue
            at = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
            out[k] = v.reshape(-1).narrow(0, at.start, at.numel).clone() if at is not None else v.new_empty(0)
        return out


@contextlib.contextmanager
def _step_without_effect(optimizer: torch.optim.Optimizer, applies: bool) -> Iterator[None]:
    """ZeRO-0 in bf16/fp16 wraps the optimizer in DeepSpeed's (un)fused fp16 optimizer, whose
    constructor steps it once on zero gradients to create its state: AdamW's step count was 1
    before training (bias correction off for the whole run) and decoupled weight decay shrank the
    weights once at setup, unlike DDP's and ZeRO 1-3's start. Within this, that step has learning
    rate 0 (no weight moves), and the state it made is dropped after."""
    if not applies:
        yield
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
            group.pop("step", None)  # (Apex's FusedAdam counts its steps in the group, torch's in the state)
        optimizer.state.clear()


@contextlib.contextmanager
def fp32_master_shares_partition() -> Iterator[None]:
    """Let ZeRO-3's fp32 master partition *be* the parameter partition when both are fp32 on the
    same device (fp32 training without optimizer offload).

    DeepSpeed means to do this itself (stage3.py `_create_fp32_partitions`: "we don't need
    another copy of the weights"), but its test compares `tensor.device` with
    `get_accelerator().current_device_name()`, a torch.device against a string, which is False
    in current torch; so it cloned every partition, and ZeRO-3 in fp32 held 0.64 of DDP's
    per-rank training state instead of about 0.5 (and a second partition during setup). While
    the optimizer is built, its device is given as a torch.device, so the comparison means what
    it says; nothing else changes (the optimizer then updates the partition in place, and
    DeepSpeed's copy back into it is a self-copy).
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions

    def create(self: Any) -> Any:
        device = self.device
        if isinstance(device, str):
            self.device = torch.device(device)
        try:
            return original(self)
        finally:
            self.device = device

    Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original


def consolidate_checkpoint(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a merged DeepSpeed checkpoint (every rank's ZeRO partition files
    in one place), offline and without a process group: DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)
    return {k: v.float().clone() for k, v in state.items()}
