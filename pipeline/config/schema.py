"""Typed configuration for every stage.

Hydra composes `configs/` into `params.yaml`; these models validate that file before any
Ray resource is taken. Every model forbids unknown keys, so a misspelt key fails with its
full dotted path instead of being silently ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- data
class SplitConfig(Strict):
    """Fractions of examples per split; assignment is a stable hash of the example."""

    train: Fraction = 0.8
    val: Fraction = 0.1
    test: Fraction = 0.1

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        if self.val == 0 or self.test == 0 or self.train == 0:
            raise ValueError("every split needs a non-zero fraction")
        return self


class TextDataConfig(Strict):
    """A text corpus for the language model."""

    kind: Literal["text"] = "text"
    source: str = Field("builtin:python-docs", description="builtin:python-docs, a .txt/.md/.rst/.jsonl/.parquet "
                        "file or folder, or a Hugging Face `datasets` save_to_disk folder")
    text_field: str = "text"  # the text column of JSONL, Parquet and Hugging Face sources
    # Of .txt/.md/.rst/.jsonl files: "auto" reads UTF-8, repairs stray bytes, detects other encodings
    # and skips binary files (all counted in the data statistics); a codec name (cp1252) is used strictly.
    encoding: str = "auto"
    min_chars: NonNegInt = 20
    # Exact repeats are always dropped; "drop" also drops near-duplicates (MinHash LSH over word
    # 5-grams, about 0.7 Jaccard and up). It keeps 16 keys per kept document in memory (~1 KB each).
    near_duplicates: Literal["keep", "drop"] = "keep"
    split: SplitConfig = SplitConfig()
    vocab_size: Annotated[int, Field(ge=260)] = 2048
    tokenizer_max_chars: PositiveInt = 50_000_000  # larger training splits are sampled evenly to this size
    seq_len: PositiveInt = 128
    shard_rows: PositiveInt = 512
    shard_compression: Literal["none", "lz4", "zstd"] = "none"  # none: memory-mapped, no decoding
    ray: bool = False  # prepare (one task per file) and shard (tokenization) as Ray tasks, local or cluster

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        if v != "auto":
            try:
                "a".encode(v)  # a text codec (not base64 and the like)
            except LookupError:
                raise ValueError("not a text encoding Python knows (e.g. auto, utf-8, cp1252, latin-1)") from None
        return v


class AugmentConfig(Strict):
    """Label-preserving image augmentation (no flips: a flipped digit is another digit)."""

    copies: NonNegInt = 2
    rotate_deg: NonNegFloat = 10.0
    shift_px: NonNegFloat = 1.0
    noise_std: NonNegFloat = 0.02
    color_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.0  # colour: brightness/contrast/saturation x [1-j, 1+j]


class ImageDataConfig(Strict):
    """Labelled images for the diffusion model."""

    kind: Literal["images"] = "images"
    source: str = Field("builtin:digits", description="builtin:digits, an .npz (images, labels) or a class-folder tree")
    image_size: PositiveInt = 8
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    # Class imbalance in the training split: oversample the smaller classes to the largest (seeded
    # repeats, before augmentation), or keep the data and weight each example's loss by
    # N / (classes x its class count). The statistics always report counts per class and split.
    balance: Literal["none", "oversample", "weights"] = "none"
    shard_rows: PositiveInt = 1024
    shard_compression: Literal["none", "lz4", "zstd"] = "none"


# ----------------------------------------------------------------------------- models
class GPTConfig(Strict):
    """Decoder-only Transformer; vocabulary and context length come from the data config."""

    kind: Literal["gpt"] = "gpt"
    preset: str = "custom"
    d_model: PositiveInt = 192
    n_layers: PositiveInt = 4
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt | None = None
    mlp_ratio: PositiveFloat = 4.0
    dropout: Fraction = 0.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    pos_emb: Literal["rope", "learned"] = "rope"
    tie_weights: bool = True
    rope_theta: PositiveFloat = 10000.0
    init: Literal["normal", "xavier", "he"] = "normal"  # normal = GPT-2's N(0, 0.02) with scaled residuals
    norm_impl: Literal["torch", "apex"] = "torch"  # apex = apex.normalization's fused kernels (CUDA)
    mlp_hidden: PositiveInt | None = None  # the MLP's hidden width; None: from mlp_ratio (SwiGLU: 2/3 of it, x64)
    norm_eps: PositiveFloat | None = None  # None: 1e-6 (rmsnorm), 1e-5 (layernorm)
    vocab_size: PositiveInt | None = None  # embedding rows; None: the tokenizer's vocabulary
    # Without vocab_size, the tokenizer's vocabulary rounded up to a multiple of this. The GPU
    # presets use 64: an odd vocabulary (GPT-2's 50,257) sends the output head's three matmuls,
    # the largest of the step, to slow fallback kernels (a quarter of a 1B step on an H200).
    vocab_multiple: PositiveInt = 1
    # A Hugging Face checkpoint folder (Llama architecture: config.json + safetensors) to start
    # from: its config.json sets the architecture fields above (the ones here are then ignored),
    # its weights the initial weights, its tokenizer replaces the one prepare would train.
    init_from: str | None = None

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: `mlp_hidden`, else `mlp_ratio * d_model`, and under SwiGLU two
        thirds of that rounded up to a multiple of 64 (the GELU MLP's parameter count)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = int(self.mlp_ratio * self.d_model)
        return 64 * math.ceil(2 * hidden / 3 / 64) if self.mlp == "swiglu" else hidden

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.d_model // self.n_heads) % 2 and self.pos_emb == "rope":
            raise ValueError("rotary embeddings need an even head dimension")
        return self


class DiffusionProcessConfig(Strict):
    """The DDPM forward process and the sampler used for evaluation."""

    timesteps: PositiveInt = 1000
    schedule: Literal["linear", "cosine"] = "cosine"
    prediction: Literal["eps", "v"] = "eps"
    sample_steps: PositiveInt = 100
    sample_eta: Fraction = 1.0  # 0 = deterministic DDIM, 1 = ancestral (DDPM-like) noise per step
    guidance_scale: NonNegFloat = 1.0
    cond_drop_prob: Fraction = 0.1


class DiTConfig(Strict):
    """Diffusion Transformer with adaLN-Zero conditioning on timestep and class."""

    kind: Literal["dit"] = "dit"
    preset: str = "custom"
    patch_size: PositiveInt = 2
    d_model: PositiveInt = 128
    depth: PositiveInt = 4
    n_heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0
    diffusion: DiffusionProcessConfig = DiffusionProcessConfig()

    @model_validator(mode="after")
    def _heads_divide(self) -> DiTConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class UNetConfig(Strict):
    """DDPM U-Net: residual blocks per resolution, channels base_channels * channel_mults[level]."""

    kind: Literal["unet"] = "unet"
    preset: str = "custom"
    base_channels: PositiveInt = 32
    channel_mults: list[PositiveInt] = Field(default_factory=lambda: [1, 2])
    num_res_blocks: PositiveInt = 1
    dropout: Fraction = 0.0
    diffusion: DiffusionProcessConfig = DiffusionProcessConfig()

    @model_validator(mode="after")
    def _groups_divide(self) -> UNetConfig:
        if self.base_channels % min(8, self.base_channels):
            raise ValueError(f"base_channels ({self.base_channels}) must be a multiple of 8 (group norm)")
        if not self.channel_mults:
            raise ValueError("channel_mults needs at least one level")
        return self


# ----------------------------------------------------------------------------- training
class OptimConfig(Strict):
    """Optimizer and learning-rate schedule.

    Every schedule starts with `warmup_steps` of linear warmup (one-cycle from lr / 25). Decoupled
    weight decay (AdamW) skips biases and norm weights; for the others it is L2 on the same set.
    """

    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    # auto = torch's fused kernel on CUDA, its foreach one on CPU; fused = torch fused (CPU too);
    # apex = apex.optimizers.FusedAdam (adam/adamw; a clear error where apex does not import)
    impl: Literal["auto", "torch", "fused", "apex"] = "auto"
    lr: PositiveFloat = 3e-4
    weight_decay: NonNegFloat = 0.1
    beta1: Fraction = 0.9
    beta2: Fraction = 0.95
    eps: PositiveFloat = 1e-8
    momentum: Fraction = 0.9  # sgd, rmsprop
    nesterov: bool = False  # sgd
    schedule: Literal["cosine", "constant", "step", "exponential", "onecycle", "plateau"] = "cosine"
    warmup_steps: NonNegInt = 50
    min_lr_ratio: Fraction = 0.1  # cosine and one-cycle end at lr * min_lr_ratio
    step_size: PositiveInt = 1000  # step: multiply by gamma every step_size steps
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.5  # step and exponential (per step) decay factor
    plateau_factor: Annotated[float, Field(gt=0, lt=1)] = 0.5  # plateau: multiply lr by this ...
    plateau_patience: PositiveInt = 2  # ... after this many validations without improvement

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov applies to sgd with momentum > 0")
        if self.impl in ("fused", "apex") and self.name not in ("adam", "adamw"):
            raise ValueError(f"impl '{self.impl}' applies to adam and adamw (got name '{self.name}')")
        return self


class TrainerConfig(Strict):
    """Loop settings. The global batch (micro x workers x accumulation) is what the data order keys on."""

    max_steps: PositiveInt = 500
    global_batch_size: PositiveInt = 32
    grad_accum_steps: PositiveInt = 1
    grad_clip: NonNegFloat = 1.0
    log_every: PositiveInt = 25
    ckpt_every: PositiveInt = 100
    keep_last_k: PositiveInt = 2
    max_nonfinite_in_a_row: PositiveInt = 20
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0  # 0 = off; else the exported weights are the EMA
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0  # language model cross-entropy
    eval_every: NonNegInt = 0  # validation loss every N steps (0 = never); needed by plateau and early stopping
    eval_batches: PositiveInt = 4  # global batches of the val split per validation
    early_stop_patience: NonNegInt = 0  # stop after N validations without improvement (0 = off)
    shuffle_window: NonNegInt = 16  # shards whose rows are shuffled together (0 = all: exact global shuffle)
    prefetch_batches: NonNegInt = 2  # batches the reader decodes ahead in a background thread (0 = none)
    # Recompute activations in backward instead of keeping them: none, full (every block), or
    # selective: every `ac_every_k`-th block, only the attention of every block, or `op`: every
    # block keeping its attention and every other matmul output, recomputing the elementwise ops.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    ac_selective: Literal["every_k", "attention", "op"] = "every_k"
    ac_every_k: PositiveInt = 2
    # torch.compile, applied by the strategy: none, blocks (each repeated block; the blocks share
    # one graph, so compile time does not grow with depth) or model (the whole model).
    compile: Literal["none", "blocks", "model"] = "none"
    # With trainer.compile, compile the task's loss too (torchtitan's `compile.components: loss`):
    # for the lm task inductor fuses the upcast of the logits, the log-softmax and the gather, so
    # the fp32 (tokens x vocab) logits and their fp32 gradient are never materialised.
    compile_loss: bool = True
    # Start from these weights instead of a random init (fine-tuning): a safetensors file, or a
    # folder holding model.safetensors (an exported model, or models/<task>). Sharded strategies
    # read it one unit at a time. A checkpoint to resume from still takes precedence.
    init_from: str | None = None
    # The dense peak TFLOP/s of one device that MFU is measured against; None: from the GPU table
    # (pipeline/training/mfu.py), or a GEMM measured at start on CPU.
    peak_tflops: PositiveFloat | None = None

    @model_validator(mode="after")
    def _eval_for_early_stop(self) -> TrainerConfig:
        if self.early_stop_patience and not self.eval_every:
            raise ValueError("early_stop_patience needs eval_every > 0")
        return self


class RegistryConfig(Strict):
    """Which registered model a run becomes, and the rule that moves the `champion` alias."""

    name: str
    metric: str
    greater_is_better: bool = False


class ExportConfig(Strict):
    onnx: bool = True
    onnx_max_abs_diff: PositiveFloat = 1e-3
    # language model only: an int8 (dynamic quantization) ONNX graph for CPU inference, scored
    # against the fp32 graph on `int8_eval_rows` validation rows
    quantize_int8: bool = False
    int8_eval_rows: PositiveInt = 256
    # language model only: a Hugging Face `transformers` folder (export/<task>/hf: config.json,
    # safetensors, tokenizer), checked against our model on validation rows: logits within
    # hf_max_abs_diff (fp32) and 20 greedy tokens equal, or the export fails.
    hf: bool = True
    hf_max_abs_diff: PositiveFloat = 1e-4
    hf_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: init_from's, else float32
    hf_shard_mb: PositiveInt = 2048  # safetensors files above this size are split (with an index)

    @model_validator(mode="after")
    def _int8_needs_onnx(self) -> ExportConfig:
        if self.quantize_int8 and not self.onnx:
            raise ValueError("quantize_int8 quantizes the ONNX graph: it needs onnx true")
        return self


class EvalConfig(Strict):
    max_batches: PositiveInt = 50
    batch_size: PositiveInt = 64
    # where the evaluate stage runs the model: auto takes the machine's GPU when it has one (a 1B
    # model's held-out loss is hours on CPUs), cpu always, cuda or a clear error. Random draws
    # (noise, timesteps, samples) come from CPU generators either way, so devices differ only
    # by floating-point rounding.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample_rows: PositiveInt = 10  # diffusion: rows of the sample grid (one per class up to 10)
    sample_cols: PositiveInt = 8
    samples_per_class: NonNegInt = 30  # diffusion: samples scored by the digit classifier (0 = skip)
    classifier_steps: PositiveInt = 400  # diffusion: training steps of that classifier


class TaskConfig(Strict):
    """One model chain (data -> shards -> train -> evaluate -> export -> register)."""

    data: TextDataConfig | ImageDataConfig = Field(discriminator="kind")
    model: GPTConfig | DiTConfig | UNetConfig = Field(discriminator="kind")
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig

    @model_validator(mode="after")
    def _model_fits_data(self) -> TaskConfig:
        if self.optim.schedule == "plateau" and not self.trainer.eval_every:
            raise ValueError("optim.schedule 'plateau' needs trainer.eval_every > 0")
        pairs = {"text": ("gpt",), "images": ("dit", "unet")}
        if self.model.kind not in pairs[self.data.kind]:
            raise ValueError(f"model kind '{self.model.kind}' cannot train on {self.data.kind} data")
        if self.export.quantize_int8 and self.data.kind != "text":
            raise ValueError("export.quantize_int8 is for the language model (text data) only")
        if getattr(self.model, "init_from", None) and self.trainer.init_from:
            raise ValueError("model.init_from (a Hugging Face checkpoint) and trainer.init_from (weights) both "
                             "name initial weights: set one")
        return self


# ----------------------------------------------------------------------------- runtime
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

    @field_validator("device_memory")
    @classmethod
    def _size(cls, value: int | str | None) -> int | str | None:
        from pipeline.config.sizes import parse_size

        if value is not None:
            parse_size(value)  # kept as written (params.yaml round-trips); the planner parses it again
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
    # compute capability 8.9+; refused before training elsewhere)
    dtype: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"


class TrackingConfig(Strict):
    """Where MLflow runs go. MLFLOW_TRACKING_URI in the environment overrides `uri`."""

    uri: str = "sqlite:///mlruns.db"
    artifact_dir: str = "mlartifacts"
    experiment: str = "pipeline"
    # How long the train stage waits for a tracking server (http[s]://) to answer its health
    # check before it stops with one line; raise it for slow links.
    connect_timeout_s: PositiveFloat = 20.0


class PipelineConfig(Strict):
    seed: NonNegInt = 1337
    tasks: dict[str, TaskConfig]
    cluster: ClusterConfig = ClusterConfig()
    strategy: StrategyConfig = DDPConfig()
    parallel: ParallelConfig = ParallelConfig()
    precision: PrecisionConfig = PrecisionConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _parallel_fits(self) -> PipelineConfig:
        from pipeline.config.elastic import check_elastic
        from pipeline.config.parallel import check_compile, check_parallel
        from pipeline.config.storage import check_storage

        check_parallel(self)
        check_compile(self)
        check_elastic(self)
        check_storage(self)
        return self

    def task(self, name: str) -> TaskConfig:
        if name not in self.tasks:
            raise KeyError(f"unknown task '{name}' (config has: {', '.join(sorted(self.tasks))})")
        return self.tasks[name]
