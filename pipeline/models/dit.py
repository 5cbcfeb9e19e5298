"""Diffusion Transformer (Peebles & Xie 2023): patchify, Transformer blocks with adaLN-Zero
conditioning on timestep and class embeddings, and a linear un-patchify head.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import DiTConfig
from pipeline.models.gpt import init_rows


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero Transformer block. Attention has separate `wq`/`wk`/`wv` projections, and the
    forward infers the head count from their outputs, so tensor parallelism can split them over
    the heads (and `proj` over its input) and each rank runs this code on its local heads."""

    def __init__(self, d: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d // heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.wq = nn.Linear(d, d)
        self.wk = nn.Linear(d, d)
        self.wv = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    @torch.no_grad()
    def init_weights(self) -> None:
        """This block alone (a sharded strategy initialises one block at a time): xavier linear
        layers, zero biases, and adaLN-Zero (the block starts as the identity). q/k/v are drawn
        as the one fused (3d, d) weight they once were, so the weights (xavier's fans included)
        are bit-identical to the fused layout's for the same seed."""
        init_rows([self.wq.weight, self.wk.weight, self.wv.weight], nn.init.xavier_uniform_)
        for m in (self.wq, self.wk, self.wv):
            nn.init.zeros_(m.bias)
        for m in (self.proj, self.mlp[0], self.mlp[2], self.ada[-1]):
            init_rows([m.weight], nn.init.xavier_uniform_)  # (a tensor-parallel shard: its slice of a whole draw)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.ada[-1].weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), sh1, sc1)
        q = self.wq(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + g1.unsqueeze(1) * self.proj(a)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


# A fused-layout key (before q/k/v were split), with whatever prefix comes before it.
_LEGACY_KEY = re.compile(r"(?P<stem>(?:.*\.)?blocks\.\d+\.(?:.*\.)?)qkv\.(?P<kind>weight|bias)$")


def upgrade_legacy_keys(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rewrite, in place, a DiT state dict of the fused layout (`blocks.N.qkv.weight`/`.bias`,
    rows [q | k | v]) into the split one (`blocks.N.wq/wk/wv`); other keys, and keys not
    starting with `prefix`, are left alone. Returns `state` (the split tensors are row views)."""
    if not any(k.startswith(prefix) and _LEGACY_KEY.match(k, len(prefix)) for k in state):
        return state
    items = list(state.items())
    state.clear()
    for key, value in items:
        m = _LEGACY_KEY.match(key, len(prefix)) if key.startswith(prefix) else None
        if m is None:
            state[key] = value
            continue
        stem, kind = prefix + m["stem"], m["kind"]
        for name, part in zip(("wq", "wk", "wv"), value.chunk(3), strict=True):
            state[f"{stem}{name}.{kind}"] = part
    return state


def _upgrade_legacy_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """`load_state_dict` pre-hook: checkpoints of the fused layout load into the split one."""
    upgrade_legacy_keys(state_dict, prefix)


class DiT(nn.Module):
    # Tensor parallelism, per repeated block (module paths inside each `DiTBlock`): q/k/v and the
    # MLP's input layer split column-wise, `proj` and the MLP's output layer row-wise. The
    # adaLN modulation, patch embedding, conditioning and output layers stay replicated.
    tp_plan: ClassVar[dict[str, str]] = {
        "wq": "colwise", "wk": "colwise", "wv": "colwise", "proj": "rowwise", "mlp.0": "colwise", "mlp.2": "rowwise",
    }

    def __init__(self, cfg: DiTConfig, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = image_shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by model.patch_size {p}")
        self.cfg, self.image_shape, self.num_classes = cfg, image_shape, num_classes
        self.grid = (h // p, w // p)
        d = cfg.d_model
        self.patch = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], d))
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(num_classes + 1, d)  # the extra row is "no label" for guidance
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, p * p * c)
        self.register_load_state_dict_pre_hook(_upgrade_legacy_hook)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, include_blocks: bool = True) -> None:
        """Initialise in place (also after meta-device construction and `to_empty`): the model's
        own parameters, then each block through its own `init_weights` unless `include_blocks`
        is False (sharded strategies initialise blocks one at a time, in the same order, so
        both routes draw the same random stream)."""
        for m in (self.t_mlp[0], self.t_mlp[2]):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        # Patch embedding as a linear layer over flattened patches (as in the DiT reference).
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        # adaLN-Zero: the output starts at zero.
        for m in (self.final_ada[-1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if include_blocks:
            for blk in self.blocks:
                blk.init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, (gh, gw), c = self.cfg.patch_size, self.grid, self.image_shape[0]
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.t_mlp(timestep_embedding(t, self.cfg.d_model)) + self.y_embed(y)
        for blk in self.blocks:
            h = blk(h, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        h = self.out(modulate(self.final_norm(h), shift, scale))
        return h.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)
