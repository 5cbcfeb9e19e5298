"""Activation checkpointing applied from outside the model (torchtitan's way): wrapped blocks
keep only their inputs in forward and recompute the rest during backward.

`full` wraps every repeated block, `selective` every k-th block or only the attention module
of every block. The wrapper (torch's `checkpoint_wrapper`, non-reentrant) leaves state-dict
keys unchanged, so checkpoints and exported weights do not depend on this setting.
"""

from __future__ import annotations

from torch import nn

from pipeline.distributed.units import block_slots


def apply_activation_checkpointing(model: nn.Module, mode: str, selective: str = "every_k",
                                   every_k: int = 2) -> int:
    """Wrap in place; returns how many modules were wrapped. `mode`, `selective` and `every_k`
    are trainer.activation_checkpointing, ac_selective and ac_every_k (the config checks them)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return 0
    wrapped = 0
    for index, (container, i) in enumerate(block_slots(model)):
        block = container[i]
        if mode == "full" or (selective == "every_k" and index % every_k == 0):
            container[i] = checkpoint_wrapper(block)
            wrapped += 1
        elif mode == "selective" and selective == "attention" and isinstance(getattr(block, "attn", None), nn.Module):
            block.attn = checkpoint_wrapper(block.attn)
            wrapped += 1
    if wrapped == 0:
        raise ValueError(f"trainer.activation_checkpointing={mode} ({selective}): this model has no "
                         "repeated blocks" + (" with an `attn` module" if selective == "attention" else ""))
    return wrapped
