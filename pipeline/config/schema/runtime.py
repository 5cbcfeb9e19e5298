"""Where and how training runs: cluster, parallel strategies, model parallelism, precision,
experiment tracking."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.schema.fields import (
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Strict,
)


class ClusterConfig(Strict):
    """Where Ray Train runs. RAY_ADDRESS in the environment overrides `address`."""

    address: str | None = None
    num_workers: PositiveInt = 2
    # Elastic training: the fewest workers a run goes on with. None = exactly num_workers. When
    # set, Ray Train starts with as many workers as the cluster has room for (up to num_workers,
    # at least min_workers); a lost node restarts the run from its last checkpoint on the workers
    # that remain, and a later restart grows back. The global batch stays trainer.global_batch_size
    # at every count (the micro-batch adjusts), so it must divide evenly at each one.
    min_workers: PositiveInt | None = None
    # Elastic runs only: how often (seconds) Ray Train looks for room to grow back towards
    # num_workers while training. Growing restarts the workers from the last checkpoint, so the
    # default (Ray's) is a minute; a shorter check regains a returned node sooner.
    resize_check_s: PositiveFloat = 60.0
    cpus_per_worker: PositiveFloat = 1.0
    use_gpu: bool = False
    storage_path: str = "runs/ray"
    # Where workers read shards: None = the shard stage's local output (one node or a shared
    # file system); a URL (s3://bucket/prefix) = the train stage publishes the shards there
    # (content-addressed by manifest) and every node caches and verifies them locally.
    shards_uri: str | None = None
    max_failures: NonNegInt = 2
    # How many times Ray Train may try to start the worker group before the run fails: a worker
    # that dies starting (a node that cannot import the code, an OOM kill at import) or a start
    # that finds no room for the workers in 60 s (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    # counts one. Ray's own default retries for ever: a broken node kept a run starting workers on
    # it, never failing. Raise it where an autoscaler takes long to add nodes.
    start_attempts: PositiveInt = 30
    # How long the train stage waits for a cluster named by `address` / RAY_ADDRESS to answer
    # before it stops with one line (before any MLflow run is opened).
    connect_timeout_s: PositiveFloat = 30.0
    # Memory of one device (GPU; on a CPU-only cluster, the memory one worker may use): "80GiB" or
    # bytes. When set, the train stage asks the memory planner first and refuses a config whose
    # per-rank peak does not fit (`python -m pipeline plan <task>` prints the breakdown).
    device_memory: int | str | None = None
    # The CUDA caching allocator's settings for GPU workers (PYTORCH_CUDA_ALLOC_CONF, unless the
    # environment sets it). Expandable segments grow one mapping instead of caching blocks of
    # fixed sizes, so a step that fills the device (the planner's largest micro-batch) is not
    # refused for fragmentation; torchtitan runs with the same. "" leaves torch's default.
    cuda_alloc_conf: str = "expandable_segments:True"

    @field_validator("device_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        """Checked before the type (an infinite or fractional number is the size's own one-line
        error, not the int-or-string union's two); kept as written (params.yaml round-trips), the
        planner parses it again."""
        from pipeline.config.sizes import parse_size

        if value is not None:
            parse_size(value)
        return value


Backend = Literal["auto", "gloo", "nccl"]  # auto = nccl on GPU, gloo on CPU


class DDPConfig(Strict):
    """torch DistributedDataParallel: every rank holds the whole model, gradients are all-reduced."""

    name: Literal["ddp"] = "ddp"
    backend: Backend = "auto"


class FSDPConfig(Strict):
    """torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded per block."""

    name: Literal["fsdp"] = "fsdp"
    backend: Backend = "auto"
    reshard_after_forward: bool = True  # False keeps gathered block weights until backward (ZeRO-2-like)


class DeepSpeedConfig(Strict):
    """DeepSpeed ZeRO: 0 = data parallel, 1 = optimizer state, 2 = + gradients, 3 = + parameters sharded."""

    name: Literal["deepspeed"] = "deepspeed"
    backend: Backend = "auto"
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 2
    offload_optimizer: bool = False  # optimizer state and step on the CPU (stage 1-3)
    offload_params: bool = False  # parameters on the CPU between uses (stage 3)
    bucket_elements: NonNegInt = 0  # reduce/all-gather/prefetch bucket size; 0 = auto (params / 50, 1M to 5e8)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class HorovodConfig(Strict):
    """Horovod ring all-reduce (gloo), run on Ray through `horovod.ray.RayExecutor`."""

    name: Literal["horovod"] = "horovod"
    backend: Literal["gloo"] = "gloo"


StrategyConfig = Annotated[DDPConfig | FSDPConfig | DeepSpeedConfig | HorovodConfig, Field(discriminator="name")]


class ParallelConfig(Strict):
    """Model parallelism on a device mesh: `cluster.num_workers` = dp x tp x pp, data parallelism
    (the `strategy`: ddp replicates, fsdp shards) taking the ranks tensor and pipeline
    parallelism leave. Gradient-accumulation micro-batches are the pipeline's micro-batches."""

    tp: PositiveInt = 1  # tensor-parallel degree: each block's projections split over this many ranks
    pp: PositiveInt = 1  # pipeline stages: the block stack cut into this many consecutive parts
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"


class PrecisionConfig(Strict):
    # fp8: torchao float8 training of the blocks' large Linear layers, bf16 elsewhere (GPUs of
    # compute capability 8.9+; refused before training elsewhere, unless emulated)
    dtype: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"
    # fp8 only: torchao's emulation (the same float8 casts and scales, each GEMM run in bf16 on
    # the dequantised operands), on any device, CPUs included. For checking an fp8 run's numerics,
    # checkpoints and layouts without float8 hardware; never faster than bf16.
    fp8_emulate: bool = False
    # fp8 under FSDP2 (strategy fsdp; with tp or pp, over more than one dp rank): the
    # converted layers' weights are all-gathered in float8 (half of bf16's bytes), their scales
    # computed for all layers in one all-reduce whenever the weights change (torchtitan's
    # enable_fsdp_float8_all_gather with precompute_float8_dynamic_scale_for_fsdp).
    fp8_all_gather: bool = True

    @model_validator(mode="after")
    def _emulate_needs_fp8(self) -> PrecisionConfig:
        if self.fp8_emulate and self.dtype != "fp8":
            raise ValueError(f"precision.fp8_emulate=true needs precision.dtype=fp8 (got {self.dtype})")
        return self


class TrackingConfig(Strict):
    """Where MLflow runs go. MLFLOW_TRACKING_URI in the environment overrides `uri`."""

    uri: str = "sqlite:///mlruns.db"
    artifact_dir: str = "mlartifacts"
    experiment: str = "pipeline"
    # How long the train stage waits for a tracking server (http[s]://) to answer its health
    # check before it stops with one line; raise it for slow links.
    connect_timeout_s: PositiveFloat = 20.0

    @field_validator("experiment")
    @classmethod
    def _named(cls, v: str) -> str:
        """MLflow refuses an empty experiment name, but only when the run starts (after Ray is up,
        and in words that blame the store)."""
        if not v.strip():
            raise ValueError("must not be empty (the MLflow experiment the runs go to)")
        return v
