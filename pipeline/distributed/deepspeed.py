"""DeepSpeed ZeRO stages 0-3, with optional CPU offload of optimizer state and parameters.

`deepspeed.initialize` runs inside the worker, over the process group Ray Train already set
up. We hand DeepSpeed a torch optimizer rather than an `optimizer` block: the block would
JIT-compile DeepSpeed's fused Adam (minutes, and a C++ toolchain on every worker). Mixed
precision is DeepSpeed's own (bf16 with fp32 master weights; fp16 with dynamic loss scaling),
configured from `precision.dtype`; gradient accumulation and clipping are DeepSpeed's too,
configured from the trainer settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.distributed.base import OptimizerFactory, Strategy

TAG = "deepspeed"  # checkpoint sub-directory: <checkpoint>/deepspeed/{mp_rank_00_model_states.pt, *optim_states.pt}


CPU_FP16_ERROR = ("precision.dtype: DeepSpeed's fp16 on CPU needs a CPU with AVX512-FP16 (oneDNN fp16), "
                  "which this one lacks; use bf16 or fp32, or train on GPUs")


def cpu_fp16_supported() -> bool:
    """What DeepSpeed's CPU accelerator checks before it accepts an fp16 config."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def ds_config(self, num_params: int) -> dict[str, Any]:
        c, s, dtype = self.cfg, self.settings, self.precision.name
        # DeepSpeed's default communication buckets hold 5e8 elements (2 GB in fp32), sized for
        # billion-parameter models; a bucket never needs to be larger than a fraction of the model.
        bucket = c.bucket_elements or int(min(5e8, max(2**20, num_params // 50)))
        zero: dict[str, Any] = {"stage": c.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if c.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = bucket
        pin = self.device.type == "cuda"
        if c.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if c.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        return {
            "train_micro_batch_size_per_gpu": s.micro_batch_size,
            "gradient_accumulation_steps": s.grad_accum_steps,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,  # offload steps our torch optimizer on the CPU
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import deepspeed

        if self.precision.name == "fp16" and self.device.type == "cpu" and not cpu_fp16_supported():
            raise ValueError(CPU_FP16_ERROR)
        model = self.materialize(model)
        optimizer = make_optimizer(model)
        config = self.ds_config(sum(p.numel() for p in model.parameters()))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine = self.model = engine
        self.optimizer = optimizer  # ZeRO steps this optimizer over its partitions: the loop sets its lr

    @property
    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def describe(self) -> str:
        c = self.cfg
        offload = [what for what, on in (("optimizer", c.offload_optimizer), ("params", c.offload_params)) if on]
        return f"deepspeed ZeRO-{c.zero_stage}" + (f" (CPU offload: {', '.join(offload)})" if offload else "")

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def clip_and_step(self, max_norm: float) -> tuple[float, bool]:
        self.engine.step()  # clips (config gradient_clipping), unscales, steps, zeroes gradients
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        return norm, bool(self.engine.was_step_applied())

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, client_state={"extra": extra}, save_latest=False)

    def load(self, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory / TAG}")
        return client.get("extra", {})

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights: DeepSpeed's fp32 master copy where it keeps one (ZeRO 1-3, bf16, fp16),
        gathered from every rank's partition (a collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        full = {}
        for p in module.parameters():
            value = safe_get_full_fp32_param(p)
            full[id(p)] = (value if value is not None else p.detach()).float().cpu()
        # clone per key: tied weights share storage, which safetensors refuses
        return {k: (full[id(v)] if id(v) in full else v.detach().float().cpu()).clone()
                for k, v in module.state_dict(keep_vars=True).items()}


def consolidate_checkpoint(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a merged DeepSpeed checkpoint (every rank's ZeRO partition files
    in one place), offline and without a process group: DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)
    return {k: v.float().clone() for k, v in state.items()}
