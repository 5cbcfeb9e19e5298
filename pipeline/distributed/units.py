"""Which sub-modules of a model are its repeated blocks, found from outside the model.

Sharding (FSDP), activation checkpointing and benchmarks all apply per block, the way
torchtitan applies parallelism to a model it does not own: a model only has to keep its
blocks in `nn.ModuleList` attributes of the root module (GPT and DiT: `blocks`; the U-Net:
`down`, `mid`, `up`).
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Entries of the root module's ModuleLists that hold parameters, in definition order."""
    blocks: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(m for m in child if any(True for _ in m.parameters()))
    return blocks
