"""Tensor parallelism from a model's declarative plan (Megatron-LM's layout, torch DTensor's API).

A model publishes `tp_plan`: module paths inside each repeated block, each "colwise" (the
output features split over the tp ranks: q/k/v and the MLP's input projections) or "rowwise"
(the input features split, the partial results summed: attention's output and the MLP's
output projection). One all-reduce per sub-layer in forward and one in backward, as in
Megatron-LM. Everything else (embeddings, norms, the output head, adaLN modulation) stays
replicated on the tp ranks: the vocabularies here are small, so a vocabulary-parallel
embedding and loss would save little memory and cost an extra collective per step, and a
replicated head keeps a tied embedding tied without cross-rank bookkeeping.
"""

from __future__ import annotations

from torch import nn

from pipeline.distributed.units import repeated_blocks

STYLES = ("colwise", "rowwise")


def tp_plan(model: nn.Module) -> dict[str, str]:
    """The model family's plan, or a clear error for a model without one."""
    plan = getattr(type(model), "tp_plan", None)
    if not plan:
        raise ValueError(f"parallel.tp: {type(model).__name__} publishes no tensor-parallel plan (tp_plan)")
    bad = {k: v for k, v in plan.items() if v not in STYLES}
    if bad:
        raise ValueError(f"{type(model).__name__}.tp_plan: unknown styles {bad} (known: {', '.join(STYLES)})")
    return dict(plan)


def _has(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(module.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], tp_mesh) -> int:
    """Split every repeated block's planned projections over `tp_mesh` (in place, also on the
    meta device, before sharding or materialising). Returns how many modules were split."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    split = 0
    for block in repeated_blocks(model):
        present = {path: styles[style]() for path, style in plan.items() if _has(block, path)}
        if present:
            parallelize_module(block, tp_mesh, present)
            split += len(present)
    if split == 0:
        raise ValueError(f"parallel.tp: none of {type(model).__name__}.tp_plan's modules exist in its blocks")
    return split
