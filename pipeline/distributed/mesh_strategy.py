"""Model parallelism on a pp x dp x tp device mesh: tensor parallel, pipeline parallel, and
either kind of data parallelism around them (2-D and 3-D layouts, as torchtitan builds them).

`parallelize` applies, in one place and this order: the pipeline cut (this rank's stage), the
tensor-parallel split of each block (`tensor_parallel`), activation checkpointing,
torch.compile (`trainer.compile`), then data parallelism over the dp sub-mesh: FSDP2's
`fully_shard` (strategy fsdp) or its replicated twin `replicate` (strategy ddp, gradients
all-reduced), per block and on the stage root. Every parameter thereby becomes a DTensor, so
optimizer, clipping and DCP treat all layouts alike.

Initialisation is the sharded one (`sharded_init`): every rank draws each unit of the full
model whole, in DDP's order, and keeps its slice of what its stage owns, so all layouts start
from DDP's exact weights. The gradient norm is reduced over dp and tp by DTensor and over the
pipeline stages here; tied weights split across the first and last stage are summed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed import dcp_state
from pipeline.distributed.base import OptimizerFactory, Strategy, contiguous_parts
from pipeline.distributed.fsdp import gradient_sync, keep_local_slices
from pipeline.distributed.mesh import Layout, build_mesh
from pipeline.distributed.pipeline_parallel import (
    build_schedule,
    merge_stages,
    rank_stages,
    retie,
    split_stage,
    tie_groups,
)
from pipeline.distributed.precision import guarded_step, nonfinite_flag
from pipeline.distributed.sharded_init import init_by_unit, to_empty_keeping_ties
from pipeline.distributed.tensor_parallel import apply_tensor_parallel, tp_plan
from pipeline.distributed.units import repeated_blocks


class MeshStrategy(Strategy):
    name = "mesh"

    def __init__(self, cfg: Any, precision, device: torch.device, settings, parallel: Any) -> None:
        super().__init__(cfg, precision, device, settings)
        self.parallel = parallel
        self.layout = Layout(dist.get_world_size() if dist.is_initialized() else 1, parallel.tp, parallel.pp)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.pp_rank, self._dp_rank, self.tp_rank = self.layout.coords(self.rank)
        # Which code paths run. Normally whether the degree is > 1; a world-size-1 check (a single
        # GPU) turns both on to build and step the tp and pp paths over size-1 mesh dimensions.
        self.use_tp, self.use_pp = parallel.tp > 1, parallel.pp > 1
        self.schedule = None
        self._step_kwargs: dict[str, Any] = {}  # what every schedule step passes (set with the schedule)
        self.stage_ids = rank_stages(self.pp_rank, parallel.pp, parallel.pp_schedule) if self.use_pp else [0]
        self.num_stages = parallel.pp * len(self.stage_ids)
        self.parts: list[nn.Module] = []  # what the schedule runs: this rank's stages
        self._tie_pairs: list[tuple[nn.Parameter, Any]] = []  # (tied parameter, group of first+last stage)
        self._norm_skip: set[int] = set()  # tied copies counted on another stage
        self._ties: list[list[str]] = []  # the full model's tied names (a stage may hold only the last one)

    # ------------------------------------------------------------------ layout
    @property
    def gathers_weights(self) -> bool:
        """FSDP2 over more than one dp rank all-gathers each weight before use (its tp shard,
        under tensor parallelism), so fp8 weights can travel in float8 (torchtitan does this
        for 2-D dp_shard x tp); `replicate` and a dp degree of 1 gather nothing."""
        return self.cfg.name == "fsdp" and self.layout.dp > 1

    @property
    def dp_rank(self) -> int:
        return self._dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def describe(self) -> str:
        pp = ""
        if self.use_pp:
            pp = f" ({self.parallel.pp_schedule}, {self.settings.grad_accum_steps} micro-batches)"
        return f"{self.cfg.name} x tensor/pipeline parallel: {self.layout.describe()}{pp}"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        if not dist.is_initialized():
            raise RuntimeError("parallel.tp/pp need torch.distributed to be initialised (Ray Train does it)")
        if self.precision.scaler is not None:
            raise ValueError("precision.dtype=fp16 cannot combine with parallel.tp/pp (use bf16)")
        self.mesh = build_mesh(self.layout, self.device)
        ties = self._ties = tie_groups(model)
        part = self.parallelize(model)
        to_empty_keeping_ties(part, self.device)
        retie(model, ties)
        init_by_unit(model, self.device, keep_local_slices, weights=self.init_from,
                     key=self.init_from_key)  # the full skeleton, in DDP's order
        self.model = part
        self.optimizer = make_optimizer(part)
        self.precision.refresh_fp8_scales(part)
        if self.use_pp:
            self._pair_tied(part, ties)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Each of this rank's stages: stage cut -> tensor parallel -> activation checkpointing ->
        torch.compile -> data parallel (each stage its own FSDP root, as torchtitan's model
        parts). Returns one module holding them all (`merge_stages`)."""
        if not self.use_pp:
            self.parts = [self._parallelize_part(model)]
            return self.parts[0]
        self.parts = [self._parallelize_part(split_stage(model, s, self.num_stages)) for s in self.stage_ids]
        return merge_stages(model, self.parts)

    def _parallelize_part(self, part: nn.Module) -> nn.Module:
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.use_tp:
            apply_tensor_parallel(part, tp_plan(part), self.mesh["tp"])
        self.checkpoint_activations(part)
        self.compile(part)
        low = self.precision.dtype if self.precision.dtype != torch.float32 else None
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        dp_mesh = self.mesh["dp"]
        if self.cfg.name == "fsdp":
            def wrap(m: nn.Module) -> None:
                fully_shard(m, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        else:
            def wrap(m: nn.Module) -> None:
                replicate(m, mesh=dp_mesh, mp_policy=mp)
        for block in repeated_blocks(part):
            wrap(block)
        wrap(part)
        return part

    def _pair_tied(self, part: nn.Module, ties: list[list[str]]) -> None:
        """Tied weights whose names live on different stages: a process group per (dp, tp)
        coordinate joins the first and the last stage, whose gradients are summed."""
        if self.layout.pp == 1:  # one stage holds every tied name
            return
        names = {n for n, _ in part.named_parameters(remove_duplicate=False)}
        groups = {}
        for dp in range(self.layout.dp):  # every rank creates every group, in the same order
            for tp in range(self.layout.tp):
                ranks = [self.layout.rank_of(0, dp, tp), self.layout.rank_of(self.layout.pp - 1, dp, tp)]
                groups[(dp, tp)] = dist.new_group(ranks)
        mine = groups[(self._dp_rank, self.tp_rank)]
        for tied in ties:
            present = [n for n in tied if n in names]
            if present and len(present) < len(tied):  # split across stages
                param = part.get_parameter(present[0])
                self._tie_pairs.append((param, mine))
                if not self.first_stage:
                    self._norm_skip.add(id(param))

    @property
    def unwrapped(self) -> nn.Module:
        assert self.model is not None
        return self.model

    # ------------------------------------------------------------------ step
    def no_sync(self, last_micro_batch: bool):
        return gradient_sync(self.model, last_micro_batch)

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], task: Any,
                         generator: torch.Generator | None) -> torch.Tensor:
        if not self.use_pp:
            return super().forward_backward(micro_batches, task, generator)
        losses: list[torch.Tensor] = []
        self._run_pipeline(micro_batches, task, losses, train=True)
        for param, group in self._tie_pairs:
            if param.grad is not None:
                grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
                dist.all_reduce(grad, group=group)
        return self._pipeline_loss(losses, len(micro_batches))

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor], task: Any, generator: torch.Generator | None) -> torch.Tensor:
        if not self.use_pp:
            return super().eval_loss(batch, task, generator)
        n = self.settings.grad_accum_steps
        micros = contiguous_parts(batch, n)
        losses: list[torch.Tensor] = []
        self._run_pipeline(micros, task, losses, train=False)
        return self._pipeline_loss(losses, n)

    def _run_pipeline(self, micro_batches: list[dict[str, torch.Tensor]], task: Any, losses: list,
                      train: bool) -> None:
        """One schedule step: the micro-batches concatenated (the schedule cuts them again, in
        order), inputs on the first stage, targets and the loss on the last."""
        self._smoothing = getattr(task, "label_smoothing", 0.0) if train else 0.0  # read by the loss_fn
        if self.schedule is None:
            self.schedule = build_schedule(
                self.parts, self.stage_ids, self.num_stages, self.device, self.mesh["pp"].get_group(),
                self.parallel.pp_schedule, len(micro_batches),
                lambda out, target: task.output_loss(out, target, self._smoothing))
            # return_outputs=False: by default the last stage keeps every micro-batch's output (the
            # logits) to the end of the step and concatenates them, which the loop never reads
            # (measured by the memory planner's harness: one more logits tensor per micro-batch).
            # (torch releases without the argument keep them.)
            if "return_outputs" in inspect.signature(self.schedule.step).parameters:
                self._step_kwargs["return_outputs"] = False
        parts = [task.pipeline_io(b) for b in micro_batches]
        args = tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0])))
        target = torch.cat([p[1] for p in parts])
        kwargs = {"target": target, "losses": losses} if self.last_stage else {}
        step = self.schedule.step if train else self.schedule.eval
        with self.precision.autocast():
            step(*(args if self.first_stage else ()), **kwargs, **self._step_kwargs)

    def _pipeline_loss(self, losses: list[torch.Tensor], n: int) -> torch.Tensor:
        """The step's mean loss, known on the last stage, shared with every stage (a float64
        tensor on the device, summed and all-reduced there: nothing is read back)."""
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.last_stage:
            for loss in losses:
                value = value + loss.detach().to(torch.float64)
            value = value / n
        value = value.reshape(1)
        dist.all_reduce(value, group=self.mesh["pp"].get_group())
        return value.reshape(())

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm over every stage, clipping and the guarded step, all on the device."""
        assert self.optimizer is not None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        counted = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in self._norm_skip]
        squared = _squared_norm(counted, self.device).reshape(1)
        if self.use_pp:
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())
        norm = squared.reshape(()).sqrt()
        if max_norm > 0:  # min(1, max_norm / norm): 1 leaves the gradients as they are; inf skips anyway
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef)
        stepped = guarded_step(self.optimizer, nonfinite_flag(norm))
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.refresh_fp8_scales(self.model)
        return norm, stepped

    # ------------------------------------------------------------------ state (collective)
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        dcp_state.save(directory, self.model, self.optimizer, extra)
        dcp_state.save_scaler(directory, self.precision.state_dict(), write=self.rank == 0)

    def load(self, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        # the last stage knows a tied head only as `head.weight`; other layouts save its
        # optimizer state under `embed.weight` (dcp_state.tied_aliases)
        extra = dcp_state.load(directory, self.model, self.optimizer, extra, ties=self._ties)
        self.precision.load_state_dict(dcp_state.load_scaler(directory))
        self.precision.refresh_fp8_scales(self.model)
        return extra

    def full_shapes(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[int, ...]]:
        if not self.use_pp:
            return super().full_shapes(state)
        return {k: shape for k, (_, shape) in self._senders(state).items()}

    def full_tensors(self, state: dict[str, torch.Tensor] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Under pipeline parallelism each stage holds its own tensors: for each in turn, the
        ranks of the stage holding it gather it over their dp and tp mesh (DTensor), and the
        stage's first rank sends it to rank 0 (point to point, on the backend's device). One
        tensor is in flight at a time."""
        if not self.use_pp:
            yield from super().full_tensors(state)
            return
        state = self.export_state() if state is None else state
        for k, (sender, shape) in self._senders(state).items():
            whole = None
            if self.layout.coords(sender)[0] == self.pp_rank:  # this rank's stage holds k
                v = state[k]
                whole = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float()
            if self.rank == 0 and sender != 0:
                whole = torch.empty(shape, dtype=torch.float32, device=self.device)
                dist.recv(whole, src=sender)
            elif self.rank == sender != 0:
                dist.send(whole.to(self.device).contiguous(), dst=0)
            yield k, whole.cpu() if self.rank == 0 else None
            del whole

    def _senders(self, state: dict[str, torch.Tensor] | None) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Every exported tensor's whole shape and the rank that sends it to rank 0: the first
        rank ((dp, tp) = (0, 0)) of the earliest stage holding it (a weight tied between the
        first and last stage is sent once). One small all-gather of names and shapes."""
        state = self.export_state() if state is None else state
        mine = {k: tuple(v.shape) for k, v in state.items()} if (self._dp_rank, self.tp_rank) == (0, 0) else {}
        everyone: list[dict[str, tuple[int, ...]] | None] = [None] * self.layout.world
        dist.all_gather_object(everyone, mine)
        senders: dict[str, tuple[int, tuple[int, ...]]] = {}
        for rank, shapes in enumerate(everyone):  # pp is the slowest coordinate: earlier stages first
            for k, shape in (shapes or {}).items():
                senders.setdefault(k, (rank, shape))
        return senders


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squared gradient norms (float64, on the device). DTensors are grouped by mesh
    and placements (one norm kernel per group, as `clip_grad_norm_` does, but without mixing
    meshes), and each group's norm is reduced over its mesh by `full_tensor`."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if hasattr(g, "device_mesh") else None
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        total = total + norm.to(torch.float64) ** 2
    return total
