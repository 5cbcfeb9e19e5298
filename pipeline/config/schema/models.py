"""Model sections: the GPT decoder, the diffusion process, DiT and U-Net."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.schema.fields import (
    Fraction,
    PositiveFloat,
    PositiveInt,
    PresetName,
    Strict,
)


class GPTConfig(Strict):
    """Decoder-only Transformer; vocabulary and context length come from the data config."""

    kind: Literal["gpt"] = "gpt"
    preset: PresetName = "custom"
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


# The sampler's settings, which an older spec (a model folder written before they moved to the
# task's `eval` section) still holds: `without_sampler` takes them out of such a spec.
SAMPLER_KEYS = ("sample_steps", "sample_eta", "guidance_scale")


class DiffusionProcessConfig(Strict):
    """The DDPM forward process the model is trained with. The sampler (steps, eta, guidance) is
    the task's `eval` section's: it does not change the trained weights."""

    timesteps: PositiveInt = 1000
    schedule: Literal["linear", "cosine"] = "cosine"
    prediction: Literal["eps", "v"] = "eps"
    cond_drop_prob: Fraction = 0.1  # label dropout while training: what classifier-free guidance needs

    @model_validator(mode="before")
    @classmethod
    def _sampler_moved(cls, data: Any) -> Any:
        moved = [k for k in SAMPLER_KEYS if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"{moved[0]}: the sampler's settings moved to the task's eval section "
                             f"(eval.{moved[0]}): they are chosen after training and do not retrain the model")
        return data

    @model_validator(mode="after")
    def _trainable(self) -> DiffusionProcessConfig:
        if self.schedule == "linear" and 0.02 * 1000 / self.timesteps >= 1:
            # (DDPM's betas 1e-4..0.02, scaled by 1000/timesteps to keep the same noise level at the end)
            raise ValueError(f"timesteps: the linear schedule needs more than 20 (its largest beta, "
                             f"0.02 x 1000/{self.timesteps}, is not below 1: every image is pure noise and the "
                             "loss is not finite); raise timesteps or use schedule: cosine")
        return self


def without_sampler(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A saved spec's model section without the sampler keys an older spec held under
    `diffusion`, and those keys (the sampler that model was evaluated with)."""
    process = dict(model.get("diffusion") or {})
    legacy = {k: process.pop(k) for k in SAMPLER_KEYS if k in process}
    return ({**model, "diffusion": process} if legacy else model), legacy


class DiTConfig(Strict):
    """Diffusion Transformer with adaLN-Zero conditioning on timestep and class."""

    kind: Literal["dit"] = "dit"
    preset: PresetName = "custom"
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
        if self.d_model % 2:  # the sinusoidal timestep embedding has d_model // 2 frequencies, sin and cos
            raise ValueError(f"d_model ({self.d_model}) must be even (the timestep embedding's sin/cos halves)")
        return self


class UNetConfig(Strict):
    """DDPM U-Net: residual blocks per resolution, channels base_channels * channel_mults[level]."""

    kind: Literal["unet"] = "unet"
    preset: PresetName = "custom"
    base_channels: PositiveInt = 32
    channel_mults: list[PositiveInt] = Field(default_factory=lambda: [1, 2])
    num_res_blocks: PositiveInt = 1
    dropout: Fraction = 0.0
    diffusion: DiffusionProcessConfig = DiffusionProcessConfig()

    @model_validator(mode="after")
    def _groups_divide(self) -> UNetConfig:
        # (a config must give a multiple of 8, TaskConfig checks; a saved spec of a smaller single-level
        # U-Net, which trained, still loads)
        if self.base_channels % min(8, self.base_channels):
            raise ValueError(f"base_channels ({self.base_channels}) must be a multiple of 8 (group norm)")
        if not self.channel_mults:
            raise ValueError("channel_mults needs at least one level")
        return self
