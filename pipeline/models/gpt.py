"""A GPT-style decoder: pre-norm blocks, rotary or learned positions, SwiGLU or GELU MLP,
attention through `scaled_dot_product_attention` (flash kernels on GPU), optional grouped-query
attention and tied embeddings. Knows nothing of data, strategies or tracking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import GPTConfig
from pipeline.models import generation
from pipeline.models.generation import KVCache


def norm_eps(kind: str, eps: float | None) -> float:
    """`model.norm_eps`, or the default: 1e-6 for RMSNorm (Llama's), 1e-5 for LayerNorm (GPT-2's)."""
    return eps if eps is not None else (1e-6 if kind == "rmsnorm" else 1e-5)


def make_norm(kind: str, dim: int, impl: str = "torch", eps: float | None = None) -> nn.Module:
    """torch's norms, or apex's fused CUDA kernels (same parameters, so weights load either way)."""
    eps = norm_eps(kind, eps)
    if impl == "apex":
        try:
            from apex.normalization import FusedLayerNorm, FusedRMSNorm
        except ImportError as e:
            raise ValueError(f"model.norm_impl: 'apex' was asked for, but apex does not import here ({e}); "
                             "install NVIDIA Apex, or use norm_impl=torch") from e
        return FusedRMSNorm(dim, eps=eps) if kind == "rmsnorm" else FusedLayerNorm(dim, eps=eps)
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) of x (B, H, T, D) by position-dependent angles: the tables'
    first T rows (T, D/2), or per row (B, 1, T, D/2) as they are."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v projections (`wq`, `wk`, `wv`) and output `wo`.

    Separate projections let tensor parallelism split each over the heads (column-wise) and
    `wo` over its input (row-wise). The forward infers the head counts from the projections'
    outputs (`view(b, t, -1, head_dim)`), so it runs unchanged on the local heads a
    column-parallel rank holds.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def forward_cached(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       cache: KVCache, layer: int) -> torch.Tensor:
        """`forward` for generation: x holds positions `cache.pos` onwards, which attend to the
        cached ones and to each other causally. Inference only (no dropout); `forward`, the one
        training and export run, stays as it is."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            pos = cache.positions(t, x.device)  # (t,), or (B, t) for left-padded rows
            cos, sin = rope[0][pos], rope[1][pos]
            if pos.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = cache.mask(t, x.device)
        ks, vs = cache.insert(layer, k, v)
        if cache.pos == 0 and cache.pad is None:  # a prefill: the plain causal attention on the new keys
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        else:  # query i (position pos + i) sees keys up to pos + i: sdpa's is_causal aligns top-left
            y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU, `w2(silu(w1(x)) * w3(x))`, or GELU, `w2(gelu(w1(x)))` (no `w3`): Llama's names."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.hidden = hidden = cfg.mlp_width
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)  # the gate under SwiGLU
        if self.swiglu:
            self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # the value
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


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


def set_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole (unsharded) value into `param`: a plain tensor, or a DTensor (a module that
    tensor parallelism split already), which keeps its own slice. Every rank drew the same
    whole value from the same seed, so no rank needs another's data."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(whole)


def init_rows(weights: list[torch.Tensor], fill: Callable[[torch.Tensor], Any]) -> None:
    """Initialise weights that once were one fused weight (their rows stacked in this order):
    `fill` a tensor of the fused shape, so the random stream and the xavier/he fans are the
    fused layer's, and copy its row slices out. Tensor-parallel (DTensor) weights get their
    slice of the same whole draw, so a split model starts from the unsplit model's weights."""
    first = weights[0]
    if len(weights) == 1 and not hasattr(first, "device_mesh"):
        fill(first)
        return
    rows = [w.shape[0] for w in weights]
    fused = torch.empty(sum(rows), *first.shape[1:], dtype=first.dtype, device=local_device(first))
    fill(fused)
    for w, part in zip(weights, fused.split(rows), strict=True):
        set_whole(w, part)


def init_linear_rows(weights: list[torch.Tensor], scheme: str, std: float) -> None:
    """`init_linear` for weights that once were one fused weight (see `init_rows`): checkpoints
    and runs from before the split start from the same weights."""
    init_rows(weights, lambda w: init_linear(w, scheme, std))


