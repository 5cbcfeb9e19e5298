"""Training state as a torch.distributed.checkpoint (DCP): one format for every layout.

Model and optimizer state are keyed by parameter name (the optimizer's state flattened to
`state.<param>.<key>` and `param_groups.<param>.<key>`), never by position or rank, and every
tensor records its global shape. So the checkpoint a layout writes (FSDP2 shards, tensor-
parallel slices, one pipeline stage per rank) loads under any other, DCP resharding on read,
and a replicated model (DDP) reads it whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

DCP_DIR = "dcp"
LEGACY_DIRS = ("fsdp",)  # where FSDP2 checkpoints were written before every layout shared one format


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd, "extra": extra}


def find(directory: Path) -> Path | None:
    """The DCP folder of a checkpoint, if it has one."""
    for name in (DCP_DIR, *LEGACY_DIRS):
        if (directory / name / ".metadata").is_file():
            return directory / name
    return None


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Collective: every rank writes its own part; DCP de-duplicates replicated tensors."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state(model, optimizer, extra), checkpoint_id=str(directory / DCP_DIR))


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any]) -> dict[str, Any]:
    """Collective: read into this rank's tensors in place (whatever layout wrote them) and
    return `extra` as saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    found = find(directory)
    if found is None:
        raise FileNotFoundError(f"checkpoint {directory} holds no DCP state ({DCP_DIR}/.metadata)")
    current = state(model, optimizer, extra)
    dcp.load(current, checkpoint_id=str(found))
    set_state_dict(model, optimizer, model_state_dict=current["model"], optim_state_dict=current["optim"],
                   options=_options())
    return current["extra"]
