"""Parallelism backends behind one `Strategy` interface, chosen by `strategy.name`."""

from __future__ import annotations

import importlib

import torch

from pipeline.distributed.base import StepSettings, Strategy
from pipeline.distributed.compile import check_compiler
from pipeline.distributed.precision import Precision, check_fp8

# name -> "module:Class", imported on use: DeepSpeed and Horovod are heavy and optional at import time.
STRATEGIES: dict[str, str] = {
    "ddp": "pipeline.distributed.ddp:DDPStrategy",
    "fsdp": "pipeline.distributed.fsdp:FSDPStrategy",
    "deepspeed": "pipeline.distributed.deepspeed:DeepSpeedStrategy",
    "horovod": "pipeline.distributed.horovod:HorovodStrategy",
}

# Config overrides naming each backend variant, for tests, benchmarks and sweeps over strategies.
VARIANTS: dict[str, list[str]] = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero0": ["strategy.name=deepspeed", "strategy.zero_stage=0"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "zero3_offload": ["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true",
                      "strategy.offload_params=true"],
    "horovod": ["strategy.name=horovod", "strategy.backend=gloo"],
}

# Model-parallel layouts (data parallelism over the remaining ranks, by the strategy named);
# tests/test_model_parallel.py proves each against DDP.
LAYOUT_VARIANTS: dict[str, list[str]] = {
    "tp2": ["strategy.name=ddp", "parallel.tp=2"],
    "pp2": ["strategy.name=ddp", "parallel.pp=2"],
    "fsdp_tp2": ["strategy.name=fsdp", "parallel.tp=2"],
    "fsdp_pp2": ["strategy.name=fsdp", "parallel.pp=2"],
}


def build_strategy(cfg, precision: Precision, device: torch.device, settings: StepSettings,
                   parallel=None) -> Strategy:
    """`cfg` is the strategy's own config model (DDPConfig, FSDPConfig, DeepSpeedConfig, HorovodConfig);
    `parallel` the ParallelConfig: with tensor or pipeline parallelism (tp or pp > 1) the mesh
    strategy runs, the named strategy (ddp or fsdp) being its data-parallel part. The config
    checked both: a known name, and tp/pp only with ddp or fsdp (`pipeline.config.parallel`)."""
    if parallel is not None and parallel.tp * parallel.pp > 1:
        from pipeline.distributed.mesh_strategy import MeshStrategy

        return MeshStrategy(cfg, precision, device, settings, parallel)
    module, cls = STRATEGIES[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, precision, device, settings)


def preflight(cfg, use_gpu: bool) -> None:
    """Checks on the driver, before any Ray resource is taken, that the chosen backend can run:
    its package imports, and the precision is one it supports on this hardware. (The kernels
    the optimizer and norms ask for: `pipeline.training.optim.check_kernels`.)"""
    import importlib.util

    name = cfg.strategy.name
    if name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("strategy.name: 'deepspeed' needs the deepspeed package (pip install deepspeed)")
        from pipeline.distributed.deepspeed import CPU_FP16_ERROR, cpu_fp16_supported

        if cfg.precision.dtype == "fp16" and not use_gpu and not cpu_fp16_supported():
            raise ValueError(CPU_FP16_ERROR)
    if name == "horovod" and importlib.util.find_spec("horovod") is None:
        raise ValueError("strategy.name: 'horovod' needs Horovod built for this torch: run `make horovod` "
                         "(scripts/build_horovod.sh, about 4 minutes once)")
    check_fp8(cfg, use_gpu)  # precision.dtype fp8: torchao, a GPU with float8 tensor cores, ddp or fsdp
    check_compiler(cfg, use_gpu)  # trainer.compile: inductor's C++ compiler (CPU) or Triton (GPU)


def trains_on_local_ray(cluster) -> bool:
    """Whether training would run on the embedded local Ray (`pipeline.runtime.connect`): this
    process is connected to the local Ray it started, or is not connected and no cluster address
    (RAY_ADDRESS, `cluster.address`) is named."""
    import ray

    from pipeline.runtime.connect import cluster_address, embedded

    if ray.is_initialized():
        return embedded()
    return not cluster_address(cluster)


def check_gpu_host(cfg) -> None:
    """`cluster.use_gpu=true` where training would run on the local Ray of a machine without a
    CUDA device: Ray would wait for a GPU node for ever (its 'No available node types can fulfill
    resource request {GPU: 1}', the worker group's startup timing out again and again). One line,
    on the driver, before any Ray resource or MLflow run."""
    if not cfg.cluster.use_gpu or not trains_on_local_ray(cfg.cluster):
        return
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (", a CPU-only build" if torch.version.cuda is None
                                               else f", built for CUDA {torch.version.cuda}, sees none")
        raise ValueError(f"cluster.use_gpu=true, but this machine has no CUDA device ({build}) and training would "
                         "run on the local Ray; set cluster.use_gpu=false or point RAY_ADDRESS at a GPU cluster")
    # one GPU a worker: the local Ray waits for ever for GPUs this machine does not have (an elastic
    # run starts with its fewest)
    fewest = cfg.cluster.min_workers or cfg.cluster.num_workers
    if (gpus := torch.cuda.device_count()) < fewest:
        what = "cluster.min_workers" if cfg.cluster.min_workers else "cluster.num_workers"
        raise ValueError(f"{what}={fewest} with cluster.use_gpu=true needs a GPU per worker, and this machine has "
                         f"{gpus}; training would run on the local Ray and wait for the others for ever: set {what} "
                         f"to at most {gpus} (with parallel.tp/pp to fit the model), or point RAY_ADDRESS at a cluster")


def gpu_cluster_warning(cfg) -> str | None:
    """After connecting to an existing cluster with `cluster.use_gpu=true`: a line when the
    cluster has no GPU at all right now (an autoscaler may still add GPU nodes, so it is not
    refused), else None."""
    if not cfg.cluster.use_gpu or trains_on_local_ray(cfg.cluster):
        return None
    import ray

    try:
        gpus = ray.cluster_resources().get("GPU", 0)
    except Exception:  # (a cluster that cannot say: nothing to warn about)
        return None
    if gpus:
        return None
    return ("cluster.use_gpu=true, but the Ray cluster has no GPU now: the workers wait until an autoscaler adds "
            "GPU nodes (none will come on a fixed cluster: stop the run and set cluster.use_gpu=false)")


def process_group_backend(cfg, use_gpu: bool) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if use_gpu else "gloo"


__all__ = ["LAYOUT_VARIANTS", "STRATEGIES", "VARIANTS", "StepSettings", "Strategy", "build_strategy",
           "check_gpu_host", "gpu_cluster_warning", "preflight", "process_group_backend", "trains_on_local_ray"]