def local_device(t: torch.Tensor) -> torch.device:
    """The device a tensor's data lives on (a DTensor's local shard's)."""
    return t.to_local().device if hasattr(t, "to_local") else t.device


class Block(nn.Module):
    """One pre-norm Transformer block: the unit that strategies shard, initialise and checkpoint."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_impl, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_impl, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise this block alone, in a fixed order (norm1, qkv, wo, norm2, up, w2).

        A sharded strategy calls it on one block at a time (with that block's parameters
        materialised whole), so the random stream, and with it every weight, is the one an
        unsharded `GPT.init_weights` draws. Residual projections are scaled by 1/sqrt(2 * layers)
        under the normal scheme (GPT-2).

        `wq`/`wk`/`wv` and `w3`/`w1` are drawn as the fused `qkv` and `up` weights they once
        were (`init_linear_rows`), so the weights are bit-identical to the fused layout's for
        the same seed under every `model.init`.
        """
        c = self.cfg
        residual_std = 0.02 / math.sqrt(2 * c.n_layers)
        init_norm(self.norm1)
        a, m = self.attn, self.mlp
        init_linear_rows([a.wq.weight, a.wk.weight, a.wv.weight], c.init, 0.02)
        init_linear_rows([a.wo.weight], c.init, residual_std)
        init_norm(self.norm2)
        init_linear_rows([m.w3.weight, m.w1.weight] if m.swiglu else [m.w1.weight], c.init, 0.02)
        init_linear_rows([m.w2.weight], c.init, residual_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward_cached(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       cache: KVCache, layer: int) -> torch.Tensor:
        """`forward` with cached attention (inference: no dropout)."""
        x = x + self.attn.forward_cached(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


# Names of the fused layout (before q/k/v and the MLP's input projections were split), with
# whatever prefix (`blocks.N.`, a wrapper's) comes before them.
_LEGACY_KEY = re.compile(r"(?P<stem>(?:.*\.)?blocks\.\d+\.(?:.*\.)?)(?P<old>attn\.qkv|attn\.proj|mlp\.up|mlp\.down)"
                         r"\.weight$")


def upgrade_legacy_keys(state: dict[str, Any], cfg: GPTConfig, prefix: str = "") -> dict[str, Any]:
    """Rewrite, in place, a state dict of the fused layout (`attn.qkv`, `attn.proj`, `mlp.up`,
    `mlp.down`) into the split one (`attn.wq/wk/wv`, `attn.wo`, `mlp.w1/w3`, `mlp.w2`); keys
    already in the split layout, and keys not starting with `prefix`, are left alone. Returns
    `state`. The split weights are row views of the fused tensors (no copy).

    qkv's rows are [q (n_heads x head_dim) | k (n_kv x head_dim) | v (n_kv x head_dim)]; SwiGLU's
    `up` rows are [value (w3) | gate (w1)], as the fused forward's `a, g = up(x).chunk(2)`.
    """
    head_dim = cfg.d_model // cfg.n_heads
    n_kv = cfg.n_kv_heads or cfg.n_heads
    if not any(k.startswith(prefix) and _LEGACY_KEY.match(k, len(prefix)) for k in state):
        return state
    items = list(state.items())
    state.clear()
    for key, value in items:
        m = _LEGACY_KEY.match(key, len(prefix)) if key.startswith(prefix) else None
        if m is None:
            state[key] = value
            continue
        stem, old = prefix + m["stem"], m["old"]
        if old == "attn.qkv":
            q, k, v = value.split([cfg.n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
            state.update({stem + "attn.wq.weight": q, stem + "attn.wk.weight": k, stem + "attn.wv.weight": v})
        elif old == "attn.proj":
            state[stem + "attn.wo.weight"] = value
        elif old == "mlp.up" and cfg.mlp == "swiglu":
            value_rows, gate_rows = value.chunk(2)
            state.update({stem + "mlp.w3.weight": value_rows, stem + "mlp.w1.weight": gate_rows})
        elif old == "mlp.up":
            state[stem + "mlp.w1.weight"] = value
        else:  # mlp.down
            state[stem + "mlp.w2.weight"] = value
    return state


def _upgrade_legacy_hook(module: GPT, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """`load_state_dict` pre-hook: checkpoints of the fused layout load into the split one."""
    upgrade_legacy_keys(state_dict, module.cfg, prefix)


class GPT(nn.Module):
    """The decoder. `forward` tolerates missing parts, because a pipeline stage is a shallow
    copy of this module that drops what it does not own: without `embed` the input is already
    the previous stage's hidden state (B, T, d_model) (no embedding, positions or embedding
    dropout), without `norm`/`head` the output is the hidden state, and the blocks it does not
    own are `nn.Identity` placeholders (kept so that block indices, and with them parameter
    names, stay those of the whole model), which the forward passes through."""

    # Tensor parallelism, per repeated block (module paths inside each `Block`): q/k/v and the
    # MLP's input projections split column-wise (over heads / hidden units), the output
    # projections row-wise. Paths absent in a config (`mlp.w3` under GELU) are skipped.
    # Embeddings, norms and the head stay replicated.
    tp_plan: ClassVar[dict[str, str]] = {
        "attn.wq": "colwise", "attn.wk": "colwise", "attn.wv": "colwise", "attn.wo": "rowwise",
        "mlp.w1": "colwise", "mlp.w3": "colwise", "mlp.w2": "rowwise",
    }
    # Pipeline parallelism: the block list a pipeline cuts into stages, the root parts only the
    # first stage keeps, and those only the last stage keeps.
    pp_plan: ClassVar[dict[str, Any]] = {"blocks": "blocks", "first": ("embed", "pos"), "last": ("norm", "head")}

    def __init__(self, cfg: GPTConfig, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.max_seq_len = cfg, vocab_size, max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_impl, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_load_state_dict_pre_hook(_upgrade_legacy_hook)
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
        device = self.embed.weight.device if self.embed is not None else self.rope_cos.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) to next-token logits (B, T, vocab).

        A pipeline stage drops the parts it does not own (see the class docstring): without
        `embed`, `idx` is the hidden state (B, T, d_model) of the previous stage; without
        `norm`/`head`, the hidden state is returned as it is."""
        t = idx.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {self.max_seq_len}")
        learned = self.cfg.pos_emb == "learned"
        if self.embed is not None:
            x = self.embed(idx)
            if learned:
                x = x + self.pos(torch.arange(t, device=idx.device))
            x = self.drop(x)
        else:
            x = idx
        rope = None if learned else (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            # (nn.Identity takes no second argument: a stage's placeholder for a block it does not own)
            x = block(x) if isinstance(block, nn.Identity) else block(x, rope)
        if self.norm is not None:
            x = self.norm(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, vocab) of tokens `idx` (B, T) at positions `cache.pos` onwards, whose
        keys and values join the cache. Inference only, on a whole model (not a pipeline stage):
        `generate` uses it to prefill a prompt once and then feed one token per step."""
        start, t = cache.pos, idx.shape[1]
        if start + t > self.max_seq_len:
            raise ValueError(f"{start} cached + {t} new tokens exceed the model's context of {self.max_seq_len}")
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos(cache.positions(t, idx.device))
        rope = None if self.pos is not None else (self.rope_cos, self.rope_sin)
        for layer, block in enumerate(self.blocks):
            x = block.forward_cached(x, rope, cache, layer)
        cache.pos += t
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

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None, min_new_tokens: int = 0, vocab: int | None = None) -> torch.Tensor:
        """Sample continuations of `idx` (B, T): `pipeline.models.generation.generate`."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, generator, eos_id, min_new_tokens,
                                   vocab)

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, generators: list[torch.Generator | None] | None = None,
                       eos_id: int | None = None, min_new_tokens: int = 0,
                       vocab: int | None = None) -> list[list[int]]:
        """Prompts of any lengths in one batch: `pipeline.models.generation.generate_batch`."""
        return generation.generate_batch(self, prompts, max_new_tokens, temperature, top_k, generators, eos_id,
                                         min_new_tokens, vocab)
