"""Typed configuration for every stage.

Hydra composes `configs/` into `params.yaml`; these models validate that file before any
Ray resource is taken. Every model forbids unknown keys, so a misspelt key fails with its
full dotted path instead of being silently ignored.

One module per responsibility (`fields`: the shared base and number types; `data`, `models`,
`training`: a task's sections; `runtime`: cluster, strategies, precision, tracking); this one
holds the two roots, `TaskConfig` and `PipelineConfig`, and re-exports every model, so
`from pipeline.config.schema import X` names any of them.
"""


from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.config.schema.data import AugmentConfig, ImageDataConfig, SplitConfig, TextDataConfig
from pipeline.config.schema.fields import Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Strict
from pipeline.config.schema.models import DiffusionProcessConfig, DiTConfig, GPTConfig, UNetConfig
from pipeline.config.schema.runtime import (
    Backend,
    ClusterConfig,
    DDPConfig,
    DeepSpeedConfig,
    FSDPConfig,
    HorovodConfig,
    ParallelConfig,
    PrecisionConfig,
    StrategyConfig,
    TrackingConfig,
)
from pipeline.config.schema.training import EvalConfig, ExportConfig, OptimConfig, RegistryConfig, TrainerConfig

__all__ = [
    "AugmentConfig", "Backend", "ClusterConfig", "DDPConfig", "DeepSpeedConfig", "DiTConfig", "DiffusionProcessConfig",
    "EvalConfig", "ExportConfig", "FSDPConfig", "Fraction", "GPTConfig", "HorovodConfig", "ImageDataConfig",
    "NonNegFloat", "NonNegInt", "OptimConfig", "ParallelConfig", "PipelineConfig", "PositiveFloat", "PositiveInt",
    "PrecisionConfig", "RegistryConfig", "SplitConfig", "StrategyConfig", "Strict", "TaskConfig", "TextDataConfig",
    "TrackingConfig", "TrainerConfig", "UNetConfig",
]


# the metrics of `eval_metrics` that are better higher (the rest: losses, perplexities, distances)
HIGHER_IS_BETTER = frozenset({"classifier_real_accuracy", "sample_accuracy"})


def eval_metrics(data_kind: str, samples_per_class: int) -> tuple[str, ...]:
    """The metrics the evaluate stage writes to eval.json for a task of `data_kind` (what
    `registry.metric` may name): the language model's loss and perplexity on val and test; the
    denoiser's loss on both, and with `eval.samples_per_class` > 0 the digit classifier's scores of
    its samples (pipeline/evaluation/classifier.py)."""
    if data_kind == "text":
        return "val_loss", "val_perplexity", "test_loss", "test_perplexity"
    scored = ("classifier_real_accuracy", "sample_accuracy", "sample_frechet_distance") if samples_per_class else ()
    return "val_denoise_loss", "test_denoise_loss", *scored


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
        known = eval_metrics(self.data.kind, self.eval.samples_per_class)
        if self.registry.metric not in known:  # (found at the register stage, after training, before)
            raise ValueError(f"registry.metric: '{self.registry.metric}' is not a metric the evaluate stage writes "
                             f"for this task (it writes {', '.join(known)})")
        higher = self.registry.metric in HIGHER_IS_BETTER
        if self.registry.greater_is_better != higher:  # (the worse model would become champion, silently)
            raise ValueError(f"registry.greater_is_better: {str(self.registry.greater_is_better).lower()}, but "
                             f"{self.registry.metric} is better {'higher' if higher else 'lower'}; set "
                             f"registry.greater_is_better: {str(higher).lower()}")
        if self.trainer.activation_checkpointing == "selective" and self.trainer.ac_selective == "attention" \
                and self.model.kind != "gpt":  # (refused by each worker's strategy, after Ray and MLflow)
            raise ValueError(f"trainer.ac_selective: 'attention' checkpoints the blocks' `attn` module, which only "
                             f"the GPT's blocks have (not the {self.model.kind}'s); use every_k, op or "
                             f"activation_checkpointing=full")
        if self.data.kind == "images":  # (every image source is resized to data.image_size)
            process = self.model.diffusion
            if self.eval.guidance_scale > 0 and process.cond_drop_prob == 0:
                raise ValueError("eval.guidance_scale: classifier-free guidance mixes in the unconditional "
                                 "prediction, which only model.diffusion.cond_drop_prob > 0 trains (the null class "
                                 "never sees a gradient at 0); set cond_drop_prob (0.1 is usual) or "
                                 "eval.guidance_scale: 0")
            size = self.data.image_size
            if self.model.kind == "dit" and size % self.model.patch_size:
                raise ValueError(f"data.image_size {size} is not divisible by model.patch_size "
                                 f"{self.model.patch_size}")
            if self.model.kind == "unet" and self.model.base_channels % 8:
                # every level's width (and the up path's concatenations) then divides into GroupNorm's 8 groups
                raise ValueError(f"model.base_channels ({self.model.base_channels}) must be a multiple of 8 "
                                 "(group norm)")
            if self.model.kind == "unet" and size % 2 ** (len(self.model.channel_mults) - 1):
                raise ValueError(f"data.image_size {size} is not divisible by 2^{len(self.model.channel_mults) - 1} "
                                 f"(the U-Net halves it at each of model.channel_mults' levels after the first)")
        if self.export.quantize_int8 and self.data.kind != "text":
            raise ValueError("export.quantize_int8 is for the language model (text data) only")
        if getattr(self.model, "init_from", None) and self.trainer.init_from:
            raise ValueError("model.init_from (a Hugging Face checkpoint) and trainer.init_from (weights) both "
                             "name initial weights: set one")
        return self


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
        if self.strategy.name == "deepspeed" and self.strategy.zero_stage == 0 and self.precision.dtype == "fp16":
            # DeepSpeed 0.19's ZeRO-0 fp16 optimizer divides the gradients by the loss scale that its
            # engine never multiplied the loss by: every update 65536 times too small, clipping never on
            raise ValueError("strategy.zero_stage=0 with precision.dtype=fp16: DeepSpeed's ZeRO-0 fp16 optimizer "
                             "unscales gradients its engine never scaled (updates 65536x too small); use "
                             "strategy.name=ddp (the same layout, with torch's loss scaling), zero_stage 1-3, or bf16")
        if getattr(self.strategy, "backend", "auto") == "nccl" and not self.cluster.use_gpu:
            # (every worker failed to make its process group, and the attempt was retried)
            raise ValueError("strategy.backend=nccl needs cluster.use_gpu=true: NCCL runs between GPUs; CPU workers "
                             "use gloo (strategy.backend=auto picks the one that fits)")
        return self

    def task(self, name: str) -> TaskConfig:
        if name not in self.tasks:
            raise KeyError(f"unknown task '{name}' (config has: {', '.join(sorted(self.tasks))})")
        return self.tasks[name]
