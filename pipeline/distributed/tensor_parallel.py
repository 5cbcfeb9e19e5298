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

import torch
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


def _style(module: nn.Module, style: str):
    """The parallel style for one projection: torch's, or, for a layer fp8 converted (torchao's
    Float8Linear), torchao's float8 twin of it, which casts the layer's input and output
    gradient as DTensors, so their scales are those of the whole tensor across the tp ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if type(module).__name__ == "Float8Linear":
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        return Float8ColwiseParallel() if style == "colwise" else Float8RowwiseParallel()
    return ColwiseParallel() if style == "colwise" else RowwiseParallel()


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], tp_mesh) -> int:
    """Split every repeated block's planned projections over `tp_mesh` (in place, also on the
    meta device, before sharding or materialising). Returns how many modules were split."""
    from torch.distributed.tensor.parallel import parallelize_module

    split = 0
    for block in repeated_blocks(model):
        present = {path: _style(block.get_submodule(path), style) for path, style in plan.items()
                   if _has(block, path)}
        if present:
            parallelize_module(block, tp_mesh, present)
            split += len(present)
    if split == 0:
        raise ValueError(f"parallel.tp: none of {type(model).__name__}.tp_plan's modules exist in its blocks")
    fork_rng_per_tp_rank(model, plan, tp_mesh.get_local_rank())
    return split


class TpRankStream:
    """Forward hooks that give one module's random draws a stream of this tp rank's own (Megatron-
    LM's `get_cuda_rng_tracker().fork()`): attention dropout masks the attention weights of the
    rank's local heads, and with the global stream every tp rank would draw the same mask, so
    heads h and h + n_heads/tp would share one where DDP draws one per head.

    Before the module runs (in training), a seed is drawn from the global stream, which every tp
    rank of a replica holds alike (the loop seeds it per step and data-parallel rank), and the
    generators (CPU and CUDA) are re-seeded with it plus the tp rank; after, they are put back
    as they were just past that draw. So the tp ranks draw different masks, and what follows
    (the residual dropout on activations every tp rank holds whole) draws alike on all of them.
    Activation checkpointing's recompute restores the global stream first, so it redraws the
    same seed and masks."""

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self._saved: list[tuple[torch.Tensor, list[torch.Tensor] | None]] = []

    def before(self, module: nn.Module, args: object) -> None:
        if not module.training:
            return
        seed = int(torch.randint(0, 1 << 62, (1,)).item())  # a CPU draw: no device sync
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._saved.append((torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None))
        torch.manual_seed(seed + self.tp_rank)

    def after(self, module: nn.Module, args: object, output: object) -> None:
        if not module.training or not self._saved:
            return
        cpu, cuda = self._saved.pop()
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def fork_rng_per_tp_rank(model: nn.Module, plan: dict[str, str], tp_rank: int) -> int:
    """`TpRankStream` hooks on the modules of the blocks that draw at random over split heads or
    features: the parents of the plan's column-wise projections (a block's attention) that have
    `dropout` > 0. Returns how many were hooked (none for the presets, whose dropout is 0)."""
    parents = {path.rpartition(".")[0] for path, style in plan.items() if style == "colwise"}
    hooked = 0
    for block in repeated_blocks(model):
        for path in sorted(parents):
            module = block.get_submodule(path) if path and _has(block, path) else None
            if module is not None and float(getattr(module, "dropout", 0.0) or 0.0) > 0:
                stream = TpRankStream(tp_rank)
                # outside dynamo (trainer.compile=blocks compiles the hooks with the block): traced, the
                # seed drawn each step was a guard that failed every step, a recompile per step until
                # dynamo's limit, then the block's rest ran eager
                module.register_forward_pre_hook(torch._dynamo.disable(stream.before))
                module.register_forward_hook(torch._dynamo.disable(stream.after))
                hooked += 1
    return hooked


def localize(model: nn.Module, plan: dict[str, str], tp: int) -> int:
    """Replace, in place, every planned projection of every repeated block by a plain Linear of
    the shape one of `tp` ranks holds (colwise: out_features / tp; rowwise: in_features / tp).
    The memory planner traces this model: tensor parallelism runs the same local matmuls on
    DTensors' local tensors, so its parameters, saved activations and temporaries are one tp
    rank's (the collectives' transient output buffers aside). Returns how many were replaced."""
    replaced = 0
    for block in repeated_blocks(model):
        for path, style in plan.items():
            if not _has(block, path):
                continue
            old = block.get_submodule(path)
            n_in, n_out = old.in_features, old.out_features
            if (n_out if style == "colwise" else n_in) % tp:
                raise ValueError(f"parallel.tp={tp}: {path} has {n_out if style == 'colwise' else n_in} "
                                 f"{'output' if style == 'colwise' else 'input'} features, not divisible by {tp}")
            shape = (n_in, n_out // tp) if style == "colwise" else (n_in // tp, n_out)
            new = nn.Linear(*shape, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            parent, _, name = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, name, new)
            replaced += 1
    return replaced
