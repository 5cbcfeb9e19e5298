"""State handling shared by the backends that keep a whole model on every rank (DDP, Horovod).

Every rank holds identical weights and optimizer state, so rank 0 alone writes `state.pt`
(tensors and plain values only) and every rank reads it back with `weights_only=True`. A
checkpoint another layout wrote (FSDP2, tensor or pipeline parallel: DCP) loads too, and
`state.pt` loads under those layouts (`dcp_state.load`: each rank keeps its shard or stage),
for which it names the parameter at each optimizer position (`param_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.distributed import dcp_state
from pipeline.distributed.base import Strategy, grad_norm_and_clip

STATE = "state.pt"  # rank 0's file; pipeline.training.checkpoint imports the name (inspection, checksums)


class ReplicatedStrategy(Strategy):
    _plain: nn.Module

    @property
    def unwrapped(self) -> nn.Module:
        return self._plain

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _clip(self, max_norm: float) -> torch.Tensor | float:
        return grad_norm_and_clip([p for p in self._plain.parameters() if p.grad is not None], max_norm)

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        assert self.optimizer is not None
        if self._rank() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self._plain.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "param_names": dcp_state.replicated_param_names(self._plain, self.optimizer),
                        "scaler": self.precision.state_dict(), "extra": extra}, directory / STATE)
        # (also beside it, where a sharded or model-parallel layout resuming this checkpoint reads it)
        dcp_state.save_scaler(directory, self.precision.state_dict(), write=self._rank() == 0)

    def load(self, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        assert self.optimizer is not None
        if not (directory / STATE).is_file() and dcp_state.find(directory) is not None:
            # written by a sharded or model-parallel layout: DCP reads it whole, by name
            extra = dcp_state.load(directory, self._plain, self.optimizer, extra)
            self.precision.load_state_dict(dcp_state.load_scaler(directory))
            return extra
        state = torch.load(directory / STATE, map_location=self.device, weights_only=True)
        self._plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("scaler", {}))
        return state.get("extra", {})
