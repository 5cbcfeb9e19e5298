"""Mixed precision as one object: the autocast context, loss scaling for fp16, float8 layers for
fp8, the optimizer step that skips non-finite gradients, and the precision's state.

The step never reads a value back from the device to decide whether to skip: the "found inf"
flag stays a device tensor and is handed to optimizers whose kernels take it (torch's fused
Adam, AdamW and SGD: `optim.impl` auto on CUDA, or fused), which then skip on the device, step
count included. Other optimizers cannot skip on the device, so for them the flag is read on
the host, once per step (`guarded_step`; under fp16, torch's GradScaler does the same).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.quiet import quiet_torchao_import

# precision.dtype -> the autocast dtype. fp8 computes the converted Linear layers' GEMMs in
# float8 (torchao) and everything else under bf16 autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have float8 tensor cores
FP8_STRATEGIES = ("ddp", "fsdp")


class Precision:
    """fp32: nothing. bf16: autocast, no scaling. fp16: autocast plus a dynamic GradScaler.
    fp8: bf16 autocast plus torchao float8 training of the blocks' Linear layers (`prepare`).
    The config admits only known names (`PrecisionConfig.dtype`)."""

    def __init__(self, dtype: str, device: torch.device, fp8_emulate: bool = False,
                 fp8_all_gather: bool = True) -> None:
        if dtype == "fp8" and not fp8_emulate:
            check_fp8_device(device)
        self.name, self.dtype, self.device = dtype, DTYPES[dtype], device
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
        self.fp8_emulate, self.fp8_all_gather = fp8_emulate, fp8_all_gather
        self._precompute_scales = False  # set by `prepare` when float8 weights are all-gathered

    def prepare(self, model: nn.Module, gathers_weights: bool = False) -> int:
        """Apply what the precision changes in the model itself, from outside it, before the
        strategy wraps it (on the meta device is fine): under fp8, swap the blocks' eligible
        Linear layers for torchao's Float8Linear. `gathers_weights`: the strategy all-gathers
        weights with FSDP2 before each use (`Strategy.gathers_weights`), so under
        `fp8_all_gather` they travel in float8. Returns how many layers were converted."""
        if self.name != "fp8":
            return 0
        self._precompute_scales = self.fp8_all_gather and gathers_weights
        return convert_to_fp8(model, emulate=self.fp8_emulate, all_gather=self._precompute_scales)

    @property
    def mfu_precision(self) -> str:
        """The precision whose dense peak MFU is taken against: emulated fp8 multiplies in bf16."""
        return "bf16" if self.name == "fp8" and self.fp8_emulate else self.name

    def describe(self, fp8_layers: int) -> str:
        """One line for the log and MLflow (`impl.precision`)."""
        if self.name != "fp8":
            return self.name
        how = ", emulated" if self.fp8_emulate else ""
        how += ", float8 all-gather" if self._precompute_scales else ""
        return f"fp8 ({fp8_layers} Float8Linear layers{how})"

    def refresh_fp8_scales(self, model: nn.Module) -> None:
        """Under float8 all-gather, whenever the weights change (the strategy's setup, a checkpoint
        load, each optimizer step): every converted weight's scale for the next forward, from one
        all-reduce of all their amaxes over the weight's whole mesh. Without it each layer's
        all-gather reduces its own amax over the dp ranks only, which under tensor parallelism
        is the amax of this tp rank's slice: every tp rank would cast with its own scale."""
        if self._precompute_scales:
            torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor | float) -> torch.Tensor:
        """Step the optimizer unless the gradient norm is not finite (or, under fp16, the scaler
        found inf/nan in the gradients). Returns whether it stepped, as a bool tensor on the
        device. Nothing is read back, unless the optimizer cannot skip on the device: then
        `guarded_step`, or under fp16 torch's GradScaler itself, reads the flag once."""
        found_inf = nonfinite_flag(norm)
        if self.scaler:
            _zero_dim_flags(self.scaler, optimizer)
            self.scaler.step(optimizer)  # skips by itself on inf/nan; on the device for fused optimizers
            scaler_found = _scaler_found_inf(self.scaler, optimizer, found_inf.device)
            self.scaler.update()
            return (found_inf == 0) & (scaler_found == 0)
        return guarded_step(optimizer, found_inf)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def nonfinite_flag(norm: torch.Tensor | float) -> torch.Tensor:
    """1.0 where the gradient norm is inf or nan, else 0.0: a 0-dim float32 tensor on the
    norm's device (the form torch's fused optimizers take as `found_inf`)."""
    if not isinstance(norm, torch.Tensor):
        norm = torch.tensor(float(norm))
    return (~torch.isfinite(norm.detach())).to(torch.float32).reshape(())


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step takes a `found_inf` tensor and skips on the device (torch's
    fused Adam, AdamW, SGD and Adagrad kernels: what GradScaler uses too)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and \
        "grad_scaler" not in _step_parameters(optimizer)


