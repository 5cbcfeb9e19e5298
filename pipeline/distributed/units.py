"""Which sub-modules of a model are its repeated blocks, found from outside the model.

Sharding (FSDP), activation checkpointing and benchmarks all apply per block, the way
torchtitan applies parallelism to a model it does not own: a model only has to keep its
blocks in `nn.ModuleList` attributes of the root module (GPT and DiT: `blocks`; the U-Net:
`down`, `mid`, `up`).
"""

from __future__ import annotations

from torch import nn


def block_slots(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """Where each repeated block sits (its ModuleList and index), for wrappers that replace it."""
    return [(child, i) for child in model.children() if isinstance(child, nn.ModuleList)
            for i, m in enumerate(child) if any(True for _ in m.parameters())]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Entries of the root module's ModuleLists that hold parameters, in definition order."""
    return [container[i] for container, i in block_slots(model)]
