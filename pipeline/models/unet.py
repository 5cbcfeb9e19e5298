"""A small DDPM U-Net (Ho et al. 2020): residual blocks with timestep and class embeddings,
strided-conv downsampling, nearest upsampling and skip connections; no attention (the
images it is sized for are tiny). Same interface as the DiT: (x_t, t, label) -> prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import UNetConfig
from pipeline.models.dit import timestep_embedding


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    # Read by UNet.forward instead of isinstance, so wrapped blocks (activation checkpointing) still get the embedding
    takes_embedding = True

    def __init__(self, cin: int, cout: int, emb: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    @torch.no_grad()
    def init_weights(self) -> None:
        """This block alone: PyTorch's default per layer, then zeros in conv2 so the block starts
        as its skip path."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = image_shape
        levels = len(cfg.channel_mults)
        if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
            raise ValueError(f"image size {h}x{w} is not divisible by 2^{levels - 1} (model.channel_mults)")
        self.cfg, self.image_shape, self.num_classes = cfg, image_shape, num_classes
        base, emb = cfg.base_channels, 4 * cfg.base_channels
        self.t_mlp = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.y_embed = nn.Embedding(num_classes + 1, emb)  # the extra row is "no label" for guidance
        self.inp = nn.Conv2d(c, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for i, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(ch, base * mult, emb, cfg.dropout))
                ch = base * mult
                skips.append(ch)
            if i < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, cfg.dropout), ResBlock(ch, ch, emb, cfg.dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), base * mult, emb, cfg.dropout))
                ch = base * mult
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm, self.out = _norm(ch), nn.Conv2d(ch, c, 3, padding=1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, include_blocks: bool = True) -> None:
        """Initialise in place (also after meta-device construction and `to_empty`): the model's
        own layers (PyTorch's default, the output at zero), then every block in `down`, `mid`
        and `up` in order unless `include_blocks` is False (sharded strategies initialise the
        blocks one at a time, in the same order, so both routes draw the same random stream)."""
        for m in (self.t_mlp[0], self.t_mlp[2], self.y_embed, self.inp, self.out_norm):
            m.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if include_blocks:
            for layers in (self.down, self.mid, self.up):
                for layer in layers:
                    if hasattr(layer, "init_weights"):
                        layer.init_weights()
                    elif hasattr(layer, "reset_parameters"):
                        layer.reset_parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.t_mlp(timestep_embedding(t, self.cfg.base_channels)) + self.y_embed(y)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if getattr(layer, "takes_embedding", False) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if getattr(layer, "takes_embedding", False) else layer(h)
        return self.out(F.silu(self.out_norm(h)))
