"""Model FLOPs utilisation (MFU): the model's training FLOP rate over the dense peak of the
devices it runs on, in the precision in use.

The peak comes from, in order: `trainer.peak_tflops` (config); on CUDA, a table of published
dense (no 2:4 sparsity) tensor-core peaks keyed by substrings of `torch.cuda.get_device_name`
(most specific first: "H100 PCIe" before "H100", "A100" before "A10"); on CPU, a GEMM of the
precision's dtype measured once per process (about a quarter of a second, best of several
runs, so that a moment of contention does not lower the peak). A CPU shared with other work
can still be busy for the whole measurement; when the model then runs faster than the peak
(MFU above 1), the GEMM is measured again and the faster figure kept (`Peak.beaten_by`). An fp32 run whose matmuls are
allowed TF32 (`torch.set_float32_matmul_precision("high")`) is measured against the TF32 peak,
an fp8 run against the fp8 peak (its attention and the other layers run bf16, so it cannot
reach it). A GPU missing from the table and without `trainer.peak_tflops` gets no MFU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense tensor-core TFLOP/s per GPU from NVIDIA's data sheets (sparsity figures halved).
# A10G: NVIDIA publishes no sheet for AWS's variant; the A10's figures.
_HOPPER_SXM = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}
_AMPERE_A100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", _HOPPER_SXM),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}),
    ("H200", _HOPPER_SXM),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}),
    ("H100", _HOPPER_SXM),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", _HOPPER_SXM),
    ("H20", {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0, "fp8": 296.0}),
    ("B200", {"fp32": 75.0, "tf32": 1125.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0}),
    ("A100", _AMPERE_A100),  # 40 GB and 80 GB, SXM and PCIe: the same compute
    ("A800", _AMPERE_A100),
    ("A10G", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0, "fp8": 733.0}),
    ("L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0, "fp8": 362.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.0}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),
    ("T4", {"fp32": 8.1, "fp16": 65.0}),
]

CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Peak:
    """The denominator of MFU for one device, and where it came from (logged once, recorded
    with the run)."""

    tflops: float
    source: str
    measured: torch.dtype | None = None  # the dtype of a GEMM measured here (CPU), None for a known peak

    def describe(self) -> str:
        return f"{self.tflops:.4g} TFLOP/s per device ({self.source})"

    def beaten_by(self, tflops_per_device: float) -> Peak:
        """This peak, or, when a device ran the model faster than it and the peak was measured
        here, the peak measured again (the faster of both): the first measurement ran while
        something else used the CPU. A known peak is kept, whatever a device reports; so is a
        measured one that measuring again did not raise (and it is not measured a third time)."""
        if self.measured is None or tflops_per_device <= self.tflops:
            return self
        again = measured_cpu_tflops(self.measured, fresh=True)
        if again <= self.tflops:
            return Peak(self.tflops, self.source, None)
        return Peak(again, self.source + ", measured again", self.measured)


def precision_key(precision: str, device: torch.device) -> str:
    """The column of the table a run uses: its precision, or tf32 for fp32 with TF32 matmuls."""
    if precision == "fp32" and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision


def table_peak(device_name: str, key: str) -> float | None:
    """The dense peak of a GPU (by its CUDA name) in one precision, or None when unknown."""
    name = device_name.upper()
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.upper() in name:
            return peaks.get(key)
    return None


_measured: dict[tuple[torch.dtype, int], float] = {}


def measured_cpu_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, budget_s: float = 0.25,
                        fresh: bool = False) -> float:
    """TFLOP/s of a size x size GEMM in `dtype` on this process's CPU threads: the fastest of
    at least 3 runs within about `budget_s` seconds. Measured once per (dtype, thread count);
    `fresh` measures again and keeps the faster figure."""
    key = (dtype, torch.get_num_threads())
    if key not in _measured or fresh:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up: thread pool, packing buffers
        best, runs, start = float("inf"), 0, time.perf_counter()
        while runs < 3 or (runs < 20 and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
            runs += 1
        _measured[key] = max(2.0 * size**3 / best / 1e12, _measured.get(key, 0.0))
    return _measured[key]


def device_peak(device: torch.device, precision: str, override: float | None = None) -> Peak | None:
    """The peak MFU is measured against, for one device of the run (None: unknown)."""
    if override is not None:
        return Peak(float(override), "trainer.peak_tflops")
    key = precision_key(precision, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = table_peak(name, key)
        return Peak(value, f"{name}, {key} dense, from the table") if value else None
    if device.type == "cpu" and precision in CPU_DTYPES:
        tflops = measured_cpu_tflops(CPU_DTYPES[precision])
        return Peak(tflops, f"CPU {key} GEMM measured on {torch.get_num_threads()} threads", CPU_DTYPES[precision])
    return None


def mfu(model_tflops: float, peak: Peak, devices: int) -> float:
    """Model FLOPs utilisation of `devices` devices together delivering `model_tflops`."""
    return model_tflops / (peak.tflops * devices)
