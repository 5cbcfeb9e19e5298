"""Activation checkpointing applied from outside the model (torchtitan's way): wrapped blocks
keep only their inputs in forward and recompute the rest during backward.

`full` wraps every repeated block; `selective` wraps every k-th block, or only the attention
module of every block, or (`op`) every block under an operator-level policy: the outputs of the
expensive operators (attention and every other matmul) are kept, the cheap elementwise ones
(norms, activations, rotary, casts) and the other matmuls recomputed, torchtitan's "selective op"
checkpointing. The wrapper (torch's `checkpoint_wrapper`, non-reentrant) leaves state-dict keys
unchanged, so checkpoints and exported weights do not depend on this setting.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn

from pipeline.distributed.units import block_slots

_aten = torch.ops.aten
# Operators whose outputs `op` keeps: attention in any of its kernels (the CPU's flash kernel, and
# CUDA's flash, memory-efficient and cuDNN ones) and matmuls (every other one, see `_policy`).
# The math attention path (attention dropout on CPU) is bmm/softmax and is recomputed.
SAVED_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))


def _policy(counts: dict[str, int], ctx: Any, func: Any, *_args: Any, **_kwargs: Any) -> Any:
    """Keep attention and every other matmul's output, recompute the rest. Odd-numbered matmuls
    are kept, counted separately in forward and in the recomputation so both agree on which;
    keeping all of them would keep almost everything a block saves without checkpointing."""
    from torch.utils.checkpoint import CheckpointPolicy

    phase = "recompute" if ctx.is_recompute else "forward"
    if func is _aten.mm.default:
        counts[phase] += 1
        keep = counts[phase] % 2 == 1
    else:
        keep = func in SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def op_policy_context() -> Any:
    """A fresh (forward, recompute) context pair for one checkpointed call of a block."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_policy, defaultdict(int)))


def describe_activation_checkpointing(mode: str, selective: str = "every_k", every_k: int = 2) -> str:
    """The setting as the training setup line shows it: `selective` alone does not say what is
    recomputed, so which kind (and k) follows it; `ac_selective` means nothing under none or full."""
    if mode != "selective":
        return mode
    return f"selective ({f'every_k, k={every_k}' if selective == 'every_k' else selective})"


def apply_activation_checkpointing(model: nn.Module, mode: str, selective: str = "every_k",
                                   every_k: int = 2) -> int:
    """Wrap in place; returns how many modules were wrapped. `mode`, `selective` and `every_k`
    are trainer.activation_checkpointing, ac_selective and ac_every_k (the config checks them)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return 0
    by_op = mode == "selective" and selective == "op"
    if by_op:
        checkpoint_wrapper = partial(checkpoint_wrapper, context_fn=op_policy_context)
    wrapped = 0
    for index, (container, i) in enumerate(block_slots(model)):
        block = container[i]
        if mode == "full" or by_op or (selective == "every_k" and index % every_k == 0):
            container[i] = checkpoint_wrapper(block)
            wrapped += 1
        elif mode == "selective" and selective == "attention" and isinstance(getattr(block, "attn", None), nn.Module):
            block.attn = checkpoint_wrapper(block.attn)
            wrapped += 1
    if wrapped == 0:
        raise ValueError(f"trainer.activation_checkpointing={mode} ({selective}): this model has no "
                         "repeated blocks" + (" with an `attn` module" if selective == "attention" else ""))
    return wrapped