def _step_parameters(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(optimizer.step).parameters)
    except (TypeError, ValueError):
        return ()


def guarded_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> torch.Tensor:
    """`optimizer.step()` unless `found_inf` is nonzero; returns `found_inf == 0` (on the device).

    Optimizers that skip on the device are handed the flag, as GradScaler hands it to them (the
    fused kernels then leave parameters, moments and the step count as they were). Any other
    optimizer (foreach or for-loop torch kernels, RMSprop, Apex FusedAdam, Horovod's wrapper)
    must be told on the host: the flag is read here, the step's one read of the device."""
    if skips_on_device(optimizer):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not found_inf.item():
        optimizer.step()
    return found_inf == 0


def _zero_dim_flags(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """FSDP's ShardedGradScaler keeps its found-inf flags 1-d, which torch's fused optimizers
    cannot subtract from their 0-d step counts ("output with shape [] doesn't match the
    broadcast shape [1]"): make them 0-d views, as GradScaler's own are."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    if state and state.get("found_inf_per_device"):
        state["found_inf_per_device"] = {k: v.reshape(()) for k, v in state["found_inf_per_device"].items()}


def _scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                      device: torch.device) -> torch.Tensor:
    """The scaler's own inf/nan flag for this step (summed over devices), read before `update()`
    clears it."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for flag in scaler._found_inf_per_device(optimizer).values():
        total = total + flag.to(device, non_blocking=True).reshape(())  # (the sharded scaler's are 1-d)
    return total


# ----------------------------------------------------------------------------- fp8
FP8_DEVICE_ERROR = ("precision.dtype: fp8 needs a GPU with float8 tensor cores (compute capability 8.9 or "
                    "newer: Ada, Hopper, Blackwell); {what}. Use bf16, or precision.fp8_emulate=true to check "
                    "its numerics")


def fp8_unavailable(device: torch.device | None = None) -> str | None:
    """Why float8 training cannot run on `device` (None: CUDA device 0 of this process), or
    None when it can."""
    if device is not None and device.type != "cuda":
        return FP8_DEVICE_ERROR.format(what=f"this run trains on {device.type.upper()}")
    if not torch.cuda.is_available():
        return FP8_DEVICE_ERROR.format(what="this machine has no CUDA device")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return FP8_DEVICE_ERROR.format(what=f"{name} has compute capability {capability[0]}.{capability[1]}")
    return None


def check_fp8_device(device: torch.device) -> None:
    if (why := fp8_unavailable(device)) is not None:
        raise ValueError(why)


def check_fp8_config(cfg: Any, use_gpu: bool) -> None:
    """What the config alone decides about fp8 (`pipeline validate` asks this much; the driver
    also checks torchao and the GPU it runs on): a strategy it is wired into, and GPUs to run on
    unless emulated."""
    if cfg.precision.dtype != "fp8":
        return
    if cfg.strategy.name not in FP8_STRATEGIES:
        raise ValueError(f"precision.dtype: fp8 runs with strategy ddp or fsdp (got {cfg.strategy.name})")
    if not use_gpu and not cfg.precision.fp8_emulate:
        raise ValueError(FP8_DEVICE_ERROR.format(what="this run trains on CPUs (cluster.use_gpu is false)"))


def fp8_layers_warning(cfg: Any, task_name: str) -> str | None:
    """Under fp8, a line when the model the task's config builds (on the meta device, no weights)
    has no Linear layer `fp8_module_filter` converts: its "fp8" run trains in bf16 (the small
    presets, whose block layers are all below torchao's size). A warning, not a refusal: precision
    is one setting for every task, and another task of the chain may convert plenty."""
    if cfg.precision.dtype != "fp8":
        return None
    from pipeline.distributed.planner.trace import spec_for_planning
    from pipeline.tasks import task_for_data

    tcfg = cfg.task(task_name)
    with torch.device("meta"):
        model = task_for_data(tcfg.data.kind).build(spec_for_planning(tcfg))
    keep = fp8_module_filter(model)
    if any(keep(m, name) for name, m in model.named_modules()):
        return None
    larger = "gpt_125m or larger" if tcfg.data.kind == "text" else "a wider model"
    return (f"tasks.{task_name}: precision.dtype=fp8 converts no layer of this model, so it trains in bf16: float8 "
            "runs the Linear layers inside its blocks whose dimensions are multiples of 16 and which are not small "
            f"(in_features > 4096 or out_features > 1024, where float8 pays); use {larger} for float8")


def check_fp8(cfg: Any, use_gpu: bool) -> None:
    """The driver's check before any Ray resource (`pipeline.distributed.preflight` calls it):
    precision.dtype fp8 needs torchao, a strategy it is wired into (ddp or fsdp, with or without tp and pp), and
    float8 hardware. Without a local GPU on a GPU cluster the hardware is checked by the
    workers (same message)."""
    if cfg.precision.dtype != "fp8":
        return
    import importlib.util

    check_fp8_config(cfg, use_gpu)
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("precision.dtype: fp8 needs torchao (pip install torchao, or the project's [gpu] extra)")
    if use_gpu and not cfg.precision.fp8_emulate and torch.cuda.is_available() and (why := fp8_unavailable()):
        raise ValueError(why)


def fp8_module_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """Which Linear layers fp8 converts: those inside the model's repeated blocks whose both
    dimensions are multiples of 16 (float8 GEMMs need it) and which are not small. "Small" is
    torchao's measured heuristic for tensorwise scaling on H100: in_features <= 4096 and
    out_features <= 1024 run faster in bf16 (the cast and scale outweigh the faster GEMM).
    Embeddings, the output head and anything outside the blocks stay in bf16."""
    from pipeline.distributed.units import repeated_blocks

    blocks = {id(b) for b in repeated_blocks(model)}
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if id(m) in blocks)

    def keep_fp8(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or not fqn.startswith(prefixes):
            return False
        k, n = module.in_features, module.out_features
        if k % 16 or n % 16:
            return False
        return not (k <= 4096 and n <= 1024)

    return keep_fp8


def convert_to_fp8(model: nn.Module, emulate: bool = False, all_gather: bool = False) -> int:
    """Swap the filtered Linear layers for torchao's Float8Linear (tensorwise dynamic scaling),
    in place, on the meta device too (before sharding); the weights keep their tensors (with
    `all_gather`, each is wrapped in a new Parameter: convert before building the optimizer).
    `emulate`: torchao's emulated GEMM (any device); `all_gather`: the weights become torchao's
    float8-castable tensor, which FSDP2 all-gathers in float8."""
    float8 = torchao_float8()
    config = float8.Float8LinearConfig(emulate=emulate, enable_fsdp_float8_all_gather=all_gather)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=fp8_module_filter(model))
    return sum(isinstance(m, float8.float8_linear.Float8Linear) for m in model.modules())


def torchao_float8() -> Any:
    """`torchao.float8`, imported quietly: its harmless import warnings (CUDA kernel libraries
    that cannot load on a CPU-only build, torch's pytree deprecation of its Enums) are dropped by
    the filters of `pipeline.quiet`; on a CUDA build a kernel library that fails to load is still
    reported."""
    quiet_torchao_import()  # (installed by `import pipeline` already; here so this never depends on it)
    import torchao.float8

    return torchao.float8
