"""What CUDA's kernels allocate and keep where the CPU's differ, for a trace on CPU tensors.

The planner traces a step on fake CPU tensors (`trace.py`), so it sees the CPU's kernels. For
most operators that is what CUDA allocates too. Where it is not, `cuda_kernels()` patches the
functions the models call for the trace's duration:

* **Attention.** CUDA's flash kernel saves an RNG state, not a dropout mask, while the CPU falls
  back to the math path (the T x T matrix saved) under attention dropout: the trace runs
  attention without dropout.

The norms differ by an activation-sized tensor per norm:

* **Autocast.** CUDA's autocast runs `layer_norm`, `rms_norm` and `group_norm` in fp32 (the
  `AT_FORALL_FP32` list of ATen's `autocast_mode.h`); the CPU's leaves them in the input's
  dtype. On CUDA a bf16 input is copied to fp32 first (the kernel saves that copy) and the
  output is fp32.
* **The fused RMSNorm.** On CUDA `torch.rms_norm` is one kernel (`_fused_rms_norm`, torch 2.8
  and later, when input and weight share a dtype) that saves its input and each row's rstd.
  On CPU it is composed of elementwise operators whose backward keeps an fp32 copy of the
  normalised input as well.

Found on the H200's 1B row (bf16, micro-batch 18, eager): the CPU-composite trace planned
135.7 GiB against 122.1 GiB measured, two fp32 activations per block too many; with the fused
stand-in it plans 121.9 (`tests/test_planner.py::test_planner_matches_the_h200s_eager_and_compiled_1b_peaks`).

Under `cuda_kernels(eager=True)` the norms cast as CUDA's autocast does, and `rms_norm` runs a
stand-in with the fused kernel's outputs and saved tensors (its values are never read: the
trace's tensors are fake). Only for eager steps: inductor decomposes the norms of compiled code
into its own kernels on either device, which the compiled trace already models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def has_fused_rms_norm() -> bool:
    """Whether this torch has the fused RMSNorm kernel CUDA runs (torch 2.8 and later)."""
    return hasattr(torch.ops.aten, "_fused_rms_norm")


class _FusedRMSNorm(torch.autograd.Function):
    """`_fused_rms_norm` as the trace sees it: forward allocates the output and a per-row rstd
    (fp32, as the kernel's accumulation type) and saves input, weight and rstd; backward
    allocates the input's and the weight's gradients. Values are not computed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, dims: int) -> torch.Tensor:
        out = torch.empty_like(x)
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        rstd = x.new_empty((*x.shape[: x.dim() - dims], *([1] * dims)), dtype=stat)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, _rstd = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _fp32_under_autocast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` under CUDA autocast's fp32 policy (the trace's CPU autocast stands for CUDA's): a
    floating argument in the autocast dtype becomes an fp32 copy first (recorded by autograd,
    so backward casts the gradient back), and so the output is fp32."""

    def cast(*args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            low = torch.get_autocast_dtype("cpu")
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == low else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == low else v
                      for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return cast


def _fused_or_composite(composite: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """torch.rms_norm as CUDA dispatches it: the fused kernel when input and weight share a
    dtype, else the composite (torch warns "Cannot dispatch to fused implementation")."""

    def rms_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                 eps: float | None = None) -> torch.Tensor:
        if weight is not None and weight.dtype != x.dtype:
            return composite(x, normalized_shape, weight, eps)
        return _FusedRMSNorm.apply(x, weight, len(normalized_shape))

    return rms_norm


def _without_dropout(sdpa: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`scaled_dot_product_attention` with `dropout_p` 0, however it was passed."""

    def attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        elif "dropout_p" in kwargs:
            kwargs["dropout_p"] = 0.0
        return sdpa(*args, **kwargs)

    return attention


@contextlib.contextmanager
def cuda_kernels(eager: bool) -> Iterator[None]:
    """A CUDA step's kernels on the trace's CPU tensors: attention without dropout always; for an
    eager step also `F.layer_norm`, `F.group_norm` and `F.rms_norm` (what `nn.LayerNorm`,
    `nn.GroupNorm` and `nn.RMSNorm` call) cast as CUDA's autocast casts them, and RMSNorm fused
    where this torch has the fused kernel. Patched on `torch.nn.functional` for the trace's
    duration (forward and backward: a checkpointed block's recompute must see the same functions)."""
    names = ["scaled_dot_product_attention", *(["layer_norm", "group_norm", "rms_norm"] if eager else [])]
    originals = {name: getattr(F, name) for name in names}
    F.scaled_dot_product_attention = _without_dropout(originals["scaled_dot_product_attention"])
    if eager:
        rms = _fused_or_composite(originals["rms_norm"]) if has_fused_rms_norm() else originals["rms_norm"]
        F.layer_norm = _fp32_under_autocast(originals["layer_norm"])
        F.group_norm = _fp32_under_autocast(originals["group_norm"])
        F.rms_norm = _fp32_under_autocast(rms)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


@contextlib.contextmanager
def cuda_autocast_flags(dtype: torch.dtype) -> Iterator[None]:
    """CUDA's autocast flags set as the trace's CPU autocast stands for them: torchao's
    Float8Linear reads CUDA's state alone (`torch.is_autocast_enabled()`, then casts its input to
    CUDA's autocast dtype and saves that copy for backward). Set for the whole forward and
    backward, since a checkpointed block's recomputation runs under the forward's CUDA autocast
    state on a GPU. Thread-local flags: no CUDA is needed, and CPU tensors dispatch to the CPU's
    autocast regardless."""
    enabled, before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", before)
