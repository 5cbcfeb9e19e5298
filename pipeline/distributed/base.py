"""The one interface every parallelism backend implements.

The training loop talks only to a `Strategy`: it never asks which backend is running. A
strategy wraps any `nn.Module` (it knows no model class) and owns everything that differs
between backends: how the model is sharded and materialised, how gradients are synchronised,
how the optimizer steps, what a checkpoint holds on disk, and how full weights are gathered
for export.

Collective methods (marked so) must be called on every rank in the same order.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed.precision import Precision

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepSettings:
    """What some backends must know before the first step (DeepSpeed builds its engine from it)."""

    micro_batch_size: int
    grad_accum_steps: int
    grad_clip: float
    # trainer.activation_checkpointing, ac_selective, ac_every_k: applied by the strategy, after
    # any tensor-parallel split and before sharding (torchtitan's order)
    activation_checkpointing: tuple[str, str, int] = ("none", "every_k", 2)
    # trainer.compile (none, blocks, model): torch.compile in place, by the strategy, after
    # activation checkpointing and before sharding (`pipeline.distributed.compile`)
    compile: str = "none"



def contiguous_parts(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into `n` consecutive parts of equal rows (the caller's rows divide by `n`):
    validation's micro-batches, and a pipeline schedule's."""
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[i * rows // n:(i + 1) * rows // n] for k, v in batch.items()} for i in range(n)]

class Strategy(ABC):
    """Wrap a model and optimizer; run backward and step; save, load and consolidate state."""

    name: str = "base"
    # Why a checkpoint of this backend cannot be loaded by another number of ranks (None: it can,
    # so a run resumes at any worker count; pipeline/config/elastic.py).
    reshard_limit: str | None = None
    # Whether FSDP2 all-gathers the weights before each use (so fp8 weights can travel in float8,
    # `Precision.prepare`); such a strategy calls `precision.refresh_fp8_scales` whenever its weights change.
    gathers_weights: bool = False

    def __init__(self, cfg: Any, precision: Precision, device: torch.device, settings: StepSettings) -> None:
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.settings = settings
        self.init_from: Path | None = None  # safetensors weights to start from instead of a random init
        self.init_from_key = "trainer.init_from"  # the config key that named them (their errors name it)
        self.model: nn.Module | None = None  # what forward() is called on
        self.optimizer: torch.optim.Optimizer | None = None  # the torch optimizer whose lr the loop sets

    # ------------------------------------------------------------------ setup
    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Shard and wrap the model, materialise it, then build the optimizer over the result.

        The model arrives on the meta device (the loop builds it there); the strategy applies
        activation checkpointing (`checkpoint_activations`) where its layout wants it. The
        caller seeds the RNG identically on every rank.
        """

    def checkpoint_activations(self, model: nn.Module) -> None:
        """Wrap the model's blocks for activation checkpointing as the settings ask (in place)."""
        from pipeline.distributed.activation import apply_activation_checkpointing

        apply_activation_checkpointing(model, *self.settings.activation_checkpointing)

    def compile(self, model: nn.Module) -> None:
        """torch.compile the model's blocks or the model as the settings ask (in place: state-dict
        keys unchanged). Called after `checkpoint_activations`, before sharding; the first step
        is timed (`step_metrics`)."""
        from pipeline.distributed.compile import apply_compile

        self._compile_timer = apply_compile(model, self.settings.compile, lambda: self.optimizer)

    def step_metrics(self) -> dict[str, float]:
        """One-off figures for the next history entry: `compile_s` (the first step's time, under
        trainer.compile) once it is known."""
        timer = getattr(self, "_compile_timer", None)
        return timer.metrics() if timer is not None else {}

    def materialize(self, model: nn.Module) -> nn.Module:
        """Allocate a meta-device model on this rank's device and initialise its weights (then
        read `init_from` into them: a replicated backend holds the whole model anyway)."""
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self.device)
            model.init_weights()
            if self.init_from is not None:
                from pipeline.distributed.sharded_init import copy_from_safetensors, parameter_names

                names = parameter_names(model)
                copy_from_safetensors(self.init_from, {names[id(p)]: p for p in model.parameters()},
                                      self.init_from_key)
        return model.to(self.device)

    @property
    @abstractmethod
    def unwrapped(self) -> nn.Module:
        """The module without its wrapper (EMA reads its state dict; evaluation calls it)."""

    def describe(self) -> str:
        """One line for the log and MLflow: the backend and its settings."""
        return self.name

    # ------------------------------------------------------------------ data parallelism
    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which slice of each global batch it reads."""
        return dist.get_rank() if world_size() > 1 else 0

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas (the world, unless model parallelism takes some ranks)."""
        return world_size()

    # ------------------------------------------------------------------ step
    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], task: Any,
                         generator: torch.Generator | None) -> torch.Tensor:
        """Forward and backward over one step's micro-batches (gradients accumulate, and are
        synchronised on the last); returns the step's mean loss as a 0-dim float64 tensor on
        the device, summed there (reading it would make the host wait for the device every
        step; the loop reads its log window once per report). A pipeline schedule overrides
        this: it interleaves the micro-batches' forwards and backwards across stages."""
        total: torch.Tensor | None = None
        for i, batch in enumerate(micro_batches):
            with self.no_sync(i == len(micro_batches) - 1), self.precision.autocast():
                loss = task.loss(self.model, batch, generator) / len(micro_batches)
            self.backward(loss)
            part = loss.detach().to(torch.float64)
            total = part if total is None else total + part
        assert total is not None
        return total

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor], task: Any, generator: torch.Generator | None) -> torch.Tensor:
        """The loss of one batch without gradients (validation), a 0-dim tensor left on the
        device; the caller sets eval mode and reads the losses once per validation. The batch
        (this rank's share of a global batch) runs in the training step's micro-batches and their
        losses are averaged as the step averages them: in one forward it would hold
        grad_accum_steps times the activations the micro-batch was sized for, which the memory
        planner does not plan."""
        parts = contiguous_parts(batch, self.settings.grad_accum_steps)
        with self.precision.autocast():
            losses = [task.loss(self.model, part, generator).detach() for part in parts]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager[None]:
        """Skip gradient synchronisation on all but the last micro-batch of an accumulation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scale(loss).backward()

    @abstractmethod
    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor | float, torch.Tensor | bool]:
        """Unscale, clip (0 = off), step if gradients are finite, zero them. Returns (norm,
        stepped): device tensors (0-dim; the norm inf or nan when the step was skipped) where the
        backend decides on the device, Python values where it decided on the host (DeepSpeed).
        Nothing is read back from the device here unless the optimizer cannot skip on the
        device (`pipeline.distributed.precision.guarded_step`)."""

    # ------------------------------------------------------------------ state (collective)
    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """Write this rank's part of the training state (model, optimizer, scaler, `extra`) under
        `directory`. File names differ per rank where ranks hold different state, so the per-rank
        directories can be merged into one checkpoint (Ray Train does exactly that)."""

    @abstractmethod
    def load(self, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        """Restore what `save` wrote (from the merged checkpoint). `extra` holds the current values
        (sharded backends load into them in place); returns the saved ones."""

    def export_state(self) -> dict[str, torch.Tensor]:
        """The model's weights under the names a plain module has, in this rank's layout (whole,
        or this rank's shards as DTensors); what `full_tensors` gathers when given no state."""
        return self.unwrapped.state_dict()

    def full_shapes(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[int, ...]]:
        """The whole (unsharded) shape of every tensor `full_tensors` will yield, in its order;
        `state` as there. Known on rank 0 before any tensor is gathered, so a file's header can
        be written first. Collective where ranks hold different parts (pipeline stages)."""
        state = self.export_state() if state is None else state
        return {k: tuple(v.shape) for k, v in state.items()}  # a DTensor's shape is the global one

    def full_tensors(self, state: dict[str, torch.Tensor] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Whole fp32 CPU tensors, one at a time: the model's weights (`export_state`), or a state
        dict in `ema_source`'s layout (EMA weights). Rank 0 gets each tensor, other ranks None;
        a tensor may alias live state (copy it to keep it). Collective: every rank runs the
        iterator to the end, in step, since each gather may be a collective. Nothing but the
        tensor in hand is ever whole, so no rank holds the whole model at once."""
        state = self.export_state() if state is None else state
        first = not dist.is_initialized() or dist.get_rank() == 0
        for k, v in state.items():
            whole = whole_on_first(v) if hasattr(v, "full_tensor") else v  # a DTensor: gathered over its mesh
            yield k, whole.detach().float().cpu() if first and whole is not None else None
            del whole  # before the next gather: one whole tensor at a time, not two

    def consolidated_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of `full_tensors` at once (complete on rank 0, empty elsewhere): for tests
        and small models. Export streams them instead (`pipeline.training.checkpoint`). Copies:
        tied weights share storage, which safetensors refuses. Collective."""
        return {k: v.clone() for k, v in self.full_tensors(state) if v is not None}

    def ema_source(self) -> dict[str, torch.Tensor]:
        """This rank's training weights as the EMA averages them: the full state dict unless the
        backend shards (then each rank's own part, so the EMA is sharded the same way and its
        update needs no communication)."""
        return self.unwrapped.state_dict()

    # ------------------------------------------------------------------ communication (collective)
    def all_mean(self, values: list[float | torch.Tensor]) -> list[float]:
        """The mean of each value (a float or a 0-dim tensor) over the data-parallel ranks: one
        all-reduce on this rank's device (NCCL takes no CPU tensors) and one read back."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device) for v in values])
        if world_size() > 1:
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return t.tolist()


def gather_rows(local: torch.Tensor, rows: list[int], ranks: list[int],
                group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """Concatenate along dim 0 the pieces `ranks` hold (`rows[i]` rows on `ranks[i]`, laid out as
    `torch.chunk` lays them: every piece but the last ones `max(rows)` long; this rank's is
    `local`) on the first of them, which gets the whole tensor (the others None). Collective over
    `group` (the default group when None), whose ranks are `ranks` in order.

    Into one preallocated tensor: the receiver holds the whole tensor once and the senders
    nothing more, where an all-gather gives every rank the whole tensor (and gloo's all-gather
    a second, internal copy of it). Under gloo, point to point (on CPU: gloo sends no CUDA
    tensors); under NCCL, one `gather` of pieces padded to one length, which runs on the group's
    own communicator (separate sends would open a communicator per pair of ranks)."""
    me, first = dist.get_rank(), ranks[0]
    per_row = math.prod(local.shape[1:])  # (the same on every rank)
    if dist.get_backend(group) == "nccl":
        chunk = max(rows)
        if local.shape[0] < chunk:
            local = torch.cat([local, local.new_zeros((chunk - local.shape[0], *local.shape[1:]))])
        whole = torch.empty((chunk * len(ranks), *local.shape[1:]), dtype=local.dtype,
                            device=local.device) if me == first else None
        dist.gather(local.contiguous(), list(whole.split(chunk)) if whole is not None else None, dst=first,
                    group=group)
        return whole[:sum(rows)] if whole is not None else None
    local = local.cpu()
    if me != first:
        if local.numel():
            dist.send(local.contiguous(), dst=first, group=group)
        return None
    whole = torch.empty((sum(rows), *local.shape[1:]), dtype=local.dtype)
    start = 0
    for rank, n in zip(ranks, rows, strict=True):
        if n * per_row and rank == me:
            whole[start:start + n].copy_(local)
        elif n * per_row:  # (the sender skips an empty piece: so does the receiver)
            dist.recv(whole[start:start + n], src=rank, group=group)
        start += n
    return whole


def whole_on_first(v: Any) -> torch.Tensor | None:
    """A DTensor made whole on global rank 0 (None elsewhere): FSDP2's layout (rows split over a
    1-D mesh whose first rank is rank 0, as `torch.chunk` splits them) by `gather_rows`, any
    other layout by DTensor's own all-gather (`full_tensor`, whole on every rank)."""
    from torch.distributed.tensor import Shard

    mesh = v.device_mesh
    ranks = mesh.mesh.flatten().tolist()
    if mesh.ndim != 1 or tuple(v.placements) != (Shard(0),) or ranks[0] != 0 or not v.dim():
        whole = v.full_tensor()
        return whole if dist.get_rank() == 0 else None
    total, chunk = v.shape[0], -(-v.shape[0] // len(ranks))
    rows = [max(0, min(chunk, total - i * chunk)) for i in range(len(ranks))]
    return gather_rows(v.to_local(), rows, ranks, mesh.get_group())


def world_size() -> int:
    """Ranks in the torch.distributed group, 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor | float:
    """Total gradient norm (before clipping; a 0-dim tensor on the device, inf or nan when a
    gradient is) and clip in place when max_norm > 0. Nothing is read back: `clip_grad_norm_`
    scales by min(1, max_norm / norm) on the device."""
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
