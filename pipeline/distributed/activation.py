"""Activation checkpointing applied from outside the model (torchtitan's way): wrapped blocks
keep only their inputs in forward and recompute the rest during backward.

`full` wraps every repeated block, `selective` every k-th block or only the attention module
of every block. The wrapper (torch's `checkpoint_wrapper`, non-reentrant) leaves state-dict
keys unchanged, so checkpoints and exported weights do not depend on this setting.
"""

from __future__ import annotations

from torch import nn

AC_MODES = ("none", "full", "selective")


def apply_activation_checkpointing(model: nn.Module, mode: str, selective: str = "every_k",
                                   every_k: int = 2) -> int:
    """Wrap in place; returns how many modules were wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in AC_MODES:
        raise ValueError(f"trainer.activation_checkpointing: unknown mode '{mode}' (known: {', '.join(AC_MODES)})")
    if mode == "none":
        return 0
    wrapped, index = 0, 0
    for child in model.children():
        if not isinstance(child, nn.ModuleList):
            continue
        for i, block in enumerate(child):
            if not any(True for _ in block.parameters()):
                continue
            if mode == "full" or (selective == "every_k" and index % every_k == 0):
                child[i] = checkpoint_wrapper(block)
                wrapped += 1
            elif mode == "selective" and selective == "attention" and isinstance(getattr(block, "attn", None),
                                                                                 nn.Module):
                block.attn = checkpoint_wrapper(block.attn)
                wrapped += 1
            index += 1
    if wrapped == 0:
        raise ValueError(f"trainer.activation_checkpointing={mode} ({selective}): this model has no "
                         "repeated blocks" + (" with an `attn` module" if selective == "attention" else ""))
    return wrapped
