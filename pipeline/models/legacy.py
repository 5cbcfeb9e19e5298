"""Reading weights saved before the fused projections were split (q/k/v, SwiGLU's up), one
tensor at a time: where a name of the split layout is missing from a file, the rows it needs
come from the fused tensor it was cut from.

`load_state_dict` goes through each model's pre-hook (`gpt.upgrade_legacy_keys`); this is for
readers that fetch single tensors by name (`trainer.init_from`, which sharded strategies read
one unit at a time). The rows a split weight takes are found from its own shape, so the same
rule serves the GPT (`attn.qkv` -> `wq/wk/wv`, `attn.proj` -> `wo`, `mlp.up` -> `w3/w1`,
`mlp.down` -> `w2`) and the DiT (`qkv` -> `wq/wk/wv`, biases too).
"""

from __future__ import annotations

import torch

# split module name -> (fused module name, which rows of the fused tensor)
_FUSED = {"wq": ("qkv", "first"), "wk": ("qkv", "middle"), "wv": ("qkv", "last"), "wo": ("proj", "all"),
          "w3": ("up", "first"), "w1": ("up", "last"), "w2": ("down", "all")}


def fused_source(name: str) -> tuple[str, str] | None:
    """(the fused tensor's name, which rows) a split parameter came from, or None."""
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or parts[1] not in _FUSED:
        return None
    path, leaf, param = parts
    old, rows = _FUSED[leaf]
    return f"{path}.{old}.{param}", rows


def take_rows(fused: torch.Tensor, rows: int, which: str) -> torch.Tensor:
    """`rows` rows of `fused`: the first, the last, the middle block of a [a | b | b] layout
    (k between q and v), or all of them. (SwiGLU's gate is the last half; under GELU the
    fused `up` is w1 whole, which "last" also gives.)"""
    n = fused.shape[0]
    if which == "first":
        return fused[:rows]
    if which == "middle":
        return fused[n - 2 * rows: n - rows]
    if which == "last":
        return fused[n - rows:]
    return fused
