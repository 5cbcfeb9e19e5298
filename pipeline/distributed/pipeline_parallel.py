"""Pipeline parallelism from a model's declarative plan, run by `torch.distributed.pipelining`.

A model publishes `pp_plan`: the attribute holding its block list, the root parts only the
first stage keeps (embeddings) and those only the last stage keeps (final norm, head). A stage
is a shallow copy of the root module that shares the kept sub-modules with it: blocks it does
not own become `nn.Identity` (so state-dict names keep their global block index and a
checkpoint written under one layout loads under any other), and root parts it does not own
are set to None (the model's forward skips them). The whole model is never materialised: the
stage is sharded and initialised while the full skeleton stays on the meta device.

Interleaved 1F1B gives each rank two stages (rank r: stages r and r + pp); each is cut and
wrapped on its own, and `merge_stages` holds them in one module for the optimizer, the
gradient norm and checkpoints.

Tied weights (a head sharing the embedding) live on the first and the last stage; their
gradients are summed between the two after backward (Megatron-LM's embedding all-reduce), so
both copies take the same optimizer step and stay equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config.parallel import stages_per_rank

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def rank_stages(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The global stage indices this pipeline rank runs: one, or one per round of the loop."""
    return [pp_rank + v * pp for v in range(stages_per_rank(schedule))]


def pp_plan(model: nn.Module) -> dict:
    plan = getattr(type(model), "pp_plan", None)
    if not plan:
        raise ValueError(f"parallel.pp: {type(model).__name__} publishes no pipeline plan (pp_plan)")
    return plan


def stage_blocks(n_blocks: int, stage: int, stages: int) -> range:
    """The block indices stage `stage` of `stages` owns (equal consecutive parts)."""
    if n_blocks % stages:
        raise ValueError(f"parallel.pp: {n_blocks} blocks cannot be cut into {stages} equal stages")
    per = n_blocks // stages
    return range(stage * per, (stage + 1) * per)


def _root_copy(model: nn.Module) -> nn.Module:
    """A shallow copy of `model`'s root: sub-modules and buffers shared with `model` (so
    initialising through the full skeleton fills the copy), module and hook registries its
    own (so wrapping the copy does not wrap the skeleton)."""
    part = copy.copy(model)
    for key, value in model.__dict__.items():
        if isinstance(value, dict) and key != "_buffers":
            part.__dict__[key] = type(value)(value)
    return part


def split_stage(model: nn.Module, stage: int, stages: int) -> nn.Module:
    """This stage's module: a root copy of `model` (`_root_copy`) holding only its own parts."""
    plan = pp_plan(model)
    part = _root_copy(model)
    blocks = getattr(model, plan["blocks"])
    owned = stage_blocks(len(blocks), stage, stages)
    setattr(part, plan["blocks"], nn.ModuleList(b if i in owned else nn.Identity() for i, b in enumerate(blocks)))
    for name in plan.get("first", ()) if stage > 0 else ():
        if getattr(part, name, None) is not None:
            setattr(part, name, None)
    for name in plan.get("last", ()) if stage < stages - 1 else ():
        if getattr(part, name, None) is not None:
            setattr(part, name, None)
    return part


def merge_stages(model: nn.Module, parts: list[nn.Module]) -> nn.Module:
    """One module holding every part this rank runs (several under interleaving): the blocks
    each part owns, and the root parts any of them keeps. It shares the parts' sub-modules
    (already wrapped), so its parameters, state dict and checkpoints are the rank's whole share
    under the usual global names; only the parts themselves are run by the schedule."""
    if len(parts) == 1:
        return parts[0]
    plan = pp_plan(model)
    merged = _root_copy(model)
    lists = [getattr(p, plan["blocks"]) for p in parts]
    setattr(merged, plan["blocks"], nn.ModuleList(
        next((blocks[i] for blocks in lists if not isinstance(blocks[i], nn.Identity)), nn.Identity())
        for i in range(len(lists[0]))))
    for name in (*plan.get("first", ()), *plan.get("last", ())):
        setattr(merged, name, next((getattr(p, name) for p in parts if getattr(p, name, None) is not None), None))
    return merged


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied weights), found by identity before any wrapping."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Point every name of each tied group in the full skeleton at the one parameter this
    rank's stage materialised (wrapping replaced it in the stage's own module only), so
    unit-by-unit initialisation sees the tie and draws the weight once."""
    for names in groups:
        params = [model.get_parameter(n) for n in names]
        live = next((p for p in params if not p.is_meta), None)
        if live is None:
            continue
        for name in names:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = live


def build_schedule(stage_modules: list[nn.Module], stage_ids: list[int], stages: int, device: torch.device, group,
                   schedule: str, n_microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A torch pipelining schedule over this rank's stages (one, or one per round under
    interleaving). `loss_fn` returns the mean loss of a micro-batch; the schedule divides
    gradients by the micro-batch count (scale_grads), so the step's gradient is the mean over
    the whole batch, as gradient accumulation's is."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule: '{schedule}' is not built here (known: {', '.join(SCHEDULES)})")
    pipe_stages = [PipelineStage(m, i, stages, device, group=group) for m, i in zip(stage_modules, stage_ids,
                                                                                     strict=True)]
    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipe_stages, n_microbatches, loss_fn=loss_fn, scale_grads=True)
    (pipe_stage,) = pipe_stages
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    return cls(pipe_stage, n_microbatches, loss_fn=loss_fn, scale_grads=True)
