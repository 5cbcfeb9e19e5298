"""Sharded initialisation: a model built on the meta device gets its weights one unit at a time,
and each rank keeps only its own shard of every unit.

Why not `to_empty` + `init_weights` on the local shards (torchtitan's route)? Random init on
a shard draws a different stream than init of the whole tensor, so a sharded run would not
start from a DDP run's weights, and step-by-step equivalence with DDP (this project's proof
that a layout is correct) would be lost. Instead every rank draws each *whole* unit with the
same seeded generator, in the order an unsharded `init_weights` uses (the model's own
parameters first, then each repeated block), keeps its slice and frees the rest. The working
set is one unit (a block, or the embeddings): no rank ever holds the whole model, and the
result is bit-identical to DDP's initialisation.

The model side of the contract is small: the root's `init_weights(include_blocks=False)`
initialises everything outside the repeated blocks (and recomputes non-persistent buffers such
as RoPE tables), and each block initialises itself with `init_weights()` (or
`reset_parameters()` for plain layers). Tied parameters are handled once, by identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from pipeline.distributed.units import repeated_blocks

CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper inserts it into parameter names

# (the module's parameter before the unit was drawn, the whole parameter just initialised for it)
Placer = Callable[[list[tuple[nn.Parameter, nn.Parameter]]], None]


def init_unit(unit: nn.Module) -> None:
    """Initialise one repeated block: its `init_weights`, else a plain layer's `reset_parameters`."""
    if hasattr(unit, "init_weights"):
        unit.init_weights()
    elif hasattr(unit, "reset_parameters"):
        unit.reset_parameters()
    else:
        raise TypeError(f"{type(unit).__name__} has parameters but neither init_weights() nor reset_parameters()")


def _slots(modules: list[nn.Module]) -> dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Each parameter directly owned by `modules`, by identity, with every (module, attribute)
    slot that holds it (tied weights have two)."""
    slots: dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]] = {}
    for module in modules:
        for name, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), (p, []))[1].append((module, name))
    return slots


@contextlib.contextmanager
def whole_parameters(modules: list[nn.Module], device: torch.device,
                     keep_whole: bool = False) -> Iterator[list[tuple[nn.Parameter, nn.Parameter]]]:
    """Swap every parameter directly owned by `modules` for an uninitialised whole one on
    `device` (a DTensor's shape is its global shape) and yield (previous, whole) pairs.
    Afterwards the previous parameters (sharded ones) are put back, unless `keep_whole`: then
    the whole ones stay (a strategy that partitions them in place, as ZeRO-3 does)."""
    slots = _slots(modules)
    full = {pid: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            for pid, (p, _) in slots.items()}
    try:
        for pid, (_, places) in slots.items():
            for module, name in places:
                module._parameters[name] = full[pid]
        yield [(p, full[pid]) for pid, (p, _) in slots.items()]
    finally:
        for p, places in slots.values() if not keep_whole else ():
            for module, name in places:
                module._parameters[name] = p


def units(model: nn.Module) -> list[tuple[list[nn.Module], Callable[[], None]]]:
    """The model's initialisation units in the order an unsharded `init_weights` draws them:
    the modules outside the repeated blocks with the root's own init, then each block."""
    blocks = repeated_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    root_modules = [m for m in model.modules() if id(m) not in inside]
    out: list[tuple[list[nn.Module], Callable[[], None]]] = [
        (root_modules, lambda: model.init_weights(include_blocks=False))]
    for block in blocks:
        out.append((list(block.modules()), lambda b=block: init_unit(b)))
    return out


@torch.no_grad()
def init_by_unit(model: nn.Module, device: torch.device, place: Placer, keep_whole: bool = False,
                 weights: Path | None = None, key: str = "trainer.init_from") -> None:
    """Initialise `model` unit by unit on `device`; `place` keeps this rank's part of each unit
    (a slice, a partition) before the whole tensors are dropped. The caller seeds the RNG the
    same way on every rank. With `weights` (a safetensors file), each unit's parameters are then
    read from it, one tensor at a time: no rank reads more than a unit of the file at once. `key`
    is the config key that named `weights`, which its errors name."""
    names = parameter_names(model)
    for modules, init in units(model):
        with whole_parameters(modules, device, keep_whole) as pairs:
            init()  # also recomputes the unit's non-persistent buffers, which the file does not hold
            if weights is not None:
                copy_from_safetensors(weights, {names[id(p)]: whole for p, whole in pairs}, key)
            place(pairs)
            # Drop this unit's whole tensors now: a name still bound would keep them alive while
            # the next unit is allocated (two units at once: one block more at every rank's peak).
            del pairs


def parameter_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's state-dict name (the first one, for tied weights), by identity: the
    names a plain module saves, without activation-checkpointing wrappers' prefixes."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name.replace(CHECKPOINT_PREFIX, ""))
    return names


@torch.no_grad()
def copy_from_safetensors(path: Path, targets: dict[str, torch.Tensor], key: str = "trainer.init_from") -> None:
    """Fill `targets` (state-dict name -> whole tensor) from a safetensors file, reading only
    those tensors (a file of the older fused layout gives each split weight its
    rows), or from a Hugging Face checkpoint folder (`pipeline.models.hf.HFCheckpoint`: its
    names, any of its sharded files). A missing name or a shape that differs is an error naming
    the file and `key`, the config key that named `path` (a Llama folder may be either init_from:
    its reader is told which, so its errors name the key the user set)."""
    from safetensors import safe_open

    from pipeline.models.hf import HFCheckpoint, is_hf_folder
    from pipeline.models.legacy import fused_source, take_rows

    if is_hf_folder(path):
        HFCheckpoint(path, key).copy_into(targets)
        return

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, target in targets.items():
            source = fused_source(name) if name not in keys else None
            if name in keys:
                tensor = f.get_tensor(name)
            elif source is not None and source[0] in keys:  # saved before q/k/v and SwiGLU were split
                tensor = take_rows(f.get_tensor(source[0]), target.shape[0], source[1])
            else:
                raise ValueError(f"{key}: {path} has no tensor '{name}' (it holds {len(keys)} others)")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{key}: {path}: '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model needs {tuple(target.shape)}")
            target.copy_(tensor)


def to_empty_keeping_ties(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device (sharded) module's storage on `device`, uninitialised. Tensors are
    swapped in place, so tied parameters stay one parameter (a plain `to_empty` unties them)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Give meta buffers storage on `device` (their values come from the model's init)."""
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)
