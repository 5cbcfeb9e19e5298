"""A GPT-style decoder: pre-norm blocks, rotary or learned positions, SwiGLU or GELU MLP,
attention through `scaled_dot_product_attention` (flash kernels on GPU), optional grouped-query
attention and tied embeddings. Knows nothing of data, strategies or tracking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import GPTConfig


def make_norm(kind: str, dim: int, impl: str = "torch") -> nn.Module:
    """torch's norms, or apex's fused CUDA kernels (same parameters, so weights load either way)."""
    if impl == "apex":
        try:
            from apex.normalization import FusedLayerNorm, FusedRMSNorm
        except ImportError as e:
            raise ValueError(f"model.norm_impl: 'apex' was asked for, but apex does not import here ({e}); "
                             "install NVIDIA Apex, or use norm_impl=torch") from e
        return FusedRMSNorm(dim, eps=1e-6) if kind == "rmsnorm" else FusedLayerNorm(dim)
    return nn.RMSNorm(dim, eps=1e-6) if kind == "rmsnorm" else nn.LayerNorm(dim)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) of x (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, *(2 * [self.n_kv * self.head_dim])], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:  # keep parameter count close to the GELU MLP of the same ratio
            hidden = 64 * math.ceil(2 * hidden / 3 / 64)
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            a, g = h.chunk(2, dim=-1)
            return self.down(F.silu(g) * a)
        return self.down(F.gelu(h))


def init_linear(weight: torch.Tensor, scheme: str, std: float) -> None:
    """`model.init` for one linear weight: normal (N(0, std)), xavier or he."""
    if scheme == "xavier":
        nn.init.xavier_normal_(weight)
    elif scheme == "he":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    else:
        nn.init.normal_(weight, mean=0.0, std=std)


def init_norm(norm: nn.Module) -> None:
    """Norms start as the identity: weight 1, bias 0 (where they have them)."""
    for name, p in norm.named_parameters():
        nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)


class Block(nn.Module):
    """One pre-norm Transformer block: the unit that strategies shard, initialise and checkpoint."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_impl)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_impl)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise this block alone, in a fixed order (norm1, qkv, proj, norm2, up, down).

        A sharded strategy calls it on one block at a time (with that block's parameters
        materialised whole), so the random stream, and with it every weight, is the one an
        unsharded `GPT.init_weights` draws. Residual projections are scaled by 1/sqrt(2 * layers)
        under the normal scheme (GPT-2).
        """
        c = self.cfg
        residual_std = 0.02 / math.sqrt(2 * c.n_layers)
        init_norm(self.norm1)
        init_linear(self.attn.qkv.weight, c.init, 0.02)
        init_linear(self.attn.proj.weight, c.init, residual_std)
        init_norm(self.norm2)
        init_linear(self.mlp.up.weight, c.init, 0.02)
        init_linear(self.mlp.down.weight, c.init, residual_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.max_seq_len = cfg, vocab_size, max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_impl)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, include_blocks: bool = True) -> None:
        """Initialise in place: the model's own parameters and buffers, then (unless
        `include_blocks` is False) every block through its own `init_weights`, in order.

        A model built on the meta device is materialised by the strategy: DDP calls this once on
        the whole model; FSDP2 and ZeRO-3 call it with `include_blocks=False` and then each
        block's `init_weights`, one unit at a time with only that unit whole, and keep their
        shard of it. Both orders draw the same random stream, so the weights are identical.
        Embeddings are N(0, 0.02) under every `model.init`; the head follows `model.init`.
        """
        if self.cfg.tie_weights and self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight  # a plain `to_empty` unties them
        self.init_buffers()
        nn.init.normal_(self.embed.weight, mean=0.0, std=0.02)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, mean=0.0, std=0.02)
        init_norm(self.norm)
        if not self.cfg.tie_weights:
            init_linear(self.head.weight, self.cfg.init, 0.02)
        if include_blocks:
            for block in self.blocks:
                block.init_weights()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-persistent RoPE tables (`to_empty` leaves them uninitialised)."""
        cos, sin = rope_tables(self.max_seq_len, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta)
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) to next-token logits (B, T, vocab)."""
        t = idx.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {self.max_seq_len}")
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=idx.device))
        x = self.drop(x)
        rope = None if self.pos is not None else (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() if not self.cfg.tie_weights else 0
            n -= self.pos.weight.numel() if self.pos is not None else 0
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (weights, forward + backward) + 12 L T d (attention scores)."""
        n = sum(p.numel() for n_, p in self.named_parameters() if not n_.startswith(("embed", "pos")))
        if self.cfg.tie_weights:
            n += self.embed.weight.numel()  # the tied head matmul still costs its FLOPs
        return 6.0 * n + 12.0 * self.cfg.n_layers * seq_len * self.cfg.d_model

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations; temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.max_seq_len :])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
