"""The device mesh: how `cluster.num_workers` ranks are laid out as pp x dp x tp.

Tensor-parallel ranks are adjacent (innermost dimension: on a GPU node they share the fastest
links, as in Megatron-LM and torchtitan), data-parallel ranks come next, and pipeline stages
are outermost. Every rank of one data-parallel replica (all its tp and pp ranks) reads the same
batch, so the data reader, the micro-batch size and token counts key on the data-parallel rank
and size, never on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class Layout:
    """world = pp x dp x tp; ranks are numbered row-major over (pp, dp, tp)."""

    world: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.world % (self.tp * self.pp):
            raise ValueError(f"parallel.tp x parallel.pp ({self.tp} x {self.pp}) must divide the {self.world} workers")

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp > 1

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of `rank`."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def dp_rank(self, rank: int) -> int:
        return self.coords(rank)[1]

    def describe(self) -> str:
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp}"


def build_mesh(layout: Layout, device: torch.device):
    """The 3-D `DeviceMesh` (dims pp, dp, tp) over the default process group; size-1
    dimensions are kept so every layout addresses its sub-meshes by the same names."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=MESH_DIMS)
