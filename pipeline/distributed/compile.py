"""torch.compile applied from outside the model (torchtitan's way), as `trainer.compile` asks.

`blocks` compiles each repeated block (`units.repeated_blocks`: whatever sits in the block
slots, so an activation-checkpointing wrapper is compiled with its block and the recomputation
is part of the graph). The blocks of a model share one code object, and with
`inline_inbuilt_nn_modules` (torch's default) their parameters are graph inputs, so every block
runs the same compiled graph: compile time does not grow with depth. `model` compiles the root
module whole.

Strategies call this after activation checkpointing and after any tensor-parallel split, before
data-parallel wrapping or sharding (torchtitan's order). Compilation is in place
(`nn.Module.compile`): the module keeps its class and its state-dict keys (no `_orig_mod.`), so
checkpoints and exported weights do not depend on this setting.

Compilation is lazy (the forward graphs on the first forward, the backward ones on the first
backward), so its cost is measured as the first training step: from the first call of a
compiled module to the optimizer's first step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed.units import repeated_blocks


class CompileTimer:
    """Times the first step of a compiled model and reports it once (`compile_s`)."""

    def __init__(self, count: int, mode: str, optimizer: Callable[[], torch.optim.Optimizer | None]) -> None:
        self.count, self.mode, self._optimizer = count, mode, optimizer
        self.start: float | None = None
        self.seconds: float | None = None
        self._reported = False
        self._hook: Any = None

    def wrap(self, module: nn.Module) -> None:
        """Note the first call of a compiled module (outside the compiled code, so the graph and
        its guards stay the same)."""
        compiled = module._compiled_call_impl

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._hook is None and self.seconds is None:
                self._start()
            return compiled(*args, **kwargs)

        module._compiled_call_impl = call

    def _start(self) -> None:
        """The first call once the optimizer exists (the strategy's setup has finished)."""
        optimizer = self._optimizer()
        if optimizer is not None:
            self.start = time.perf_counter()
            self._hook = optimizer.register_step_pre_hook(self._first_step)

    def _first_step(self, *_: Any) -> None:
        assert self.start is not None
        self.seconds = time.perf_counter() - self.start
        self._hook.remove()  # (`seconds` keeps `call` from starting again)
        if _rank() == 0:
            what = f"{self.count} block{'s' * (self.count != 1)}" if self.mode == "blocks" else "the model"
            print(f"torch.compile: compiled {what} in {self.seconds:.1f} s (the first step, compilation "
                  "included)", flush=True)

    def metrics(self) -> dict[str, float]:
        """`compile_s` once, as soon as the first step has been timed; then nothing."""
        if self.seconds is None or self._reported:
            return {}
        self._reported = True
        return {"compile_s": round(self.seconds, 3)}


def _rank() -> int:
    """This process's rank: torch.distributed's, or Horovod's (which starts no torch group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("HOROVOD_RANK", "0"))


def compile_targets(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules `mode` (trainer.compile: none, blocks, model) compiles, in forward order; the
    memory planner compiles the same ones."""
    if mode == "none":
        return []
    targets = repeated_blocks(model) if mode == "blocks" else [model]
    if not targets:
        raise ValueError("trainer.compile=blocks: this model has no repeated blocks (use compile=model)")
    return targets


def apply_compile(model: nn.Module, mode: str,
                  optimizer: Callable[[], torch.optim.Optimizer | None] = lambda: None) -> CompileTimer | None:
    """Compile in place, as `mode` (trainer.compile: none, blocks, model) asks; `optimizer` gives
    the optimizer once it exists (the end of the timed first step). Returns the timer (None
    for none)."""
    targets = compile_targets(model, mode)
    if not targets:
        return None
    timer = CompileTimer(len(targets), mode, optimizer)
    for module in targets:
        module.compile()
        timer.wrap(module)
    return timer


def check_compiler(cfg: Any, use_gpu: bool) -> None:
    """On the driver, before any Ray resource is taken: a task with trainer.compile needs what
    inductor generates code with, a C++ compiler on CPU (`CXX`, else g++) or Triton on GPUs.
    `cfg` is the PipelineConfig."""
    import importlib.util
    import shutil

    for name, task in cfg.tasks.items():
        mode = task.trainer.compile
        if mode == "none":
            continue
        if use_gpu and importlib.util.find_spec("triton") is None:
            raise ValueError(f"tasks.{name}.trainer.compile={mode}: torch.compile on GPUs needs Triton, which "
                             "does not import here; install it, or use trainer.compile=none")
        cxx = os.environ.get("CXX", "g++")
        if not use_gpu and shutil.which(cxx) is None:
            raise ValueError(f"tasks.{name}.trainer.compile={mode}: torch.compile on CPU builds C++ kernels, and "
                             f"{cxx} is not on PATH; install g++ (or set CXX), or use trainer.compile=none")
