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
        if getattr(self.strategy, "backend", "auto") == "nccl" and not self.cluster.use_gpu:
            # (every worker failed to make its process group, and the attempt was retried)
            raise ValueError("strategy.backend=nccl needs cluster.use_gpu=true: NCCL runs between GPUs; CPU workers "
                             "use gloo (strategy.backend=auto picks the one that fits)")
        return self

    def task(self, name: str) -> TaskConfig:
        if name not in self.tasks:
            raise KeyError(f"unknown task '{name}' (config has: {', '.join(sorted(self.tasks))})")
        return self.tasks[name]
