"""Per-task training sections: optimizer, trainer loop, evaluation, export, registry."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.schema.fields import (
    Decay,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Strict,
)


class OptimConfig(Strict):
    """Optimizer and learning-rate schedule.

    Every schedule starts with `warmup_steps` of linear warmup (one-cycle from lr / 25). Decoupled
    weight decay (AdamW) skips biases and norm weights; for the others it is L2 on the same set.
    """

    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    # auto = torch's fused kernel on CUDA, its per-parameter loop on CPU; fused = torch fused (CPU too);
    # apex = apex.optimizers.FusedAdam (adam/adamw; a clear error where apex does not import)
    impl: Literal["auto", "torch", "fused", "apex"] = "auto"
    lr: PositiveFloat = 3e-4
    weight_decay: NonNegFloat = 0.1
    beta1: Decay = 0.9  # in [0, 1) (torch refuses 1)
    beta2: Decay = 0.95  # (rmsprop: its smoothing constant alpha)
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
    # The weights the run hands on (models/<task>, then export): those of its last step, or of the
    # step with the lowest validation loss so far (kept by rank 0 and carried in every checkpoint).
    # With ema_decay, the EMA weights at that step; the validation loss is the trained weights'.
    export_weights: Literal["last", "best"] = "last"
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
        if self.export_weights == "best" and not 0 < self.eval_every <= self.max_steps:
            raise ValueError(f"export_weights=best needs a validation before the end: eval_every "
                             f"({self.eval_every}) must be between 1 and max_steps ({self.max_steps})")
        return self


class RegistryConfig(Strict):
    """Which registered model a run becomes, and the rule that moves the `champion` alias."""

    name: str
    metric: str
    greater_is_better: bool = False

    @field_validator("name")
    @classmethod
    def _registrable_name(cls, v: str) -> str:
        """MLflow's own rule (`mlflow.utils.validation._validate_model_name` and the file store's),
        checked here so `pipeline validate` names the key, not a traceback at the register stage."""
        if not v.strip():
            raise ValueError("must not be empty (the MLflow registered model name)")
        if bad := sorted({c for c in v if c in "/\\:%"}):
            raise ValueError(f"MLflow registered model names cannot contain {' or '.join(map(repr, bad))}")
        if v == "." or v.startswith(".."):
            raise ValueError("MLflow registered model names cannot be '.' or start with '..'")
        return v


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
    # The logged MLflow model is loaded back, before anything is registered, in a fresh Python that
    # sees only the distributions its requirements.txt needs and its own code/ (as a serving image
    # would), and must predict what it predicted here. false: in the exporting process instead (for
    # an environment whose packages carry no file record to link, such as some conda installs).
    load_alone: bool = True

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
    # diffusion: the sampler evaluation scores and the exported model serves by default. Chosen
    # after training (a run is not retrained to try another), so kept out of the model's config.
    sample_steps: PositiveInt = 100  # DDIM steps (capped at the model's diffusion.timesteps)
    sample_eta: Fraction = 1.0  # 0 = deterministic DDIM, 1 = ancestral (DDPM-like) noise per step
    guidance_scale: NonNegFloat = 1.0  # classifier-free guidance weight (0 = conditional only)
